"""The model interface the engine trains through.

A binding wraps one loaded Stable Diffusion model (diffusers components for the CLI and tests, the model
AUTOMATIC1111 has loaded for the WebUI) and offers exactly what DreamArtist needs: prompts encoded with learned
embeddings injected, noise predicted for rows that each belong to a branch, the VAE both ways, and the noise
schedule. Adapters are routed here, by branch, so no caller has to know where they live.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import nn

from .errors import InvalidInput

if TYPE_CHECKING:
    from .adapters import BranchAdapters

POS = "pos"
NEG = "neg"
BRANCHES = (POS, NEG)
CHECKPOINTED_PARTS = ("unet", "decoder")
# The Linear layers adapters go on, by path suffix; the same in diffusers and in the host's ldm model.
UNET_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# OpenCLIP encoders (SD 2.x, SDXL's clip_g): in the host their attention is a fused nn.MultiheadAttention whose
# q/k/v projection is no Linear to wrap, so adapters go on the attention output and the MLP in both bindings (files
# from the CLI and the WebUI stay interchangeable).
OPEN_CLIP_TEXT_TARGETS = ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def linear_paths(root: nn.Module, suffixes: Sequence[str]) -> tuple[str, ...]:
    """Paths of the Linear layers under ``root`` whose path ends with one of ``suffixes`` (where adapters go)."""
    return tuple(
        name
        for name, module in root.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
    )


class UnsupportedModelError(InvalidInput):
    """The loaded model is not one DreamArtist can train on (yet)."""


FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


class TextEncoder(NamedTuple):
    """One text encoder of a model family: its key in embedding files and its token width (a (key, width) pair,
    as files.save_embedding takes them)."""

    key: str  # "clip_l" (SD1, SDXL's first), "clip_h" (SD2), "clip_g" (SDXL's second)
    dim: int


@dataclass(frozen=True)
class TokenTable:
    """One text encoder's token-embedding weights, its tokenizer (ids without start/end) and end token."""

    weight: torch.Tensor  # [vocab, dim]
    tokenize: Callable[[str], Sequence[int]]
    end_id: int


def native_size(family: str, prediction_type: str) -> int:
    """The side length a family was trained at: SD 1.x and SD 2.x base 512, SD 2.x-v 768, SDXL 1024."""
    if family == "sdxl":
        return 1024
    return 768 if family == "sd2" and prediction_type == "v_prediction" else 512


# A prompt batch's conditioning: the cross-attention context [B, L, C], or (SDXL) a dict of batch-first tensors
# holding it and the pooled/size vector. The engine only concatenates and counts rows; bindings read it.
Conditioning = Union[torch.Tensor, dict]


def concat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    """Rows of several conditionings, in order (dicts key by key)."""
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(list(parts))


def conditioning_rows(cond: Conditioning) -> int:
    return int(next(iter(cond.values())).shape[0]) if isinstance(cond, dict) else int(cond.shape[0])


def check_family(binding: "DiffusionBinding", family: object, what: str) -> None:
    """Refuse files made for another model family (their metadata's "architecture"); files without it pass and
    meet the width check instead."""
    if family in FAMILIES and family != binding.family:
        made, loaded = FAMILY_NAMES[family], FAMILY_NAMES[binding.family]
        raise UnsupportedModelError(
            f"{what} was trained on an {made} model and cannot be used with the loaded {loaded} model; "
            f"load an {made} checkpoint to use it (or train it again on this one)")


@dataclass(frozen=True)
class AdapterSite:
    """Where adapters of one part of the model go.

    ``module_paths`` are relative to ``root``; ``kohya_prefix`` turns one of them into the key prefix the
    AUTOMATIC1111 Lora loader understands, so files written from either binding are interchangeable.
    """

    part: str  # "unet" or "te"
    root: nn.Module
    module_paths: tuple[str, ...]
    kohya_prefix: Callable[[str], str]
    # Paths (prefixes; "" = all) of modules whose input is sequence-first [L, N, D] (OpenCLIP's text tower in the
    # host): a call there must be routed to one branch for all its rows.
    sequence_first: tuple[str, ...] = ()

    def is_sequence_first(self, path: str) -> bool:
        return any(p == "" or path == p or path.startswith(p + ".") for p in self.sequence_first)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    hash: str
    architecture: str = "sd1"  # the model family, FAMILIES


class DiffusionBinding(abc.ABC):
    """One Stable Diffusion model (SD 1.x, SD 2.x, SDXL) as the trainer sees it.

    A learned word is ONE tensor [n, token_dim]: the vectors of every text encoder concatenated in
    ``encoders`` order (SDXL: clip_l then clip_g), so the pair, its optimiser and its checks are the same on
    every family; bindings split it where they inject it and files split it where the format asks.
    """

    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights
    family: str = "sd1"  # FAMILIES
    prediction_type: str = "epsilon"  # what the U-Net predicts: PREDICTION_TYPES
    encoders: tuple[TextEncoder, ...]
    native_size: int = 512  # the side length the family was trained at (default training/preview size)
    latent_channels: int = 4
    latent_scale_factor: float
    vae_downscale: int = 8
    size_multiple: int = 64  # training/preview sizes must be multiples of this
    alphas_cumprod: torch.Tensor  # [T] float32, on ``device``

    def __init__(self) -> None:
        self.adapters: BranchAdapters | None = None

    # -- schedule -----------------------------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def zero_terminal_snr(self) -> bool:
        """The last timestep is pure noise (a schedule rescaled to zero terminal SNR, as v-prediction finetunes
        such as NoobAI's use): sampling must start there, and only a v model can predict from it."""
        return float(self.alphas_cumprod[-1]) < 1e-8

    @property
    def token_dim(self) -> int:
        """Width of a learned word's row: the encoders' widths added up."""
        return sum(encoder.dim for encoder in self.encoders)

    # -- text ---------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _token_tables(self) -> list[TokenTable]:
        """Every text encoder's token table, in ``encoders`` order."""

    def token_vectors(self, text: str) -> torch.Tensor:
        """Token-embedding rows [k, token_dim] of the words in ``text`` (no start/end tokens), detached: each
        encoder's rows side by side."""
        rows = []
        for table in self._token_tables():
            ids = torch.tensor(table.tokenize(text), dtype=torch.long, device=table.weight.device)
            rows.append(table.weight[ids].detach().float())
        if len({r.shape[0] for r in rows}) != 1:
            raise InvalidInput(f"the text encoders' tokenizers split {text!r} differently; use another init text")
        return torch.cat(rows, dim=1)

    def end_token_vector(self) -> torch.Tensor:
        """Token-embedding row [token_dim] of the end-of-text token: what the empty prompt is made of."""
        return torch.cat([t.weight[t.end_id].detach().float() for t in self._token_tables()])

    def embedding_table_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std [token_dim] of the whole token-embedding tables."""
        weights = [t.weight.detach().float() for t in self._token_tables()]
        return torch.cat([w.mean(0) for w in weights]), torch.cat([w.std(0) for w in weights])

    @contextlib.contextmanager
    def learned_words(self, vectors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Make ``vectors`` (word -> [n, token_dim], may require grad) usable in prompts for the duration."""
        self._install_words(vectors)
        try:
            yield
        finally:
            self._remove_words(vectors)

    @abc.abstractmethod
    def _install_words(self, vectors: Mapping[str, torch.Tensor]) -> None: ...

    @abc.abstractmethod
    def _remove_words(self, vectors: Mapping[str, torch.Tensor]) -> None: ...

    @abc.abstractmethod
    def _encode(self, prompts: Sequence[str], image_size: tuple[int, int]) -> Conditioning:
        """Conditioning for ``prompts`` with learned words injected; ``image_size`` (height, width) in pixels is
        what SDXL's size conditioning states (original = target size, no crop)."""

    one_branch_per_text_call = False  # a text encoder with sequence-first adapter sites (see AdapterSite)

    def encode_prompts(
        self, prompts: Sequence[str], branches: Sequence[str], image_size: tuple[int, int] | None = None
    ) -> Conditioning:
        """Encode ``prompts``; row i goes through the text-encoder adapters of ``branches[i]``."""
        if len(prompts) != len(branches):
            raise ValueError(f"{len(prompts)} prompts but {len(branches)} branches")
        if self.one_branch_per_text_call and self.adapters is not None and len(set(branches)) > 1:
            runs = [[i for i, _ in run] for _, run in itertools.groupby(enumerate(branches), key=lambda x: x[1])]
            return concat_conditioning([self.encode_prompts([prompts[i] for i in run], [branches[i] for i in run],
                                                            image_size) for run in runs])
        size = image_size or (self.native_size, self.native_size)
        with self._routed("te", branches):
            return self._encode(prompts, (int(size[0]), int(size[1])))

    # -- U-Net --------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, branches: Sequence[str]
    ) -> torch.Tensor:
        """The U-Net's raw output for a batch (noise, or v for v-prediction models: ``prediction_type``);
        row i goes through the U-Net adapter of ``branches[i]``."""
        if latents.shape[0] != len(branches) or conditioning_rows(cond) != len(branches):
            raise ValueError(f"{latents.shape[0]} latent rows and {conditioning_rows(cond)} conditioning rows "
                             f"but {len(branches)} branches")
        with self._routed("unet", branches):
            return self._predict(latents, timesteps, cond)

    # -- VAE ----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent distribution (mean, std) of images in [-1, 1], already multiplied by the latent scale factor."""

    @abc.abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents, keeping the autograd graph (the reconstruction loss
        needs gradients through the decoder)."""

    # -- adapters and training switches -------------------------------------------------------------------------

    @abc.abstractmethod
    def adapter_sites(self) -> list[AdapterSite]:
        """Where LoRA adapters may go: one site per part ("unet", "te"; "te" spans every text encoder)."""

    @abc.abstractmethod
    def trainable_roots(self) -> list[nn.Module]:
        """Every module whose parameters must stay frozen while training (they are restored afterwards)."""

    def checkpointed_modules(self, part: str) -> list[nn.Module]:
        """Blocks of ``part`` ("unet" or "decoder", the VAE decoder) that gradient checkpointing recomputes in the
        backward pass instead of storing their activations."""
        return []

    def set_gradient_checkpointing(self, enabled: bool, parts: Sequence[str] = CHECKPOINTED_PARTS) -> None:
        """Trade compute for memory: recompute the :meth:`checkpointed_modules` of ``parts`` in the backward pass.

        Non-reentrant checkpointing works with frozen inputs; the replay restores the adapter routing of the
        original call (the routing context has ended by the time backward runs)."""
        for module in (m for part in parts for m in self.checkpointed_modules(part)):
            if not enabled:
                module.__dict__.pop("forward", None)
                continue
            if "forward" in module.__dict__:
                continue  # already checkpointed
            original = module.forward

            def forward(*args, _original=original, **kwargs):
                routing = self.adapters.routing_state() if self.adapters is not None else None

                def replay(*a, **k):
                    if routing is None:
                        return _original(*a, **k)
                    with self.adapters.restored_routing(routing):
                        return _original(*a, **k)

                return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False, **kwargs)

            module.forward = forward

    def training_context(self) -> contextlib.AbstractContextManager:
        """Whatever the host needs around a training run (entered once, after freezing)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def model_info(self) -> ModelInfo: ...

    def _routed(self, part: str, branches: Sequence[str]) -> contextlib.AbstractContextManager:
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.routed(part, branches)


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Freeze every parameter of ``modules`` and put each ``requires_grad`` flag back afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
