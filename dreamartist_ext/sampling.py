"""Image generation for the standalone path: DDIM with classifier-free guidance routed by branch.

The WebUI uses its own samplers (our inference hook routes the adapters there); this sampler serves the CLI's
``generate`` command and training previews, and does exactly what the WebUI does with a learned pair: the
positive prompt (with ``name``) through the positive adapters, the negative prompt (with ``name-neg``) through
the negative adapters, combined as eps_neg + g (eps_pos - eps_neg).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .losses import guided_noise, predicted_clean_latents, predicted_noise
from .model import NEG, POS, DiffusionBinding, concat_conditioning


@dataclass
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    count: int = 1


def ddim_timesteps(num_timesteps: int, steps: int, trailing: bool = False) -> list[int]:
    """Evenly spaced training timesteps, high to low: "leading" spacing as SD 1.x inference uses (from 0 up),
    or "trailing" (from the last timestep down), which a zero-terminal-SNR model needs to start at pure noise."""
    if steps >= num_timesteps:
        return list(range(num_timesteps))[::-1]
    if trailing:
        return [round(num_timesteps - 1 - i * num_timesteps / steps) for i in range(steps)]
    stride = num_timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


@torch.no_grad()
def generate(binding: DiffusionBinding, request: SampleRequest) -> list[Image.Image]:
    if request.width % binding.size_multiple or request.height % binding.size_multiple:
        raise ValueError(f"image size must be a multiple of {binding.size_multiple} for this model")
    count = request.count
    size = (request.height, request.width)
    cond = binding.encode_prompts([request.prompt] * count, [POS] * count, size)
    uncond = binding.encode_prompts([request.negative_prompt] * count, [NEG] * count, size)
    context = concat_conditioning([uncond, cond])
    branches = [NEG] * count + [POS] * count
    shape = (count, binding.latent_channels, request.height // binding.vae_downscale,
             request.width // binding.vae_downscale)
    generator = torch.Generator().manual_seed(request.seed)
    latents = torch.randn(shape, generator=generator).to(binding.device)
    alphas = binding.alphas_cumprod
    timesteps = ddim_timesteps(binding.num_timesteps, request.steps, trailing=binding.zero_terminal_snr)
    guidance = torch.full((count,), float(request.guidance), device=binding.device)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((2 * count,), t, device=binding.device, dtype=torch.long)
        output = binding.predict(torch.cat([latents, latents]), t_batch, context, branches).float()
        out_neg, out_pos = output.chunk(2)
        out_hat = guided_noise(out_neg, out_pos, guidance)  # the training objective's own formulas
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=alphas.device)
        a_t = alphas[t].expand(count)
        clean = predicted_clean_latents(latents, out_hat, a_t, binding.prediction_type)
        eps_hat = predicted_noise(latents, out_hat, a_t, binding.prediction_type)
        latents = a_prev.sqrt() * clean + (1 - a_prev).sqrt() * eps_hat
    pixels = binding.decode_latents(latents).float().clamp(-1, 1)
    return [to_pil(p) for p in pixels]


def generate_with_concepts(binding: DiffusionBinding, concepts, request: SampleRequest,
                           adapter_weight: float = 1.0) -> list[Image.Image]:
    """:func:`generate` with learned concepts loaded: their words usable in the prompts, their adapters (scaled
    by ``adapter_weight``) routed per branch; the model is left as it was."""
    from .adapters import BranchAdapters
    from .concepts import composed_adapters, words_of

    layers = composed_adapters(concepts, {c.name: adapter_weight for c in concepts})
    adapters = BranchAdapters.from_layers(binding.adapter_sites(), layers) if layers else None
    binding.adapters = adapters
    try:
        with binding.learned_words(words_of(concepts)):
            return generate(binding, request)
    finally:
        binding.adapters = None
        if adapters is not None:
            adapters.detach()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    array = ((pixels.detach().cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB")
