"""Test helper (runs in the test process, not in the host): a DreamArtist concept written straight into a host's
folders with the engine's files API - embeddings plus LoRA adapters with known, non-zero weights - so the
integration tests need no training run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from dreamartist_ext import __version__, files, lora_keys
from dreamartist_ext.names import negative_name
from dreamartist_ext.model import TEXT_TARGETS, UNET_TARGETS

UNET_KEY = "model.diffusion_model."
TEXT_KEY = "cond_stage_model.transformer."
TEXT_LAYERS = TEXT_KEY + "text_model.encoder.layers."


def adapter_shapes(checkpoint: Path, config: Path, text_layers: int = 4) -> dict[str, tuple[int, int]]:
    """kohya prefix -> (out, in) of every Linear layer our adapters target in the host's checkpoint: the whole
    U-Net, and the first ``text_layers`` text-encoder layers (fewer layers to wrap keeps the tests quick)."""
    params = yaml.safe_load(config.read_text())["model"]["params"]["unet_config"]["params"]
    layout = lora_keys.UnetLayout.from_ldm_config(params["channel_mult"], params["num_res_blocks"],
                                                  params["attention_resolutions"])
    shapes = {}
    with safe_open(str(checkpoint), framework="pt") as handle:
        for key in handle.keys():
            if not key.endswith(".weight"):
                continue
            path = key[:-len(".weight")]
            shape = tuple(handle.get_slice(key).get_shape())
            if len(shape) != 2:
                continue
            if path.startswith(UNET_KEY) and path.endswith(UNET_TARGETS):
                unet_path = path[len(UNET_KEY):]
                prefix = lora_keys.kohya_prefix("unet", lora_keys.compvis_to_diffusers_unet(unet_path, layout))
            elif path.startswith(TEXT_LAYERS) and path.endswith(TEXT_TARGETS):
                if int(path[len(TEXT_LAYERS):].split(".")[0]) >= text_layers:
                    continue
                prefix = lora_keys.kohya_prefix("te", path[len(TEXT_KEY):])
            else:
                continue
            shapes[prefix] = shape
    return shapes


@dataclass
class WrittenConcept:
    name: str
    layers: dict[str, dict[str, files.LoraLayer]]  # branch -> prefix -> layer
    paths: list[Path]


def write_concept(data_dir: Path, name: str, shapes: dict[str, tuple[int, int]] | None, *, seed: int,
                  unet_scale: float = 2.0, text_scale: float = 0.3, rank: int = 4, vectors: int = 2) -> WrittenConcept:
    """``name`` / ``name-neg`` embeddings in ``<data>/embeddings`` and, when ``shapes`` is given, positive and
    negative adapters on all those layers in ``<data>/models/Lora/dreamartist`` (``*_scale``: size of the
    adapters' output relative to their input; the tiny U-Net needs larger ones to change its output clearly)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = data_dir / "embeddings"
    lora_dir = data_dir / "models" / "Lora" / "dreamartist"
    embeddings.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, word in (("positive", name), ("negative", negative_name(name))):
        meta = {"name": word, "role": role, "partner": negative_name(name) if role == "positive" else name,
                "step": 0, "dreamartist_version": __version__, "adapters": shapes is not None}
        vectors_ = torch.randn(vectors, 768, generator=generator) * 0.3
        paths.append(files.save_embedding(embeddings / f"{word}.safetensors", vectors_, meta))
    layers: dict[str, dict[str, files.LoraLayer]] = {}
    if shapes is not None:
        for branch, word in (("pos", name), ("neg", negative_name(name))):
            layers[branch] = {
                prefix: files.LoraLayer(
                    down=torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5,
                    up=torch.randn(fan_out, rank, generator=generator) / rank ** 0.5
                    * (unet_scale if prefix.startswith("lora_unet_") else text_scale),
                    alpha=float(rank) / 2,
                )
                for prefix, (fan_out, fan_in) in shapes.items()
            }
            paths.append(files.save_lora(lora_dir / f"{word}.safetensors", layers[branch], {"name": word}))
    return WrittenConcept(name, layers, paths)


def expected_delta(concepts: list[tuple[WrittenConcept, float]], branch: str, prefix: str) -> torch.Tensor:
    """sum_i w_i * alpha_i / rank_i * up_i @ down_i: what the composed adapter of ``branch`` must add."""
    total = None
    for concept, weight in concepts:
        layer = concept.layers[branch][prefix]
        delta = layer.up @ layer.down * (layer.alpha / layer.rank) * weight
        total = delta if total is None else total + delta
    return total
