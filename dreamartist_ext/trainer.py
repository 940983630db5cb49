"""The DreamArtist training story, host-agnostic.

    prepare_run (preparation.py) -> a Trainer on a binding checks what needs the model -> create (or load) the
    pair -> attach adapters -> cache latents -> loop:
        draw images, prompts, timesteps and noise from one seeded generator
        one text-encoder call for [negative prompts; positive prompts]
        one U-Net call on [z_t; z_t] with [c_neg; c_pos]        -> eps_neg, eps_pos
        eps_hat = eps_neg + g (eps_pos - eps_neg); MSE to the noise; + L1 of the decoded z0_hat
        AdamW on the embeddings and adapters only; skip non-finite steps
    save the pair, the adapters, a resumable checkpoint, the loss log and plot; previews on the way.

A stop request or Ctrl-C ends the run at a step boundary and saves it. Nothing is written before every input has
been checked, and the model is handed back exactly as it came.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import files
from .adapters import AdapterSpec, BranchAdapters
from .checkpoints import Counters, restore_checkpoint, save_checkpoint
from .data import render_prompt
from .embeddings import EmbeddingPair, create_pair
from .errors import TrainingError
from .logs import LossLog, plot_losses
from .losses import LossTerms, PerceptualLoss, PerceptualLossUnavailable
from .model import NEG, POS, DiffusionBinding, UnsupportedModelError, check_family, frozen
from .names import negative_name
from .objective import LossInputs, dreamartist_loss
from .outputs import OutputLayout, save_pair
from .preparation import PreparedRun

log = logging.getLogger(__name__)

__all__ = ["LOG_FIELDS", "OutputLayout", "StepReport", "TrainCallbacks", "TrainResult", "Trainer", "TrainingError"]

LOG_FIELDS = ("loss", "loss_denoise", "loss_rec", "loss_lpips", "lr", "skipped")


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
    files: list[Path]  # the final save: pair, adapters, checkpoint, loss log and plot
    message: str
    last_values: dict[str, float] = field(default_factory=dict)
    start_step: int = 0  # where this run began (a resumed or continued run starts past 0)
    checkpoints: list[Path] = field(default_factory=list)  # every checkpoint of this run still on disk
    previews: list[Path] = field(default_factory=list)

    @property
    def steps_run(self) -> int:
        return self.step - self.start_step


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
        return {"order": list(self.order), "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.order, self.position = list(state["order"]), int(state["position"])


@contextlib.contextmanager
def _interrupt_deferred(on_interrupt: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C in the middle of the parameter update would leave some tensors updated and others not: a SIGINT
    that arrives inside this block is only recorded (``on_interrupt``) and the loop stops after the step."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: on_interrupt())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


# -- the trainer --------------------------------------------------------------------------------------------------


class Trainer:
    """Trains one prepared run on a binding. Building it checks what depends on the model (TrainingError)."""

    def __init__(self, binding: DiffusionBinding, prepared: PreparedRun, *,
                 callbacks: TrainCallbacks | None = None) -> None:
        self.binding = binding
        self.prepared = prepared
        self.config = prepared.config
        self.layout = prepared.layout
        self.callbacks = callbacks or TrainCallbacks()
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.counters = Counters(step=prepared.existing.step if prepared.existing is not None else 0)
        self.pair: EmbeddingPair | None = None
        self.adapters: BranchAdapters | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.cuda.amp.GradScaler | None = None
        self.perceptual: PerceptualLoss | None = None
        self._interrupt_pending = False
        self._checkpoints: list[Path] = []
        self._previews: list[Path] = []
        self._check_model()
        self.precision = self._pick_precision()

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def steps_total(self) -> int:
        return self.prepared.steps_total

    def _check_model(self) -> None:
        self.config.validate(self.binding.size_multiple)
        existing = self.prepared.existing
        if existing is not None:
            try:
                check_family(self.binding, existing.family, self.config.name)
            except UnsupportedModelError as error:
                raise TrainingError(str(error)) from None
        if existing is not None and existing.positive.shape[1] != self.binding.token_dim:
            raise TrainingError(
                f"{self.config.name} has {existing.positive.shape[1]}-wide vectors; this model needs "
                f"{self.binding.token_dim} (it was made for another model family)"
            )

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
        binding, config, prepared = self.binding, self.config, self.prepared
        if config.uses_reconstruction and config.perceptual_weight > 0:
            try:
                self.perceptual = PerceptualLoss(binding.device, random_trunk=config.perceptual_random_trunk)
            except PerceptualLossUnavailable as error:
                raise TrainingError(str(error)) from None
        if prepared.existing is not None:
            self.pair = EmbeddingPair(config.name, prepared.existing.positive, prepared.existing.negative)
        else:
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
                for branch, layers in (prepared.existing.adapters if prepared.existing else {}).items():
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
            if prepared.checkpoint is not None:
                self.counters, order = restore_checkpoint(
                    prepared.checkpoint, pair=self.pair, adapters=self.adapters, optimizer=self.optimizer,
                    generator=self.generator, scaler=self.scaler)
                self._order.restore(order)
            self.loss_log = LossLog(self.layout.loss_csv, LOG_FIELDS)
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
        for image in self.prepared.images:
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
        config, pair, rates = self.config, self.pair, self.prepared.learning_rates
        groups = [([pair.positive], rates["embedding"], 1.0)]
        if pair.negative is not None:
            groups.append(([pair.negative], rates["embedding"], config.negative_lr_scale))
        if self.adapters is not None:
            for part in ("unet", "te"):
                for branch, scale in ((POS, 1.0), (NEG, config.negative_adapter_lr_scale)):
                    params = self.adapters.parameters(branch, part)
                    if params:
                        groups.append((params, rates[part], scale))
        self._schedules = [(schedule, scale) for _, schedule, scale in groups]
        self.optimizer = torch.optim.AdamW(
            [{"params": params} for params, _, _ in groups], lr=1e-3, betas=tuple(config.adam_betas),
            weight_decay=config.weight_decay,
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
        config, counters = self.config, self.counters
        status, message = "finished", ""
        values: dict[str, float] = {}
        started, start_step = time.perf_counter(), self.step
        while self.step < self.steps_total:
            if self.callbacks.should_stop() or self._interrupt_pending:
                status = "interrupted"
                break
            boundary = self.generator.get_state(), self._order.state()
            try:
                lr = self._set_learning_rates(self.step)
                values, finite = self._optimizer_step()
            except KeyboardInterrupt:  # Ctrl-C mid-step: drop the step in flight, save the boundary it began at
                self.generator.set_state(boundary[0])
                self._order.restore(boundary[1])
                self.optimizer.zero_grad(set_to_none=True)
                status = "interrupted"
                break
            counters.step += 1
            if finite:
                counters.bad_in_a_row = 0
            else:
                counters.skipped += 1
                counters.bad_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", self.step)
            try:  # the step is done: an interrupt from here on stops at this boundary
                self.loss_log.append(self.step, {**values, "lr": lr, "skipped": float(not finite)})
                if counters.bad_in_a_row >= config.max_bad_steps:
                    status = "diverged"
                    message = (
                        f"the loss was not finite for {counters.bad_in_a_row} steps in a row (last at step "
                        f"{self.step}); the last good state was kept. Lower the learning rate or the guidance, or "
                        f"use fp32."
                    )
                    break
                done, elapsed = self.step - start_step, time.perf_counter() - started
                rate = done / elapsed if elapsed > 0 else 0.0
                if self.callbacks.on_step:
                    self.callbacks.on_step(StepReport(
                        self.step, self.steps_total, values, lr, rate,
                        (self.steps_total - self.step) / rate if rate > 0 else math.inf, counters.skipped,
                    ))
                if config.save_every and self.step % config.save_every == 0 and self.step < self.steps_total:
                    self._save()
                if config.preview_every and self.step % config.preview_every == 0 and self.step < self.steps_total:
                    self._preview()
            except KeyboardInterrupt:
                status = "interrupted"
                break
        counters.elapsed += time.perf_counter() - started
        written = self._save()
        if status == "finished":  # previews at the end whatever preview_every says (0 = only then)
            self._preview()
        steps_run = self.step - self.prepared.start_step
        if status == "interrupted":
            message = f"interrupted at step {self.step} after {steps_run} steps of this run"
        elif status == "finished":
            message = f"trained {config.name} for {steps_run} steps"
            if self.prepared.start_step:
                message += f" (from step {self.prepared.start_step} to {self.step})"
            if counters.skipped:
                message += f" ({counters.skipped} non-finite steps skipped)"
        return TrainResult(status, self.step, written, message, values, start_step=self.prepared.start_step,
                           checkpoints=[p for p in self._checkpoints if p.exists()], previews=list(self._previews))

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
        with _interrupt_deferred(self._note_interrupt):
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

    def _note_interrupt(self) -> None:
        self._interrupt_pending = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.binding.device.type, dtype=self.precision)

    def _draw_batch(self) -> list[_Sample]:
        config, generator = self.config, self.generator
        samples = []
        for _ in range(config.batch_size):
            index = self._order.next(generator)
            templates = self.prepared.templates
            template = templates[int(torch.randint(len(templates), (1,), generator=generator))]
            caption = self.prepared.images[index // (2 if config.flip else 1)].caption
            prompt = render_prompt(template, "[name]", caption, shuffle_tags=config.shuffle_tags,
                                   tag_dropout=config.tag_dropout, generator=generator)
            samples.append(_Sample(index, prompt))
        return samples

    def _micro_batch_loss(self, samples: list[_Sample]) -> LossTerms:
        """The micro-batch's loss; images of different sizes (aspect-ratio buckets) are evaluated size by size and
        weighted by their share, which is exactly the batch mean since every term is a mean of per-sample terms."""
        groups: dict[tuple[int, ...], list[_Sample]] = {}
        for sample in samples:
            groups.setdefault(tuple(self._cache[sample.image].mean.shape), []).append(sample)
        if len(groups) == 1:
            return self._same_size_loss(samples)
        parts = [(self._same_size_loss(group), len(group) / len(samples)) for group in groups.values()]
        return LossTerms.weighted_sum(parts)

    def _same_size_loss(self, samples: list[_Sample]) -> LossTerms:
        """Draw these samples' latents, timesteps and noise, then evaluate the objective."""
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
            binding, inputs, guidance=self.prepared.guidance, reconstruction_weight=config.reconstruction_weight,
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

    def _save(self) -> list[Path]:
        """Write the pair, the adapters, a checkpoint, the loss log's plot; returns the paths written."""
        written = save_pair(self.binding, self.config, self.layout, self.pair, self.step, self.adapters)
        checkpoint = save_checkpoint(
            self.layout, self.config, self.counters, pair=self.pair, adapters=self.adapters,
            optimizer=self.optimizer, generator=self.generator, order=self._order.state(), scaler=self.scaler,
            model=self.binding.model_info())
        self._checkpoints = [p for p in self._checkpoints if p != checkpoint] + [checkpoint]
        written += [checkpoint, self.layout.loss_csv]
        rows = self.loss_log.read()
        if rows:
            fields = [f for f in ("loss", "loss_denoise", "loss_rec") if any(f in r for r in rows)]
            written.append(plot_losses(rows, self.layout.loss_png, title=f"{self.config.name}: loss", fields=fields))
        if self.callbacks.on_save:
            self.callbacks.on_save(self.step, written)
        return written

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
        self._previews += paths
        if self.callbacks.on_preview:
            self.callbacks.on_preview(self.step, paths)


def _stack_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Stack per-image weights (cached weights are all present or all absent)."""
    return torch.stack(tensors) if tensors and all(t is not None for t in tensors) else None
