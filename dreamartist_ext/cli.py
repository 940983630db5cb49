"""Command line: ``python -m dreamartist_ext train|generate``.

    train --demo                       tiny random model + the shipped sample image, whole pipeline (~20 s)
    train --model M --image I --name N --out DIR [options]
    generate --model M --concepts DIR --prompt "a photo of N on a beach" --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .config import PreviewConfig, TrainConfig

DEMO_NAME = "dreamdemo"
ASSETS = Path(__file__).parent / "assets"

HELP = {
    "init_text": "words to start the positive embedding from, e.g. 'girl' ('*' = no hint)",
    "positive_vectors": "vectors in the positive embedding (paper: 3)",
    "negative_vectors": "vectors in the negative embedding (paper: 3; the original extension used 6)",
    "negative_noise": "std of the noise added to the empty-text init of the negative embedding",
    "use_negative": "learn the negative embedding (off = plain textual inversion, g = 1)",
    "width": "training width in pixels", "height": "training height in pixels",
    "resize": "how images are fitted: crop, pad or stretch",
    "template": "prompt template: a shipped name (subject, style, subject_filewords, style_filewords, none) or a file",
    "flip": "also train on the mirrored image",
    "shuffle_tags": "shuffle the comma-separated tags of [filewords]",
    "tag_dropout": "probability of dropping each [filewords] tag",
    "latent_sampling": "once (sample the VAE once), deterministic (its mean) or random (every step)",
    "use_alpha_weight": "weight the loss by the image's alpha channel / <image>_att mask",
    "guidance": "guidance scale g of the combined loss (paper: 3, 5 for styles); 'L-H[:linear|cos|cos2]' = dynamic",
    "reconstruction_weight": "weight of the pixel reconstruction loss (0 = off)",
    "perceptual_weight": "weight of an LPIPS term on the reconstruction (needs AlexNet weights)",
    "perceptual_random_trunk": "LPIPS on an untrained trunk (tests only)",
    "steps": "optimizer steps",
    "embedding_lr": "embedding learning rate or schedule, e.g. '0.005:100, 1e-3:1000, 1e-5' (paper: 0.0025)",
    "negative_lr_scale": "multiplier on the negative embedding's learning rate",
    "batch_size": "images per micro-batch", "gradient_accumulation": "micro-batches per optimizer step",
    "clip_mode": "gradient clipping: none, value or norm", "clip_value": "clipping threshold",
    "weight_decay": "AdamW weight decay", "adam_betas": "AdamW betas",
    "unet_rank": "rank of the U-Net adapters (0 = no U-Net adapters)",
    "text_rank": "rank of the text-encoder adapters (0 = none)",
    "adapter_alpha": "LoRA alpha (0 = same as the rank)",
    "unet_lr": "U-Net adapter learning rate or schedule", "text_lr": "text-encoder adapter learning rate or schedule",
    "negative_adapter_lr_scale": "multiplier on the negative adapters' learning rate",
    "seed": "seed of everything random in the run",
    "precision": "auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16",
    "gradient_checkpointing": "trade compute for memory in the U-Net (the VAE decoder is always checkpointed for the "
                              "reconstruction loss)",
    "reconstruction_scale": "decode the reconstruction from a random latent crop of this side fraction (1 = whole)",
    "save_every": "save the pair and a checkpoint every N steps (0 = only at the end)",
    "preview_every": "make preview images every N steps (0 = only at the end... and never if no preview)",
    "max_bad_steps": "stop after this many non-finite steps in a row",
}
NOT_OPTIONS = {"name", "images", "preview"}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training options (defaults follow the paper)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_OPTIONS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = HELP.get(f.name, f.name.replace("_", " ")) + f" (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=float, nargs=len(default), default=None, help=text)
        else:
            group.add_argument(flag, type=type(default), default=None, help=text)
    preview = parser.add_argument_group("previews")
    for f in dataclasses.fields(PreviewConfig):
        preview.add_argument("--preview-" + f.name.replace("_", "-"), type=type(f.default), default=None,
                             help=f"preview {f.name.replace('_', ' ')} (default: {f.default})")


def _config_from(args: argparse.Namespace, base: dict) -> TrainConfig:
    values = dict(base)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NOT_OPTIONS and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    preview = dict(values.get("preview", {}))
    for f in dataclasses.fields(PreviewConfig):
        value = getattr(args, "preview_" + f.name, None)
        if value is not None:
            preview[f.name] = value
    values["preview"] = preview
    return TrainConfig.from_dict(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreamartist_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dreamartist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="learn a concept from one (or a few) images")
    train.add_argument("--demo", action="store_true",
                       help="tiny random model + shipped sample image: the whole pipeline in ~20 s on 2 CPU cores")
    train.add_argument("--model", help="diffusers folder, or a single-file .safetensors/.ckpt (then also --config)")
    train.add_argument("--config", help="for a single-file model: its LDM .yaml or a diffusers folder with configs")
    train.add_argument("--image", action="append", default=[], help="training image or folder (repeatable)")
    train.add_argument("--name", help="concept name: the prompt word (its partner NAME-neg is made automatically)")
    train.add_argument("--out", help="output folder (embeddings/, lora/, log/ go in it)")
    train.add_argument("--options", help="JSON file with training options (command-line flags override it)")
    train.add_argument("--resume", help="checkpoint to resume from exactly (log/checkpoints/NAME-STEP.safetensors)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing pair of the same name")
    train.add_argument("--continue", dest="continue_existing", action="store_true",
                       help="keep training an existing pair from its saved vectors and adapters")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _add_config_options(train)

    gen = sub.add_parser("generate", help="make images with learned concepts")
    gen.add_argument("--model", required=False, help="as for train")
    gen.add_argument("--config", help="as for train")
    gen.add_argument("--demo", action="store_true",
                     help="use the demo's tiny model and concept (from --concepts, default demo-out)")
    gen.add_argument("--concepts", help="folder holding embeddings/ and lora/ (a train --out folder)")
    gen.add_argument("--prompt", help="positive prompt; learned words in it are recognised")
    gen.add_argument("--negative", default="", help="negative prompt; NAME-neg is added for every learned NAME used")
    gen.add_argument("--no-auto-negative", action="store_true", help="do not add NAME-neg to the negative prompt")
    gen.add_argument("--adapter-weight", type=float, default=1.0, help="strength of the learned adapters")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=7.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--count", type=int, default=1)
    gen.add_argument("--out", required=False, help="folder for the images")
    gen.add_argument("--device", default=None)
    return parser


def _device(choice: str | None) -> torch.device:
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _demo_model(out: Path) -> Path:
    from .tiny import save_tiny_model

    folder = out / "tiny-model"
    if not (folder / "model_index.json").exists():
        save_tiny_model(folder)
    return folder


def _demo_options() -> dict:
    return dict(
        name=DEMO_NAME, images=[str(ASSETS / "sample.png")], width=64, height=64, steps=120,
        init_text="cat", guidance="3", reconstruction_weight=1.0, unet_rank=4, text_rank=4,
        embedding_lr="0.01", unet_lr="1e-3", text_lr="5e-4", save_every=60, preview_every=60,
        preview=dict(prompt="a picture of [name]", steps=10, count=2),
    )


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .diffusers_binding import DiffusersBinding
    from .trainer import OutputLayout, TrainCallbacks, Trainer

    if args.demo:
        out = Path(args.out or "demo-out")
        print("DreamArtist demo: a TINY RANDOM model (no download) learns the shipped sample image.\n"
              "A random model knows nothing, so its pictures are meaningless noise: this run shows the pipeline\n"
              "working end to end (files, adapters, previews, loss plot). For real results point --model at a\n"
              "Stable Diffusion 1.x checkpoint (diffusers folder, or .safetensors with --config v1-inference.yaml),\n"
              "or use the DreamArtist tab inside the WebUI.\n")
        model_path, base = _demo_model(out), _demo_options()
    else:
        missing = [flag for flag, value in (("--model", args.model), ("--name", args.name), ("--out", args.out))
                   if not value]
        if missing or not (args.image or args.options):
            print(f"error: train needs {', '.join(missing + ([] if args.image else ['--image']))} "
                  f"(or --demo)", file=sys.stderr)
            return 2
        out, model_path = Path(args.out), Path(args.model)
        base = json.loads(Path(args.options).read_text()) if args.options else {}
        base.setdefault("name", args.name)
        if args.image:
            base["images"] = list(args.image)
    config = _config_from(args, base)
    device = _device(args.device)
    started = time.perf_counter()
    binding = DiffusersBinding.load(model_path, config=args.config, device=device)
    layout = OutputLayout.under(out)
    bar = tqdm(total=config.steps, desc=f"training {config.name}", unit="step", dynamic_ncols=True)

    def on_step(report) -> None:
        bar.total = report.total
        bar.n = report.step
        bar.set_postfix(loss=f"{report.values.get('loss', float('nan')):.4f}", lr=f"{report.learning_rate:.2g}",
                        refresh=False)  # one line per step, drawn by refresh() below
        bar.refresh()

    trainer = Trainer(binding, config, layout, callbacks=TrainCallbacks(on_step=on_step,
                                                                        preview=_previewer(binding, config)),
                      resume=args.resume, overwrite=args.overwrite or args.demo,
                      continue_existing=args.continue_existing)
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        bar.close()
        print("\ninterrupted before the first save; nothing was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    print(f"\n{result.status}: {result.message} in {time.perf_counter() - started:.1f} s")
    print("files written:")
    for path in result.files:
        print(f"  {path}")
    previews = sorted(layout.previews_dir.glob("*.png")) if layout.previews_dir.exists() else []
    if previews:
        print(f"  {len(previews)} preview images in {layout.previews_dir}")
    if args.demo:
        print(f"\nnext: python -m dreamartist_ext generate --demo --concepts {out} --out {out / 'generated'}")
    return 0 if result.status != "diverged" else 1


def _previewer(binding, config: TrainConfig):
    from .names import negative_name
    from .sampling import SampleRequest, generate

    preview = config.preview

    def make(step: int):
        prompt = preview.prompt.replace("[name]", config.name)
        negative = preview.negative_prompt.replace("[name]", config.name)
        if config.use_negative and negative_name(config.name) not in negative:
            negative = f"{negative}, {negative_name(config.name)}" if negative else negative_name(config.name)
        return generate(binding, SampleRequest(
            prompt, negative, steps=preview.steps, guidance=preview.guidance, seed=preview.seed,
            width=preview.width or config.width, height=preview.height or config.height, count=preview.count))

    return make


def run_generate(args: argparse.Namespace) -> int:
    from .adapters import BranchAdapters
    from .concepts import composed_adapters, list_concepts, load_concept, words_of
    from .diffusers_binding import DiffusersBinding
    from .names import negative_name
    from .sampling import SampleRequest, generate
    from .trainer import OutputLayout

    if args.demo:
        root = Path(args.concepts or "demo-out")
        model_path, concepts_root = Path(args.model) if args.model else root / "tiny-model", root
        prompt = args.prompt or f"a picture of {DEMO_NAME}"
        width = args.width or 64
        height = args.height or 64
    else:
        if not (args.model and args.concepts and args.prompt):
            print("error: generate needs --model, --concepts and --prompt (or --demo)", file=sys.stderr)
            return 2
        model_path, concepts_root, prompt = Path(args.model), Path(args.concepts), args.prompt
        width, height = args.width or 512, args.height or 512
    layout = OutputLayout.under(concepts_root)
    known = {c.name.lower(): c.name for c in list_concepts(layout.embeddings_dir, layout.lora_dir)}
    used = [known[w.lower()] for w in re.findall(r"[\w.\-]+", prompt) if w.lower() in known]
    used = list(dict.fromkeys(used))
    if not used:
        print(f"note: no learned concept of {layout.embeddings_dir} appears in the prompt", file=sys.stderr)
    concepts = [load_concept(name, layout.embeddings_dir, layout.lora_dir) for name in used]
    negative = args.negative
    if not args.no_auto_negative:
        for concept in concepts:
            if concept.negative is not None and negative_name(concept.name) not in negative:
                negative = f"{negative}, {negative_name(concept.name)}" if negative else negative_name(concept.name)
    binding = DiffusersBinding.load(model_path, config=args.config, device=_device(args.device))
    layers = composed_adapters(concepts, {c.name: args.adapter_weight for c in concepts})
    out = Path(args.out or "generated")
    out.mkdir(parents=True, exist_ok=True)
    adapters = BranchAdapters.from_layers(binding.adapter_sites(), layers) if layers else None
    binding.adapters = adapters
    try:
        with binding.learned_words(words_of(concepts)):
            images = generate(binding, SampleRequest(prompt, negative, steps=args.steps, guidance=args.guidance,
                                                     seed=args.seed, width=width, height=height, count=args.count))
    finally:
        binding.adapters = None
        if adapters is not None:
            adapters.detach()
    print(f"prompt: {prompt}\nnegative: {negative}")
    for i, image in enumerate(images):
        path = out / f"{args.seed:06d}-{i}.png"
        image.save(path)
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data import ImageInputError
    from .trainer import TrainingError

    try:
        return run_train(args) if args.command == "train" else run_generate(args)
    except (ConfigError, ImageInputError, TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
