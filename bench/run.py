"""Speed and memory of one DreamArtist step against the host's own textual-inversion step (issue 4).

Every configuration runs in its own process (bench/child.py) on the real AUTOMATIC1111 host, in process, with the
host's own model loader, hijack and attention optimisation; the host baseline is its built-in trainer called the
way the Train tab calls it. One line per figure, the targets (ratios of figures from this same run) last.

    SD_WEBUI_DIR=/work/host/webui SD_WEBUI_PYTHON=/work/host/venv/bin/python HF_HOME=/work/host/hf \\
    DREAMARTIST_BENCH_CACHE=/work/host/bench-cache python3 bench/run.py [--quick] [--sizes 256 512] [--only NAME ...]

--quick: the tiny model at 128 px (seconds). Default: SD1.5-size weights with random init at 256 and 512 px.
Results also go to bench/out/<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoints import checkpoint, host_env  # noqa: E402
from child import RESULT_PREFIX, cpu_ticks, mem_available  # noqa: E402

GIB = 2 ** 30

# what "one DreamArtist embedding step" is here: adapters off, batch 1, guidance 3
DREAMARTIST = {"unet_rank": 0, "text_rank": 0, "batch_size": 1, "guidance": "3", "use_negative": True}
RECONSTRUCTION = {"reconstruction_weight": 1.0}


@dataclass
class Config:
    name: str
    label: str
    kind: str  # "host" or "ours"
    spec: dict = field(default_factory=dict)
    est_gib: dict = field(default_factory=dict)  # expected peak by (model, size): skip when memory is short

    def spec_for(self, model: str, size: int) -> dict:
        return {"name": self.name, "kind": self.kind, "size": size, **self.spec}


HOST_ATTENTION = {"training_attention": "Host setting"}  # ours with the host's own choice (InvokeAI on CPU)

CONFIGS = [
    Config("host_default", "host TI, its defaults (attention opt. OFF, checkpointing, U-Net grads), batch 1", "host",
           {"xattn": False, "batch": 1}, {("sd15", 256): 9, ("sd15", 512): 12}),
    Config("host_xattn", "host TI, attention optimisation ON (host's choice), batch 1", "host",
           {"xattn": True, "batch": 1}, {("sd15", 256): 9, ("sd15", 512): 11}),
    Config("host_xattn_b2", "host TI, attention optimisation ON (host's choice), batch 2 (2 U-Net rows)", "host",
           {"xattn": True, "batch": 2}, {("sd15", 256): 9, ("sd15", 512): 12}),
    Config("host_sdp_b2", "host TI, attention optimisation ON and set to 'sdp', batch 2", "host",
           {"xattn": True, "batch": 2, "attention": "sdp"}, {("sd15", 256): 9, ("sd15", 512): 12}),
    Config("ours_ti", "ours, plain TI (use_negative=False, g=1), 1 U-Net row", "ours",
           {"config": {**DREAMARTIST, "use_negative": False, "reconstruction_weight": 0.0}},
           {("sd15", 256): 7, ("sd15", 512): 9}),
    Config("ours_da", "ours, DreamArtist (2 U-Net rows), reconstruction off", "ours",
           {"config": {**DREAMARTIST, "reconstruction_weight": 0.0}}, {("sd15", 256): 7, ("sd15", 512): 10}),
    Config("ours_da_rec", "ours, DreamArtist + reconstruction (full-size decode, decoder checkpointed)", "ours",
           {"config": {**DREAMARTIST, **RECONSTRUCTION}}, {("sd15", 256): 9, ("sd15", 512): 12}),
    Config("ours_da_hostattn", "ours, DreamArtist, training with the host's attention choice (not sdp)", "ours",
           {"config": {**DREAMARTIST, "reconstruction_weight": 0.0}, **HOST_ATTENTION},
           {("sd15", 256): 7, ("sd15", 512): 14}),
    Config("ours_da_rec_hostattn", "ours, DreamArtist + reconstruction, the host's attention choice", "ours",
           {"config": {**DREAMARTIST, **RECONSTRUCTION}, **HOST_ATTENTION}, {("sd15", 256): 9, ("sd15", 512): 15}),
    Config("ours_da_rec_crop", "ours, DreamArtist + reconstruction on a random half-side latent crop", "ours",
           {"config": {**DREAMARTIST, **RECONSTRUCTION, "reconstruction_scale": 0.5}},
           {("sd15", 256): 8, ("sd15", 512): 11}),
]
# levers: what each option buys (run with --levers)
LEVERS = [
    Config("host_frozen", "host TI defaults but its U-Net frozen (what its U-Net gradients cost it)", "host",
           {"xattn": False, "batch": 1, "freeze_unet": True}, {("sd15", 256): 7, ("sd15", 512): 10}),
    Config("host_sdp", "host TI, attention optimisation ON and set to 'sdp', batch 1", "host",
           {"xattn": True, "batch": 1, "attention": "sdp"}, {("sd15", 256): 9, ("sd15", 512): 11}),
    Config("ours_da_ckpt", "ours, DreamArtist + U-Net gradient checkpointing", "ours",
           {"config": {**DREAMARTIST, "reconstruction_weight": 0.0, "gradient_checkpointing": True}},
           {("sd15", 256): 7, ("sd15", 512): 9}),
    Config("ours_da_rec_ckpt", "ours, DreamArtist + reconstruction + U-Net gradient checkpointing", "ours",
           {"config": {**DREAMARTIST, **RECONSTRUCTION, "gradient_checkpointing": True}},
           {("sd15", 256): 8, ("sd15", 512): 11}),
    Config("ours_da_bf16", "ours, DreamArtist, bf16 autocast", "ours",
           {"config": {**DREAMARTIST, "reconstruction_weight": 0.0, "precision": "bf16"}},
           {("sd15", 256): 7, ("sd15", 512): 10}),
    Config("ours_da_rec_bf16", "ours, DreamArtist + reconstruction, bf16 autocast", "ours",
           {"config": {**DREAMARTIST, **RECONSTRUCTION, "precision": "bf16"}}, {("sd15", 256): 8, ("sd15", 512): 12}),
]
BY_NAME = {c.name: c for c in CONFIGS + LEVERS}
DEFAULT_SELECTION = [c.name for c in CONFIGS]

# the targets of issue 4: (label, numerator, denominator, what, limit)
TARGETS = [
    ("P1", "ours_da", "host_xattn_b2", "time", 1.15),
    ("P2", "ours_da", "host_default", "time", 1.3),
    ("P3", "ours_da_rec", "host_default", "time", 1.8),
    ("P4", "ours_da_rec", "host_default", "peak", 1.2),
]
INFO_RATIOS = [
    ("P1 with the same attention (sdp) on both sides", "ours_da", "host_sdp_b2", "time"),
    ("P1 with the host's attention choice on both sides", "ours_da_hostattn", "host_xattn_b2", "time"),
    ("P3 with the host's attention choice", "ours_da_rec_hostattn", "host_default", "time"),
    ("P4 with the host's attention choice", "ours_da_rec_hostattn", "host_default", "peak"),
    ("P3 with a half-side reconstruction crop", "ours_da_rec_crop", "host_default", "time"),
    ("plain TI / host TI defaults", "ours_ti", "host_default", "time"),
    ("plain TI / host TI attention on", "ours_ti", "host_xattn", "time"),
    ("DreamArtist / plain TI (the method's overhead)", "ours_da", "ours_ti", "time"),
]


def others_busy(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes over a short window (this orchestrator is idle meanwhile)."""
    before = cpu_ticks()[0]
    time.sleep(seconds)
    return (cpu_ticks()[0] - before) / os.sysconf("SC_CLK_TCK") / seconds


def wait_until_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use less than ``threshold`` cores; returns their last use."""
    deadline = time.time() + max_wait
    load = others_busy()
    while load > threshold and time.time() < deadline:
        load = others_busy(5.0)
    return load


def run_child(python: Path, spec: dict, env: dict, log_path: Path) -> dict:
    command = [str(python), str(HERE / "child.py"), json.dumps(spec)]
    with open(log_path, "a") as log:
        log.write(f"\n==== {spec['name']} {spec['size']} px\n")
        log.flush()
        process = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        log.write(process.stdout)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
        if line.startswith("BENCH_ABORTED"):
            raise RuntimeError(line[len("BENCH_ABORTED "):])
    raise RuntimeError(f"{spec['name']} at {spec['size']} px failed (exit {process.returncode}); see {log_path}")


def describe(result: dict) -> str:
    times = result["step_times"]
    spread = f"{min(times):.2f}-{max(times):.2f}" if len(times) > 1 else ""
    retried = result.get("attempt_medians", [])
    others = f"others used {result['others_cores']:.2f} cores"
    if len(retried) > 1:
        others += f", {len(retried)} attempts: " + "/".join(f"{t:.2f}" for t in retried) + " s"
    return (f"step {statistics.median(times):7.2f} s (median of {len(times)}{', ' + spread if spread else ''}; "
            f"CPU {statistics.median(result['step_cpu']):6.2f} s, kernel "
            f"{statistics.median(result.get('step_system') or [0]):5.2f} s; {others})  "
            f"peak RSS {result['peak_rss'] / GIB:5.2f} GiB (model loaded: {result['rss_before'] / GIB:5.2f})  "
            f"attention={result.get('attention')}  U-Net params with grad={result.get('unet_params_with_grad')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model at 128 px")
    parser.add_argument("--sizes", type=int, nargs="+", help="training sizes (default 256 512; quick: 128)")
    parser.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="run only these configurations")
    parser.add_argument("--levers", action="store_true", help="also run the lever configurations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps (default 1)")
    parser.add_argument("--timed", type=int, help="timed optimizer steps (default 3; quick: 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", help="folder holding another dreamartist_ext to measure instead of this one")
    parser.add_argument("--force", action="store_true", help="run even when free memory looks too small")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="a configuration counts as disturbed when other processes used more cores than this "
                             "during its timed steps; it then waits for a quiet machine and runs again (default 0.3)")
    parser.add_argument("--attempts", type=int, default=3, help="runs of a disturbed configuration (default 3)")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine")
    args = parser.parse_args(argv)

    webui = Path(os.environ.get("SD_WEBUI_DIR", ""))
    if not (webui / "launch.py").exists():
        print("set SD_WEBUI_DIR to an AUTOMATIC1111 v1.10 checkout (with repositories/)")
        return 2
    python = Path(os.environ.get("SD_WEBUI_PYTHON") or webui / "venv" / "bin" / "python")
    cache = Path(os.environ.get("DREAMARTIST_BENCH_CACHE", Path.home() / ".cache" / "dreamartist-bench"))
    model = "tiny" if args.quick else "sd15"
    sizes = args.sizes or ([128] if args.quick else [256, 512])
    timed = args.timed or (5 if args.quick else 3)
    selection = args.only or DEFAULT_SELECTION + ([c.name for c in LEVERS] if args.levers else [])
    ckpt = checkpoint(model, webui=webui, python=python, cache=cache)
    env = host_env(cache)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = out_dir / f"{stamp}.log"
    settings = " ".join(f"{key}={shlex.quote(os.environ[key])}" for key in
                        ("SD_WEBUI_DIR", "SD_WEBUI_PYTHON", "HF_HOME", "DREAMARTIST_BENCH_CACHE") if key in os.environ)
    command = settings + " " + " ".join(shlex.quote(a) for a in ["python3", str(Path(__file__).relative_to(Path.cwd())
                                                 if Path(__file__).is_relative_to(Path.cwd()) else __file__),
                                                *(argv if argv is not None else sys.argv[1:])])
    print(f"# DreamArtist bench: model={model} ({ckpt.name}), sizes={sizes}, {args.threads} threads, fp32, "
          f"{args.warmup} warm-up + {timed} timed steps per configuration, one process each; log: {log_path}",
          flush=True)
    results: dict[str, dict[int, dict]] = {}
    started = time.perf_counter()
    for size in sizes:
        for name in selection:
            config = BY_NAME[name]
            needed = config.est_gib.get((model, size), 0) * GIB
            if needed and mem_available() < needed and not args.force:
                print(f"{model} {size:4d}px {name:14s} SKIPPED: {mem_available() / GIB:.1f} GiB available, "
                      f"needs about {needed / GIB:.0f} (--force runs it anyway)", flush=True)
                continue
            spec = {**config.spec_for(model, size), "webui": str(webui), "ckpt": str(ckpt),
                    "warmup": args.warmup, "timed": timed, "threads": args.threads}
            if args.engine:
                spec["engine"] = str(Path(args.engine).resolve())
            attempts = []
            try:
                for _ in range(max(1, args.attempts)):
                    wait_until_quiet(args.quiet_cores, args.max_wait)
                    attempts.append(run_child(python, spec, env, log_path))
                    if attempts[-1]["others_cores"] <= args.quiet_cores:
                        break
            except RuntimeError as error:
                print(f"{model} {size:4d}px {name:14s} FAILED: {error}", flush=True)
                continue
            result = min(attempts, key=lambda r: r["others_cores"])  # the least disturbed attempt counts
            result["attempt_medians"] = [statistics.median(r["step_times"]) for r in attempts]
            results.setdefault(name, {})[size] = result
            print(f"{model} {size:4d}px {name:14s} {describe(result)}  | {config.label}", flush=True)

    print(f"# ratios (same run, same model, size, fp32, {args.threads} threads); medians of the timed steps")
    if args.quick:
        print("# (tiny model: fixed per-step overheads dominate; the targets are about SD1.5-size weights)")
    verdicts = []
    for size in sizes:
        for label, top, bottom, what, limit in TARGETS:
            if size not in results.get(top, {}) or size not in results.get(bottom, {}):
                continue
            ratio = _ratio(results[top][size], results[bottom][size], what)
            ok = ratio <= limit
            verdicts.append(ok)
            print(f"{label} {model} {size:4d}px  {what:4s} {top} / {bottom} = {ratio:.2f}  (target <= {limit})  "
                  f"{'PASS' if ok else 'FAIL'}")
        for label, top, bottom, what in INFO_RATIOS:
            if size in results.get(top, {}) and size in results.get(bottom, {}):
                ratio = _ratio(results[top][size], results[bottom][size], what)
                print(f"   {model} {size:4d}px  {what:4s} {label}: {ratio:.2f}")
    print(f"# total {time.perf_counter() - started:.0f} s; rerun: {command}")
    (out_dir / f"{stamp}.json").write_text(json.dumps({"model": model, "sizes": sizes, "threads": args.threads,
                                                       "results": results}, indent=1))
    return 0 if all(verdicts) else 1


def _ratio(top: dict, bottom: dict, what: str) -> float:
    if what == "time":
        return statistics.median(top["step_times"]) / statistics.median(bottom["step_times"])
    return top["peak_rss"] / bottom["peak_rss"]


if __name__ == "__main__":
    sys.exit(main())
