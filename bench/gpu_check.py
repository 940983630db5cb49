"""The real trainer on SD1.5- and SDXL-size models with random weights, on a GPU (issue 10).

The user's path: ``TrainConfig`` -> ``prepare_run`` -> ``Trainer`` on a ``DiffusersBinding``, as the CLI does, with
the run's defaults (adapters on at rank 4, reconstruction on) unless a case says otherwise. The models are built
on the device from their configs with random weights (no download): SD 1.5 (the default U-Net config with
cross-attention 768, CLIP ViT-L/14 text encoder, the SD VAE) and SDXL base (its U-Net, CLIP-L + OpenCLIP bigG with
its 1280 projection, the SDXL VAE). The weights are held in the case's half precision (fp16 or bf16) and the
trainer autocasts to it; the learned vectors and the adapters stay in float32 (the trainer's own choice).

Each case: s/step (median of the steps after the warm-up), peak VRAM (``torch.cuda.max_memory_allocated`` over the
whole run, weights included), whether every loss was finite and no update was skipped. One line per figure, then
JSON to ``$OUT/gpu_check.json`` (or ``--out``).

    python bench/gpu_check.py                 # the GPU cases (SD1.5 512 and SDXL 1024, fp16 and bf16), < 8 min
    python bench/gpu_check.py --smoke         # the same code on tiny models on the CPU, fp32, 2 steps (seconds)

``bench/gpu_check.sh run`` installs the carried wheels (diffusers) and runs this. ``bench/sdxl_cpu.py`` uses the same
builders for SDXL-size figures on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2 ** 30

# full-size architectures (random weights); tests/test_lora_keys.py checks SDXL_UNET (2567 M parameters) against
# the host's own sgm U-Net
SD15_UNET = dict(cross_attention_dim=768)  # UNet2DConditionModel's default config is SD 1.x's
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 hidden_act="gelu", projection_dim=1280)
CLIP_VOCAB = 49408  # the real table size; the tokenizer is tiny.write_tokenizer's byte-level one (ids < 600)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    name: str
    family: str  # "sd15", "sdxl" (full size) or "tiny-sd1", "tiny-sdxl"
    size: int
    precision: str  # fp32 / bf16 / fp16: the weights' dtype and the trainer's autocast
    checkpointing: bool = False
    unet_rank: int = 4
    text_rank: int = 4
    reconstruction: float = 1.0


GPU_CASES = [
    Case("sd15-512-fp16", "sd15", 512, "fp16"),
    Case("sd15-512-bf16", "sd15", 512, "bf16"),
    Case("sdxl-1024-fp16-ckpt", "sdxl", 1024, "fp16", checkpointing=True),
    Case("sdxl-1024-bf16-ckpt", "sdxl", 1024, "bf16", checkpointing=True),
]
SMOKE_CASES = [
    Case("tiny-sd1-64-fp32", "tiny-sd1", 64, "fp32"),
    Case("tiny-sdxl-64-fp32", "tiny-sdxl", 64, "fp32", checkpointing=True),
]


# -- models -------------------------------------------------------------------------------------------------------


def write_tokenizers(folder: Path) -> dict[str, Path]:
    """The tiny byte-level CLIP tokenizer files (no download); SDXL's second tokenizer pads with "!"."""
    from dreamartist_ext.tiny import write_tokenizer

    return {"tokenizer": write_tokenizer(folder / "tokenizer"),
            "tokenizer_2": write_tokenizer(folder / "tokenizer_2", pad_token="!")}


def _clip_config(spec: dict):
    from transformers import CLIPTextConfig

    from dreamartist_ext.tiny import END, START, vocabulary

    tokens = vocabulary()
    return CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77, bos_token_id=tokens.index(START),
                          eos_token_id=tokens.index(END), pad_token_id=tokens.index(END), **spec)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """New parameters are made in ``dtype`` (no float32 copy of a 2.6 B-parameter U-Net on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(family: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """unet, vae, text_encoder (and text_encoder_2) with random weights drawn on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if family.startswith("tiny-"):
        from dreamartist_ext.tiny import build_tiny_components

        parts = build_tiny_components(seed, family[len("tiny-"):])
        return {name: module.to(device, dtype) for name, module in parts.items()}
    with torch.device(device), _default_dtype(dtype):
        if family == "sd15":
            parts = {"unet": UNet2DConditionModel(**SD15_UNET),
                     "vae": AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215),
                     "text_encoder": CLIPTextModel(_clip_config(CLIP_L))}
        elif family == "sdxl":
            parts = {"unet": UNet2DConditionModel(**SDXL_UNET),
                     "vae": AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025),
                     "text_encoder": CLIPTextModel(_clip_config(CLIP_L)),
                     "text_encoder_2": CLIPTextModelWithProjection(_clip_config(CLIP_BIGG))}
        else:
            raise ValueError(f"unknown family {family!r}")
    return parts


def build_binding(family: str, device: torch.device, dtype: torch.dtype, tokenizers: dict[str, Path]):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from dreamartist_ext.diffusers_binding import DiffusersBinding

    parts = build_components(family, device, dtype)
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(tokenizers["tokenizer"])
    if "text_encoder_2" in parts:
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tokenizers["tokenizer_2"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    binding = DiffusersBinding(**parts, alphas_cumprod=scheduler.alphas_cumprod, prediction_type="epsilon",
                               name=f"random {family}")
    counts = {name: sum(p.numel() for p in parts[name].parameters())
              for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name in parts}
    return binding, counts


# -- one case -----------------------------------------------------------------------------------------------------


def write_images(folder: Path, size: int, count: int = 2) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from support import write_image

    return [str(write_image(folder / f"{seed:02d}.png", (size, size), seed)) for seed in range(count)]


def train_config(case: Case, images: list[str], steps: int, **extra):
    from dreamartist_ext.config import TrainConfig

    values = dict(name="gpucheck", images=images, width=case.size, height=case.size, steps=steps,
                  precision=case.precision, gradient_checkpointing=case.checkpointing, unet_rank=case.unet_rank,
                  text_rank=case.text_rank, reconstruction_weight=case.reconstruction, save_every=0,
                  preview_every=0, template="subject")
    values.update(extra)
    return TrainConfig.from_dict(values)


class Clock:
    """Ends of optimizer steps (after a device sync), the losses reported, and an optional hook at the warm-up's
    end (the CPU bench resets its resident-memory peak there)."""

    def __init__(self, device: torch.device, warmup: int, at_warmup=None) -> None:
        self.device, self.warmup, self.at_warmup = device, warmup, at_warmup
        self.started = 0.0
        self.cpu: list[float] = []  # this process's CPU seconds at the same points (all threads)
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.skipped = 0
        self.skipped_at: list[int] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.started = time.perf_counter()
        self.cpu = [time.process_time()]

    def on_step(self, report) -> None:
        self._sync()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.losses.append(float(report.values.get("loss", float("nan"))))
        if report.skipped > self.skipped:  # the update of this step was not made (non-finite loss or gradient)
            self.skipped_at.append(len(self.ends))
        self.skipped = report.skipped
        if len(self.ends) == self.warmup and self.at_warmup is not None:
            self.at_warmup()
            self.ends[-1] = time.perf_counter()  # the hook is not timed

    def step_times(self) -> list[float]:
        ends = [self.started] + self.ends
        return [b - a for a, b in zip(ends[:-1], ends[1:])]


def run_case(case: Case, device: torch.device, work: Path, *, steps: int, warmup: int,
             deadline: float = math.inf, at_warmup=None, after_build=None,
             tokenizers: dict[str, Path] | None = None) -> dict:
    """Build the case's model, train ``steps`` steps through prepare_run + Trainer, return its figures."""
    from dreamartist_ext.outputs import OutputLayout
    from dreamartist_ext.preparation import prepare_run
    from dreamartist_ext.trainer import TrainCallbacks, Trainer

    cuda = device.type == "cuda"
    tokenizers = tokenizers or write_tokenizers(work / "tokenizers")
    built = time.perf_counter()
    binding, counts = build_binding(case.family, device, PRECISIONS[case.precision], tokenizers)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    build_s = time.perf_counter() - built
    if after_build is not None:
        after_build()
    weights = torch.cuda.memory_allocated(device) if cuda else None
    images = write_images(work / f"images-{case.size}", case.size)
    config = train_config(case, images, steps)
    prepared = prepare_run(config, OutputLayout.under(work / f"out-{case.name}"), overwrite=True,
                           size_multiple=binding.size_multiple)
    clock = Clock(device, warmup, at_warmup)
    trainer = Trainer(binding, prepared, callbacks=TrainCallbacks(
        on_step=clock.on_step, should_stop=lambda: time.perf_counter() > deadline))
    clock.start()
    result = trainer.run()
    times = clock.step_times()
    timed = times[warmup:]
    figures = {
        **asdict(case),
        "device": str(device),
        "parameters": counts,
        "build_s": round(build_s, 2),
        "status": result.status,
        "steps_done": len(clock.ends),
        "steps_asked": steps,
        "warmup": warmup,
        "s_per_step": statistics.median(timed) if timed else None,
        "step_times": [round(t, 4) for t in times],
        "step_cpu_s": [round(b - a, 3) for a, b in zip(clock.cpu[:-1], clock.cpu[1:])],
        "losses": clock.losses,
        "losses_finite": bool(clock.losses) and all(math.isfinite(v) for v in clock.losses),
        "skipped_updates": clock.skipped,  # fp16: the loss scaler's overflowing first steps show up here
        "skipped_at_steps": clock.skipped_at,
        "all_finite": bool(clock.losses) and all(math.isfinite(v) for v in clock.losses) and clock.skipped == 0,
    }
    if cuda:
        figures.update(peak_vram=torch.cuda.max_memory_allocated(device),
                       peak_vram_reserved=torch.cuda.max_memory_reserved(device), weights_vram=weights)
    del trainer, binding, prepared
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return figures


def describe(figures: dict) -> str:
    if "error" in figures:
        return f"{figures['name']}: FAILED {figures['error']}"
    rate = figures["s_per_step"]
    text = (f"{figures['name']}: {rate:.3f} s/step (median of {len(figures['step_times']) - figures['warmup']} "
            f"after {figures['warmup']} warm-up)" if rate is not None else f"{figures['name']}: no timed step")
    if figures.get("peak_vram") is not None:
        text += (f", peak VRAM {figures['peak_vram'] / GIB:.2f} GiB ({figures['peak_vram'] / 1e9:.2f} GB; "
                 f"weights {figures['weights_vram'] / GIB:.2f} GiB)")
    if figures.get("peak_rss") is not None:
        text += f", peak RSS {figures['peak_rss'] / GIB:.2f} GiB"
    text += f", {figures['steps_done']}/{figures['steps_asked']} steps, "
    text += "every loss finite" if figures["losses_finite"] else "NON-FINITE loss"
    if figures["skipped_updates"]:
        text += f", {figures['skipped_updates']} updates skipped (steps {figures['skipped_at_steps']})"
    if figures["status"] != "finished":
        text += f" [{figures['status']}]"
    return text


def skip_plot_without_matplotlib() -> str | None:
    """The trainer's final save draws the loss plot with matplotlib, which a bare GPU machine may lack (it is not
    carried): draw nothing there, and say so in the report. Nothing else of the run changes."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from dreamartist_ext import trainer

        trainer.plot_losses = lambda rows, png_path, **options: Path(png_path)
        return "matplotlib is missing here: the loss plot of the final save was not drawn"
    return None


def machine() -> dict:
    import diffusers
    import peft
    import PIL
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "pillow": PIL.__version__,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory=props.total_memory, cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in fp32, 2 steps")
    parser.add_argument("--out", help="JSON path (default $OUT/gpu_check.json, else bench/out/gpu_check.json)")
    parser.add_argument("--steps", type=int, help="steps per case (default 50; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 5; 1 with --smoke)")
    parser.add_argument("--only", nargs="*", help="case names")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1 with --smoke: tiny ops on a shared "
                        "machine are many times slower with 2 threads spinning)")
    parser.add_argument("--device", help="run the full-size cases on this device instead (e.g. cpu, to try the "
                        "builders; with --size and --precision)")
    parser.add_argument("--size", type=int, help="side length for every case instead of its own")
    parser.add_argument("--precision", choices=list(PRECISIONS), help="precision for every case instead of its own")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop training (and skip cases) past this many seconds from the start")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s
    cases = SMOKE_CASES if args.smoke else GPU_CASES
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    if args.size or args.precision:
        cases = [dataclasses.replace(c, size=args.size or c.size, precision=args.precision or c.precision,
                                     name=f"{c.family}-{args.size or c.size}-{args.precision or c.precision}"
                                          f"{'-ckpt' if c.checkpointing else ''}") for c in cases]
    steps = args.steps or (2 if args.smoke else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    if args.smoke or args.device:
        device = torch.device(args.device or "cpu")
        if device.type == "cpu":
            # torch 2.1.2's CPU flash-attention kernel corrupts the heap in the bf16 backward of cross-attention
            # (see bench/sdxl_cpu.py); the math kernel is used instead, as there
            torch.backends.cuda.enable_flash_sdp(False)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: use --smoke on a CPU", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
    else:
        out = (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "out") / "gpu_check.json"
    report = {"machine": machine(), "smoke": args.smoke, "steps": steps, "warmup": warmup, "cases": []}
    note = skip_plot_without_matplotlib()
    if note:
        report["note"] = note
        print(note, flush=True)
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="da-gpu-check-") as tmp:
        work = Path(tmp)
        tokenizers = write_tokenizers(work / "tokenizers")
        for case in cases:
            if time.perf_counter() > deadline:
                figures = {**asdict(case), "error": "skipped: over the time budget"}
            else:
                try:
                    figures = run_case(case, device, work, steps=steps, warmup=warmup, deadline=deadline,
                                       tokenizers=tokenizers)
                except Exception as error:  # an OOM or a bug in one case must not lose the others' figures
                    figures = {**asdict(case), "error": f"{type(error).__name__}: {error}"[:2000]}
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            report["cases"].append(figures)
            print(describe(figures), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))  # after every case: a later kill keeps the earlier ones
    goal = [c for c in report["cases"] if c.get("family") == "sdxl" and c.get("size") == 1024
            and c.get("peak_vram") is not None]
    for c in goal:
        print(f"goal SDXL 1024 + adapters + checkpointing under 12 GB VRAM, {c['precision']}: "
              f"{c['peak_vram'] / 1e9:.2f} GB -> {'met' if c['peak_vram'] < 12e9 else 'NOT met'}", flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['total_s']} s)", flush=True)
    ok = all("error" not in c and c["all_finite"] and c["status"] == "finished" for c in report["cases"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
