"""Where a run's files go and what they say about themselves: the output layout, file metadata, the pair and
adapter files, and a check that the output folder can be written at all (made before a model is loaded)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__, files
from .config import TrainConfig
from .embeddings import EmbeddingPair, create_pair
from .errors import InvalidInput, TrainingError
from .model import NEG, POS, DiffusionBinding
from .names import negative_name

if TYPE_CHECKING:
    from .adapters import BranchAdapters


@dataclass(frozen=True)
class OutputLayout:
    embeddings_dir: Path
    lora_dir: Path
    log_dir: Path

    @classmethod
    def under(cls, root: str | Path) -> "OutputLayout":
        root = Path(root)
        return cls(root / "embeddings", root / "lora", root / "log")

    def embedding_path(self, word: str) -> Path:
        return self.embeddings_dir / f"{word}.safetensors"

    def lora_path(self, word: str) -> Path:
        return self.lora_dir / f"{word}.safetensors"

    @property
    def checkpoints_dir(self) -> Path:
        return self.log_dir / "checkpoints"

    @property
    def previews_dir(self) -> Path:
        return self.log_dir / "previews"

    @property
    def loss_csv(self) -> Path:
        return self.log_dir / "loss.csv"

    @property
    def loss_png(self) -> Path:
        return self.log_dir / "loss.png"

    def checkpoint_path(self, name: str, step: int) -> Path:
        return self.checkpoints_dir / f"{name}-{step:06d}.safetensors"

    def checkpoints(self, name: str) -> list[Path]:
        """Saved checkpoints of ``name``, oldest first."""
        folder = self.checkpoints_dir
        return sorted(folder.glob(f"{name}-*.safetensors")) if folder.is_dir() else []

    def check_writable(self) -> None:
        """Refuse (InvalidInput) folders that cannot be created or written, before anything is written."""
        for folder in dict.fromkeys((self.embeddings_dir, self.lora_dir, self.log_dir)):
            check_writable_folder(folder)


def check_writable_folder(folder: Path) -> None:
    """``folder`` exists as a writable folder or can be made: its nearest existing ancestor is a writable folder."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput(f"cannot write into {folder}: {existing} is a file, not a folder")
    try:  # os.access says yes to root everywhere; only a real attempt tells (read-only mounts, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".dreamartist-probe-", dir=existing))
    except OSError as error:
        raise InvalidInput(f"cannot write into {folder}: {existing} is not writable "
                           f"({error.strerror or type(error).__name__})") from None


def pair_words(config: TrainConfig) -> list[str]:
    """The prompt words a run writes embeddings for: ``name`` and, unless plain TI, ``name-neg``."""
    return [config.name] + ([negative_name(config.name)] if config.use_negative else [])


def existing_pair_files(layout: OutputLayout, config: TrainConfig) -> list[Path]:
    return [layout.embedding_path(w) for w in pair_words(config) if layout.embedding_path(w).exists()]


def embedding_metadata(binding: DiffusionBinding, config: TrainConfig, role: str, step: int, *,
                       adapters: bool) -> dict[str, Any]:
    """What every embedding/LoRA file we write says about itself (safetensors header)."""
    info = binding.model_info()
    name = config.name
    return {
        "name": name if role == "positive" else negative_name(name),
        "role": role,
        "partner": negative_name(name) if role == "positive" else name,
        "step": step,
        "sd_checkpoint": info.hash,
        "sd_checkpoint_name": info.name,
        "architecture": info.architecture,
        "hyperparameters": config.hyperparameters(),
        "dreamartist_version": __version__,
        "adapters": adapters,
    }


def save_pair(binding: DiffusionBinding, config: TrainConfig, layout: OutputLayout, pair: EmbeddingPair,
              step: int, adapters: "BranchAdapters | None" = None) -> list[Path]:
    """Write the embedding pair and, when trained, the positive and negative adapters; returns the paths."""
    layout.embeddings_dir.mkdir(parents=True, exist_ok=True)

    def meta(role: str) -> dict[str, Any]:
        return embedding_metadata(binding, config, role, step, adapters=adapters is not None)

    written = [files.save_embedding(layout.embedding_path(config.name), pair.positive.detach(), meta("positive"),
                                    binding.encoders)]
    if pair.negative is not None:
        written.append(files.save_embedding(layout.embedding_path(negative_name(config.name)),
                                            pair.negative.detach(), meta("negative"), binding.encoders))
    if adapters is not None:
        for branch, word, role in ((POS, config.name, "positive"), (NEG, negative_name(config.name), "negative")):
            layers = adapters.export(branch)
            if layers:
                layout.lora_dir.mkdir(parents=True, exist_ok=True)
                written.append(files.save_lora(layout.lora_path(word), layers, {**meta(role), "ss_output_name": word}))
    return written


def create_pair_files(binding: DiffusionBinding, config: TrainConfig, layout: OutputLayout, *,
                      overwrite: bool = False) -> list[Path]:
    """Write a fresh step-0 pair (the WebUI's "create" step); training later continues from these files."""
    existing = existing_pair_files(layout, config)
    if existing and not overwrite:
        raise TrainingError(f"{existing[0].name} already exists in {existing[0].parent}; choose another name or "
                            f"overwrite it")
    pair = create_pair(
        binding, config.name, init_text=config.init_text, positive_vectors=config.positive_vectors,
        negative_vectors=config.negative_vectors, negative_noise=config.negative_noise,
        with_negative=config.use_negative, generator=torch.Generator().manual_seed(config.seed),
    )
    return save_pair(binding, config, layout, pair, 0)
