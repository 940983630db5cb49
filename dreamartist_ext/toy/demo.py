"""``train --demo``: the toy world learns a concept it has never seen, from one image.

The pretrained toy model has drawn every shape and every colour, but never a purple star. One picture of one
(on a gray background) teaches it DreamArtist's pair and adapters; plain textual inversion learns from the same
picture for the same number of steps. Both then draw the concept on backgrounds the picture never showed,
and the toy world's judge says whether each kept the concept and followed the prompt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import TrainConfig
from ..files import atomic_write
from . import WEIGHTS
from .world import Scene, render

NAME = "dreamdemo"
CONCEPT = ("star", "purple")
REFERENCE = Scene("star", "purple", "gray", cx=0.5, cy=0.5, radius=0.27, angle=0.0)
REFERENCE_FILE = WEIGHTS / "reference.png"  # render(REFERENCE), shipped so the demo writes nothing before its checks
TEMPLATE = Path(__file__).parent / "template.txt"
SIZE = 64
INTRO = ("DreamArtist demo on the toy world shipped with this repository: a small text-to-image model pretrained\n"
         "on 64 px pictures of coloured shapes, which has never seen a purple star. It learns one from the single\n"
         "picture {reference} (on a gray background), then draws it on four other backgrounds; plain textual\n"
         "inversion learns from the same picture with the same number of steps for comparison. For real pictures\n"
         "point --model at a Stable Diffusion checkpoint, or use the DreamArtist tab inside the WebUI.\n")


def write_reference(folder: Path, scene: Scene = REFERENCE) -> Path:
    """A training picture of ``scene``, with its caption's context in the .txt beside it (read as [filewords])."""
    folder.mkdir(parents=True, exist_ok=True)
    image = atomic_write(folder / "reference.png", lambda tmp: render(scene).save(tmp, "PNG"))
    atomic_write(folder / "reference.txt", lambda tmp: tmp.write_text(f"on a {scene.background} background\n"))
    return image


def dreamartist_options(reference: Path) -> dict:
    """The demo's DreamArtist run: the paper's method with lengths and rates for a 1-2 minute run. Guidance 1.5:
    on the toy world it kept the concept best of 1.5, 3, 5 and 7 while still following the prompt (docs/fidelity.md)."""
    return dict(
        name=NAME, images=[str(reference)], width=SIZE, height=SIZE, template=str(TEMPLATE), init_text="shape",
        steps=300, guidance="1.5", reconstruction_weight=1.0, unet_rank=4, text_rank=4,
        embedding_lr="0.02", unet_lr="1e-3", text_lr="5e-4", save_every=0, preview_every=0,
        preview=dict(prompt="a [name] on a navy background", steps=20, guidance=5.0, count=2),
    )


def plain_ti(config: TrainConfig) -> TrainConfig:
    """The same run as plain textual inversion: the positive word alone, no adapters, no reconstruction."""
    return dataclasses.replace(config, use_negative=False, unet_rank=0, text_rank=0, reconstruction_weight=0.0,
                               perceptual_weight=0.0)


def report(model_dir: Path, runs: list[tuple[str, Path, bool]], reference: Path, device, *,
           samples: int = 8, guidance: float = 5.0) -> list[tuple[str, list]]:
    """Draw each run's concept in every context, print the judge's verdicts, write the contact sheet."""
    from PIL import Image

    from ..concepts import load_concept
    from ..diffusers_binding import DiffusersBinding
    from ..outputs import OutputLayout
    from . import JUDGE_FILE
    from .evaluate import CONTEXTS, contact_sheet, evaluate, mean_of
    from .judge import load_judge

    binding = DiffusersBinding.load(model_dir, device=device)
    judge = load_judge(JUDGE_FILE)
    picture = Image.open(reference).convert("RGB")
    rows = []
    for label, folder, negative in runs:
        layout = OutputLayout.under(folder)
        concept = load_concept(NAME, layout.embeddings_dir, layout.lora_dir)
        rows.append((label, evaluate(binding, judge, [concept], NAME, CONCEPT, picture, samples=samples,
                                     guidance=guidance, negative=negative)))
    print(f"\nthe judge's verdict, {samples} pictures per background (guidance {guidance}):")
    print(f"  {'':34}" + "".join(f"{'on ' + c:>10}" for c in CONTEXTS) + f"{'mean':>8}")
    for label, results in rows:
        for key, what in (("concept_kept", "purple star kept"), ("context_followed", "background followed")):
            cells = "".join(f"{getattr(r, key):>10.0%}" for r in results)
            print(f"  {label + ': ' + what:34}{cells}{mean_of(results, key):>8.0%}")
    sheet = contact_sheet(rows, picture, runs[0][1] / "demo.png")
    print(f"\npictures: {sheet} (rows: {', '.join(label for label, _ in rows)})")
    return rows
