"""The engine on diffusers components: the standalone CLI, the demo and the tests.

Learned words are injected the way the WebUI does it: the prompt is tokenized with the word's name replaced by
``n`` placeholder tokens, and a forward hook on the token-embedding layer writes the learned vectors into those
positions, so gradients reach them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from . import lora_keys
from .errors import InvalidInput
from .model import (OPEN_CLIP_TEXT_TARGETS, PREDICTION_TYPES, TEXT_TARGETS, UNET_TARGETS, AdapterSite, Conditioning,
                    DiffusionBinding, ModelInfo, TextEncoder, TokenTable, UnsupportedModelError, linear_paths,
                    native_size)

log = logging.getLogger(__name__)


def check_model_files(model: str | Path, config: str | Path | None = None) -> None:
    """Refuse (InvalidInput) a model path that cannot be loaded, before spending time on loading it."""
    path = Path(model)
    if path.is_dir():
        if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
            raise InvalidInput(f"{path} is not a diffusers Stable Diffusion folder (no unet/ or text_encoder/)")
    elif path.is_file():
        if config is None:
            raise InvalidInput(
                f"{path.name} is a single-file checkpoint: pass --config (its .yaml, or a diffusers folder)")
        if not Path(config).exists():
            raise InvalidInput(f"model config {config} does not exist")
    else:
        raise InvalidInput(f"model {path} does not exist")


@dataclass
class _Encoder:
    """One text encoder and its tokenizer, with where its slice of a learned word's row lies."""

    model: nn.Module
    tokenizer: object
    info: TextEncoder
    offset: int  # this encoder's columns in a word's [n, token_dim] row: offset .. offset + info.dim
    penultimate: bool  # SDXL reads the second-to-last hidden state; SD 1.x/2.x the final (normed) one

    @property
    def table(self) -> nn.Embedding:
        return self.model.get_input_embeddings()


def native_size_of(model: str | Path, config: str | Path | None = None) -> int:
    """The family's side length read from the model's config files alone (before loading, so a run is validated
    at the size it will train at): 1024 SDXL, 768 SD 2.x-v, else 512. Unknown layouts give 512."""
    source = Path(model) if Path(model).is_dir() else (Path(config) if config is not None else None)
    if source is None or not source.exists():
        return 512
    return native_size(*_family_of_config(source))


def _family_of_config(config: Path) -> tuple[str, str]:
    """(family, prediction type) a diffusers folder or an original LDM/sgm yaml describes, read without loading:
    what :func:`_family_of` and the scheduler tell once the model is loaded."""
    if config.is_dir():

        def read(name: str) -> dict:
            try:
                return json.loads((config / name).read_text())
            except (OSError, ValueError):
                return {}

        prediction = read("scheduler/scheduler_config.json").get("prediction_type", "epsilon")
        if (config / "text_encoder_2").is_dir() or "XL" in read("model_index.json").get("_class_name", ""):
            return "sdxl", prediction
        return ("sd2" if read("text_encoder/config.json").get("hidden_act") == "gelu" else "sd1"), prediction
    text = config.read_text(errors="replace")
    v_prediction = bool(re.search(r"parameterization:\s*[\"']?v\b", text)) or "VScaling" in text
    prediction = "v_prediction" if v_prediction else "epsilon"
    if "sgm." in text and "DiffusionEngine" in text:
        return "sdxl", prediction
    return ("sd2" if "FrozenOpenCLIPEmbedder" in text else "sd1"), prediction


class DiffusersBinding(DiffusionBinding):
    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        alphas_cumprod: torch.Tensor,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        prediction_type: str = "epsilon",
        name: str = "diffusers model",
        model_hash: str = "",
    ) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is not None:
                module.eval()
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        if prediction_type not in PREDICTION_TYPES:
            raise UnsupportedModelError(f"the scheduler's prediction type {prediction_type!r} is not supported "
                                        f"(expected one of {', '.join(PREDICTION_TYPES)})")
        self.prediction_type = prediction_type
        if self.zero_terminal_snr and prediction_type == "epsilon":
            raise UnsupportedModelError("the scheduler reaches zero terminal SNR, where an epsilon model cannot "
                                        "say what the image is; such schedules need v-prediction")
        self.family = _family_of(unet, text_encoder, text_encoder_2)
        if self.family == "sdxl":
            specs = [(text_encoder, tokenizer, "clip_l"), (text_encoder_2, tokenizer_2, "clip_g")]
        else:
            specs = [(text_encoder, tokenizer, "clip_l" if self.family == "sd1" else "clip_h")]
        self.text_encoders: list[_Encoder] = []
        offset = 0
        for model, tok, key in specs:
            if tok is None:
                raise UnsupportedModelError(f"the {key} text encoder has no tokenizer")
            width = model.get_input_embeddings().embedding_dim
            self.text_encoders.append(_Encoder(model, tok, TextEncoder(key, width), offset, self.family == "sdxl"))
            offset += width
        self.encoders = tuple(e.info for e in self.text_encoders)
        # Kept for callers that knew one encoder (single-encoder families); SDXL's second one is text_encoder_2.
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        context = sum(e.model.config.hidden_size for e in self.text_encoders)
        if getattr(unet.config, "cross_attention_dim", None) != context:
            raise UnsupportedModelError(
                f"the U-Net's cross-attention width ({unet.config.cross_attention_dim}) does not match the text "
                f"encoders ({context})")
        self.native_size = native_size(self.family, prediction_type)
        self.latent_scale_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.vae_downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_downscale * 2 ** (len(unet.config.block_out_channels) - 1)
        self._name, self._hash = name, model_hash
        self._words: dict[str, torch.Tensor] = {}
        self._word_pattern: re.Pattern | None = None
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._hooks = [e.table.register_forward_hook(self._injector(e)) for e in self.text_encoders]

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        config: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "DiffusersBinding":
        """A diffusers folder (SD 1.x, SD 2.x or SDXL), or a single-file checkpoint (.safetensors/.ckpt) with
        ``config``: the original LDM/sgm yaml or a diffusers folder holding the component configs. Never
        downloads."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = Path(model)
        check_model_files(path, config)
        if path.is_dir():
            kwargs = dict(torch_dtype=dtype, local_files_only=True)
            parts = dict(
                unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs),
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
                text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs),
                tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            )
            if (path / "text_encoder_2").is_dir():
                parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                    path, subfolder="text_encoder_2", **kwargs)
                parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                    path, subfolder="tokenizer_2", local_files_only=True)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
            fingerprint = _folder_fingerprint(path)
        else:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

            config = Path(config)
            extra = {"config": str(config)} if config.is_dir() else {"original_config": str(config)}
            sdxl = _family_of_config(config)[0] == "sdxl"
            pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
            options = {} if pipeline is StableDiffusionXLPipeline else {"safety_checker": None}
            pipe = pipeline.from_single_file(str(path), torch_dtype=dtype, local_files_only=True, **options, **extra)
            parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            if pipeline is StableDiffusionXLPipeline:
                parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            fingerprint = _file_fingerprint(path)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name].to(device)
        return cls(**parts, alphas_cumprod=scheduler.alphas_cumprod,
                   prediction_type=scheduler.config.get("prediction_type", "epsilon"),
                   name=path.name, model_hash=fingerprint)

    # -- text ---------------------------------------------------------------------------------------------------

    def _token_tables(self) -> list[TokenTable]:
        return [TokenTable(e.table.weight, lambda text, t=e.tokenizer: t(text, add_special_tokens=False).input_ids,
                           e.tokenizer.eos_token_id) for e in self.text_encoders]

    def _install_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        for word, tensor in vectors.items():
            if tensor.dim() != 2 or tensor.shape[1] != self.token_dim:
                raise ValueError(
                    f"word {word!r} has shape {tuple(tensor.shape)}, this model needs [n, {self.token_dim}]")
        self._words.update(vectors)
        self._compile_word_pattern()

    def _remove_words(self, vectors: Mapping[str, torch.Tensor]) -> None:
        for word in vectors:
            self._words.pop(word, None)
        self._compile_word_pattern()

    def _compile_word_pattern(self) -> None:
        if not self._words:
            self._word_pattern = None
            return
        # Longest first so "cat-neg" wins over "cat"; case-insensitive because the tokenizer lower-cases.
        words = sorted(self._words, key=len, reverse=True)
        alternation = "|".join(re.escape(w) for w in words)
        self._word_pattern = re.compile(rf"(?<![\w])({alternation})(?![\w])", re.IGNORECASE)
        self._word_lookup = {w.lower(): w for w in words}

    def _tokenize(self, tokenizer, prompt: str) -> tuple[list[int], list[tuple[int, str]]]:
        """Token ids without start/end, and (position, word) of every learned word (its placeholder slots)."""
        ids: list[int] = []
        slots: list[tuple[int, str]] = []
        cursor = 0
        matches = self._word_pattern.finditer(prompt) if self._word_pattern else ()
        for match in matches:
            ids += tokenizer(prompt[cursor : match.start()], add_special_tokens=False).input_ids
            word = self._word_lookup[match.group(1).lower()]
            slots.append((len(ids), word))
            # Placeholder id 0, as the host writes: never the end token, which SDXL's pooling looks for.
            ids += [PLACEHOLDER_ID] * self._words[word].shape[0]
            cursor = match.end()
        ids += tokenizer(prompt[cursor:], add_special_tokens=False).input_ids
        return ids, slots

    def _encode(self, prompts: Sequence[str], image_size: tuple[int, int]) -> Conditioning:
        outputs = [self._run_encoder(encoder, prompts) for encoder in self.text_encoders]
        context = torch.cat([hidden for hidden, _ in outputs], dim=-1)
        pooled = outputs[-1][1]  # SDXL's pooled vector comes from its second encoder
        if self.family != "sdxl":
            return context
        # SDXL's micro-conditioning: original size, crop (top, left), target size; the same for both branches.
        height, width = image_size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device).repeat(len(prompts), 1)
        return {"crossattn": context, "text_embeds": pooled, "time_ids": time_ids}

    def _run_encoder(self, encoder: _Encoder, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokenizer = encoder.tokenizer
        room = tokenizer.model_max_length - 2
        batch_ids, pending = [], []
        for row, prompt in enumerate(prompts):
            ids, slots = self._tokenize(tokenizer, prompt)
            if len(ids) > room:
                if encoder.offset == 0:
                    log.warning("prompt is longer than %d tokens and was cut: %r", room, prompt)
                ids = ids[:room]
            for position, word in slots:
                vectors = self._words[word][:, encoder.offset:encoder.offset + encoder.info.dim]
                fits = min(vectors.shape[0], room - position)
                if fits > 0:
                    pending.append((row, 1 + position, vectors[:fits]))
            pad = [tokenizer.pad_token_id] * (room - len(ids))
            batch_ids.append([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + pad)
        input_ids = torch.tensor(batch_ids, device=self.device)
        self._pending = pending
        try:
            out = encoder.model(input_ids, output_hidden_states=encoder.penultimate)
        finally:
            self._pending = []
        hidden = out.hidden_states[-2] if encoder.penultimate else out[0]
        return hidden, getattr(out, "text_embeds", None)

    def _injector(self, encoder: _Encoder):
        def inject(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
            if not self._pending:
                return None
            rows, cols, values = [], [], []
            for row, start, vectors in self._pending:
                n = vectors.shape[0]
                rows.append(torch.full((n,), row, dtype=torch.long))
                cols.append(torch.arange(start, start + n))
                values.append(vectors.to(output.dtype))
            index = (torch.cat(rows).to(output.device), torch.cat(cols).to(output.device))
            # out-of-place: the result keeps the graph back to the learned vectors
            return output.index_put(index, torch.cat(values).to(output.device))

        return inject

    # -- U-Net and VAE ------------------------------------------------------------------------------------------

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if isinstance(cond, dict):
            added = {"text_embeds": cond["text_embeds"].to(self.dtype), "time_ids": cond["time_ids"].to(self.dtype)}
            return self.unet(latents.to(self.dtype), timesteps,
                             encoder_hidden_states=cond["crossattn"].to(self.dtype), added_cond_kwargs=added).sample
        return self.unet(latents.to(self.dtype), timesteps, encoder_hidden_states=cond.to(self.dtype)).sample

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean * self.latent_scale_factor, dist.std * self.latent_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype) / self.latent_scale_factor).sample

    # -- adapters and switches ----------------------------------------------------------------------------------

    def adapter_sites(self) -> list[AdapterSite]:
        if self.family == "sdxl":
            # kohya's SDXL files name the U-Net in the original (sgm) naming and the encoders te1 / te2.
            layout = lora_keys.UnetLayout.from_diffusers_config(self.unet.config)

            def unet_prefix(path: str) -> str:
                return lora_keys.kohya_prefix("unet", lora_keys.diffusers_to_compvis_unet(path, layout))

            encoders = nn.ModuleDict({"te1": self.text_encoder, "te2": self.text_encoder_2})
            # SDXL reads clip_l at its penultimate layer: the last layer never sees a gradient (clip_g's does,
            # through the pooled vector), so it gets no adapter.
            unused = f"text_model.encoder.layers.{self.text_encoder.config.num_hidden_layers - 1}."
            paths = tuple(f"te1.{p}" for p in linear_paths(self.text_encoder, TEXT_TARGETS)
                          if not p.startswith(unused))
            paths += tuple(f"te2.{p}" for p in linear_paths(self.text_encoder_2, OPEN_CLIP_TEXT_TARGETS))
            return [
                AdapterSite("unet", self.unet, linear_paths(self.unet, UNET_TARGETS), unet_prefix),
                AdapterSite("te", encoders, paths, lora_keys.sdxl_text_prefix),
            ]
        return [
            AdapterSite("unet", self.unet, linear_paths(self.unet, UNET_TARGETS),
                        lambda path: lora_keys.kohya_prefix("unet", path)),
            AdapterSite("te", self.text_encoder,
                        linear_paths(self.text_encoder,
                                     TEXT_TARGETS if self.family == "sd1" else OPEN_CLIP_TEXT_TARGETS),
                        lambda path: lora_keys.kohya_prefix("te", path)),
        ]

    def trainable_roots(self) -> list[nn.Module]:
        return [self.unet, self.vae] + [e.model for e in self.text_encoders]

    def checkpointed_modules(self, part: str) -> list[nn.Module]:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        root, block = (self.unet, BasicTransformerBlock) if part == "unet" else (self.vae.decoder, ResnetBlock2D)
        return [m for m in root.modules() if isinstance(m, block)]

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self._name, hash=self._hash, architecture=self.family)


PLACEHOLDER_ID = 0


def _family_of(unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None) -> str:
    """sdxl: two text encoders and the text/time-conditioned U-Net; sd2: OpenCLIP (gelu) text encoder; else sd1."""
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if text_encoder_2 is not None or text_time:
        if text_encoder_2 is None or not text_time:
            raise UnsupportedModelError("an SDXL model needs both text encoders and the text/time-conditioned U-Net")
        return "sdxl"
    if getattr(unet.config, "addition_embed_type", None) or getattr(unet.config, "class_embed_type", None):
        raise UnsupportedModelError("this U-Net takes extra conditioning (an upscaler or unCLIP model?); "
                                    "DreamArtist trains SD 1.x, SD 2.x and SDXL text-to-image models")
    return "sd2" if getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def _file_fingerprint(path: Path) -> str:
    """Short hash of a checkpoint file (first/last MiB + size: cheap and stable for the metadata)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 1 << 20:
            handle.seek(max(size - (1 << 20), 1 << 20))
            digest.update(handle.read())
    digest.update(str(size).encode())
    return digest.hexdigest()[:10]


def _folder_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(_file_fingerprint(file).encode())
    return digest.hexdigest()[:10]
