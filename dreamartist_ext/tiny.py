"""A tiny Stable-Diffusion-architecture model with random weights.

Same classes and wiring as SD 1.x (CLIP text encoder, cross-attention U-Net, 8x VAE), tiny widths, so the real
code paths run on a CPU in seconds. It knows nothing: its pictures are noise-like. Used by ``--demo`` and the
tests; no download involved (the tokenizer is a byte-level BPE vocabulary written here).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKEN_DIM = 32
START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The printable stand-in characters byte-level BPE uses for the 256 byte values (GPT-2/CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


MERGES = (("t", "h"), ("th", "e</w>"), ("a", "r"), ("i", "n"), ("o", "f</w>"), ("o", "n</w>"))


def vocabulary() -> list[str]:
    """Every byte (alone and word-final), a few common merges, then the start and end tokens."""
    alphabet = _byte_alphabet()
    return alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in MERGES] + [START, END]


def write_tokenizer(folder: Path) -> Path:
    """Files of a CLIP tokenizer over :func:`vocabulary`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = vocabulary(), MERGES
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "bos_token": START, "eos_token": END, "unk_token": END,
                    "pad_token": END, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    )
    return folder


def build_tiny_components(seed: int = 0):
    """(unet, vae, text_encoder) with random weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokens = vocabulary()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TOKEN_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 32, 32),  # four levels keep SD's 8x latent downscale
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TOKEN_DIM,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(tokens),
                max_position_embeddings=77,
                bos_token_id=tokens.index(START),
                eos_token_id=tokens.index(END),
                pad_token_id=tokens.index(END),
            )
        )
    return unet, vae, text_encoder


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a complete diffusers Stable Diffusion folder with a tiny random model; returns the folder."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    folder = Path(folder)
    unet, vae, text_encoder = build_tiny_components(seed)
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.eos_token_id == text_encoder.config.eos_token_id, "tokenizer and text encoder disagree"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.31.0",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )
    return folder
