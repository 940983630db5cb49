"""The engine on the model AUTOMATIC1111 has loaded (``shared.sd_model``).

Prompts go through the host's own hijacked text encoder, so ``name`` and ``name-neg`` are injected by the host's
embedding database exactly as at inference; the U-Net is the host's diffusion model with its cross-attention
optimisation left on; the decode for the reconstruction loss goes through ``first_stage_model.decode`` (the
host's ``decode_first_stage`` runs without gradient). Everything we change is put back on exit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import lora_keys
from ..model import (TEXT_TARGETS, UNET_TARGETS, AdapterSite, Conditioning, DiffusionBinding, ModelInfo, TextEncoder,
                     UnsupportedModelError, linear_paths)
from . import host

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
        self.encoders = (TextEncoder("clip_l", self.token_table.embedding_dim),)
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

    def _install_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        from modules.textual_inversion.textual_inversion import Embedding

        db = host.embedding_db()
        for word, tensor in vectors.items():
            if tensor.dim() != 2 or tensor.shape[1] != self.token_dim:
                raise ValueError(f"{word!r} has shape {tuple(tensor.shape)}, this model needs [n, {self.token_dim}]")
            self._replaced.setdefault(word, db.word_embeddings.get(word))
            embedding = Embedding(tensor, word)
            embedding.shape, embedding.vectors = tensor.shape[1], tensor.shape[0]
            db.register_embedding(embedding, self.sd_model)

    def _remove_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        db = host.embedding_db()
        for word in vectors:
            previous = self._replaced.pop(word, None)
            db.register_embedding_by_name(previous, self.sd_model, word)

    def _encode(self, prompts: Sequence[str], image_size: tuple[int, int]) -> Conditioning:
        return self.clip(list(prompts))

    # -- U-Net and VAE ------------------------------------------------------------------------------------------

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, context: Conditioning) -> torch.Tensor:
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
        implementation whose backward pass is fast (see :func:`host.training_attention`)."""
        released = host.release_host_networks()
        try:
            with host.training_attention():
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
