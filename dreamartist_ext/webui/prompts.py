"""The always-on "DreamArtist" script's work: a learned word typed into the prompt gets its positive adapter on the
positive branch and its negative adapter on the negative branch, a missing ``name-neg`` is added to the negative
prompt, and the infotext records both (and is read back when pasted). Which words a prompt uses is asked of the
host's own parser and tokenizer. Also the route the prompt-side JavaScript reads the learned names from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .. import prompt_words
from ..model import UnsupportedModelError
from ..names import negative_name
from . import host
from .binding import check_supported, model_family
from .learned import LEARNED, has_adapters
from .routing import attach_adapters, routed_generation, routing_active

log = logging.getLogger(__name__)

ROUTE = "/dreamartist/prompt-words"


# ---------------------------------------------------------------------------------------------------------------
# Which learned words a prompt uses - asked of the host's own parser and tokenizer


def _injected_words(text: str, steps: int, *, negative: bool) -> list[str]:
    """Names of the embeddings the host injects when it encodes ``text``, in order of first use."""
    from modules import extra_networks, prompt_parser, shared

    clip = shared.sd_model.cond_stage_model
    if not hasattr(clip, "tokenize_line"):  # SDXL's conditioner: its text embedders tokenize alike
        clip = next(e for e in clip.embedders if hasattr(e, "tokenize_line"))
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
# One generation


@dataclass
class PromptOptions:
    enabled: bool = True
    weight: float = host.DEFAULT_WEIGHT
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

    family = model_family(shared.sd_model)
    with_adapters = [learned[name] for name in used if has_adapters(learned[name])
                     and learned[name].metadata.get("architecture", family) == family]  # the host skips others
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
# Infotext paste, the route for the prompt-side JavaScript, unloading


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
