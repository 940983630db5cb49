"""Resumable training checkpoints: what goes into one, whether one fits a run, and putting one back.

A checkpoint is one safetensors file (files.save_training_state): the pair, the adapters' state, the optimizer
state, the run's random generator, and a JSON state (step, counters, image order, scaler, the full config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__, files
from .config import ConfigError, TrainConfig
from .embeddings import EmbeddingPair
from .errors import TrainingError
from .model import ModelInfo

if TYPE_CHECKING:
    from .adapters import BranchAdapters
    from .outputs import OutputLayout

KEEP_CHECKPOINTS = 3
# Options that shape tensors or the random stream: they must match for an exact continuation.
RESUME_KEYS = ("name", "positive_vectors", "negative_vectors", "use_negative", "unet_rank", "text_rank",
               "batch_size", "gradient_accumulation", "seed", "width", "height", "latent_sampling", "flip")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


@dataclass
class Counters:
    """The loop's counters that a checkpoint carries."""

    step: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    elapsed: float = 0.0


def read_checkpoint(path: Path, config: TrainConfig) -> Checkpoint:
    """Read ``path`` and check that it can continue a run with ``config``; TrainingError says why not."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        tensors, state = files.load_training_state(path)
        saved = TrainConfig.from_dict(state["config"])
    except (ValueError, KeyError, TypeError) as error:
        detail = error if not isinstance(error, ConfigError) else f"its options are from another version ({error})"
        raise TrainingError(f"checkpoint {path.name} cannot be read: {detail}") from None
    for key in RESUME_KEYS:
        if getattr(saved, key) != getattr(config, key):
            raise TrainingError(
                f"checkpoint {path.name} was made with {key}={getattr(saved, key)!r}, this run has "
                f"{getattr(config, key)!r}; resume with the same setting"
            )
    return Checkpoint(path, tensors, state)


def save_checkpoint(layout: "OutputLayout", config: TrainConfig, counters: Counters, *, pair: EmbeddingPair,
                    adapters: "BranchAdapters | None", optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    order: dict[str, Any], scaler: torch.cuda.amp.GradScaler | None, model: ModelInfo) -> Path:
    """Write a checkpoint of the run at ``counters.step`` and keep only the newest KEEP_CHECKPOINTS."""
    tensors = {"embedding.pos": pair.positive.detach().cpu()}
    if pair.negative is not None:
        tensors["embedding.neg"] = pair.negative.detach().cpu()
    if adapters is not None:
        tensors.update({f"adapter.{k}": v for k, v in adapters.state_tensors().items()})
    optim_tensors, optim_meta = files.flatten_optimizer_state(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.generator"] = files.generator_state_tensor(generator)
    state = {
        "version": __version__,
        "step": counters.step,
        "skipped": counters.skipped,
        "bad_in_a_row": counters.bad_in_a_row,
        "elapsed": counters.elapsed,
        "config": config.to_dict(),
        "order": order,
        "optimizer": optim_meta,
        "scaler": scaler.state_dict() if scaler else None,
        "model": model.__dict__,
    }
    layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    path = files.save_training_state(layout.checkpoint_path(config.name, counters.step), tensors, state)
    for old in layout.checkpoints(config.name)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def restore_checkpoint(checkpoint: Checkpoint, *, pair: EmbeddingPair, adapters: "BranchAdapters | None",
                       optimizer: torch.optim.Optimizer, generator: torch.Generator,
                       scaler: torch.cuda.amp.GradScaler | None) -> tuple[Counters, dict[str, Any]]:
    """Put a checkpoint's tensors back in place; returns its counters and the image order state."""
    tensors, state = checkpoint.tensors, checkpoint.state
    with torch.no_grad():
        pair.positive.copy_(tensors["embedding.pos"])
        if pair.negative is not None:
            pair.negative.copy_(tensors["embedding.neg"])
    if adapters is not None:
        adapters.load_state_tensors({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(files.unflatten_optimizer_state(optim_tensors, state["optimizer"]))
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    files.restore_generator(tensors["rng.generator"], generator)
    counters = Counters(int(state["step"]), int(state["skipped"]), int(state["bad_in_a_row"]), float(state["elapsed"]))
    return counters, state["order"]
