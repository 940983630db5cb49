"""Learned words at generation time in AUTOMATIC1111: each CFG branch gets its own adapter.

The host puts the positive and the negative side of classifier-free guidance into the same U-Net calls, in a
layout that depends on its settings (one call for all rows, chunks, separate calls for prompts of different
token lengths, no uncond rows on skipped steps). ``on_cfg_denoiser`` tells us, before each denoiser call, how
its rows are laid out: the cond rows (one per image and AND sub-prompt) first, then the uncond rows. Every
U-Net call that follows consumes those rows in order, so a cursor in a forward pre-hook on the U-Net knows the
branch of each row of each call. The text encoder is told which prompt it encodes by the host itself: the
negative prompts arrive as an ``SdConditioning`` marked ``is_negative_prompt``.

Two users: :func:`routed_generation` (training previews, the batch script) routes adapters someone else
attached; :func:`begin_generation` / :func:`end_generation` (the always-on prompt script) find learned words in
a job's prompts, attach their composed adapters and route them for the whole job.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import concepts as concept_files
from . import prompt_words
from .adapters import BranchAdapters
from .model import NEG, POS, UnsupportedModelError
from .names import negative_name
from .webui_binding import SETTINGS_SECTION, WebuiBinding, check_supported, host_layout

log = logging.getLogger(__name__)

WEIGHT_OPTION = "dreamartist_adapter_weight"
AUTO_NEGATIVE_OPTION = "dreamartist_auto_negative"
DEFAULT_WEIGHT = 1.0
MAX_WEIGHT = 2.0
ROUTE = "/dreamartist/prompt-words"


# ---------------------------------------------------------------------------------------------------------------
# Routing one generation


class BranchRouter:
    """Tells the adapters the CFG branch of every row of every U-Net and text-encoder call."""

    def __init__(self, adapters: BranchAdapters) -> None:
        self.adapters = adapters
        self.roles: list[str] = []  # this denoiser call's x_in rows: cond rows, then uncond rows
        self.cursor = 0
        self.unrouted_rows = 0

    def on_cfg_denoiser(self, params) -> None:
        rows = int(params.x.shape[0])
        cond = int(params.text_cond.shape[0])
        uncond = int(params.text_uncond.shape[0])
        # Anything but "cond rows then uncond rows" (an edit model's extra rows) is a layout we cannot read.
        self.roles = [POS] * cond + [NEG] * uncond if cond + uncond == rows else []
        self.cursor = 0

    def before_unet(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        count = int(x.shape[0])
        rows = self.roles[self.cursor:self.cursor + count]
        self.cursor += count
        if len(rows) != count:
            if not self.unrouted_rows:
                log.warning("DreamArtist: a U-Net call of %d rows fell outside the CFG layout; it runs with the "
                            "base weights (no adapter)", count)
            self.unrouted_rows += count
            rows = None
        self.adapters.set_rows("unet", rows)

    def after_unet(self, module, args, kwargs, output):
        self.adapters.set_rows("unet", None)

    def before_text(self, module, args):
        texts = args[0] if args else None
        if texts is None:
            return
        branch = NEG if getattr(texts, "is_negative_prompt", False) else POS
        self.adapters.set_rows("te", [branch] * len(texts))

    def after_text(self, module, args, output):
        self.adapters.set_rows("te", None)


_ROUTING: list[BranchRouter | None] = []  # the generation being routed (None: routed without adapters)


def routing_active() -> bool:
    return bool(_ROUTING)


def active_adapters() -> BranchAdapters | None:
    """The adapters routed right now (for diagnostics and the integration tests' probe)."""
    return _ROUTING[-1].adapters if _ROUTING and _ROUTING[-1] is not None else None


def invalidate_cond_cache(p=None) -> None:
    """Forget the host's cached conds: their cache key knows nothing about adapters or embedding values."""
    from modules import processing

    caches = [processing.StableDiffusionProcessing.cached_c, processing.StableDiffusionProcessing.cached_uc,
              processing.StableDiffusionProcessingTxt2Img.cached_hr_c,
              processing.StableDiffusionProcessingTxt2Img.cached_hr_uc]
    # p's lists are the class lists unless an earlier p.close() replaced those (persistent_cond_cache off)
    caches += [getattr(p, name, None) for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")]
    for cache in caches:
        if isinstance(cache, list) and cache:
            cache[0] = None


@contextlib.contextmanager
def routed_generation(adapters: BranchAdapters | None, p) -> Iterator[BranchRouter | None]:
    """While processing ``p``: cond rows of every U-Net call use the positive adapter, uncond rows the negative
    one; the negative prompt is encoded with the negative text-encoder adapter, the positive with the positive.

    The adapters must be attached to the host's current model; they stay attached afterwards (the caller owns
    them). The host's cond cache is invalidated before and after, so no conds of another routing are reused.
    """
    from modules import script_callbacks, shared

    if _ROUTING:
        raise RuntimeError("DreamArtist adapters are already being routed for another generation")
    with contextlib.ExitStack() as stack:
        invalidate_cond_cache(p)
        stack.callback(invalidate_cond_cache, p)
        if adapters is None or not adapters.attached:
            _ROUTING.append(None)
            stack.callback(_ROUTING.pop)
            yield None
            return
        router = BranchRouter(adapters)
        _ROUTING.append(router)
        stack.callback(_ROUTING.pop)
        stack.callback(adapters.set_rows, "unet", None)
        stack.callback(adapters.set_rows, "te", None)
        script_callbacks.on_cfg_denoiser(router.on_cfg_denoiser, name="dreamartist_branch_routing")
        stack.callback(script_callbacks.remove_callbacks_for_function, router.on_cfg_denoiser)
        if "unet" in adapters.parts:
            unet = adapters.sites["unet"].root
            stack.callback(unet.register_forward_pre_hook(router.before_unet, with_kwargs=True).remove)
            stack.callback(unet.register_forward_hook(router.after_unet, with_kwargs=True).remove)
        if "te" in adapters.parts:
            text_encoder = shared.sd_model.cond_stage_model  # the host's wrapper: it sees SdConditioning
            stack.callback(text_encoder.register_forward_pre_hook(router.before_text).remove)
            stack.callback(text_encoder.register_forward_hook(router.after_text).remove)
        yield router


# ---------------------------------------------------------------------------------------------------------------
# Learned concepts on disk


def _host_folders() -> tuple[Path, Path]:
    layout = host_layout("")
    return layout.embeddings_dir, layout.lora_dir


def _files_signature(*folders: Path) -> tuple:
    entries = []
    for folder in folders:
        if not folder.is_dir():
            entries.append((str(folder), None))
            continue
        for root, _, names in os.walk(folder, followlinks=True):
            for name in names:
                if name.endswith(".safetensors"):
                    path = os.path.join(root, name)
                    with contextlib.suppress(OSError):
                        stat = os.stat(path)
                        entries.append((path, stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(entries, key=str))


def _stamp(paths: Sequence[Path | None]) -> tuple:
    out = []
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                out.append((str(path), path.stat().st_mtime_ns))
    return tuple(out)


class LearnedConcepts:
    """The DreamArtist pairs in the host's folders, listed again whenever a file there changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._concepts: dict[str, concept_files.ConceptInfo] = {}
        self._loaded: dict[str, tuple[tuple, concept_files.Concept]] = {}

    def current(self) -> dict[str, concept_files.ConceptInfo]:
        embeddings_dir, lora_dir = _host_folders()
        signature = _files_signature(embeddings_dir, lora_dir)
        with self._lock:
            if signature != self._signature:
                self._concepts = {info.name: info for info in concept_files.list_concepts(embeddings_dir, lora_dir)}
                self._signature = signature
            return dict(self._concepts)

    def adapters_of(self, info: concept_files.ConceptInfo) -> concept_files.Concept:
        """The concept with the adapters its files hold (read again only when a file changed)."""
        key = _stamp([info.embedding, info.negative_embedding, info.lora, info.negative_lora])
        with self._lock:
            cached = self._loaded.get(info.name)
            if cached is not None and cached[0] == key:
                return cached[1]
        embeddings_dir, lora_dir = _host_folders()
        concept = concept_files.load_concept(info.name, embeddings_dir, lora_dir)
        listed = {POS: info.lora, NEG: info.negative_lora}
        concept.adapters = {branch: layers for branch, layers in concept.adapters.items() if listed.get(branch)}
        with self._lock:
            self._loaded[info.name] = (key, concept)
        return concept

    def forget(self) -> None:
        with self._lock:
            self._signature = None
            self._concepts.clear()
            self._loaded.clear()


LEARNED = LearnedConcepts()


def has_adapters(info: concept_files.ConceptInfo) -> bool:
    return bool(info.lora or info.negative_lora)


def attach_adapters(concepts: Sequence[concept_files.ConceptInfo], weights: Mapping[str, float]) -> BranchAdapters:
    """The composed adapters of ``concepts`` attached to the host's model (the caller detaches them)."""
    from modules import shared

    loaded = [LEARNED.adapters_of(info) for info in concepts]
    layers = concept_files.composed_adapters(loaded, weights)
    binding = WebuiBinding(shared.sd_model)
    names = ", ".join(info.name for info in concepts)
    return BranchAdapters.from_layers(binding.adapter_sites(), layers, source=f"adapters of {names}")


# ---------------------------------------------------------------------------------------------------------------
# Which learned words a prompt uses - asked of the host's own parser and tokenizer


def _injected_words(text: str, steps: int, *, negative: bool) -> list[str]:
    """Names of the embeddings the host injects when it encodes ``text``, in order of first use."""
    from modules import extra_networks, prompt_parser, shared

    clip = shared.sd_model.cond_stage_model
    if negative:  # the host neither splits AND nor removes <lora:...> in negative prompts
        parts = [text]
    else:
        parts = list(prompt_parser.get_multicond_prompt_list([re.sub(extra_networks.re_extra_net, "", text)])[1])
    words: dict[str, None] = {}  # an ordered set
    for schedule in prompt_parser.get_learned_conditioning_prompt_schedules(parts, max(int(steps), 1)):
        for _, variant in schedule:
            chunks, _ = clip.tokenize_line(variant)
            words.update(dict.fromkeys(fix.embedding.name for chunk in chunks for fix in chunk.fixes))
    return list(words)


def injected_words(texts: Sequence[str], steps: int, *, negative: bool = False) -> list[list[str]]:
    """Per text, the embedding names the host injects for it (each distinct text is tokenized once)."""
    seen: dict[str, list[str]] = {}
    for text in texts:
        if text not in seen:
            seen[text] = _injected_words(text, steps, negative=negative)
    return [seen[text] for text in texts]


# ---------------------------------------------------------------------------------------------------------------
# The always-on prompt script's job


@dataclass
class PromptOptions:
    enabled: bool = True
    weight: float = DEFAULT_WEIGHT
    auto_negative: bool = True

    @classmethod
    def from_args(cls, enabled: Any, weight: Any, auto_negative: Any) -> "PromptOptions":
        """Script args as sent by the UI or an API client; wrong types are a ValueError with a plain message."""
        def flag(value: Any, what: str) -> bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(f"DreamArtist: {what} must be true or false, got {value!r}")

        try:
            number = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"DreamArtist: the adapter weight must be a number, got {weight!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"DreamArtist: the adapter weight must be finite, got {weight!r}")
        return cls(flag(enabled, "enabled"), number, flag(auto_negative, "auto-negative"))


@dataclass
class _Job:
    p: weakref.ref
    stack: contextlib.ExitStack


_job: _Job | None = None
_warned_models: set[str] = set()


def begin_generation(p, options: PromptOptions) -> None:
    """Before ``p``'s conds are computed: add missing ``name-neg`` words, attach and route the adapters of the
    learned words its prompts use, and say so in the infotext. Costs a folder listing when no name is used."""
    global _job
    if _job is not None:  # only if a generation ended without postprocess or close
        log.warning("DreamArtist: removing the adapters an earlier generation left attached")
        end_generation()
    if not options.enabled:
        return
    learned = LEARNED.current()
    if not learned or routing_active():  # the batch script / a training preview routes this one itself
        return
    prompts = list(p.all_prompts) + list(getattr(p, "all_hr_prompts", None) or [])
    if not any(prompt_words.may_mention(text, learned) for text in set(prompts)):
        return
    from modules import shared

    try:
        check_supported(shared.sd_model)
    except UnsupportedModelError as error:
        if str(error) not in _warned_models:
            _warned_models.add(str(error))
            log.warning("DreamArtist: learned words are left to the host (%s)", error)
        return

    steps = p.steps
    used_by_prompt = {text: [w for w in words if w in learned]
                      for text, words in zip(prompts, injected_words(prompts, steps))}
    used = list(dict.fromkeys(name for names in used_by_prompt.values() for name in names))
    if not used:
        return

    _complete_negative_prompts(p, learned, used_by_prompt, options.auto_negative)

    with_adapters = [learned[name] for name in used if has_adapters(learned[name])]
    if not with_adapters:
        return  # only the embeddings act, and the host injects those
    weights = {info.name: options.weight for info in with_adapters}
    if options.weight == 0:
        p.extra_generation_params[prompt_words.INFOTEXT_KEY] = prompt_words.format_applied(weights)
        return
    stack = contextlib.ExitStack()
    try:
        adapters = attach_adapters(with_adapters, weights)
        stack.callback(adapters.detach)
        stack.enter_context(routed_generation(adapters, p))
        _close_with(p, stack)
    except (ValueError, OSError) as error:  # files that do not fit this model, unreadable files
        stack.close()
        log.warning("DreamArtist: %s; only the learned embeddings act in this generation", error)
        return
    except BaseException:
        stack.close()
        raise
    _job = _Job(weakref.ref(p), stack)
    p.extra_generation_params[prompt_words.INFOTEXT_KEY] = prompt_words.format_applied(weights)


def _close_with(p, stack: contextlib.ExitStack) -> None:
    """End the job when ``p`` is closed too: the host skips script postprocess when a generation fails, but
    the API and the UI close every processing object (``with closing(p)``)."""
    original_close = p.close

    def close():
        try:
            end_generation(p)
        finally:
            original_close()

    p.close = close
    stack.callback(p.__dict__.pop, "close", None)


def end_generation(p=None) -> None:
    """Detach and unroute whatever :func:`begin_generation` set up (for ``p``, or any leftover job)."""
    global _job
    job = _job
    owner = job.p() if job is not None else None
    if job is None or (p is not None and owner is not None and owner is not p):  # identity: p compares by value
        return
    _job = None
    job.stack.close()


def _complete_negative_prompts(p, learned, used_by_prompt: Mapping[str, list[str]], enabled: bool) -> None:
    """Append each image's missing ``name-neg`` to its negative prompt (first pass and hires pass)."""
    added: list[str] = []
    missing_any = False
    for prompts_attr, negatives_attr, single_attr in (
        ("all_prompts", "all_negative_prompts", "negative_prompt"),
        ("all_hr_prompts", "all_hr_negative_prompts", "hr_negative_prompt"),
    ):
        prompts = getattr(p, prompts_attr, None)
        negatives = getattr(p, negatives_attr, None)
        if not prompts or not negatives:
            continue
        present = injected_words(negatives, p.steps, negative=True)
        completed = []
        for prompt, negative, words in zip(prompts, negatives, present):
            names = [n for n in used_by_prompt.get(prompt, ()) if learned[n].negative_embedding is not None]
            missing = prompt_words.missing_negatives(negative, names, words)
            missing_any = missing_any or bool(missing)
            if enabled and missing:
                negative = prompt_words.append_words(negative, missing)
                added += [word for word in missing if word not in added]
            completed.append(negative)
        if enabled and completed != list(negatives):
            setattr(p, negatives_attr, completed)
            single = getattr(p, single_attr, None)
            setattr(p, single_attr, list(completed) if isinstance(single, list) else completed[0])
    if enabled and added:
        p.main_negative_prompt = p.all_negative_prompts[0]
        p.extra_generation_params[prompt_words.AUTO_NEGATIVE_KEY] = prompt_words.format_added(added)
    elif not enabled and missing_any:
        p.extra_generation_params[prompt_words.AUTO_NEGATIVE_KEY] = prompt_words.AUTO_NEGATIVE_OFF


# ---------------------------------------------------------------------------------------------------------------
# Settings, infotext paste, the route for the prompt-side JavaScript, unloading


def default_weight() -> float:
    from modules import shared

    return float(getattr(shared.opts, WEIGHT_OPTION, DEFAULT_WEIGHT))


def default_auto_negative() -> bool:
    from modules import shared

    return bool(getattr(shared.opts, AUTO_NEGATIVE_OPTION, True))


def add_settings() -> None:
    import gradio as gr
    from modules import shared

    shared.opts.add_option(WEIGHT_OPTION, shared.OptionInfo(
        DEFAULT_WEIGHT, "Default weight of a learned word's adapters in prompts", gr.Slider,
        {"minimum": 0.0, "maximum": MAX_WEIGHT, "step": 0.05}, section=SETTINGS_SECTION))
    shared.opts.add_option(AUTO_NEGATIVE_OPTION, shared.OptionInfo(
        True, "Add name-neg to the negative prompt when a learned name is in the prompt (default of the "
              "txt2img/img2img option)", section=SETTINGS_SECTION))


def pasted_enabled(params: Mapping[str, str]) -> bool | None:
    return True if prompt_words.INFOTEXT_KEY in params else None


def pasted_weight(params: Mapping[str, str]) -> float | None:
    text = params.get(prompt_words.INFOTEXT_KEY)
    if text is None:
        return None
    try:
        weights = prompt_words.parse_applied(text)
    except ValueError:
        return None
    return float(next(iter(weights.values()))) if weights else None


def pasted_auto_negative(params: Mapping[str, str]) -> bool | None:
    text = params.get(prompt_words.AUTO_NEGATIVE_KEY)
    if text is None:
        return None
    return prompt_words.parse_added(text) is not None


def prompt_words_payload() -> dict[str, Any]:
    """What the prompt-side JavaScript needs: each learned name, its negative partner, whether it has adapters."""
    learned = LEARNED.current()
    return {
        "concepts": [
            {"name": info.name,
             "negative": negative_name(info.name) if info.negative_embedding is not None else None,
             "adapters": has_adapters(info)}
            for info in learned.values()
        ],
    }


def add_routes(_demo, app) -> None:
    # Like the host's own /internal routes the UI polls: names only, no authentication of its own.
    app.add_api_route(ROUTE, prompt_words_payload, methods=["GET"])


def unload() -> None:
    """UI reload: nothing of ours may stay on the model."""
    end_generation()
    LEARNED.forget()


# ---------------------------------------------------------------------------------------------------------------
# The batch script: every concept x prompt (x guidance), adapters routed per branch


class BatchArgumentError(ValueError):
    pass


@dataclass
class BatchPlan:
    concepts: list[concept_files.ConceptInfo]
    prompts: list[str]
    guidance: list[float | None]

    PLACEHOLDER = "[name]"

    @classmethod
    def parse(cls, concepts: Any, prompts: Any, guidance: Any,
              learned: Mapping[str, concept_files.ConceptInfo]) -> "BatchPlan":
        names = _items(concepts, "concepts", split=r"[,\n]")
        if not learned:
            raise BatchArgumentError("there are no learned DreamArtist concepts in the embeddings folder yet")
        if not names:
            chosen = list(learned.values())
        else:
            unknown = [n for n in names if n not in learned]
            if unknown:
                raise BatchArgumentError(f"unknown concept(s) {', '.join(unknown)}; learned: {', '.join(learned)}")
            chosen = [learned[n] for n in dict.fromkeys(names)]
        lines = _items(prompts, "prompts", split=r"\n") or [cls.PLACEHOLDER]
        without = [line for line in lines if cls.PLACEHOLDER not in line]
        if without:
            raise BatchArgumentError(f"prompt {without[0]!r} has no {cls.PLACEHOLDER} placeholder for the concept")
        values: list[float | None] = []
        for item in _items(guidance, "guidance values", split=r"[,\n]"):
            try:
                value = float(item)
            except (TypeError, ValueError):
                raise BatchArgumentError(f"guidance value {item!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise BatchArgumentError(f"guidance value {item!r} must be a positive number")
            values.append(value)
        return cls(chosen, lines, values or [None])

    def cells(self) -> list[tuple[concept_files.ConceptInfo, str, float | None]]:
        return [(c, line, g) for c in self.concepts for line in self.prompts for g in self.guidance]


def _items(value: Any, what: str, *, split: str) -> list[str]:
    """A list argument given as a list, or as text with one item per separator."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = re.split(split, value)
    elif isinstance(value, (list, tuple)):
        parts = list(value)
        if any(isinstance(part, (list, tuple, dict)) for part in parts):
            raise BatchArgumentError(f"{what} must be a list of strings or numbers")
        parts = [str(part) for part in parts]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [str(value)]
    else:
        raise BatchArgumentError(f"{what} must be text or a list, got {type(value).__name__}")
    return [part.strip() for part in parts if part.strip()]


def run_batch(p, concepts: Any, prompts: Any, guidance: Any):
    """Generate every concept x prompt (x guidance) with ``name`` / ``name-neg`` and per-branch adapters;
    one Processed holding every image with its infotext."""
    from modules import processing, shared

    plan = BatchPlan.parse(concepts, prompts, guidance, LEARNED.current())
    cells = plan.cells()
    processing.fix_seed(p)  # every cell starts from the same noise, so cells compare
    shared.state.job_count = len(cells) * p.n_iter
    weight = default_weight()
    images, infotexts, all_prompts, all_negatives, all_seeds, all_subseeds = [], [], [], [], [], []
    for index, (info, line, cfg) in enumerate(cells):
        if shared.state.interrupted or shared.state.stopping_generation:
            break
        shared.state.job = f"DreamArtist batch {index + 1} out of {len(cells)}"
        cell = copy.copy(p)
        cell.extra_generation_params = dict(p.extra_generation_params)
        cell.prompt = line.replace(BatchPlan.PLACEHOLDER, info.name)
        words = [info.name] if info.negative_embedding is not None else []
        cell.negative_prompt = prompt_words.complete_negative(p.negative_prompt or "", words)[0]
        if cfg is not None:
            cell.cfg_scale = cfg
        processed = _generate_cell(cell, info, weight)
        images += processed.images
        infotexts += processed.infotexts
        all_prompts += processed.all_prompts
        all_negatives += processed.all_negative_prompts
        all_seeds += processed.all_seeds
        all_subseeds += processed.all_subseeds
    return processing.Processed(
        p, images, p.seed, infotexts[0] if infotexts else "", subseed=p.subseed, all_prompts=all_prompts,
        all_negative_prompts=all_negatives, all_seeds=all_seeds, all_subseeds=all_subseeds, infotexts=infotexts,
    )


def _generate_cell(cell, info: concept_files.ConceptInfo, weight: float):
    from modules import processing

    with contextlib.ExitStack() as stack:
        adapters = None
        if has_adapters(info) and weight != 0:
            adapters = attach_adapters([info], {info.name: weight})
            stack.callback(adapters.detach)
        if has_adapters(info):
            cell.extra_generation_params[prompt_words.INFOTEXT_KEY] = prompt_words.format_applied({info.name: weight})
        stack.enter_context(routed_generation(adapters, cell))
        return processing.process_images(cell)
