"""The engine on the model AUTOMATIC1111 has loaded (``shared.sd_model``).

Prompts go through the host's own hijacked text encoder, so ``name`` and ``name-neg`` are injected by the host's
embedding database exactly as at inference; the U-Net is the host's diffusion model with its cross-attention
optimisation left on; the decode for the reconstruction loss goes through ``first_stage_model.decode`` (the
host's ``decode_first_stage`` runs without gradient). Everything we change is put back on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from . import lora_keys
from .model import (TEXT_TARGETS, UNET_TARGETS, AdapterSite, DiffusionBinding, ModelInfo, UnsupportedModelError,
                    linear_paths)
from .outputs import OutputLayout

log = logging.getLogger(__name__)



def check_supported(sd_model) -> None:
    """Raise UnsupportedModelError with a plain sentence for models we cannot train on yet."""
    if sd_model is None:
        raise UnsupportedModelError("no Stable Diffusion model is loaded yet; wait for it to load and try again")
    if getattr(sd_model, "is_sdxl", False):
        raise UnsupportedModelError("SDXL models are not supported by DreamArtist yet; load an SD 1.x checkpoint")
    if getattr(sd_model, "is_sd2", False):
        raise UnsupportedModelError("SD 2.x models are not supported by DreamArtist yet; load an SD 1.x checkpoint")
    if hasattr(sd_model, "forge_objects"):
        raise UnsupportedModelError("WebUI Forge is not supported yet (it runs the model under inference mode)")
    if not hasattr(sd_model, "cond_stage_model"):
        raise UnsupportedModelError("this model has no text encoder DreamArtist can use")
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", None)
    if key != "crossattn":
        raise UnsupportedModelError(
            f"this model's conditioning is {key!r}; inpainting and instruct-pix2pix models are not supported yet"
        )


def host_layout(name: str) -> OutputLayout:
    """Where the host looks: its embeddings folder, its LoRA folder (under ``dreamartist/``), and a log folder."""
    from modules import paths_internal, shared

    lora_root = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths_internal.models_path, "Lora")
    return OutputLayout(
        embeddings_dir=Path(shared.cmd_opts.embeddings_dir),
        lora_dir=Path(lora_root) / "dreamartist",
        log_dir=Path(paths_internal.data_path) / "dreamartist" / name,
    )


class WebuiBinding(DiffusionBinding):
    def __init__(self, sd_model) -> None:
        super().__init__()
        check_supported(sd_model)
        self.sd_model = sd_model
        self.clip = sd_model.cond_stage_model  # the host's hijacked wrapper (injects embeddings)
        self.text_model = self.clip.wrapped.transformer  # transformers CLIPTextModel
        self.unet = sd_model.model.diffusion_model
        self.vae = sd_model.first_stage_model
        embedding_layer = self.text_model.get_input_embeddings()
        self.token_table: nn.Embedding = getattr(embedding_layer, "wrapped", embedding_layer)
        self.token_dim = self.token_table.embedding_dim
        self.device = next(self.unet.parameters()).device
        self.dtype = next(self.unet.parameters()).dtype
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().to(self.device, torch.float32)
        self.latent_scale_factor = float(sd_model.scale_factor)
        self.vae_downscale = 8
        self.unet_layout = lora_keys.UnetLayout.from_ldm_config(
            self.unet.channel_mult, self.unet.num_res_blocks, self.unet.attention_resolutions
        )
        self.size_multiple = self.vae_downscale * 2 ** (self.unet_layout.levels - 1)
        self._replaced: dict[str, object] = {}

    # -- text ---------------------------------------------------------------------------------------------------

    def token_vectors(self, text: str) -> torch.Tensor:
        ids = self.clip.tokenize([text])[0]
        return self.token_table.weight[torch.tensor(ids, dtype=torch.long, device=self.token_table.weight.device)
                                       ].detach().float()

    def end_token_vector(self) -> torch.Tensor:
        return self.token_table.weight[self.clip.id_end].detach().float()

    def embedding_table_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.token_table.weight.detach().float()
        return table.mean(0), table.std(0)

    def _database(self):
        from modules import sd_hijack

        return sd_hijack.model_hijack.embedding_db

    def _install_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        from modules.textual_inversion.textual_inversion import Embedding

        db = self._database()
        for word, tensor in vectors.items():
            if tensor.dim() != 2 or tensor.shape[1] != self.token_dim:
                raise ValueError(f"{word!r} has shape {tuple(tensor.shape)}, this model needs [n, {self.token_dim}]")
            self._replaced.setdefault(word, db.word_embeddings.get(word))
            embedding = Embedding(tensor, word)
            embedding.shape, embedding.vectors = tensor.shape[1], tensor.shape[0]
            db.register_embedding(embedding, self.sd_model)

    def _remove_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        db = self._database()
        for word in vectors:
            previous = self._replaced.pop(word, None)
            db.register_embedding_by_name(previous, self.sd_model, word)

    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.clip(list(prompts))

    # -- U-Net and VAE ------------------------------------------------------------------------------------------

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.sd_model.apply_model(latents.to(self.dtype), timesteps, context.to(self.dtype))

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, next(self.vae.parameters()).dtype))
        return dist.mean * self.latent_scale_factor, dist.std * self.latent_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / self.latent_scale_factor).to(vae_dtype))

    # -- adapters and training switches -------------------------------------------------------------------------

    def adapter_sites(self) -> list[AdapterSite]:
        layout = self.unet_layout

        def unet_prefix(path: str) -> str:
            return lora_keys.kohya_prefix("unet", lora_keys.compvis_to_diffusers_unet(path, layout))

        return [
            AdapterSite("unet", self.unet, linear_paths(self.unet, UNET_TARGETS), unet_prefix),
            AdapterSite("te", self.text_model, linear_paths(self.text_model, TEXT_TARGETS),
                        lambda path: lora_keys.kohya_prefix("te", path)),
        ]

    def trainable_roots(self) -> list[nn.Module]:
        # The host leaves every U-Net weight requiring grad; freezing them saves the memory and time the
        # built-in trainer spends on gradients it never uses (flags are restored afterwards).
        return [self.sd_model]

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        """The host model as training needs it: no LoRA left over from the last generation, and an attention
        implementation whose backward pass is fast (see :func:`training_attention`)."""
        released = _release_host_networks()
        try:
            with training_attention():
                yield
        finally:
            if released:
                log.info("DreamArtist: LoRA networks of the previous generation will be re-applied when asked for")

    def checkpointed_modules(self, part: str) -> list[nn.Module]:
        root, block = (self.unet, "BasicTransformerBlock") if part == "unet" else (self.vae.decoder, "ResnetBlock")
        return [m for m in root.modules() if type(m).__name__ == block]

    def model_info(self) -> ModelInfo:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        name = getattr(info, "name_for_extra", None) or getattr(info, "model_name", None) or "unknown"
        short = getattr(info, "shorthash", None) or ""
        if not short and info is not None and hasattr(info, "calculate_shorthash"):
            with contextlib.suppress(Exception):
                short = info.calculate_shorthash() or ""
        return ModelInfo(name=name, hash=short)


SETTINGS_SECTION = ("dreamartist", "DreamArtist")
TRAINING_ATTENTION_OPTION = "dreamartist_training_attention"
TRAINING_ATTENTION_CHOICES = ("Automatic", "Host setting")
# Host optimisations that train well as they are; the split ones (InvokeAI, Doggettx, sub-quadratic, V1) slice
# attention in Python loops that the backward pass replays slice by slice.
FAST_BACKWARD = ("xformers", "sdp", "sdp-no-mem")


def attention_patches() -> tuple[tuple[str, str], ...]:
    """The host's attention optimiser and the class-level forwards it patches (to check they come back)."""
    import ldm.modules.attention
    import ldm.modules.diffusionmodules.model
    from modules import sd_hijack

    optimizer = sd_hijack.current_optimizer
    return (
        ("optimizer", optimizer.name if optimizer is not None else "None"),
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
    from modules import sd_hijack, shared

    previous = sd_hijack.current_optimizer
    wanted = shared.opts.data.get(TRAINING_ATTENTION_OPTION, TRAINING_ATTENTION_CHOICES[0])
    sdp = next((o for o in sd_hijack.optimizers if o.name == "sdp"), None)
    if wanted != "Automatic" or sdp is None or previous is None or previous.name in FAST_BACKWARD:
        yield
        return
    sd_hijack.model_hijack.apply_optimizations(sdp.title())
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations(previous.title())


def add_settings() -> None:
    import gradio as gr
    from modules import shared

    shared.opts.add_option(TRAINING_ATTENTION_OPTION, shared.OptionInfo(
        TRAINING_ATTENTION_CHOICES[0], "Attention while training", gr.Radio,
        {"choices": list(TRAINING_ATTENTION_CHOICES)}, section=SETTINGS_SECTION,
    ).info("Automatic: PyTorch scaled dot product (the host's 'sdp') during training when the host uses a split "
           "attention (InvokeAI, Doggettx, sub-quadratic, V1), whose backward pass is slow; put back afterwards"))


def _release_host_networks() -> bool:
    """Forget the built-in Lora extension's networks from the last generation, so training sees the base model
    (its patched forward restores the original weights when no network is wanted)."""
    try:
        import networks  # extensions-builtin/Lora, on sys.path inside the host
    except ImportError:
        return False
    loaded = getattr(networks, "loaded_networks", None)
    if not loaded:
        return False
    loaded.clear()
    return True
