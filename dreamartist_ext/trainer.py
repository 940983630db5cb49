"""The DreamArtist training story, host-agnostic.

    validate everything -> create (or load) the pair -> attach adapters -> cache latents -> loop:
        draw images, prompts, timesteps and noise from one seeded generator
        one text-encoder call for [negative prompts; positive prompts]
        one U-Net call on [z_t; z_t] with [c_neg; c_pos]        -> eps_neg, eps_pos
        eps_hat = eps_neg + g (eps_pos - eps_neg); MSE to the noise; + L1 of the decoded z0_hat
        AdamW on the embeddings and adapters only; skip non-finite steps
    save the pair, the adapters, a resumable checkpoint, the loss log and plot; previews on the way.

Nothing is written before every input has been checked, and the model is handed back exactly as it came.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import __version__, files
from .adapters import AdapterSpec, BranchAdapters
from .config import ConfigError, TrainConfig
from .data import TrainImage, load_templates, load_training_images, render_prompt, resolve_template
from .embeddings import EmbeddingPair, create_pair
from .logs import LossLog, plot_losses
from .losses import LossTerms, PerceptualLoss, PerceptualLossUnavailable
from .model import NEG, POS, DiffusionBinding, frozen
from .objective import LossInputs, dreamartist_loss
from .names import negative_name, validate_concept_name
from .schedules import LearningRateSchedule

log = logging.getLogger(__name__)

LOG_FIELDS = ("loss", "loss_denoise", "loss_rec", "loss_lpips", "lr", "skipped")
KEEP_CHECKPOINTS = 3


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message says why and what to do."""


# -- where files go -----------------------------------------------------------------------------------------------


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


# -- what the caller sees -----------------------------------------------------------------------------------------


@dataclass
class StepReport:
    step: int  # optimizer steps done
    total: int
    values: dict[str, float]
    learning_rate: float
    steps_per_second: float
    eta_seconds: float
    skipped: int


@dataclass
class TrainResult:
    status: str  # "finished", "interrupted" or "diverged"
    step: int
    files: list[Path]
    message: str
    last_values: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainCallbacks:
    on_step: Callable[[StepReport], None] | None = None
    # preview(step) -> PIL images, made while the current embeddings and adapters are in place
    preview: Callable[[int], Sequence[Any]] | None = None
    on_preview: Callable[[int, list[Path]], None] | None = None
    on_save: Callable[[int, list[Path]], None] | None = None
    should_stop: Callable[[], bool] = lambda: False


# -- one micro-batch ----------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    image: int  # index into the cache (each orientation of each image is one entry)
    prompt: str  # with "[name]" still in it


@dataclass
class _CachedImage:
    mean: torch.Tensor  # scaled latent mean [4, h, w] (device)
    std: torch.Tensor
    fixed: torch.Tensor | None  # the latent used every step ("once"/"deterministic")
    latent_weight: torch.Tensor | None  # [1, h, w]
    pixels: torch.Tensor  # [3, H, W] on CPU
    pixel_weight: torch.Tensor | None


class _Order:
    """Epoch-shuffled image order drawn from the run's generator; its state goes into checkpoints."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.order: list[int] = []
        self.position = 0

    def next(self, generator: torch.Generator) -> int:
        if self.position >= len(self.order):
            self.order = torch.randperm(self.count, generator=generator).tolist()
            self.position = 0
        self.position += 1
        return self.order[self.position - 1]

    def state(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.order, self.position = list(state["order"]), int(state["position"])


# -- file metadata and step-0 pairs ----------------------------------------------------------------------------------


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


def create_pair_files(binding: DiffusionBinding, config: TrainConfig, layout: OutputLayout, *,
                      overwrite: bool = False) -> list[Path]:
    """Write a fresh step-0 pair (the WebUI's "create" step); training later continues from these files."""
    try:
        validate_concept_name(config.name)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    words = [config.name] + ([negative_name(config.name)] if config.use_negative else [])
    existing = [layout.embedding_path(w) for w in words if layout.embedding_path(w).exists()]
    if existing and not overwrite:
        raise TrainingError(f"{existing[0].name} already exists in {existing[0].parent}; choose another name or "
                            f"overwrite it")
    pair = create_pair(
        binding, config.name, init_text=config.init_text, positive_vectors=config.positive_vectors,
        negative_vectors=config.negative_vectors, negative_noise=config.negative_noise,
        with_negative=config.use_negative, generator=torch.Generator().manual_seed(config.seed),
    )
    layout.embeddings_dir.mkdir(parents=True, exist_ok=True)
    written = [files.save_embedding(layout.embedding_path(config.name), pair.positive,
                                    embedding_metadata(binding, config, "positive", 0, adapters=False))]
    if pair.negative is not None:
        written.append(files.save_embedding(layout.embedding_path(negative_name(config.name)), pair.negative,
                                            embedding_metadata(binding, config, "negative", 0, adapters=False)))
    return written


# -- the trainer --------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        binding: DiffusionBinding,
        config: TrainConfig,
        layout: OutputLayout,
        *,
        callbacks: TrainCallbacks | None = None,
        resume: str | Path | None = None,
        overwrite: bool = False,
        continue_existing: bool = False,
        template_dirs: Sequence[Path] = (),
    ) -> None:
        self.binding = binding
        self.config = config
        self.layout = layout
        self.callbacks = callbacks or TrainCallbacks()
        self.resume = Path(resume) if resume else None
        self.overwrite = overwrite
        self.continue_existing = continue_existing
        self.template_dirs = tuple(template_dirs)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.skipped = 0
        self.bad_in_a_row = 0
        self.elapsed = 0.0
        self.pair: EmbeddingPair | None = None
        self.adapters: BranchAdapters | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.cuda.amp.GradScaler | None = None
        self.perceptual: PerceptualLoss | None = None
        self._checkpoint: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._initial_adapters: dict[str, dict[str, files.LoraLayer]] | None = None

    # ---- preparation: everything that can fail, before anything is written --------------------------------------

    def prepare(self) -> None:
        config = self.config
        try:
            config.validate(self.binding.size_multiple)
        except ConfigError as error:
            raise TrainingError(str(error)) from None
        if not config.images:
            raise TrainingError("no training images given")
        self.guidance = config.guidance_schedule()
        self.images: list[TrainImage] = load_training_images(config.images, config.width, config.height,
                                                             resize=config.resize)
        template_path = resolve_template(config.template, self.template_dirs)
        self.templates = load_templates(template_path)
        if config.uses_reconstruction and config.perceptual_weight > 0:
            try:
                self.perceptual = PerceptualLoss(self.binding.device, random_trunk=config.perceptual_random_trunk)
            except PerceptualLossUnavailable as error:
                raise TrainingError(str(error)) from None
        if self.resume is not None:
            self._checkpoint = self._read_checkpoint(self.resume)
        else:
            self._check_existing_files()
        # like the WebUI: an embedding schedule whose last item names a step ends training there
        schedule_end = LearningRateSchedule.parse(config.embedding_lr).end_step
        self.steps_total = min(config.steps, schedule_end) if schedule_end else config.steps
        self.precision = self._pick_precision()

    def _check_existing_files(self) -> None:
        config = self.config
        words = [config.name] + ([negative_name(config.name)] if config.use_negative else [])
        existing = [self.layout.embedding_path(w) for w in words if self.layout.embedding_path(w).exists()]
        if existing and not (self.overwrite or self.continue_existing):
            raise TrainingError(
                f"{existing[0].name} already exists in {existing[0].parent}; choose another name, overwrite it, "
                f"or continue training it"
            )
        if existing and self.continue_existing and not self.overwrite:
            vectors = {}
            for word in words:
                path = self.layout.embedding_path(word)
                if not path.exists():
                    raise TrainingError(f"cannot continue: {path.name} is missing next to {existing[0].name}")
                vectors[word], meta = files.load_embedding(path)
                if word == config.name:
                    self.step = int(meta.get("step", 0) or 0)
            negative = vectors.get(negative_name(config.name))
            self.pair = EmbeddingPair(config.name, vectors[config.name], negative)
            # the saved pair decides the vector counts (the metadata must describe what is written)
            self.config = config = dataclasses.replace(
                config, positive_vectors=self.pair.positive.shape[0],
                negative_vectors=negative.shape[0] if negative is not None else config.negative_vectors)
            if self.pair.positive.shape[1] != self.binding.token_dim:
                raise TrainingError(
                    f"{config.name} has {self.pair.positive.shape[1]}-wide vectors; this model needs "
                    f"{self.binding.token_dim} (it was made for another model family)"
                )
            self._initial_adapters = {}
            for branch, word in ((POS, config.name), (NEG, negative_name(config.name))):
                path = self.layout.lora_path(word)
                if config.uses_adapters and path.exists():
                    self._initial_adapters[branch], _ = files.load_lora(path)

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not path.is_file():
            raise TrainingError(f"checkpoint {path} does not exist")
        try:
            tensors, state = files.load_training_state(path)
        except ValueError as error:
            raise TrainingError(f"checkpoint {path.name} cannot be read: {error}") from None
        saved = TrainConfig.from_dict(state["config"])
        # Options that shape tensors or the random stream must match for an exact continuation.
        for key in ("name", "positive_vectors", "negative_vectors", "use_negative", "unet_rank", "text_rank",
                    "batch_size", "gradient_accumulation", "seed", "width", "height", "latent_sampling", "flip"):
            if getattr(saved, key) != getattr(self.config, key):
                raise TrainingError(
                    f"checkpoint {path.name} was made with {key}={getattr(saved, key)!r}, this run has "
                    f"{getattr(self.config, key)!r}; resume with the same setting"
                )
        return tensors, state

    def _pick_precision(self) -> torch.dtype | None:
        choice, cuda = self.config.precision, self.binding.device.type == "cuda"
        if choice == "fp32" or (choice == "auto" and not cuda):
            return None
        if choice == "fp16":
            if not cuda:
                raise TrainingError("fp16 training needs a CUDA GPU; use fp32 or bf16 on the CPU")
            return torch.float16
        if choice == "bf16":
            return torch.bfloat16
        # auto on CUDA: match half-precision weights (no casts per op); otherwise bf16 where the GPU has it
        if self.binding.dtype == torch.float16 or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    # ---- the run --------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.prepare()
        binding, config = self.binding, self.config
        if self.pair is None:
            self.pair = create_pair(
                binding, config.name, init_text=config.init_text, positive_vectors=config.positive_vectors,
                negative_vectors=config.negative_vectors, negative_noise=config.negative_noise,
                with_negative=config.use_negative, generator=self.generator,
            )
        self.pair = self.pair.trainable(binding.device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(binding.trainable_roots()))
            stack.enter_context(binding.training_context())
            if config.uses_adapters:
                self.adapters = stack.enter_context(self._make_adapters())
                for branch, layers in (self._initial_adapters or {}).items():
                    self.adapters.load(branch, layers, source=f"{branch} adapter of {config.name}")
                binding.adapters = self.adapters
                stack.callback(setattr, binding, "adapters", None)
            stack.enter_context(binding.learned_words(self.pair.words()))
            # A decode with gradient keeps every full-resolution activation of the VAE decoder (about 5.5 GB at
            # 512 px); recomputing them in backward costs little, so reconstruction always checkpoints the decoder.
            parts = [part for part, wanted in (("unet", config.gradient_checkpointing),
                                               ("decoder", config.uses_reconstruction)) if wanted]
            if parts:
                binding.set_gradient_checkpointing(True, parts)
                stack.callback(binding.set_gradient_checkpointing, False, parts)
            self._cache = self._cache_images()
            self._order = _Order(len(self._cache))
            self._make_optimizer()
            self.loss_log = LossLog(self.layout.loss_csv, LOG_FIELDS)
            if self._checkpoint is not None:
                self._restore(*self._checkpoint)
            self.loss_log.truncate_after(self.step)
            return self._loop()

    def _make_adapters(self) -> BranchAdapters:
        config = self.config

        def spec(rank: int) -> AdapterSpec:
            return AdapterSpec(rank, config.adapter_alpha or float(rank))

        specs = {"unet": {POS: spec(config.unet_rank), NEG: spec(config.unet_rank if config.use_negative else 0)},
                 "te": {POS: spec(config.text_rank), NEG: spec(config.text_rank if config.use_negative else 0)}}
        return BranchAdapters(self.binding.adapter_sites(), specs, generator=self.generator)

    @torch.no_grad()
    def _cache_images(self) -> list[_CachedImage]:
        """Encode every image (and its mirror when flipping) once; keep only latents on the device."""
        cached = []
        for image in self.images:
            for flipped in ((False, True) if self.config.flip else (False,)):
                pixels = image.pixels.flip(-1) if flipped else image.pixels
                weight = image.weight.flip(-1) if (flipped and image.weight is not None) else image.weight
                if not self.config.use_alpha_weight:
                    weight = None
                mean, std = self.binding.encode_pixels(pixels.unsqueeze(0))
                mean, std = mean[0].float(), std[0].float()
                fixed = None
                if self.config.latent_sampling == "deterministic":
                    fixed = mean
                elif self.config.latent_sampling == "once":
                    noise = torch.randn(mean.shape, generator=self.generator).to(mean.device)
                    fixed = mean + std * noise
                latent_weight = None
                if weight is not None:
                    latent_weight = F.interpolate(weight.unsqueeze(0), size=mean.shape[-2:], mode="area")[0]
                    latent_weight = latent_weight.to(mean.device)
                cached.append(_CachedImage(mean, std, fixed, latent_weight, pixels.cpu(), weight))
        if any(c.latent_weight is not None for c in cached):
            # a batch mixing weighted and unweighted images weighs the latter uniformly
            for c in cached:
                if c.latent_weight is None:
                    c.latent_weight = torch.ones_like(c.mean[:1])
                    c.pixel_weight = torch.ones_like(c.pixels[:1])
        return cached

    def _make_optimizer(self) -> None:
        config, pair = self.config, self.pair
        groups = [{"params": [pair.positive], "schedule": config.embedding_lr, "scale": 1.0, "label": "embedding"}]
        if pair.negative is not None:
            groups.append({"params": [pair.negative], "schedule": config.embedding_lr,
                           "scale": config.negative_lr_scale, "label": "negative embedding"})
        if self.adapters is not None:
            for part, schedule in (("unet", config.unet_lr), ("te", config.text_lr)):
                for branch, scale in ((POS, 1.0), (NEG, config.negative_adapter_lr_scale)):
                    params = self.adapters.parameters(branch, part)
                    if params:
                        groups.append({"params": params, "schedule": schedule, "scale": scale,
                                       "label": f"{branch} {part} adapter"})
        for group in groups:
            group["schedule"] = LearningRateSchedule.parse(group["schedule"])
        self._schedules = [(g.pop("schedule"), g.pop("scale")) for g in groups]
        for group in groups:
            group.pop("label")
        self.optimizer = torch.optim.AdamW(
            groups, lr=1e-3, betas=tuple(config.adam_betas), weight_decay=config.weight_decay
        )
        if self.precision == torch.float16:
            self.scaler = torch.cuda.amp.GradScaler()

    def _set_learning_rates(self, step: int) -> float:
        for group, (schedule, scale) in zip(self.optimizer.param_groups, self._schedules):
            group["lr"] = schedule.rate_at(step) * scale
        return self.optimizer.param_groups[0]["lr"]

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> TrainResult:
        config = self.config
        status, message = "finished", ""
        values: dict[str, float] = {}
        started, start_step = time.perf_counter(), self.step
        while self.step < self.steps_total:
            if self.callbacks.should_stop():
                status, message = "interrupted", f"interrupted at step {self.step}"
                break
            lr = self._set_learning_rates(self.step)
            values, finite = self._optimizer_step()
            self.step += 1
            self.loss_log.append(self.step, {**values, "lr": lr, "skipped": float(not finite)})
            if finite:
                self.bad_in_a_row = 0
            else:
                self.skipped += 1
                self.bad_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", self.step)
                if self.bad_in_a_row >= config.max_bad_steps:
                    status = "diverged"
                    message = (
                        f"the loss was not finite for {self.bad_in_a_row} steps in a row (last at step {self.step}); "
                        f"the last good state was kept. Lower the learning rate or the guidance, or use fp32."
                    )
                    break
            done = self.step - start_step
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            if self.callbacks.on_step:
                self.callbacks.on_step(StepReport(
                    self.step, self.steps_total, values, lr, rate,
                    (self.steps_total - self.step) / rate if rate > 0 else math.inf, self.skipped,
                ))
            if config.save_every and self.step % config.save_every == 0 and self.step < self.steps_total:
                self._save(intermediate=True)
            if config.preview_every and self.step % config.preview_every == 0 and self.step < self.steps_total:
                self._preview()
        self.elapsed += time.perf_counter() - started
        written = self._save(intermediate=False)
        if config.preview_every and status == "finished":
            self._preview()
        if status == "finished":
            message = f"trained {config.name} for {self.step} steps"
            if self.skipped:
                message += f" ({self.skipped} non-finite steps skipped)"
        return TrainResult(status, self.step, written, message, values)

    def _optimizer_step(self) -> tuple[dict[str, float], bool]:
        """k micro-batches, one update. Returns the mean loss values and whether the update happened."""
        config, optimizer = self.config, self.optimizer
        k = config.gradient_accumulation
        sums: dict[str, float] = {}
        finite = True
        optimizer.zero_grad(set_to_none=True)
        for _ in range(k):
            with self._autocast():
                terms = self._micro_batch_loss(self._draw_batch())
            if not torch.isfinite(terms.total.detach()):
                finite = False
                break
            loss = terms.total / k
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key, value in terms.as_floats().items():
                sums[key] = sums.get(key, 0.0) + value / k
        if finite and self.scaler:
            self.scaler.unscale_(optimizer)
        if finite:
            finite = all(torch.isfinite(p.grad).all() for p in self._trainable() if p.grad is not None)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update(self.scaler.get_scale() / 2)  # what a skipped fp16 step would do
            return sums or {"loss": float("nan")}, False
        if config.clip_mode == "value":
            torch.nn.utils.clip_grad_value_(self._trainable(), config.clip_value)
        elif config.clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(self._trainable(), config.clip_value)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sums, True

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.binding.device.type, dtype=self.precision)

    def _draw_batch(self) -> list[_Sample]:
        config, generator = self.config, self.generator
        samples = []
        for _ in range(config.batch_size):
            index = self._order.next(generator)
            template = self.templates[int(torch.randint(len(self.templates), (1,), generator=generator))]
            caption = self.images[index // (2 if config.flip else 1)].caption
            prompt = render_prompt(template, "[name]", caption, shuffle_tags=config.shuffle_tags,
                                   tag_dropout=config.tag_dropout, generator=generator)
            samples.append(_Sample(index, prompt))
        return samples

    def _micro_batch_loss(self, samples: list[_Sample]) -> LossTerms:
        """Draw this micro-batch's latents, timesteps and noise, then evaluate the objective."""
        binding, config, generator = self.binding, self.config, self.generator
        device = binding.device
        cached = [self._cache[s.image] for s in samples]
        latents = []
        for item in cached:
            if item.fixed is not None:
                latents.append(item.fixed)
            else:  # "random": a fresh draw from the cached posterior every step
                latents.append(item.mean + item.std * torch.randn(item.mean.shape, generator=generator).to(device))
        latents = torch.stack(latents)
        timesteps = torch.randint(0, binding.num_timesteps, (len(samples),), generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        inputs = LossInputs(
            latents=latents,
            noise=noise,
            timesteps=timesteps,
            positive_prompts=[s.prompt.replace("[name]", config.name) for s in samples],
            negative_prompts=([s.prompt.replace("[name]", negative_name(config.name)) for s in samples]
                              if config.use_negative else None),
            latent_weight=_stack_or_none([c.latent_weight for c in cached]),
        )
        if config.uses_reconstruction:
            # pixels live on the CPU and travel only for the micro-batch that needs them
            inputs.pixels = torch.stack([c.pixels for c in cached]).to(device)
            weight = _stack_or_none([c.pixel_weight for c in cached])
            inputs.pixel_weight = weight.to(device) if weight is not None else None
            if config.reconstruction_scale < 1:
                inputs.crop = self._random_crop(latents.shape[-2:])
        return dreamartist_loss(
            binding, inputs, guidance=self.guidance, reconstruction_weight=config.reconstruction_weight,
            perceptual=self.perceptual, perceptual_weight=config.perceptual_weight,
        )

    def _random_crop(self, size: torch.Size) -> tuple[int, int, int, int]:
        """A random latent window with sides ``reconstruction_scale`` of the whole (decoding less is cheaper)."""
        h, w = int(size[0]), int(size[1])
        ch = max(1, round(h * self.config.reconstruction_scale))
        cw = max(1, round(w * self.config.reconstruction_scale))
        top = int(torch.randint(h - ch + 1, (1,), generator=self.generator))
        left = int(torch.randint(w - cw + 1, (1,), generator=self.generator))
        return top, left, ch, cw

    # ---- saving, previews, resuming ---------------------------------------------------------------------------

    def _metadata(self, role: str) -> dict[str, Any]:
        return embedding_metadata(self.binding, self.config, role, self.step, adapters=self.adapters is not None)

    def _save(self, *, intermediate: bool) -> list[Path]:
        """Write the pair, the adapters, a checkpoint and the plot; returns the paths written."""
        name, pair = self.config.name, self.pair
        for folder in (self.layout.embeddings_dir, self.layout.lora_dir, self.layout.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)
        written = [files.save_embedding(self.layout.embedding_path(name), pair.positive.detach(),
                                        self._metadata("positive"))]
        if pair.negative is not None:
            written.append(files.save_embedding(self.layout.embedding_path(negative_name(name)),
                                                pair.negative.detach(), self._metadata("negative")))
        if self.adapters is not None:
            for branch, word, role in ((POS, name, "positive"), (NEG, negative_name(name), "negative")):
                layers = self.adapters.export(branch)
                if layers:
                    meta = {**self._metadata(role), "ss_output_name": word}
                    written.append(files.save_lora(self.layout.lora_path(word), layers, meta))
        written.append(self._save_checkpoint())
        rows = self.loss_log.read()
        if rows:
            fields = [f for f in ("loss", "loss_denoise", "loss_rec") if any(f in r for r in rows)]
            written.append(plot_losses(rows, self.layout.loss_png, title=f"{name}: loss", fields=fields))
        if self.callbacks.on_save:
            self.callbacks.on_save(self.step, written)
        return written

    def _save_checkpoint(self) -> Path:
        tensors = {"embedding.pos": self.pair.positive.detach().cpu()}
        if self.pair.negative is not None:
            tensors["embedding.neg"] = self.pair.negative.detach().cpu()
        if self.adapters is not None:
            tensors.update({f"adapter.{k}": v for k, v in self.adapters.state_tensors().items()})
        optim_tensors, optim_meta = files.flatten_optimizer_state(self.optimizer.state_dict())
        tensors.update(optim_tensors)
        tensors["rng.generator"] = files.generator_state_tensor(self.generator)
        state = {
            "version": __version__,
            "step": self.step,
            "skipped": self.skipped,
            "bad_in_a_row": self.bad_in_a_row,
            "elapsed": self.elapsed,
            "config": self.config.to_dict(),
            "order": self._order.state(),
            "optimizer": optim_meta,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "model": self.binding.model_info().__dict__,
        }
        path = self.layout.checkpoints_dir / f"{self.config.name}-{self.step:06d}.safetensors"
        files.save_training_state(path, tensors, state)
        for old in sorted(self.layout.checkpoints_dir.glob(f"{self.config.name}-*.safetensors"))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.pair.positive.copy_(tensors["embedding.pos"])
            if self.pair.negative is not None:
                self.pair.negative.copy_(tensors["embedding.neg"])
        if self.adapters is not None:
            self.adapters.load_state_tensors({k[len("adapter."):]: v for k, v in tensors.items()
                                              if k.startswith("adapter.")})
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        self.optimizer.load_state_dict(files.unflatten_optimizer_state(optim_tensors, state["optimizer"]))
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        files.restore_generator(tensors["rng.generator"], self.generator)
        self._order.restore(state["order"])
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.elapsed = float(state["elapsed"])

    def _preview(self) -> None:
        if not self.callbacks.preview:
            return
        generator_state = self.generator.get_state()  # previews must not shift the training's random stream
        try:
            with torch.no_grad():
                images = list(self.callbacks.preview(self.step))
        except Exception as error:  # a failed preview must not kill a long run
            log.warning("preview at step %d failed: %s", self.step, error)
            return
        finally:
            self.generator.set_state(generator_state)
        self.layout.previews_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(images):
            path = self.layout.previews_dir / f"{self.config.name}-{self.step:06d}-{i}.png"
            files.atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(path)
        if self.callbacks.on_preview:
            self.callbacks.on_preview(self.step, paths)


def _stack_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Stack per-image weights (cached weights are all present or all absent)."""
    return torch.stack(tensors) if tensors and all(t is not None for t in tensors) else None
