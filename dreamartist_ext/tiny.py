"""Tiny Stable-Diffusion-architecture models with random weights, one per family.

Same classes and wiring as the real ones, tiny widths, so the real code paths run on a CPU in seconds:
- sd1: CLIP text encoder (quick_gelu), cross-attention U-Net, 8x VAE, epsilon prediction;
- sd2: OpenCLIP-style text encoder (gelu), linear-projection transformers, v-prediction (as SD 2.x 768-v);
- sdxl: two text encoders (the second with a projection for the pooled vector, read at the penultimate layer),
  a U-Net with text/time micro-conditioning and deeper transformers on its lower level, as SDXL base (whose
  first level has no attention; the full-size layout is checked in test_lora_keys).
They know nothing: their pictures are noise-like. Used by ``--demo`` and the tests; no download involved (the
tokenizer is a byte-level BPE vocabulary written here).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKEN_DIM = 32
SDXL_SECOND_DIM = 48  # clip_g's stand-in: another width than clip_l's, so a wrong slice cannot pass unseen
FAMILIES = ("sd1", "sd2", "sdxl")
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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """``word`` split by byte-pair merges of the given ranks, as CLIP's tokenizer splits it."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def merges_for(words: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """:data:`MERGES`, then merges that make each of ``words`` a single token (lower-case ASCII words)."""
    merges = list(MERGES)
    for word in words:
        ranks = {pair: i for i, pair in enumerate(merges)}
        parts = _bpe(word, ranks)
        while len(parts) > 1:  # later merges rank lower, so words merged before keep their own splits
            merges.append((parts[0], parts[1]))
            parts[:2] = [parts[0] + parts[1]]
    return tuple(merges)


def vocabulary(words: tuple[str, ...] = ()) -> list[str]:
    """Every byte (alone and word-final), the merges' tokens (``words`` whole among them), then the start and
    end tokens."""
    alphabet = _byte_alphabet()
    merged = list(dict.fromkeys("".join(pair) for pair in merges_for(words)))
    return alphabet + [c + "</w>" for c in alphabet] + merged + [START, END]


def write_tokenizer(folder: Path, pad_token: str = END, words: tuple[str, ...] = (),
                    max_length: int = 77) -> Path:
    """Files of a CLIP tokenizer over :func:`vocabulary` (SDXL's second tokenizer pads with "!"); ``words``
    become single tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = vocabulary(words), merges_for(words)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "bos_token": START, "eos_token": END, "unk_token": END,
                    "pad_token": pad_token, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    )
    return folder


def _text_config(width: int, hidden_act: str, **extra):
    from transformers import CLIPTextConfig

    tokens = vocabulary()
    return CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokens), max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=tokens.index(START), eos_token_id=tokens.index(END), pad_token_id=tokens.index(END), **extra)


def build_tiny_components(seed: int = 0, family: str = "sd1") -> dict:
    """The model's modules with random weights drawn from ``seed``: unet, vae, text_encoder (and, for sdxl,
    text_encoder_2)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            time_dim = 8
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                transformer_layers_per_block=(1, 2), cross_attention_dim=TOKEN_DIM + SDXL_SECOND_DIM,
                attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=32,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + SDXL_SECOND_DIM,
            )
        else:
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=TOKEN_DIM, attention_head_dim=8, norm_num_groups=32,
                use_linear_projection=family == "sd2",
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
            scaling_factor=0.13025 if family == "sdxl" else 0.18215,
        )
        parts = {"unet": unet, "vae": vae,
                 "text_encoder": CLIPTextModel(_text_config(TOKEN_DIM, "gelu" if family == "sd2" else "quick_gelu"))}
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                _text_config(SDXL_SECOND_DIM, "gelu", projection_dim=SDXL_SECOND_DIM))
    return parts


def save_tiny_model(folder: str | Path, seed: int = 0, family: str = "sd1") -> Path:
    """Write a complete diffusers folder with a tiny random model of ``family``; returns the folder."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    folder = Path(folder)
    parts = build_tiny_components(seed, family)
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.eos_token_id == parts["text_encoder"].config.eos_token_id, "tokenizer and text encoder disagree"
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", "DDPMScheduler"]}
    if family == "sdxl":
        write_tokenizer(folder / "tokenizer_2", pad_token="!")
        components.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                          tokenizer_2=["transformers", "CLIPTokenizer"])
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    ).save_pretrained(folder / "scheduler")
    pipeline = {"sdxl": "StableDiffusionXLPipeline"}.get(family, "StableDiffusionPipeline")
    extra = {} if family == "sdxl" else {"safety_checker": [None, None], "feature_extractor": [None, None],
                                         "requires_safety_checker": False}
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": pipeline, "_diffusers_version": "0.31.0", **components, **extra}, indent=2))
    return folder
