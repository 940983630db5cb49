"""Grade a learned toy concept: generate it in new contexts and let the judge say what it sees.

Per context ("a NAME on a navy background"): how often the concept is kept (the judge sees the reference's shape
and colour), how often the context is followed (the judge sees the requested background), the distance to the
reference in the judge's feature space, the colour error of the drawn shape, and the diversity of the samples.
Used by ``train --demo``, the unit test that DreamArtist learns, and bench/fidelity.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .judge import Judge, judge_images

CONTEXTS = ("white", "navy", "brown", "beige")  # backgrounds other than the reference's gray


def context_prompt(name: str, background: str) -> str:
    return f"a {name} on a {background} background"


@dataclass
class ContextResult:
    background: str
    prompt: str
    images: list[Image.Image] = field(repr=False)
    concept_kept: float  # share of samples with the reference's shape and colour
    shape_kept: float  # ... with its shape
    colour_kept: float  # ... with its colour
    context_followed: float  # share of samples on the requested background
    feature_distance: float  # mean distance to the reference in the judge's feature space
    colour_error: float  # mean distance (0-255 RGB) of the drawn shape's colour to the reference's
    diversity: float  # mean variance of the samples' features


def shape_colour(image: Image.Image) -> np.ndarray:
    """Mean colour of the pixels that differ from the background (the border's median colour)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(array - background).sum(-1) > 60
    return array[mask].mean(0) if mask.sum() >= 8 else background


def grade(judge: Judge, images: Sequence[Image.Image], reference: Image.Image, concept: tuple[str, str],
          background: str, prompt: str = "") -> ContextResult:
    verdict = judge_images(judge, list(images))
    reference_verdict = judge_images(judge, [reference])
    features = verdict.features
    colours = np.stack([shape_colour(im) for im in images])
    return ContextResult(
        background=background, prompt=prompt, images=list(images),
        concept_kept=verdict.concept_share(*concept),
        shape_kept=verdict.share("shape", concept[0]), colour_kept=verdict.share("colour", concept[1]),
        context_followed=verdict.share("background", background),
        feature_distance=float(np.linalg.norm(features - reference_verdict.features, axis=1).mean()),
        colour_error=float(np.linalg.norm(colours - shape_colour(reference), axis=1).mean()),
        diversity=float(features.var(0).mean()) if len(images) > 1 else 0.0)


def evaluate(binding, judge: Judge, concepts: Sequence, name: str, concept: tuple[str, str],
             reference: Image.Image, *, contexts: Sequence[str] = CONTEXTS, samples: int = 8,
             guidance: float = 5.0, seed: int = 0, steps: int = 20, negative: bool = True,
             adapter_weight: float = 1.0) -> list[ContextResult]:
    """Generate ``samples`` pictures of ``name`` in each context with the loaded ``concepts`` and grade them."""
    from ..names import negative_name
    from ..sampling import SampleRequest, generate_with_concepts

    size = reference.size[0]
    results = []
    for background in contexts:
        prompt = context_prompt(name, background)
        request = SampleRequest(prompt, negative_name(name) if negative else "", steps=steps, guidance=guidance,
                                seed=seed, width=size, height=size, count=samples)
        images = generate_with_concepts(binding, concepts, request, adapter_weight)
        results.append(grade(judge, images, reference, concept, background, prompt))
    return results


def mean_of(results: Sequence[ContextResult], key: str) -> float:
    return float(np.mean([getattr(r, key) for r in results]))


def contact_sheet(rows: Sequence[tuple[str, Sequence[ContextResult]]], reference: Image.Image,
                  path: Path, per_context: int = 4) -> Path:
    """One row per method: the reference, then ``per_context`` samples of each context."""
    from PIL import ImageDraw

    from ..files import atomic_write

    side = reference.size[0]
    label_width, gap = 150, 6
    contexts = len(rows[0][1])
    width = label_width + side + gap + contexts * (per_context * side + gap)
    height = 18 + len(rows) * (side + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((label_width, 2), "reference", fill=(0, 0, 0))
    for c, result in enumerate(rows[0][1]):
        draw.text((label_width + side + gap + c * (per_context * side + gap), 2), f"on {result.background}",
                  fill=(0, 0, 0))
    for r, (label, results) in enumerate(rows):
        top = 18 + r * (side + gap)
        draw.text((4, top + side // 2 - 6), label, fill=(0, 0, 0))
        sheet.paste(reference, (label_width, top))
        for c, result in enumerate(results):
            for i, image in enumerate(result.images[:per_context]):
                sheet.paste(image, (label_width + side + gap + c * (per_context * side + gap) + i * side, top))
    return atomic_write(path, lambda temporary: sheet.save(temporary, "PNG"))
