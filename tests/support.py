"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def make_image(size=(64, 64), seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random-colour picture (tanh gradients): something a model can fit."""
    generator = torch.Generator().manual_seed(seed)
    w, h = size
    ys = torch.linspace(-1, 1, h).view(h, 1)
    xs = torch.linspace(-1, 1, w).view(1, w)
    channels = []
    for _ in range(3):
        a, b, c = torch.rand(3, generator=generator) * 2 - 1
        channels.append(torch.tanh(2 * a * xs + 2 * b * ys + c))
    pixels = ((torch.stack(channels, -1) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    return image.convert(mode) if mode != "RGB" else image


def write_image(path: Path, size=(64, 64), seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(size, seed, mode).save(path)
    return path


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: to assert that nothing was written or changed."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def state_fingerprint(module: torch.nn.Module) -> dict[str, tuple]:
    """Names, dtypes, bit patterns and requires_grad of every parameter and buffer, plus module types."""
    out = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        out[name] = (tensor.dtype, tuple(tensor.shape), tensor.detach().cpu().numpy().tobytes(),
                     getattr(tensor, "requires_grad", False))
    out["__modules__"] = tuple((n, type(m).__name__) for n, m in module.named_modules())
    return out


def make_trainer(binding, config, layout, *, callbacks=None, **flags):
    """prepare_run then a Trainer on the binding: the two steps the CLI takes around loading the model."""
    from dreamartist_ext.preparation import prepare_run
    from dreamartist_ext.trainer import Trainer

    prepared = prepare_run(config, layout, size_multiple=binding.size_multiple, **flags)
    return Trainer(binding, prepared, callbacks=callbacks)


def random_conditioning(binding, rows: int, generator: torch.Generator):
    """Identical random conditioning rows in the binding's own form (a context tensor, or SDXL's dict)."""
    width = binding.unet.config.cross_attention_dim
    context = torch.randn(1, 77, width, generator=generator).repeat(rows, 1, 1)
    if binding.family != "sdxl":
        return context
    pooled = torch.randn(1, binding.text_encoder_2.config.projection_dim, generator=generator).repeat(rows, 1)
    return {"crossattn": context, "text_embeds": pooled,
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(rows, 1)}


def conditioning_row(cond, row: int) -> torch.Tensor:
    """One row of a conditioning as a flat tensor (context, then SDXL's pooled vector)."""
    if isinstance(cond, dict):
        return torch.cat([cond["crossattn"][row].flatten(), cond["text_embeds"][row].flatten()])
    return cond[row].flatten()
