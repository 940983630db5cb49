"""One benchmark configuration, alone in its own process (so its memory peak is its own).

Runs the real AUTOMATIC1111 host IN-PROCESS with its own initialisation (``import webui`` as ``launch.py`` does,
then ``modules.initialize.initialize()`` like ``webui.webui()``, without the UI or a server) and its own model
loader, then trains with either

* ``host``: the host's built-in textual-inversion trainer, called through the Train tab's function
  (``modules.textual_inversion.ui.train_embedding``: optimisations undone unless
  ``training_xattention_optimizations``, gradient checkpointing added, U-Net weights left requiring grad), or
* ``ours``: the DreamArtist ``Trainer`` on ``WebuiBinding(shared.sd_model)``.

An optimizer step ends where each trainer reports it (the host's per-step ``write_loss`` call, our
``TrainCallbacks.on_step``); a step's time is the gap between two such ends, so it includes everything the loop does
per step. The first ``warmup`` steps are not timed; the peak resident memory (VmHWM) is reset after them and read
at the end of the last step.

Usage (the orchestrator bench/run.py does this): ``<host python> bench/child.py '<json spec>'``; the result is one
line ``BENCH_RESULT {json}`` on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "


def memory_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks used by this process): their difference over a window is what
    other processes took from the cores while we were being timed."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open("/proc/self/stat") as stat:
        own = stat.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime, all threads


def mem_available() -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def guard_memory(reserve: int) -> None:
    """Stop this process (not a colleague's) before the machine runs out of memory: the kernel's OOM killer
    would pick the largest process, which may be someone else's."""
    import threading

    def watch() -> None:
        while True:
            if mem_available() < reserve:
                rss = memory_status()["VmRSS"]
                print(f"BENCH_ABORTED only {mem_available() / 2**30:.1f} GiB left on the machine; this configuration "
                      f"had {rss / 2**30:.1f} GiB resident", flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def reset_peak() -> None:
    """Start a fresh VmHWM from the current RSS (Linux: writing 5 to clear_refs resets the peak)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class StepClock:
    """Ends of optimizer steps; times the steps after ``warmup`` and the memory peak over them."""

    def __init__(self, warmup: int, total: int, probe=None) -> None:
        self.warmup, self.total = warmup, total
        self.ends: list[float] = []
        self.rss_before = 0
        self.peak = 0
        self.probe = probe
        self.probed: dict = {}
        self.cpu_start = (0, 0)
        self.cpu_end = (0, 0)
        self.process_cpu: list[float] = []
        self.system_cpu: list[float] = []  # kernel time: page faults of fresh allocations show up here
        self.profiler = None  # torch.profiler over the timed steps, when asked for

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        self.process_cpu.append(time.process_time())
        self.system_cpu.append(os.times().system)
        done = len(self.ends)
        if done == self.warmup:
            if self.probe:
                self.probed = self.probe()
            self.rss_before = memory_status()["VmRSS"]
            reset_peak()
            if self.profiler is not None:
                self.profiler.__enter__()
            self.cpu_start = cpu_ticks()
            self.ends[-1], self.process_cpu[-1] = time.perf_counter(), time.process_time()  # probe not timed
        if done == self.total:
            self.peak = memory_status()["VmHWM"]
            self.cpu_end = cpu_ticks()
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)

    def others_cores(self) -> float:
        """Average number of cores other processes kept busy during the timed steps."""
        elapsed = self.ends[-1] - self.ends[self.warmup - 1]
        busy = self.cpu_end[0] - self.cpu_start[0]
        own = self.cpu_end[1] - self.cpu_start[1]
        ticks = os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy - own) / ticks / elapsed) if elapsed > 0 else 0.0

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[self.warmup - 1:], self.ends[self.warmup:])]

    def step_cpu(self) -> list[float]:
        return [b - a for a, b in zip(self.process_cpu[self.warmup - 1:], self.process_cpu[self.warmup:])]

    def step_system(self) -> list[float]:
        return [b - a for a, b in zip(self.system_cpu[self.warmup - 1:], self.system_cpu[self.warmup:])]


# -- the host, in process ---------------------------------------------------------------------------------------


def start_host(spec: dict, data_dir: Path) -> None:
    webui = Path(spec["webui"])
    ckpt = Path(spec["ckpt"])
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "Stable-diffusion").symlink_to(ckpt.parent, target_is_directory=True)
    os.chdir(webui)
    sys.path.insert(0, str(webui))
    sys.argv = [
        str(webui / "launch.py"), "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
        "--skip-version-check", "--no-download-sd-model", "--use-cpu", "all", "--no-half", "--precision", "full",
        "--data-dir", str(data_dir), "--ckpt", str(models / "Stable-diffusion" / ckpt.name),
        "--skip-load-model-at-start",  # loaded below on this thread, as initialize.load_model() does
    ]
    import webui as host_webui  # noqa: F401  - runs initialize.imports() and check_versions(), like launch.py
    from modules import devices, initialize, sd_hijack, shared

    initialize.initialize()
    os.makedirs(shared.cmd_opts.embeddings_dir, exist_ok=True)  # the UI's first start makes it
    shared.sd_model  # noqa: B018 - the property loads the checkpoint (hijack, embeddings, eval())
    if spec.get("attention"):  # as if chosen in Settings: the option holds the optimiser's title
        titles = [o.title() for o in sd_hijack.optimizers if o.name == spec["attention"]]
        if not titles:
            names = [o.name for o in sd_hijack.optimizers]
            raise SystemExit(f"no attention optimisation {spec['attention']!r} in {names}")
        shared.opts.cross_attention_optimization = titles[0]
        sd_hijack.apply_optimizations()
    elif sd_hijack.current_optimizer is None:
        sd_hijack.apply_optimizations()
    devices.first_time_calculation()


def attention_in_use() -> str:
    import ldm.modules.attention as attention

    return attention.CrossAttention.forward.__name__


def write_images(folder: Path, size: int, count: int) -> list[Path]:
    """Smooth random pictures, the tests' own (the figures are about cost; the content does not matter)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import write_image

    return [write_image(folder / f"{seed:02d}-a red object.png", (size, size), seed) for seed in range(count)]


def run_host_ti(spec: dict, work: Path, clock: StepClock) -> dict:
    """The built-in trainer as the Train tab runs it, with the tab's defaults (a preview and a save every 500
    steps: none happens within a benchmark's few steps)."""
    import torch
    from modules import sd_hijack, shared
    from modules.textual_inversion import textual_inversion as ti
    from modules.textual_inversion import ui as ti_ui

    name = "benchti"
    ti.create_embedding(name, spec.get("vectors", 1), overwrite_old=True, init_text="*")
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    shared.opts.training_xattention_optimizations = bool(spec.get("xattn", False))
    unet = shared.sd_model.model.diffusion_model
    if spec.get("freeze_unet"):  # a lever the host does not have: what its U-Net gradients cost
        unet.requires_grad_(False)

    losses = []
    original_write_loss = ti.write_loss

    def timed_write_loss(log_directory, filename, step, epoch_len, values):
        losses.append(float(values["loss"]))
        clock.step_done()
        return original_write_loss(log_directory, filename, step, epoch_len, values)

    def probe():
        return {
            "attention": attention_in_use(),
            "unet_params_with_grad": sum(p.grad is not None for p in unet.parameters()),
            "checkpointing": type(shared.sd_model.model.diffusion_model.input_blocks[1][1]
                                  .transformer_blocks[0]).forward.__name__,
        }

    clock.probe = probe
    ti.write_loss = timed_write_loss
    data_root = work / "images"
    write_images(data_root, spec["size"], max(2, spec.get("batch", 1)))
    try:
        ti_ui.train_embedding(
            "task(bench)", name, "0.005", spec.get("batch", 1), 1, str(data_root), str(work / "ti-log"),
            spec["size"], spec["size"], False, clock.total, "disabled", "0.1", False, 0, "once", False,
            500, 500, "style_filewords.txt", True, False, "", "", 20, "Euler a", 7.0, -1, 512, 512,
        )
    finally:
        ti.write_loss = original_write_loss
    torch.set_grad_enabled(True)
    return {"losses": losses}


def run_ours(spec: dict, work: Path, clock: StepClock) -> dict:
    sys.path.insert(0, spec.get("engine") or str(REPO))  # another checkout's engine, to measure a change
    from modules import shared
    from dreamartist_ext.config import TrainConfig
    from dreamartist_ext.outputs import OutputLayout
    from dreamartist_ext.preparation import prepare_run
    from dreamartist_ext.trainer import TrainCallbacks, Trainer
    from dreamartist_ext.webui.binding import WebuiBinding
    from dreamartist_ext.webui.host import TRAINING_ATTENTION_OPTION

    images = write_images(work / "images", spec["size"], 2)
    values = dict(name="benchda", images=[str(p) for p in images], width=spec["size"], height=spec["size"],
                  steps=clock.total, unet_rank=0, text_rank=0, guidance="3", reconstruction_weight=0.0,
                  template="style_filewords", save_every=0, preview_every=0)
    values.update(spec.get("config", {}))
    config = TrainConfig.from_dict(values)
    if spec.get("training_attention"):  # as if chosen in Settings > DreamArtist
        shared.opts.data[TRAINING_ATTENTION_OPTION] = spec["training_attention"]
    binding = WebuiBinding(shared.sd_model)
    unet = binding.unet
    losses = []

    def on_step(report):
        losses.append(report.values.get("loss", float("nan")))
        clock.step_done()

    def probe():
        return {"attention": attention_in_use(),
                "unet_params_with_grad": sum(p.grad is not None for p in unet.parameters())}

    clock.probe = probe
    phases: dict[str, list[float]] = {}
    if spec.get("phases"):  # forward time of each part; the rest of a step is backward + optimizer
        for method, key in (("_encode", "text encoder forward"), ("_predict", "U-Net forward"),
                            ("decode_latents", "VAE decode forward")):
            setattr(binding, method, _timed(getattr(binding, method), phases.setdefault(key, [])))
    prepared = prepare_run(config, OutputLayout.under(work / "out"), size_multiple=binding.size_multiple)
    result = Trainer(binding, prepared, callbacks=TrainCallbacks(on_step=on_step)).run()
    skip = spec["warmup"]  # one call of each part per step (batch 1, no accumulation)
    return {"losses": losses, "status": result.status,
            "phases": {key: times[skip:] for key, times in phases.items() if times}}


def _stacks_of(profiler, names: list[str], top: int = 8) -> str:
    """Where the named operators are called from (Python frames), by self CPU time."""
    lines = []
    for name in names:
        by_stack: dict[tuple, list] = {}
        for event in profiler.events():
            if event.name != name:
                continue
            frames = tuple(f for f in event.stack if not f.startswith(("torch/", "<built-in", "nn.Module")))[:5]
            entry = by_stack.setdefault((frames, str(event.input_shapes)), [0.0, 0])
            entry[0] += event.self_cpu_time_total / 1e6
            entry[1] += 1
        lines.append(f"== {name}: top call sites by self CPU time")
        for (frames, shapes), (seconds, calls) in sorted(by_stack.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"{seconds:8.3f} s {calls:4d} calls  shapes {shapes}")
            lines.extend(f"        {frame}" for frame in frames)
    return "\n".join(lines)


def _timed(function, into: list[float]):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)

    return timed


def main() -> None:
    spec = json.loads(sys.argv[1])
    guard_memory(int(spec.get("reserve_gib", 1.5) * 2**30))
    import torch

    torch.set_num_threads(spec["threads"])
    clock = StepClock(spec["warmup"], spec["warmup"] + spec["timed"])
    if spec.get("profile"):
        stacks = bool(spec.get("stacks"))
        clock.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=stacks, with_stack=stacks,
            # Python frames in event stacks need the verbose experimental config (torch 2.x)
            experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True) if stacks else None,
        )
    with tempfile.TemporaryDirectory(prefix="da-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        start_host(spec, work / "data")
        torch.set_num_threads(spec["threads"])  # the host's initialisation must not have changed it
        ready = time.perf_counter() - started
        runner = run_host_ti if spec["kind"] == "host" else run_ours
        extra = runner(spec, work, clock)
    if len(clock.ends) != clock.total:
        raise SystemExit(f"expected {clock.total} optimizer steps, saw {len(clock.ends)}")
    result = {
        "name": spec["name"],
        "step_times": clock.step_times(),
        "step_cpu": clock.step_cpu(),
        "step_system": clock.step_system(),
        "others_cores": clock.others_cores(),
        "rss_before": clock.rss_before,
        "peak_rss": clock.peak,
        "max_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "startup_s": ready,
        "threads": torch.get_num_threads(),
        **clock.probed,
        **extra,
    }
    if clock.profiler is not None:
        result["profile"] = clock.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        if spec.get("stacks"):
            result["profile"] += "\n" + _stacks_of(clock.profiler, spec.get("stack_ops", ["aten::copy_"]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
