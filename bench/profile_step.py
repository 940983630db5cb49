"""Where one of our steps spends its time: forward time per part, the rest (backward + optimizer), and optionally
torch.profiler's top operators over the timed steps.

    SD_WEBUI_DIR=/work/host/webui SD_WEBUI_PYTHON=/work/host/venv/bin/python HF_HOME=/work/host/hf \\
    DREAMARTIST_BENCH_CACHE=/work/host/bench-cache python3 bench/profile_step.py [--quick] [--size 256] \\
        [--config ours_da_rec] [--set precision=bf16 ...] [--ops]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoints import checkpoint, host_env  # noqa: E402
from run import BY_NAME, HERE as BENCH, run_child  # noqa: E402


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int)
    parser.add_argument("--config", default="ours_da_rec", choices=[n for n, c in BY_NAME.items() if c.kind == "ours"])
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="TrainConfig overrides, e.g. gradient_checkpointing=true reconstruction_scale=0.5")
    parser.add_argument("--attention", help="host cross-attention optimisation to select (e.g. sdp, InvokeAI)")
    parser.add_argument("--host-attention", action="store_true",
                        help="train with the host's attention choice (by default a split one is swapped for sdp)")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    parser.add_argument("--stacks", action="store_true", help="with --ops: group operators by Python call stack")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", help="folder holding another dreamartist_ext to measure instead of this one")
    args = parser.parse_args(argv)

    webui = Path(os.environ["SD_WEBUI_DIR"])
    python = Path(os.environ.get("SD_WEBUI_PYTHON") or webui / "venv" / "bin" / "python")
    cache = Path(os.environ.get("DREAMARTIST_BENCH_CACHE", Path.home() / ".cache" / "dreamartist-bench"))
    model = "tiny" if args.quick else "sd15"
    size = args.size or (128 if args.quick else 256)
    config = BY_NAME[args.config]
    spec = config.spec_for(model, size)
    spec["config"] = {**spec["config"], **{k: parse_value(v) for k, v in (o.split("=", 1) for o in args.set)}}
    spec.update(webui=str(webui), ckpt=str(checkpoint(model, webui=webui, python=python, cache=cache)),
                warmup=args.warmup, timed=args.timed, threads=args.threads, phases=True, profile=args.ops,
                stacks=args.stacks)
    if args.engine:
        spec["engine"] = str(Path(args.engine).resolve())
    if args.attention:
        spec["attention"] = args.attention
    if args.host_attention:
        spec["training_attention"] = "Host setting"
    env = host_env(cache)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    (BENCH / "out").mkdir(exist_ok=True)
    result = run_child(python, spec, env, BENCH / "out" / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.log")
    step = statistics.median(result["step_times"])
    print(f"{model} {size}px {args.config} {spec['config']}")
    print(f"step {step:.2f} s (CPU {statistics.median(result['step_cpu']):.2f} s, others used "
          f"{result['others_cores']:.2f} cores), peak RSS {result['peak_rss'] / 2**30:.2f} GiB, "
          f"attention={result.get('attention')}")
    forward = 0.0
    for part, times in result["phases"].items():
        median = statistics.median(times)
        forward += median
        print(f"  {part:22s} {median:7.2f} s  ({median / step:5.1%})")
    print(f"  {'backward + optimizer':22s} {step - forward:7.2f} s  ({(step - forward) / step:5.1%})")
    if args.ops:
        print(result["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
