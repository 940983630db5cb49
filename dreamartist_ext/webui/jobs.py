"""DreamArtist training as a job of the AUTOMATIC1111 host.

One job at a time trains on ``shared.sd_model`` as loaded. A job holds the host's queue lock, so no generation
(and no embedding reload) runs while it trains; it reports through ``shared.state`` (progress bar, Interrupt
button, ``GET /sdapi/v1/progress``), writes into the host's embeddings and LoRA folders, and refreshes both lists
when it ends, whatever the outcome. Before and after every job the model is fingerprinted, so a status can
say whether the model was handed back exactly as it came (``model_restored``).

The UI runs a job in its own thread (``run_blocking``, inside ``wrap_gradio_gpu_call``); the HTTP API starts a
background thread (``start``) and polls ``status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..concepts import list_concepts
from ..config import ConfigError, PreviewConfig, TrainConfig, option
from ..errors import DreamArtistError, InvalidInput, TrainingError
from ..names import clashing_names, negative_name, validate_concept_name
from ..outputs import OutputLayout, create_pair_files
from ..preparation import PreparedRun, prepare_run
from ..progress import progress_text
from ..prompt_words import complete_negative
from ..trainer import StepReport, TrainCallbacks, Trainer
from . import host
from .binding import WebuiBinding, check_supported
from .routing import routed_generation

log = logging.getLogger(__name__)

JOB_NAME = "dreamartist"  # shared.state.job while a job runs
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("finished", "interrupted", "diverged", "failed")
KEEP_JOBS = 20  # finished jobs remembered for status queries
PREVIEW_KEYS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")


class BusyError(DreamArtistError):
    """A DreamArtist job is already running; the message says which one."""


# What a caller reports as "bad request": bad user input, raised before anything is written. Anything else is a
# bug and keeps its traceback.
REQUEST_ERRORS = (InvalidInput,)


@dataclass
class TrainRequest:
    config: TrainConfig
    resume: str | None = None  # checkpoint path
    overwrite: bool = False  # replace an existing pair
    continue_existing: bool = True  # train the existing (e.g. just created) pair from its saved state
    # {prompt, negative_prompt, steps, sampler_name, cfg_scale, seed, width, height} of the txt2img tab
    preview_from_txt2img: dict | None = None
    preview_sampler: str | None = None  # sampler name for previews (None = host default)


@dataclass
class JobStatus:
    """A job's state as the tab shows it and the API sends it (``as_json``). The API's status model is generated
    from these fields; their help text is its documentation."""

    id: str = option(dataclasses.MISSING, "the job id")
    state: str = option("queued", "queued, running, finished, interrupted, diverged or failed")
    step: int = option(0, "optimizer steps done")
    total: int = option(0, "optimizer steps of the run")
    values: dict[str, float] = option(help="last loss values and learning rate", factory=dict)
    steps_per_second: float = option(0.0, "training speed")
    eta_seconds: float | None = option(None, "estimated seconds left")
    message: str = option("", "what the job is doing, or how it ended, in a line")
    error: str | None = option(None, "why it failed")
    files: list[str] = option(help="the files written so far", factory=list)
    previews: list[str] = option(help="the preview images made so far", factory=list)
    loss_plot: str | None = option(None, "the loss plot image, once written")
    started_at: float | None = option(None, "when training started (Unix time)")
    finished_at: float | None = option(None, "when the job ended (Unix time)")
    name: str = option("", "the concept being trained")
    model_restored: bool | None = option(None, "the model was left exactly as before the job (known once the job "
                                               "has ended)")
    attention: str | None = option(None, "the host's attention optimisation the training steps ran with "
                                         "(setting 'Attention while training')")
    created_at: float = option(help="when the job was created (Unix time)", factory=time.time)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def as_json(self) -> dict[str, Any]:
        """A plain dict that ``json.dumps(..., allow_nan=False)`` accepts (non-finite numbers become None)."""
        out = dataclasses.asdict(self)
        out["values"] = {k: _finite_or_none(v) for k, v in self.values.items()}
        out["eta_seconds"] = _finite_or_none(self.eta_seconds)
        out["steps_per_second"] = _finite_or_none(self.steps_per_second) or 0.0
        return out

    def copy(self) -> "JobStatus":
        return dataclasses.replace(self, values=dict(self.values), files=list(self.files),
                                   previews=list(self.previews))


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


# -- pure helpers (no host needed) ---------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of a model's state: every parameter and buffer (name, storage pointer, in-place version
    counter, requires_grad, whether it holds a gradient) and every module (name, class, train/eval mode, hook
    counts, instance-level forward). Equal fingerprints mean nothing was replaced, edited in place, re-flagged or
    left hooked -- without copying a single weight."""
    tensors = tuple(
        (name, t.data_ptr(), t._version, t.requires_grad, t.grad is None if isinstance(t, nn.Parameter) else True)
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    )
    modules = tuple(
        (name, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
         "forward" in m.__dict__)
        for name, m in model.named_modules()
    )
    return tensors, modules


def host_fingerprint(sd_model) -> tuple:
    """:func:`model_fingerprint` plus the host's attention patches (training may switch them for its duration)."""
    return (*model_fingerprint(sd_model), host.attention_patches())


def fingerprint_difference(before: tuple, after: tuple, limit: int = 5) -> list[str]:
    """Names of what changed between two fingerprints (for the log), at most ``limit``."""
    changed = []
    for label, old_part, new_part in zip(("tensor", "module", "attention"), before, after):
        old = {entry[0]: entry for entry in old_part}
        new = {entry[0]: entry for entry in new_part}
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                changed.append(f"{label} {name or '<root>'}")
    return changed[:limit] + ([f"... {len(changed) - limit} more"] if len(changed) > limit else [])


@dataclass(frozen=True)
class PreviewSettings:
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    count: int
    sampler_name: str | None  # None = the host's default sampler


def preview_settings(config: TrainConfig, from_txt2img: Mapping[str, Any] | None = None,
                     sampler: str | None = None) -> PreviewSettings:
    """What previews generate: ``config.preview``, or the txt2img values when given; ``[name]`` becomes the
    concept, ``name-neg`` joins the negative prompt, size 0 means the training size. Bad values -> ConfigError."""
    preview = config.preview
    if not isinstance(preview, PreviewConfig):
        raise ConfigError("option 'preview' must be an object with prompt, negative_prompt, steps, guidance, seed, "
                          "width, height, count")
    values: dict[str, Any] = dict(prompt=preview.prompt, negative_prompt=preview.negative_prompt,
                                  steps=preview.steps, cfg_scale=preview.guidance, seed=preview.seed,
                                  width=preview.width, height=preview.height, sampler_name=None)
    if from_txt2img:
        unknown = sorted(set(from_txt2img) - set(PREVIEW_KEYS))
        if unknown:
            raise ConfigError(f"unknown txt2img preview value(s): {', '.join(unknown)}")
        values.update({k: v for k, v in from_txt2img.items() if v is not None})
    if sampler:
        values["sampler_name"] = sampler
    for key, kind in (("prompt", str), ("negative_prompt", str)):
        if not isinstance(values[key], kind):
            raise ConfigError(f"preview {key} must be text, got {values[key]!r}")
    for key in ("steps", "seed", "width", "height"):
        value = values[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # gradio sliders hand over floats
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"preview {key} must be a whole number, got {values[key]!r}")
        values[key] = value
    cfg = values["cfg_scale"]
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ConfigError(f"preview guidance (CFG scale) must be a number >= 0, got {cfg!r}")
    if values["steps"] < 1:
        raise ConfigError("preview steps must be at least 1")
    width = values["width"] or config.width
    height = values["height"] or config.height
    for label, size in (("width", width), ("height", height)):
        if size < 64 or size > 4096 or size % 8:
            raise ConfigError(f"preview {label} {size} must be a multiple of 8 between 64 and 4096")
    sampler_name = values["sampler_name"]
    if sampler_name is not None and not isinstance(sampler_name, str):
        raise ConfigError(f"preview sampler must be a sampler name, got {sampler_name!r}")
    name = config.name
    prompt = values["prompt"].replace("[name]", name)
    negative = values["negative_prompt"].replace("[name]", name)
    if config.use_negative:
        negative, _ = complete_negative(negative, [name])
    return PreviewSettings(prompt, negative, values["steps"], float(cfg), values["seed"], width, height,
                           preview.count, sampler_name or None)


def name_conflicts(name: str, existing: Mapping[str, Path | None], own_files: Sequence[Path]) -> list[str]:
    """Names in ``existing`` (name -> file) that ``name``/``name-neg`` would shadow or be shadowed by, except
    our own pair's files (same name, same path): CLIP lower-cases prompts, so 'Cube' and 'cube' are one word."""
    own = {_resolved(p) for p in own_files}
    words = {name, negative_name(name)}
    return [other for other in clashing_names(name, existing)
            if not (other in words and existing[other] is not None and _resolved(existing[other]) in own)]


def _resolved(path: Path | str) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path)


def check_name_free(name: str, layout: OutputLayout) -> None:
    """Refuse a name that clashes case-insensitively with another embedding or LoRA the host knows."""
    words = (name, negative_name(name))
    clashes = name_conflicts(name, host.loaded_embedding_files(), [layout.embedding_path(w) for w in words])
    if clashes:
        raise TrainingError(
            f"the name {name!r} clashes with the existing embedding {clashes[0]!r}: prompts ignore case, so "
            f"both would answer to the same word; choose another name"
        )
    clashes = name_conflicts(name, host.lora_files(), [layout.lora_path(w) for w in words])
    if clashes:
        raise TrainingError(
            f"the name {name!r} clashes with the existing LoRA {clashes[0]!r} (<lora:{clashes[0]}:...> would be "
            f"ambiguous); choose another name"
        )


# -- jobs ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidatedJob:
    """A request that passed JobManager.validate, with what the job consumes: the prepared run (images decoded
    once) and the preview settings."""

    request: TrainRequest
    prepared: PreparedRun
    preview: PreviewSettings


@dataclass
class _Job:
    status: JobStatus
    validated: ValidatedJob | None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class JobManager:
    """One DreamArtist job at a time, with the status of recent ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._active: _Job | None = None  # the job holding the slot (queued or running)
        self._activity: str | None = None  # short work that holds the slot without a job (creating a pair)

    # ---- checks ---------------------------------------------------------------------------------------------

    def validate(self, request: TrainRequest) -> "ValidatedJob":
        """Every check that can be made before training; raises one of REQUEST_ERRORS, writes nothing. The result
        is what ``start`` and ``run_blocking`` take: the job trains on it without checking or decoding again."""
        from modules import shared

        config = request.config
        if not isinstance(config, TrainConfig):
            raise ConfigError("the request has no training configuration")
        validate_concept_name(config.name)  # before any path is built from it
        sd_model = shared.sd_model
        check_supported(sd_model)
        binding = WebuiBinding(sd_model)
        layout = host.host_layout(config.name)
        prepared = prepare_run(config, layout, resume=request.resume, overwrite=request.overwrite,
                               continue_existing=request.continue_existing, template_dirs=host.template_dirs(),
                               size_multiple=binding.size_multiple, native_size=binding.native_size)
        check_name_free(config.name, layout)
        preview = preview_settings(prepared.config, request.preview_from_txt2img, request.preview_sampler)
        host.sampler_and_scheduler(preview.sampler_name)
        Trainer(binding, prepared)  # the checks that need the model (token width, precision); writes nothing
        return ValidatedJob(request, prepared, preview)

    # ---- running --------------------------------------------------------------------------------------------

    def start(self, validated: "ValidatedJob", job_id: str | None = None) -> str:
        """Train a validated request in a background thread that waits for the host's queue; returns the job id."""
        job = self._reserve(validated, job_id)
        job.thread = threading.Thread(target=self._run_with_queue_lock, args=(job,), daemon=True,
                                      name=f"dreamartist-job-{job.status.id}")
        job.thread.start()
        return job.status.id

    def run_blocking(self, validated: "ValidatedJob", job_id: str | None = None, *,
                     take_queue_lock: bool = True) -> JobStatus:
        """Train a validated request in the calling thread; returns the final status (errors during training end
        in state "failed", they are not raised). With ``take_queue_lock=False`` the caller must already hold
        ``modules.call_queue.queue_lock`` and have called ``shared.state.begin`` (wrap_gradio_gpu_call does)."""
        job = self._reserve(validated, job_id)
        if take_queue_lock:
            self._run_with_queue_lock(job)
        else:
            try:
                self._execute(job)
            finally:
                self._release(job)
        return self.status(job.status.id)

    def status(self, job_id: str | None = None) -> JobStatus | None:
        with self._lock:
            if job_id is None:
                job = max(self._jobs.values(), key=lambda j: j.status.created_at, default=None)
            else:
                job = self._jobs.get(job_id)
            return job.status.copy() if job else None

    def recent(self) -> list[JobStatus]:
        """Known jobs, newest first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.status.created_at, reverse=True)
            return [j.status.copy() for j in jobs]

    def cancel(self, job_id: str | None = None) -> bool:
        """Ask a queued or running job to stop at the next step boundary (the trainer then saves). False if
        there is no such job or it has already ended."""
        with self._lock:
            job = self._active if job_id is None else self._jobs.get(job_id)
            if job is None or not job.status.active:
                return False
            job.cancel.set()
            job.status.message = "stopping at the next step..." if job.status.state == "running" else "cancelled"
            return True

    def ensure_idle(self) -> None:
        with self._lock:
            self._raise_if_busy()

    @contextlib.contextmanager
    def exclusive(self, activity: str) -> Iterator[None]:
        """Hold the job slot for short work that must not overlap a job (BusyError if one runs)."""
        with self._lock:
            self._raise_if_busy()
            self._activity = activity
        try:
            yield
        finally:
            with self._lock:
                self._activity = None

    def _raise_if_busy(self) -> None:
        if self._active is not None:
            s = self._active.status
            where = f"step {s.step}/{s.total}" if s.state == "running" else "waiting for the host's queue"
            raise BusyError(f"DreamArtist is already running job {s.id} (training {s.name!r}, {where}); wait for "
                            f"it to finish or cancel it")
        if self._activity is not None:
            raise BusyError(f"DreamArtist is busy {self._activity}; try again in a moment")

    def _reserve(self, validated: ValidatedJob, job_id: str | None) -> _Job:
        with self._lock:
            self._raise_if_busy()
            job_id = job_id or new_job_id()
            if job_id in self._jobs:
                raise ValueError(f"job id {job_id!r} is already in use")  # a bug of the caller, not user input
            prepared = validated.prepared
            job = _Job(JobStatus(job_id, name=prepared.config.name, total=prepared.steps_total,
                                 message="waiting for the host's queue"), validated)
            self._jobs[job_id] = job
            self._active = job
            finished = sorted((j for j in self._jobs.values() if not j.status.active),
                              key=lambda j: j.status.created_at)
            for old in finished[:max(0, len(self._jobs) - KEEP_JOBS)]:
                del self._jobs[old.status.id]
            return job

    def _release(self, job: _Job) -> None:
        with self._lock:
            if self._active is job:
                self._active = None

    def _update(self, job: _Job, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job.status, key, value)

    def _run_with_queue_lock(self, job: _Job) -> None:
        from modules import call_queue, shared

        try:
            with call_queue.queue_lock:
                shared.state.begin(job=JOB_NAME)
                try:
                    self._execute(job)
                finally:
                    shared.state.end()
                    shared.state.interrupted = False  # as wrap_gradio_call does after a job
        finally:
            self._release(job)

    def _execute(self, job: _Job) -> None:
        """Train; never raises for a training problem: the outcome goes into the job's status."""
        from modules import errors, shared

        prepared, state = job.validated.prepared, shared.state
        config = prepared.config
        self._update(job, state="running", started_at=time.time(), message="preparing")
        state.job, state.job_count, state.job_no = JOB_NAME, prepared.steps_total, 0
        state.textinfo = f"DreamArtist: preparing {config.name}"
        sd_model, before, layout = None, None, None
        outcome: dict[str, Any] = {"state": "failed", "error": "stopped unexpectedly",
                                   "message": "stopped unexpectedly"}  # if something like KeyboardInterrupt gets out
        try:
            if job.cancel.is_set():
                outcome = {"state": "interrupted", "message": "cancelled before it started; nothing was written"}
                return
            sd_model = shared.sd_model
            host.settle_host_networks(sd_model)
            before = host_fingerprint(sd_model)
            binding = WebuiBinding(sd_model)
            layout = prepared.layout
            trainer = Trainer(binding, prepared, callbacks=self._callbacks(job, layout))
            trainer.callbacks.preview = self._previewer(job, trainer)
            result = trainer.run()
            outcome = {"state": result.status, "step": result.step, "files": [str(p) for p in result.files],
                       "message": result.message + (" (saved)" if result.status == "interrupted" else "")}
            if result.last_values:
                outcome["values"] = {**job.status.values, **result.last_values}  # keeps the last "lr"
        except REQUEST_ERRORS as error:  # a problem with the input found once running (e.g. LPIPS weights)
            outcome = {"state": "failed", "error": str(error), "message": f"failed: {error}"}
        except Exception as error:
            outcome = {"state": "failed", "error": f"{type(error).__name__}: {error}",
                       "message": f"failed: {type(error).__name__}: {error}"}
            errors.report(f"DreamArtist: job {job.status.id} ({config.name}) failed", exc_info=True)
        finally:
            self._finish(job, sd_model, before, layout, outcome)

    def _finish(self, job: _Job, sd_model, before: tuple | None, layout: OutputLayout | None,
                outcome: dict[str, Any]) -> None:
        """Reload the host's lists, check the model, then publish the outcome and free the slot in one go (a
        client that sees the job ended may start the next one at once)."""
        from modules import errors, shared

        self._update(job, message="refreshing the host's embedding and LoRA lists")
        try:
            host.refresh_host_lists()
        except Exception:
            errors.report("DreamArtist: could not refresh the embedding/LoRA lists after training", exc_info=True)
        restored = None if before is None else host_fingerprint(sd_model) == before  # None: failed before it
        if restored is False:
            changed = ", ".join(fingerprint_difference(before, host_fingerprint(sd_model)))
            log.error("DreamArtist: job %s did NOT leave the model as it found it (%s)", job.status.id, changed)
        plot = layout.loss_png if layout is not None and layout.loss_png.is_file() else None
        with self._lock:
            for key, value in outcome.items():
                setattr(job.status, key, value)
            job.status.model_restored = restored
            job.status.finished_at = time.time()
            job.status.eta_seconds = None
            job.status.loss_plot = str(plot) if plot else None
            if self._active is job:
                self._active = None
            status = job.status.copy()
        shared.state.textinfo = f"DreamArtist: {status.message}"
        print(f"DreamArtist: job {status.id} ({status.name}) {status.state} at step {status.step}/{status.total}"
              + (f": {status.error}" if status.error else ""))

    def _callbacks(self, job: _Job, layout: OutputLayout) -> TrainCallbacks:
        from modules import shared

        def on_step(report: StepReport) -> None:
            values = {**report.values, "lr": report.learning_rate}
            eta = report.eta_seconds if math.isfinite(report.eta_seconds) else None
            self._update(job, step=report.step, total=report.total, values=values,
                         attention=host.current_attention(),
                         steps_per_second=report.steps_per_second, eta_seconds=eta,
                         message=progress_text(report.step, report.total, values, report.steps_per_second, eta)
                         + (" · stopping" if job.cancel.is_set() else ""))
            state = shared.state
            state.job_count, state.job_no = report.total, report.step
            state.textinfo = job.status.message

        def on_save(step: int, written: list[Path]) -> None:
            plot = str(layout.loss_png) if layout.loss_png.is_file() else None
            self._update(job, files=[str(p) for p in written], loss_plot=plot)

        def on_preview(step: int, paths: list[Path]) -> None:
            self._update(job, previews=job.status.previews + [str(p) for p in paths])

        def should_stop() -> bool:
            return job.cancel.is_set() or bool(shared.state.interrupted)

        return TrainCallbacks(on_step=on_step, on_save=on_save, on_preview=on_preview, should_stop=should_stop)

    def _previewer(self, job: _Job, trainer: Trainer):
        settings = job.validated.preview
        sampler, scheduler = host.sampler_and_scheduler(settings.sampler_name)

        def preview(step: int) -> list:
            from modules import processing, shared

            state = shared.state
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=settings.prompt, negative_prompt=settings.negative_prompt,
                steps=settings.steps, cfg_scale=settings.cfg_scale, seed=settings.seed, width=settings.width,
                height=settings.height, batch_size=settings.count, n_iter=1, sampler_name=sampler, scheduler=scheduler,
                do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True,
                # the preview shows what training sees: no <lora:...> merged into the weights mid-run
                disable_extra_networks=True,
            )
            host.invalidate_cond_cache()  # same prompt text, new vectors
            try:
                with _routed(trainer.adapters, p), contextlib.closing(p):
                    processed = processing.process_images(p)
            finally:
                host.invalidate_cond_cache()
                # process_images moves the host's counters; put the job's back
                state.job, state.job_count, state.job_no = JOB_NAME, job.status.total, job.status.step
                state.sampling_step = state.sampling_steps = 0
                state.current_latent = None
                state.textinfo = job.status.message
            images = list(processed.images)
            if images:
                state.assign_current_image(images[0])
            return images

        return preview


def _routed(adapters, p) -> contextlib.AbstractContextManager:
    """A preview routes the adapters being trained per branch (none when the run trains no adapters)."""
    return contextlib.nullcontext() if adapters is None else routed_generation(adapters, p)


JOBS = JobManager()


# -- pairs and concepts ---------------------------------------------------------------------------------------------


def create_pair(name: str, init_text: str = "*", positive_vectors: int = 3, negative_vectors: int = 3,
                overwrite: bool = False) -> list[Path]:
    """Write a step-0 pair ``name``/``name-neg`` into the host's embeddings folder and load it.

    Refused while a job runs (BusyError) and for names that clash with another embedding or LoRA. Overwriting
    our own pair also removes its old adapters, so training it next starts afresh."""
    from modules import shared

    validate_concept_name(name)
    config = TrainConfig.from_dict(dict(name=name, init_text=init_text, positive_vectors=positive_vectors,
                                        negative_vectors=negative_vectors))
    with JOBS.exclusive(f"creating {name!r}"):
        binding = WebuiBinding(shared.sd_model)
        config = config.sized_for(binding.native_size).validate(binding.size_multiple)
        layout = host.host_layout(name)
        check_name_free(name, layout)
        written = create_pair_files(binding, config, layout, overwrite=overwrite)
        if overwrite:
            for word in (name, negative_name(name)):
                layout.lora_path(word).unlink(missing_ok=True)
        host.refresh_host_lists()
    return written


def concepts() -> list[dict]:
    """The DreamArtist pairs in the host's folders, as JSON-able dicts (``loaded``: the host has the pair)."""
    embeddings_dir, lora_dir = host.host_folders()
    try:
        loaded = set(host.embedding_db().word_embeddings)
    except Exception:  # no model yet
        loaded = set()
    out = []
    for concept in list_concepts(embeddings_dir, lora_dir):
        item = concept.as_json()
        item["loaded"] = concept.name in loaded and (concept.negative_embedding is None
                                                     or negative_name(concept.name) in loaded)
        out.append(item)
    return out
