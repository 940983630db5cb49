"""The paper's claims on the toy world: plain TI against DreamArtist, and DreamArtist's parts (issue 11).

For each held-out concept (a shape/colour pair the toy model never saw) and seed, one reference picture on a gray
background trains each method for the same number of steps through the real trainer; then 16 pictures of the
concept (4 on each of 4 other backgrounds) are graded by the toy world's judge:
- fidelity: concept kept (the judge sees the reference's shape and colour), distance to the reference in the
  judge's feature space, colour error of the drawn shape (0-255 RGB);
- controllability: the requested background is drawn;
- diversity: variance of the pictures' judge features.

    python bench/fidelity.py                # the whole study (resumes: finished runs are kept in the results file)
    python bench/fidelity.py --quick        # one concept, one seed, 30 steps: seconds, for trying the script
    python bench/fidelity.py --report-only  # table, plot and comparison from the results so far

Writes docs/fidelity.jsonl (one line per run), docs/fidelity-table.md (mean ± sd) and docs/fidelity.png (plot);
docs/fidelity.md compares them with the paper, claim by claim.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dreamartist_ext.config import TrainConfig  # noqa: E402
from dreamartist_ext.toy import JUDGE_FILE, MODEL_DIR  # noqa: E402
from dreamartist_ext.toy.demo import NAME, dreamartist_options, plain_ti, write_reference  # noqa: E402
from dreamartist_ext.toy.world import HELD_OUT, Scene  # noqa: E402

DOCS = HERE.parent / "docs"
METRICS = ("concept_kept", "context_followed", "feature_distance", "colour_error", "diversity")
SAMPLE_GUIDANCE = 5.0


def methods() -> dict[str, dict]:
    """Method name -> changes to the demo's DreamArtist options (the baseline of the study)."""
    table = {"TI": {"plain_ti": True}}
    for g in ("1.5", "3", "5", "7"):
        table[f"DA g={g}"] = {"guidance": g}
    table["DA g=3 no rec"] = {"guidance": "3", "reconstruction_weight": 0.0}
    table["DA g=3 no adapters"] = {"guidance": "3", "unet_rank": 0, "text_rank": 0}
    return table


def run_one(method: str, changes: dict, concept: tuple[str, str], seed: int, steps: int, work: Path,
            samples_per_context: int) -> dict:
    from PIL import Image

    from dreamartist_ext.concepts import load_concept
    from dreamartist_ext.diffusers_binding import DiffusersBinding
    from dreamartist_ext.outputs import OutputLayout
    from dreamartist_ext.preparation import prepare_run
    from dreamartist_ext.toy.evaluate import evaluate, mean_of
    from dreamartist_ext.toy.judge import load_judge
    from dreamartist_ext.trainer import Trainer

    folder = work / f"{concept[1]}-{concept[0]}" / method.replace(" ", "_").replace("=", "") / f"seed{seed}"
    reference = write_reference(folder / "reference", Scene(concept[0], concept[1], "gray", radius=0.27))
    options = dreamartist_options(reference)
    options.update({k: v for k, v in changes.items() if k != "plain_ti"}, steps=steps, seed=seed, preview_every=0)
    config = TrainConfig.from_dict(options)
    if changes.get("plain_ti"):
        config = plain_ti(config)
    layout = OutputLayout.under(folder)
    started = time.perf_counter()
    binding = DiffusersBinding.load(MODEL_DIR)
    result = Trainer(binding, prepare_run(config, layout, overwrite=True, native_size=64)).run()
    if result.status != "finished":
        raise RuntimeError(f"{method} {concept} seed {seed}: {result.status}: {result.message}")
    trained = time.perf_counter() - started
    concept_files = load_concept(NAME, layout.embeddings_dir, layout.lora_dir)
    results = evaluate(binding, load_judge(JUDGE_FILE), [concept_files], NAME, concept,
                       Image.open(reference).convert("RGB"), samples=samples_per_context,
                       guidance=SAMPLE_GUIDANCE, seed=1000 + seed, negative=config.use_negative)
    row = {"method": method, "concept": f"{concept[1]} {concept[0]}", "seed": seed, "steps": steps,
           "train_seconds": round(trained, 1), "eval_seconds": round(time.perf_counter() - started - trained, 1),
           **{key: mean_of(results, key) for key in METRICS},
           "per_context": {r.background: {"concept_kept": r.concept_kept, "context_followed": r.context_followed}
                           for r in results}}
    return row


def _load(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> metric -> (mean, sd over concept x seed runs, runs)."""
    table = {}
    for method in methods():
        mine = [r for r in rows if r["method"] == method]
        if mine:
            table[method] = {key: (float(np.mean([r[key] for r in mine])),
                                   float(np.std([r[key] for r in mine], ddof=1)) if len(mine) > 1 else 0.0,
                                   len(mine)) for key in METRICS}
    return table


def write_report(rows: list[dict], out: Path) -> None:
    table = summarise(rows)
    if not table:
        print("no results yet")
        return
    heads = {"concept_kept": "concept kept ↑", "context_followed": "background followed ↑",
             "feature_distance": "feature distance ↓", "colour_error": "colour error ↓", "diversity": "diversity"}
    lines = ["| method | runs | " + " | ".join(heads[k] for k in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for method, values in table.items():
        cells = []
        for key in METRICS:
            mean, sd, _ = values[key]
            cells.append(f"{mean:.0%} ± {sd:.0%}" if key in ("concept_kept", "context_followed")
                         else f"{mean:.2f} ± {sd:.2f}")
        lines.append(f"| {method} | {values['concept_kept'][2]} | " + " | ".join(cells) + " |")
    steps = sorted({r["steps"] for r in rows})
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} runs, {', '.join(map(str, steps))} steps each, "
                 f"{seconds / 60:.0f} min of training and grading in all; mean ± sd over concept × seed runs.")
    (out / "fidelity-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(table, out / "fidelity.png")


def _plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("concept_kept", "context_followed", "feature_distance"),
                              ("fidelity: concept kept", "controllability: background followed",
                               "feature distance to the reference")):
        means = [table[n][key][0] for n in names]
        sds = [table[n][key][1] for n in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3, color=["#999"] + ["#4a7ebb"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key != "feature_distance":
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=4, help=f"held-out concepts (at most {len(HELD_OUT)})")
    parser.add_argument("--samples", type=int, default=4, help="pictures per background (4 backgrounds)")
    parser.add_argument("--only", nargs="*", help="methods to run (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dreamartist-fidelity"))
    parser.add_argument("--results", type=Path, default=DOCS / "fidelity.jsonl")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th run from the K-th (parallel processes "
                                                       "sharing one results file)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.seeds, args.concepts, args.samples = 30, 1, 1, 2
        args.results = args.work / "quick.jsonl"
    out = args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = _load(args.results)
    if not args.report_only:
        done = {(r["method"], r["concept"], r["seed"], r["steps"]) for r in rows}
        shard, shards = (int(part) for part in args.shard.split("/"))
        plan = [(seed, concept, method, changes) for seed in range(args.seeds) for concept in HELD_OUT[:args.concepts]
                for method, changes in methods().items() if not args.only or method in args.only]
        for seed, concept, method, changes in plan[shard::shards]:
            if (method, f"{concept[1]} {concept[0]}", seed, args.steps) in done:
                continue
            row = run_one(method, changes, concept, seed, args.steps, args.work, args.samples)
            rows.append(row)
            with args.results.open("a") as f:  # one short line per append: shards can share the file
                f.write(json.dumps(row) + "\n")
            print(f"{method:20} {row['concept']:14} seed {seed}: kept {row['concept_kept']:.0%} "
                  f"background {row['context_followed']:.0%} dist {row['feature_distance']:.2f} "
                  f"({row['train_seconds']:.0f}+{row['eval_seconds']:.0f} s)", flush=True)
        rows = _load(args.results)
    write_report(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
