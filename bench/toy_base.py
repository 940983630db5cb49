"""Does a toy base model follow its captions? The acceptance check for a new toy model (issue 11).

    python bench/toy_base.py [MODEL_FOLDER] [--guidance 5]

12 random caption prompts of pretraining pairs, 8 samples each; prints the share of samples whose shape, colour
and background the judge sees as the prompt asked (chance: 1/6, 1/8, 1/6).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist_ext.diffusers_binding import DiffusersBinding  # noqa: E402
from dreamartist_ext.sampling import SampleRequest, generate  # noqa: E402
from dreamartist_ext.toy import JUDGE_FILE, MODEL_DIR  # noqa: E402
from dreamartist_ext.toy.judge import judge_images, load_judge  # noqa: E402
from dreamartist_ext.toy.world import BACKGROUNDS, COLOURS, HELD_OUT, SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=MODEL_DIR)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    binding, judge = DiffusersBinding.load(args.model), load_judge(JUDGE_FILE)
    rng, started = random.Random(7), time.perf_counter()
    hits = {"shape": 0.0, "colour": 0.0, "background": 0.0}
    pairs = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT]
    for k in range(args.prompts):
        shape, colour = rng.choice(pairs)
        background = rng.choice(list(BACKGROUNDS))
        images = generate(binding, SampleRequest(f"a {colour} {shape} on a {background} background", steps=20,
                                                 guidance=args.guidance, seed=k, width=64, height=64,
                                                 count=args.samples))
        verdict = judge_images(judge, images)
        for head, wanted in (("shape", shape), ("colour", colour), ("background", background)):
            hits[head] += verdict.share(head, wanted) / args.prompts
    shown = ", ".join(f"{head} {share:.0%}" for head, share in hits.items())
    print(f"{args.model} (g {args.guidance}): {shown} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
