"""The one validation boundary of a training run: ``prepare_run`` checks everything that can be checked without a
model (options, name, images, templates, schedules, output folder, existing files, the resume checkpoint) and
returns a frozen ``PreparedRun`` that the trainer consumes. The CLI, the HTTP API and the WebUI tab all validate
through it, so a bad request fails before a model is loaded, a progress bar drawn or a file written; images are
decoded once, here.

What needs the model (its size multiple and token width, the precision on its device, LPIPS on its device, the
initial pair from its tokenizer) is checked when the Trainer is built on a binding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import files
from .checkpoints import Checkpoint, read_checkpoint
from .config import TrainConfig
from .data import TrainImage, load_templates, load_training_images, resolve_template
from .errors import InvalidInput, TrainingError
from .guidance import GuidanceSchedule
from .model import NEG, POS
from .names import negative_name
from .outputs import OutputLayout, existing_pair_files, pair_words
from .schedules import LearningRateSchedule

DEFAULT_SIZE_MULTIPLE = 8  # the VAE's downscale; a binding may ask for more (its U-Net's depth)


@dataclass(frozen=True)
class ExistingPair:
    """A saved pair that training continues from (``--continue``), with the adapters saved next to it."""

    positive: torch.Tensor
    negative: torch.Tensor | None
    step: int
    adapters: dict[str, dict[str, files.LoraLayer]]  # branch -> layers
    family: str | None = None  # the model family it was trained on (its metadata's "architecture")


@dataclass(frozen=True)
class PreparedRun:
    config: TrainConfig  # validated; when continuing, its vector counts are the saved pair's
    layout: OutputLayout
    images: tuple[TrainImage, ...]
    templates: tuple[str, ...]
    guidance: GuidanceSchedule
    learning_rates: dict[str, LearningRateSchedule]  # "embedding", "unet", "te"
    steps_total: int
    checkpoint: Checkpoint | None = None
    existing: ExistingPair | None = None

    @property
    def start_step(self) -> int:
        if self.checkpoint is not None:
            return self.checkpoint.step
        return self.existing.step if self.existing is not None else 0


def prepare_run(config: TrainConfig, layout: OutputLayout, *, resume: str | Path | None = None,
                overwrite: bool = False, continue_existing: bool = False, template_dirs: Sequence[Path] = (),
                size_multiple: int = DEFAULT_SIZE_MULTIPLE, native_size: int = 512) -> PreparedRun:
    """Validate a run without a model; raises InvalidInput (one sentence) and writes nothing. A width or height
    of 0 becomes ``native_size`` (the model family's side length, known from its files before it loads)."""
    if not isinstance(config, TrainConfig):
        raise InvalidInput("the request has no training configuration")
    config = config.sized_for(native_size)
    config.validate(size_multiple)
    if not isinstance(config.images, list) or not all(isinstance(p, (str, Path)) for p in config.images):
        raise InvalidInput("images must be a list of file or folder paths")
    if not config.images:
        raise InvalidInput("no training images given")
    layout.check_writable()
    images = tuple(load_training_images(config.images, config.width, config.height, resize=config.resize,
                                        multiple=size_multiple))
    templates = tuple(load_templates(resolve_template(config.template, template_dirs)))
    learning_rates = {part: LearningRateSchedule.parse(text)
                      for part, text in (("embedding", config.embedding_lr), ("unet", config.unet_lr),
                                         ("te", config.text_lr))}
    checkpoint = existing = None
    if resume is not None:
        checkpoint = read_checkpoint(Path(resume), config)
    else:
        existing = _existing_pair(config, layout, overwrite=overwrite, continue_existing=continue_existing)
        if existing is not None:
            # the saved pair decides the vector counts (the metadata must describe what is written)
            config = dataclasses.replace(
                config, positive_vectors=existing.positive.shape[0],
                negative_vectors=existing.negative.shape[0] if existing.negative is not None
                else config.negative_vectors)
    # like the WebUI: an embedding schedule whose last item names a step ends training there
    schedule_end = learning_rates["embedding"].end_step
    steps_total = min(config.steps, schedule_end) if schedule_end else config.steps
    return PreparedRun(config, layout, images, templates, config.guidance_schedule(), learning_rates, steps_total,
                       checkpoint, existing)


def _existing_pair(config: TrainConfig, layout: OutputLayout, *, overwrite: bool,
                   continue_existing: bool) -> ExistingPair | None:
    existing = existing_pair_files(layout, config)
    if not existing or overwrite:
        return None
    if not continue_existing:
        raise TrainingError(f"{existing[0].name} already exists in {existing[0].parent}; choose another name, "
                            f"overwrite it, or continue training it")
    vectors, step, family = {}, 0, None
    for word in pair_words(config):
        path = layout.embedding_path(word)
        if not path.exists():
            raise TrainingError(f"cannot continue: {path.name} is missing next to {existing[0].name}")
        try:
            vectors[word], meta = files.load_embedding(path)
        except ValueError as error:
            raise TrainingError(f"cannot continue from {path.name}: {error}") from None
        if word == config.name:
            step = int(meta.get("step", 0) or 0)
            family = meta.get("architecture")
    adapters = {}
    for branch, word in ((POS, config.name), (NEG, negative_name(config.name))):
        path = layout.lora_path(word)
        if config.uses_adapters and path.exists():
            try:
                adapters[branch], _ = files.load_lora(path)
            except ValueError as error:
                raise TrainingError(f"cannot continue from {path.name}: {error}") from None
    return ExistingPair(vectors[config.name], vectors.get(negative_name(config.name)), step, adapters, family)
