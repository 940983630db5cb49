"""The engine on diffusers components: the standalone CLI, the demo and the tests.

Learned words are injected the way the WebUI does it: the prompt is tokenized with the word's name replaced by
``n`` placeholder tokens, and a forward hook on the token-embedding layer writes the learned vectors into those
positions, so gradients reach them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from . import lora_keys
from .errors import InvalidInput
from .model import (TEXT_TARGETS, UNET_TARGETS, AdapterSite, DiffusionBinding, ModelInfo, UnsupportedModelError,
                    linear_paths)

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


class DiffusersBinding(DiffusionBinding):
    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        alphas_cumprod: torch.Tensor,
        name: str = "diffusers model",
        model_hash: str = "",
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        for module in (unet, vae, text_encoder):
            module.eval()
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.token_embedding: nn.Embedding = text_encoder.get_input_embeddings()
        self.token_dim = self.token_embedding.embedding_dim
        width = text_encoder.config.hidden_size
        if getattr(unet.config, "addition_embed_type", None) or width >= 1024:
            # SD2 (OpenCLIP-H, 1024 wide) and SDXL (two text encoders) need bindings of their own.
            raise UnsupportedModelError(
                "this looks like a Stable Diffusion 2.x or SDXL model; DreamArtist supports SD 1.x models for now"
            )
        if getattr(unet.config, "cross_attention_dim", None) != width:
            raise UnsupportedModelError("the U-Net's cross-attention width does not match the text encoder")
        self.latent_scale_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.vae_downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_downscale * 2 ** (len(unet.config.block_out_channels) - 1)
        self._name, self._hash = name, model_hash
        self._words: dict[str, torch.Tensor] = {}
        self._word_pattern: re.Pattern | None = None
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._hook = self.token_embedding.register_forward_hook(self._inject_words)

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
        """A diffusers folder, or a single-file checkpoint (.safetensors/.ckpt) with ``config``: the original
        LDM yaml or a diffusers folder holding the component configs. Never downloads."""
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

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
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
            fingerprint = _folder_fingerprint(path)
        else:
            config = Path(config)
            extra = {"config": str(config)} if config.is_dir() else {"original_config": str(config)}
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), torch_dtype=dtype, local_files_only=True, safety_checker=None, **extra
            )
            parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            fingerprint = _file_fingerprint(path)
        for name in ("unet", "vae", "text_encoder"):
            parts[name].to(device)
        return cls(**parts, alphas_cumprod=scheduler.alphas_cumprod, name=path.name, model_hash=fingerprint)

    # -- text ---------------------------------------------------------------------------------------------------

    def token_vectors(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return self.token_embedding.weight[ids].detach().float()

    def end_token_vector(self) -> torch.Tensor:
        return self.token_embedding.weight[self.tokenizer.eos_token_id].detach().float()

    def embedding_table_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.token_embedding.weight.detach().float()
        return table.mean(0), table.std(0)

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

    def _tokenize(self, prompt: str) -> tuple[list[int], list[tuple[int, str]]]:
        """Token ids without start/end, and (position, word) of every learned word (its placeholder slots)."""
        ids: list[int] = []
        slots: list[tuple[int, str]] = []
        placeholder = self.tokenizer.eos_token_id
        cursor = 0
        matches = self._word_pattern.finditer(prompt) if self._word_pattern else ()
        for match in matches:
            ids += self.tokenizer(prompt[cursor : match.start()], add_special_tokens=False).input_ids
            word = self._word_lookup[match.group(1).lower()]
            slots.append((len(ids), word))
            ids += [placeholder] * self._words[word].shape[0]
            cursor = match.end()
        ids += self.tokenizer(prompt[cursor:], add_special_tokens=False).input_ids
        return ids, slots

    def _encode(self, prompts: Sequence[str]) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        room = length - 2
        batch_ids, pending = [], []
        for row, prompt in enumerate(prompts):
            ids, slots = self._tokenize(prompt)
            if len(ids) > room:
                log.warning("prompt is longer than %d tokens and was cut: %r", room, prompt)
                ids = ids[:room]
            for position, word in slots:
                vectors = self._words[word]
                fits = min(vectors.shape[0], room - position)
                if fits > 0:
                    pending.append((row, 1 + position, vectors[:fits]))
            pad = [self.tokenizer.pad_token_id] * (room - len(ids))
            batch_ids.append([self.tokenizer.bos_token_id] + ids + [self.tokenizer.eos_token_id] + pad)
        input_ids = torch.tensor(batch_ids, device=self.device)
        self._pending = pending
        try:
            return self.text_encoder(input_ids)[0]
        finally:
            self._pending = []

    def _inject_words(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
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

    # -- U-Net and VAE ------------------------------------------------------------------------------------------

    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(latents.to(self.dtype), timesteps, encoder_hidden_states=context.to(self.dtype)).sample

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean * self.latent_scale_factor, dist.std * self.latent_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype) / self.latent_scale_factor).sample

    # -- adapters and switches ----------------------------------------------------------------------------------

    def adapter_sites(self) -> list[AdapterSite]:
        return [
            AdapterSite("unet", self.unet, linear_paths(self.unet, UNET_TARGETS),
                        lambda path: lora_keys.kohya_prefix("unet", path)),
            AdapterSite("te", self.text_encoder, linear_paths(self.text_encoder, TEXT_TARGETS),
                        lambda path: lora_keys.kohya_prefix("te", path)),
        ]

    def trainable_roots(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    def checkpointed_modules(self, part: str) -> list[nn.Module]:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        root, block = (self.unet, BasicTransformerBlock) if part == "unet" else (self.vae.decoder, ResnetBlock2D)
        return [m for m in root.modules() if isinstance(m, block)]

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self._name, hash=self._hash)


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
