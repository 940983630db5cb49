"""The selectable "DreamArtist batch" script's plan and run: every learned concept x prompt (x guidance) in one run,
each with ``name`` / ``name-neg`` and its adapters routed per CFG branch."""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .. import concepts as concept_files
from .. import prompt_words
from . import host
from .learned import LEARNED, has_adapters
from .routing import attach_adapters, routed_generation


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
    weight = host.default_weight()
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
