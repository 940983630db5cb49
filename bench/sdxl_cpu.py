"""SDXL-size training figures on the CPU (issue 10): random SDXL base weights in bf16, the real trainer.

Each configuration runs in its own process (its peak resident memory is its own), through the same builders and
trainer call as bench/gpu_check.py (TrainConfig -> prepare_run -> Trainer on a DiffusersBinding), weights in bf16 and
bf16 autocast (fp32 SDXL, 13.5 GB of weights, does not fit next to the other workers). Figures: s/step (median of
the timed steps after one warm-up), peak RSS over the timed steps (VmHWM reset after the warm-up), RSS with the
weights built, for

    embeddings only  (adapters off, reconstruction off)
    + adapters       (rank 4 on the U-Net and both text encoders)
    + reconstruction (weight 1, decoder checkpointed as always)

with and without U-Net gradient checkpointing, at each side length asked. A 1024 px configuration runs only when
its peak, extrapolated from the same configuration at the two smaller sides, stays under ``--cap-gb`` (a process
that passes the cap anyway stops itself). One line per figure, then the ratios; JSON into bench/out/.

On a shared machine, read ``others_cores`` (cores other processes kept busy while the steps were timed) and
``step_cpu_s`` (this process's CPU seconds per step) next to the wall-clock s/step: memory figures are not
affected by neighbours, times are. torch 2.1.2's CPU flash-attention kernel is switched off here (its bf16
cross-attention backward corrupts the heap).

    nice -n 10 python bench/sdxl_cpu.py [--sizes 256 512 1024] [--threads 2] [--timed 2] [--budget-s 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GIB = 2 ** 30
RESULT = "SDXL_CPU_RESULT "
VARIANTS = {  # name -> (unet_rank, text_rank, reconstruction weight)
    "emb": (0, 0, 0.0),
    "adapters": (4, 4, 0.0),
    "rec": (4, 4, 1.0),
}
LABELS = {"emb": "embeddings only", "adapters": "+ adapters", "rec": "+ adapters + reconstruction"}


def _watch_rss(cap: int) -> None:
    from child import memory_status, mem_available

    def watch() -> None:
        while True:
            rss = memory_status()["VmRSS"]
            if rss > cap or mem_available() < 1.5 * GIB:
                print(f"SDXL_CPU_ABORTED resident {rss / 1e9:.2f} GB (cap {cap / 1e9:.1f} GB), machine has "
                      f"{mem_available() / 1e9:.1f} GB left", flush=True)
                os._exit(3)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def child(spec: dict) -> None:
    """One configuration: build SDXL bf16 on the CPU, train warmup + timed steps, print the figures."""
    _watch_rss(int(spec["cap_gb"] * 1e9))
    import resource
    import tempfile

    import torch

    from child import cpu_ticks, memory_status, reset_peak
    from gpu_check import Case, run_case

    torch.set_num_threads(spec["threads"])
    if spec.get("no_cpu_flash", True):
        # torch 2.1.2's CPU flash-attention kernel corrupts the heap in the bf16 backward of cross-attention
        # (query 1024 x key 77, head dim 64: "double free or corruption"); the math kernel is fine. The flag is
        # the one torch.backends.cuda names, but 2.1's CPU kernel choice reads it too.
        torch.backends.cuda.enable_flash_sdp(False)
    unet_rank, text_rank, rec = VARIANTS[spec["variant"]]
    case = Case(spec["name"], "sdxl", spec["size"], "bf16", checkpointing=spec["checkpointing"],
                unet_rank=unet_rank, text_rank=text_rank, reconstruction=rec)
    probe = {}

    def at_warmup():
        probe["rss_after_warmup"] = memory_status()["VmRSS"]
        probe["ticks"] = cpu_ticks()
        probe["clock"] = time.perf_counter()
        reset_peak()

    with tempfile.TemporaryDirectory(prefix="da-sdxl-cpu-") as tmp:
        figures = run_case(case, torch.device("cpu"), Path(tmp), steps=spec["warmup"] + spec["timed"],
                           warmup=spec["warmup"], at_warmup=at_warmup,
                           after_build=lambda: probe.update(rss_weights=memory_status()["VmRSS"]))
        figures["peak_rss"] = memory_status()["VmHWM"]
    busy, own = cpu_ticks()
    elapsed = time.perf_counter() - probe["clock"]
    ticks = os.sysconf("SC_CLK_TCK")
    figures.update(rss_weights=probe.get("rss_weights"), rss_after_warmup=probe.get("rss_after_warmup"),
                   max_rss_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   others_cores=max(0.0, ((busy - probe["ticks"][0]) - (own - probe["ticks"][1])) / ticks / elapsed),
                   threads=torch.get_num_threads(), variant=spec["variant"])
    print(RESULT + json.dumps(figures), flush=True)


def run_one(spec: dict, log) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
        if line.startswith("SDXL_CPU_ABORTED"):
            return {**spec, "error": line[len("SDXL_CPU_ABORTED "):]}
    return {**spec, "error": f"exit {process.returncode} (see the log)"}


def describe(r: dict) -> str:
    name = f"{r['size']:>4} px {LABELS[r['variant']]:<28} ckpt {'on ' if r['checkpointing'] else 'off'}"
    if "error" in r:
        return f"{name}: not measured: {r['error']}"
    return (f"{name}: {r['s_per_step']:7.2f} s/step, peak RSS {r['peak_rss'] / 1e9:5.2f} GB (weights built "
            f"{r['rss_weights'] / 1e9:.2f} GB; step-time others' cores {r['others_cores']:.2f}; "
            f"{'finite' if r['all_finite'] else 'NON-FINITE'})")


def predicted_peak(results: list[dict], variant: str, checkpointing: bool, size: int) -> float | None:
    """Peak at ``size`` from the same configuration at the two largest smaller sides: the part above the weights
    grows by the same factor again per doubling (a stand-in for pixels x attention growth)."""
    done = sorted((r for r in results if r["variant"] == variant and r["checkpointing"] == checkpointing
                   and "error" not in r and r["size"] < size), key=lambda r: r["size"])
    if not done:
        return None
    if len(done) == 1:  # one smaller side only: the pixels' growth (a lower bound; attention grows faster)
        large = done[0]
        return large["rss_weights"] + (large["peak_rss"] - large["rss_weights"]) * (size / large["size"]) ** 2
    small, large = done[-2], done[-1]
    base = large["rss_weights"]
    growth = (large["peak_rss"] - base) / max(1.0, small["peak_rss"] - base)
    steps = (size / large["size"]) / (large["size"] / small["size"])  # 1 when the sides double each time
    return base + (large["peak_rss"] - base) * growth ** steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timed", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=12.0, help="resident memory a configuration may reach")
    parser.add_argument("--budget-s", type=float, default=3000.0, help="start no configuration past this")
    parser.add_argument("--out", help="JSON path (default bench/out/sdxl_cpu-<time>.json)")
    parser.add_argument("--previous", nargs="*", default=[],
                        help="reports of earlier runs: their figures feed the 1024 px estimate and the ratios")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(args.out) if args.out else HERE / "out" / f"sdxl_cpu-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    earlier = [r for path in args.previous for r in json.loads(Path(path).read_text())["results"]]
    results: list[dict] = []
    report = {"previous": args.previous, "started_utc": stamp, "threads": args.threads, "warmup": args.warmup, "timed": args.timed,
              "cap_gb": args.cap_gb, "results": results}
    with open(log_path, "a") as log:
        for size in sorted(args.sizes):
            for checkpointing in [c == "on" for c in args.checkpointing]:
                for variant in args.variants:
                    spec = {"name": f"sdxl-{size}-{variant}-{'ckpt' if checkpointing else 'nockpt'}",
                            "size": size, "variant": variant, "checkpointing": checkpointing,
                            "threads": args.threads, "warmup": args.warmup, "timed": args.timed,
                            "cap_gb": args.cap_gb}
                    estimate = predicted_peak(earlier + results, variant, checkpointing, size)
                    if time.time() - started > args.budget_s:
                        result = {**spec, "error": "skipped: over the time budget"}
                    elif size > 512 and (estimate is None or estimate > args.cap_gb * 1e9 * 0.95):
                        result = {**spec, "error": "skipped: estimated peak " + (
                            f"{estimate / 1e9:.1f} GB" if estimate else "unknown") + f" > cap {args.cap_gb} GB"}
                    else:
                        log.write(f"\n==== {spec['name']}\n")
                        log.flush()
                        result = run_one(spec, log)
                    if estimate is not None:
                        result["estimated_peak_rss"] = estimate
                    results.append(result)
                    print(describe(result), flush=True)
                    out.write_text(json.dumps(report, indent=1))
    print_ratios(earlier + results)
    report["total_s"] = round(time.time() - started)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def print_ratios(results: list[dict]) -> None:
    ok = {(r["size"], r["variant"], r["checkpointing"]): r for r in results if "error" not in r}
    sizes = sorted({k[0] for k in ok})
    for (size, variant, ckpt), r in sorted(ok.items()):
        other = ok.get((size, variant, not ckpt))
        if ckpt and other:
            above = (r["peak_rss"] - r["rss_weights"]) / (other["peak_rss"] - other["rss_weights"])
            print(f"{size} px {LABELS[variant]}: checkpointing on/off time "
                  f"x{r['s_per_step'] / other['s_per_step']:.2f}, peak-above-weights x{above:.2f}")
    for small, large in zip(sizes, sizes[1:]):
        for (size, variant, ckpt), r in sorted(ok.items()):
            if size != large or (small, variant, ckpt) not in ok:
                continue
            s = ok[(small, variant, ckpt)]
            print(f"{small}->{large} px {LABELS[variant]} ckpt {'on' if ckpt else 'off'}: time "
                  f"x{r['s_per_step'] / s['s_per_step']:.2f}, peak-above-weights "
                  f"x{(r['peak_rss'] - r['rss_weights']) / (s['peak_rss'] - s['rss_weights']):.2f} "
                  f"(pixels x{(large / small) ** 2:.0f})")


if __name__ == "__main__":
    sys.exit(main())
