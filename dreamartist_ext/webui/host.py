"""Every touch of the AUTOMATIC1111 host's state, in one place.

Folders (where the host looks for embeddings, LoRA files and templates), its embedding database, the built-in
Lora extension's networks, the cross-attention optimisation, its settings (``shared.opts``), its sampler names and
its cached conditionings. The other modules of this package ask here instead of reaching into ``modules``
themselves; ``modules`` is imported inside the functions, so this module loads outside the host too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError
from ..outputs import OutputLayout

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp", ".jxl", ".avif")

# -- settings (Settings > DreamArtist) -------------------------------------------------------------------------------

SETTINGS_SECTION = ("dreamartist", "DreamArtist")
WEIGHT_OPTION = "dreamartist_adapter_weight"
AUTO_NEGATIVE_OPTION = "dreamartist_auto_negative"
TRAINING_ATTENTION_OPTION = "dreamartist_training_attention"
DEFAULT_WEIGHT = 1.0
MAX_WEIGHT = 2.0
TRAINING_ATTENTION_CHOICES = ("Automatic", "Host setting")


def add_settings() -> None:
    """on_ui_settings callback: the DreamArtist section of the host's Settings."""
    import gradio as gr
    from modules import shared

    shared.opts.add_option(WEIGHT_OPTION, shared.OptionInfo(
        DEFAULT_WEIGHT, "Default weight of a learned word's adapters in prompts", gr.Slider,
        {"minimum": 0.0, "maximum": MAX_WEIGHT, "step": 0.05}, section=SETTINGS_SECTION))
    shared.opts.add_option(AUTO_NEGATIVE_OPTION, shared.OptionInfo(
        True, "Add name-neg to the negative prompt when a learned name is in the prompt (default of the "
              "txt2img/img2img option)", section=SETTINGS_SECTION))
    shared.opts.add_option(TRAINING_ATTENTION_OPTION, shared.OptionInfo(
        TRAINING_ATTENTION_CHOICES[0], "Attention while training", gr.Radio,
        {"choices": list(TRAINING_ATTENTION_CHOICES)}, section=SETTINGS_SECTION,
    ).info("Automatic: PyTorch scaled dot product (the host's 'sdp') during training when the host uses a split "
           "attention (InvokeAI, Doggettx, sub-quadratic, V1), whose backward pass is slow; put back afterwards"))


def default_weight() -> float:
    from modules import shared

    return float(getattr(shared.opts, WEIGHT_OPTION, DEFAULT_WEIGHT))


def default_auto_negative() -> bool:
    from modules import shared

    return bool(getattr(shared.opts, AUTO_NEGATIVE_OPTION, True))


def training_attention_choice() -> str:
    from modules import shared

    return shared.opts.data.get(TRAINING_ATTENTION_OPTION, TRAINING_ATTENTION_CHOICES[0])


# -- folders --------------------------------------------------------------------------------------------------------


def host_layout(name: str) -> OutputLayout:
    """Where the host looks: its embeddings folder, its LoRA folder (under ``dreamartist/``), and a log folder."""
    from modules import paths_internal, shared

    lora_root = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths_internal.models_path, "Lora")
    return OutputLayout(
        embeddings_dir=Path(shared.cmd_opts.embeddings_dir),
        lora_dir=Path(lora_root) / "dreamartist",
        log_dir=Path(paths_internal.data_path) / "dreamartist" / name,
    )


def host_folders() -> tuple[Path, Path]:
    """The host's embeddings folder and our folder in its LoRA folder (where learned concepts live)."""
    layout = host_layout("")
    return layout.embeddings_dir, layout.lora_dir


def templates_dir() -> Path:
    """The host's textual_inversion_templates folder (it may not exist)."""
    from modules import shared

    return Path(shared.cmd_opts.textual_inversion_templates_dir)


def template_dirs() -> tuple[Path, ...]:
    """Folders where a template file name may be looked up: the host's templates folder, when it exists."""
    folder = templates_dir()
    return (folder,) if folder.is_dir() else ()


# -- the embedding database and the Lora extension's networks ---------------------------------------------------


def embedding_db():
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db


def loaded_embedding_files() -> dict[str, Path | None]:
    """Every embedding name the host knows (loaded or skipped) or has on disk in its folder -> its file."""
    db = embedding_db()
    out: dict[str, Path | None] = {}
    for name, embedding in itertools.chain(db.word_embeddings.items(), db.skipped_embeddings.items()):
        out[name] = Path(embedding.filename) if getattr(embedding, "filename", None) else None
    folder, _ = host_folders()
    if folder.is_dir():
        for path in folder.rglob("*"):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and not path.name.startswith("."):
                out.setdefault(path.stem, path)
    return out


def lora_extension():
    """The built-in Lora extension's ``networks`` module, or None outside the host or without it."""
    try:
        import networks  # extensions-builtin/Lora (in sys.modules once the host has loaded it)
    except ImportError:
        return None
    return networks if hasattr(networks, "list_available_networks") else None


def lora_files() -> dict[str, Path | None]:
    """Every LoRA the built-in extension lists -> its file."""
    networks = lora_extension()
    if networks is None:
        return {}
    return {name: Path(entry.filename) for name, entry in getattr(networks, "available_networks", {}).items()}


def refresh_host_lists() -> None:
    """Reload the embedding database (forced: files were replaced in place) and the Lora extension's list."""
    embedding_db().load_textual_inversion_embeddings(force_reload=True)
    networks = lora_extension()
    if networks is not None:
        networks.list_available_networks()
    invalidate_cond_cache()


def release_host_networks() -> bool:
    """Forget the built-in Lora extension's networks from the last generation, so training sees the base model
    (its patched forward restores the original weights when no network is wanted)."""
    networks = lora_extension()
    loaded = getattr(networks, "loaded_networks", None)
    if not loaded:
        return False
    loaded.clear()
    return True


def settle_host_networks(sd_model) -> None:
    """Take out LoRA weights the built-in Lora extension merged into the model for the last generation.

    Training runs on the base model anyway (the binding releases those networks, and the extension restores the
    weights lazily on the next forward); doing it now makes the before/after fingerprints comparable."""
    networks = lora_extension()
    if not release_host_networks():
        return
    with torch.no_grad():  # the host's U-Net weights require grad; the extension's own restore runs under no_grad
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_apply_weights(module)


# -- attention ------------------------------------------------------------------------------------------------------

# Host optimisations that train well as they are; the split ones (InvokeAI, Doggettx, sub-quadratic, V1) slice
# attention in Python loops that the backward pass replays slice by slice.
FAST_BACKWARD = ("xformers", "sdp", "sdp-no-mem")


def current_attention() -> str:
    """The name of the host's attention optimisation now ("None" when it runs none)."""
    from modules import sd_hijack

    optimizer = sd_hijack.current_optimizer
    return optimizer.name if optimizer is not None else "None"


def attention_patches() -> tuple[tuple[str, str], ...]:
    """The host's attention optimiser and the class-level forwards it patches (to check they come back)."""
    import ldm.modules.attention
    import ldm.modules.diffusionmodules.model

    return (
        ("optimizer", current_attention()),
        ("CrossAttention.forward", ldm.modules.attention.CrossAttention.forward.__qualname__),
        ("AttnBlock.forward", ldm.modules.diffusionmodules.model.AttnBlock.forward.__qualname__),
    )


@contextlib.contextmanager
def training_attention() -> Iterator[None]:
    """Train with the host's own "sdp" optimisation (PyTorch scaled-dot-product attention) when the host runs a
    split attention, then put the host's choice back.

    The split optimisations save memory at inference but their backward is slow: on CPU (where the host picks
    InvokeAI) a 512 px SD1.5 DreamArtist step took 35.7 s and 13.4 GiB with it, 24.0 s and 8.6 GiB with sdp
    (bench/run.py). The setting "Host setting", an optimiser already in FAST_BACKWARD, or attention optimisation
    turned off keep the host's choice."""
    from modules import sd_hijack

    previous = sd_hijack.current_optimizer
    wanted = training_attention_choice()
    sdp = next((o for o in sd_hijack.optimizers if o.name == "sdp"), None)
    if wanted != "Automatic" or sdp is None or previous is None or previous.name in FAST_BACKWARD:
        yield
        return
    sd_hijack.model_hijack.apply_optimizations(sdp.title())
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations(previous.title())


# -- generation -----------------------------------------------------------------------------------------------------


def invalidate_cond_cache(p=None) -> None:
    """Forget the host's cached conds: their cache key is the prompt text, which knows nothing about adapters or
    embedding values that changed under the same text."""
    from modules import processing

    caches = [processing.StableDiffusionProcessing.cached_c, processing.StableDiffusionProcessing.cached_uc,
              processing.StableDiffusionProcessingTxt2Img.cached_hr_c,
              processing.StableDiffusionProcessingTxt2Img.cached_hr_uc]
    # p's lists are the class lists unless an earlier p.close() replaced those (persistent_cond_cache off)
    caches += [getattr(p, name, None) for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")]
    for cache in caches:
        if isinstance(cache, list) and cache:
            cache[0] = None


def sampler_and_scheduler(name: str | None) -> tuple[str, str]:
    """The host's sampler and scheduler for a preview sampler name (None = the host's default); both are given
    to the host explicitly, so it has nothing to "autocorrect" (and warn about). Unknown names -> ConfigError."""
    from modules import sd_samplers

    if name:
        canonical = sd_samplers.samplers_map.get(name.lower())
        if canonical is not None:
            name = canonical
        else:  # old style "<sampler> <scheduler>", e.g. "DPM++ 2M Karras"
            sampler, scheduler = sd_samplers.get_sampler_and_scheduler(name, None, convert_automatic=False)
            if not name.lower().startswith(sampler.lower() + " "):
                known = ", ".join(sorted(sd_samplers.all_samplers_map))
                raise ConfigError(f"unknown preview sampler {name!r}; available: {known}")
            return sampler, scheduler
    return sd_samplers.get_sampler_and_scheduler(name, None, convert_automatic=False)
