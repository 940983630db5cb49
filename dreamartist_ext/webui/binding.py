"""The engine on the model AUTOMATIC1111 has loaded (``shared.sd_model``): SD 1.x, SD 2.x and SDXL.

Prompts go through the host's own hijacked text encoders, so ``name`` and ``name-neg`` are injected by the host's
embedding database exactly as at inference (on SDXL one embedding holds a tensor per encoder, and the host's
EmbeddingsWithFixes puts each into its encoder); the U-Net is the host's diffusion model with its cross-attention
optimisation left on; the decode for the reconstruction loss goes through ``first_stage_model.decode`` (the
host's ``decode_first_stage`` runs without gradient). Everything we change is put back on exit.

Where the families differ:
- SD 1.x: ``cond_stage_model`` wraps a transformers CLIPTextModel (CLIP-L).
- SD 2.x: it wraps OpenCLIP ViT-H, whose text tower runs sequence-first with a fused nn.MultiheadAttention:
  adapters go on the attention output and the MLP (OPEN_CLIP_TEXT_TARGETS) and are routed one branch per call.
  v-prediction models (768-v) train in v space.
- SDXL: ``conditioner`` (sgm GeneralConditioner) holds CLIP-L and OpenCLIP bigG (pooled) plus the size
  embedders; it runs frozen embedders under no_grad, so the two text embedders are marked trainable for the run.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import files, lora_keys
from ..model import (TEXT_TARGETS, UNET_TARGETS, AdapterSite, Conditioning, DiffusionBinding, ModelInfo, TextEncoder,
                     TokenTable, UnsupportedModelError, linear_paths, native_size)
from . import host

log = logging.getLogger(__name__)

# OpenCLIP module names -> the transformers CLIPTextModel names kohya files (and the host's Lora loader) use
_OPEN_CLIP_LAYER = re.compile(r"resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)")
_OPEN_CLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def model_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    return "sd2" if getattr(sd_model, "is_sd2", False) else "sd1"


def check_supported(sd_model) -> None:
    """Raise UnsupportedModelError with a plain sentence for models we cannot train on."""
    if sd_model is None:
        raise UnsupportedModelError("no Stable Diffusion model is loaded yet; wait for it to load and try again")
    if hasattr(sd_model, "forge_objects"):
        raise UnsupportedModelError("WebUI Forge is not supported yet (it runs the model under inference mode)")
    if getattr(sd_model, "is_sdxl_inpaint", False):
        raise UnsupportedModelError("SDXL inpainting models are not supported; load an SDXL text-to-image checkpoint")
    if getattr(sd_model, "is_sdxl", False):
        kinds = [type(getattr(e, "wrapped", e)).__name__ for e in sd_model.conditioner.embedders]
        if "FrozenCLIPEmbedder" not in kinds or "FrozenOpenCLIPEmbedder2" not in kinds:
            raise UnsupportedModelError("this SDXL model lacks one of the two text encoders (an SDXL refiner?); "
                                        "load an SDXL base-architecture checkpoint")
    elif not hasattr(sd_model, "cond_stage_model"):
        raise UnsupportedModelError("this model has no text encoder DreamArtist can use")
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", None)
    if key != "crossattn":
        raise UnsupportedModelError(
            f"this model's conditioning is {key!r}; inpainting, depth and instruct-pix2pix models are not supported"
        )


class _HostEncoder:
    """One of the host's hijacked text embedders, with what the engine reads from it."""

    def __init__(self, embedder, key: str, *, open_clip: bool) -> None:
        self.embedder = embedder  # tokenize() gives ids without start/end; id_end the end token
        self.open_clip = open_clip
        if open_clip:
            self.transformer: nn.Module = embedder.wrapped.model.transformer
            layer = embedder.wrapped.model.token_embedding
        else:
            self.transformer = embedder.wrapped.transformer  # transformers CLIPTextModel
            layer = self.transformer.get_input_embeddings()
        self.table: nn.Embedding = getattr(layer, "wrapped", layer)  # under the host's EmbeddingsWithFixes
        self.info = TextEncoder(key, self.table.embedding_dim)

    def token_table(self) -> TokenTable:
        return TokenTable(self.table.weight, lambda text: self.embedder.tokenize([text])[0], self.embedder.id_end)

    def adapter_paths(self, *, skip_last: bool) -> tuple[str, ...]:
        """Linear layers adapters may go on (relative to ``transformer``); ``skip_last`` drops the last layer,
        which a penultimate-layer encoder never runs."""
        if self.open_clip:
            paths = [p for p in linear_paths(self.transformer, tuple(_OPEN_CLIP_TO_HF))
                     if _OPEN_CLIP_LAYER.fullmatch(p)]
            last = len(self.transformer.resblocks) - 1
            prefix = f"resblocks.{last}."
        else:
            paths = list(linear_paths(self.transformer, TEXT_TARGETS))
            last = self.transformer.config.num_hidden_layers - 1
            prefix = f"text_model.encoder.layers.{last}."
        return tuple(p for p in paths if not (skip_last and p.startswith(prefix)))

    def hf_path(self, path: str) -> str:
        """The transformers CLIPTextModel path of one of :meth:`adapter_paths` (what kohya keys name)."""
        if not self.open_clip:
            return path
        match = _OPEN_CLIP_LAYER.fullmatch(path)
        if match is None:
            raise ValueError(f"{path!r} is not an OpenCLIP text layer DreamArtist adapts")
        return f"text_model.encoder.layers.{match[1]}.{_OPEN_CLIP_TO_HF[match[2]]}"


class WebuiBinding(DiffusionBinding):
    def __init__(self, sd_model) -> None:
        super().__init__()
        check_supported(sd_model)
        self.sd_model = sd_model
        self.family = model_family(sd_model)
        self.unet = sd_model.model.diffusion_model
        self.vae = sd_model.first_stage_model
        if self.family == "sdxl":
            embedders = {type(e.wrapped).__name__: e for e in sd_model.conditioner.embedders if hasattr(e, "wrapped")}
            clip_l, clip_g = embedders["FrozenCLIPEmbedder"], embedders["FrozenOpenCLIPEmbedder2"]
            self.text_encoders = [_HostEncoder(clip_l, "clip_l", open_clip=False),
                                  _HostEncoder(clip_g, "clip_g", open_clip=True)]
        else:
            self.text_encoders = [_HostEncoder(sd_model.cond_stage_model,
                                               "clip_h" if self.family == "sd2" else "clip_l",
                                               open_clip=self.family == "sd2")]
        self.encoders = tuple(e.info for e in self.text_encoders)
        self.one_branch_per_text_call = any(e.open_clip for e in self.text_encoders)
        self.prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.native_size = native_size(self.family, self.prediction_type)
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

    def _token_tables(self) -> list[TokenTable]:
        return [e.token_table() for e in self.text_encoders]

    def host_vector(self, tensor: torch.Tensor):
        """A word's row as the host's Embedding holds it: the tensor, or SDXL's {'clip_l': .., 'clip_g': ..}."""
        if len(self.encoders) == 1:
            return tensor
        return files.split_by_encoder(tensor, self.encoders)

    def _install_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        from modules.textual_inversion.textual_inversion import Embedding

        db = host.embedding_db()
        for word, tensor in vectors.items():
            if tensor.dim() != 2 or tensor.shape[1] != self.token_dim:
                raise ValueError(f"{word!r} has shape {tuple(tensor.shape)}, this model needs [n, {self.token_dim}]")
            self._replaced.setdefault(word, db.word_embeddings.get(word))
            embedding = Embedding(self.host_vector(tensor), word)
            embedding.shape, embedding.vectors = tensor.shape[1], tensor.shape[0]
            db.register_embedding(embedding, self.sd_model)

    def _remove_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        db = host.embedding_db()
        for word in vectors:
            previous = self._replaced.pop(word, None)
            db.register_embedding_by_name(previous, self.sd_model, word)

    def _encode(self, prompts: Sequence[str], image_size: tuple[int, int]) -> Conditioning:
        if self.family != "sdxl":
            return self.sd_model.cond_stage_model(list(prompts))
        # what sd_models_xl.get_learned_conditioning builds, with the training size and no crop
        height, width = image_size
        rows = len(prompts)
        sizes = dict(device=self.device, dtype=torch.float32)
        batch = {
            "txt": list(prompts),
            "original_size_as_tuple": torch.tensor([height, width], **sizes).repeat(rows, 1),
            "crop_coords_top_left": torch.tensor([0, 0], **sizes).repeat(rows, 1),
            "target_size_as_tuple": torch.tensor([height, width], **sizes).repeat(rows, 1),
        }
        for embedder in self.sd_model.conditioner.embedders:
            embedder.ucg_rate = 0.0  # as the host sets it on every call: no random prompt dropping
        return self.sd_model.conditioner(batch)

    # -- U-Net and VAE ------------------------------------------------------------------------------------------

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if isinstance(cond, dict):
            cond = {key: value.to(self.dtype) for key, value in cond.items()}
        else:
            cond = cond.to(self.dtype)
        return self.sd_model.apply_model(latents.to(self.dtype), timesteps, cond)

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The posterior's moments, as ldm's and sgm's AutoencoderKL compute them (sgm's inference wrapper only
        # returns a sample).
        moments = self.vae.quant_conv(self.vae.encoder(pixels.to(self.device, next(self.vae.parameters()).dtype)))
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean * self.latent_scale_factor, std * self.latent_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / self.latent_scale_factor).to(vae_dtype))

    # -- adapters and training switches -------------------------------------------------------------------------

    def adapter_sites(self) -> list[AdapterSite]:
        layout = self.unet_layout
        if self.family == "sdxl":  # kohya's SDXL files keep the sgm U-Net names

            def unet_prefix(path: str) -> str:
                return lora_keys.kohya_prefix("unet", path)
        else:

            def unet_prefix(path: str) -> str:
                return lora_keys.kohya_prefix("unet", lora_keys.compvis_to_diffusers_unet(path, layout))

        sites = [AdapterSite("unet", self.unet, linear_paths(self.unet, UNET_TARGETS), unet_prefix)]
        if self.family == "sdxl":
            clip_l, clip_g = self.text_encoders
            root = nn.ModuleDict({"te1": clip_l.transformer, "te2": clip_g.transformer})
            # clip_l is read at its penultimate layer; clip_g's last layer feeds the pooled vector
            paths = tuple(f"te1.{p}" for p in clip_l.adapter_paths(skip_last=True)) + tuple(
                f"te2.{p}" for p in clip_g.adapter_paths(skip_last=False))

            def text_prefix(path: str) -> str:
                encoder, _, rest = path.partition(".")
                return lora_keys.kohya_prefix(encoder, (clip_l if encoder == "te1" else clip_g).hf_path(rest))

            sites.append(AdapterSite("te", root, paths, text_prefix, sequence_first=("te2",)))
        else:
            (encoder,) = self.text_encoders
            # SD 2.x reads OpenCLIP-H at its penultimate layer: the last resblock never runs
            paths = encoder.adapter_paths(skip_last=encoder.open_clip)
            sites.append(AdapterSite("te", encoder.transformer, paths,
                                     lambda path: lora_keys.kohya_prefix("te", encoder.hf_path(path)),
                                     sequence_first=("",) if encoder.open_clip else ()))
        return sites

    def trainable_roots(self) -> list[nn.Module]:
        # The host leaves every U-Net weight requiring grad; freezing them saves the memory and time the
        # built-in trainer spends on gradients it never uses (flags are restored afterwards).
        return [self.sd_model]

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        """The host model as training needs it: no LoRA left over from the last generation, an attention
        implementation whose backward pass is fast (see :func:`host.training_attention`), and on SDXL the text
        embedders marked trainable (sgm's conditioner runs frozen ones under no_grad: no gradient would reach
        the pair) with sgm's own reentrant checkpointing off."""
        released = host.release_host_networks()
        switches: list[tuple[object, str, object]] = []
        if self.family == "sdxl":
            switches += [(e.embedder, "is_trainable", True) for e in self.text_encoders]
        # sgm/ldm checkpointing differentiates the frozen weights and drops our routing; ours replaces it
        switches += [(m, "checkpoint", False) for m in self.unet.modules() if getattr(m, "checkpoint", None) is True]
        switches += [(m, "use_checkpoint", False) for m in self.unet.modules()
                     if getattr(m, "use_checkpoint", None) is True]
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in switches]
        try:
            for obj, name, value in switches:
                setattr(obj, name, value)
            with host.training_attention():
                yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
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
        return ModelInfo(name=name, hash=short, architecture=self.family)
