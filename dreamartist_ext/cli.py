"""Command line: ``dreamartist train|generate`` (or ``python -m dreamartist_ext``).

    train --demo                       the shipped toy world learns a new concept from one picture (1-2 min)
    train --model M --image I --name N --out DIR [options]
    generate --model M --concepts DIR --prompt "a photo of N on a beach" --out DIR

Every input is checked before the model loads; a bad one is one line on stderr and exit status 2, with nothing
written. Ctrl-C stops training at a step boundary, saves, and prints how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import __version__, toy
from .config import PreviewConfig, TrainConfig
from .errors import InvalidInput

DEMO_NAME = "dreamdemo"
TOY_MODEL = toy.MODEL_DIR  # the toy world's pretrained model, which --demo uses
NOT_OPTIONS = {"name", "images", "preview"}  # given as --name/--image and the --preview-* flags
DEMO_REFUSES = ("--image", "--name", "--model", "--config", "--options")
PLAIN_PROGRESS_LINES = 100  # without a terminal: about this many progress lines per run
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def _flag_help(f: dataclasses.Field) -> str:
    if f.metadata.get("hidden"):
        return argparse.SUPPRESS
    return f"{f.metadata.get('help', '')} (default: {f.default})"


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig/PreviewConfig field; help, choices and defaults come from the fields."""
    group = parser.add_argument_group("training options (defaults follow the paper)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_OPTIONS:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        common = dict(dest=f.name, default=None, help=_flag_help(f))
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=float, nargs=len(default), metavar=("B1", "B2"), **common)
        else:
            group.add_argument(flag, type=type(default), choices=f.metadata.get("choices"), **common)
    preview = parser.add_argument_group("previews (made every --preview-every steps and at the end)")
    for f in dataclasses.fields(PreviewConfig):
        preview.add_argument("--preview-" + f.name.replace("_", "-"), dest="preview_" + f.name, type=type(f.default),
                             default=None, help=_flag_help(f))


class _DefaultsShown(argparse.HelpFormatter):
    """'(default: X)' after every option that has a real default and does not say its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default in ("", argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser(prog: str = "dreamartist") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dreamartist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="learn a concept from one (or a few) images")
    train.add_argument("--demo", action="store_true",
                       help="the shipped toy world learns a concept it never saw from one picture, beside plain "
                            "textual inversion, and its judge grades both (1-2 min on 2 CPU cores; takes none of "
                            f"{', '.join(DEMO_REFUSES)}; other flags apply)")
    train.add_argument("--model", help="diffusers folder, or a single-file .safetensors/.ckpt (then also --config)")
    train.add_argument("--config", help="for a single-file model: its LDM .yaml or a diffusers folder with configs")
    train.add_argument("--image", action="append", default=[], help="training image or folder (repeatable)")
    train.add_argument("--name", help=TrainConfig.__dataclass_fields__["name"].metadata["help"])
    train.add_argument("--out", help="output folder (embeddings/, lora/, log/ go in it; default for --demo: demo-out)")
    train.add_argument("--options", help="JSON file with training options, as TrainConfig fields (any flag given "
                                         "on the command line wins, --name and --image included)")
    train.add_argument("--resume", help="checkpoint to resume from exactly (log/checkpoints/NAME-STEP.safetensors)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing pair of the same name")
    train.add_argument("--continue", dest="continue_existing", action="store_true",
                       help="keep training an existing pair from its saved vectors and adapters")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _add_config_options(train)

    gen = sub.add_parser("generate", help="make images with learned concepts",
                         formatter_class=_DefaultsShown)
    gen.add_argument("--model", help="diffusers folder or single-file checkpoint, as for train (--demo: the demo's)")
    gen.add_argument("--config", help="for a single-file model: its LDM .yaml or a diffusers folder")
    gen.add_argument("--demo", action="store_true",
                     help="use the toy world's model and the demo's concept (from --concepts, default demo-out)")
    gen.add_argument("--concepts", help="folder holding embeddings/ and lora/ (a train --out folder)")
    gen.add_argument("--prompt", help="positive prompt; learned words in it are recognised (--demo: 'a "
                                      f"{DEMO_NAME} on a navy background')")
    gen.add_argument("--negative", default="", help="negative prompt; NAME-neg is added for every learned NAME used")
    gen.add_argument("--no-auto-negative", action="store_true", help="do not add NAME-neg to the negative prompt")
    gen.add_argument("--adapter-weight", type=float, default=1.0, help="strength of the learned adapters")
    gen.add_argument("--steps", type=int, default=30, help="DDIM sampling steps")
    gen.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance (CFG) scale")
    gen.add_argument("--seed", type=int, default=0, help="seed of the images: the same seed gives the same images")
    gen.add_argument("--width", type=int, default=None,
                     help="image width in pixels (default: the model's native size: 512 SD 1.x, 768 SD 2.x-v, "
                          "1024 SDXL; --demo: 64)")
    gen.add_argument("--height", type=int, default=None,
                     help="image height in pixels (default: the model's native size; --demo: 64)")
    gen.add_argument("--count", type=int, default=1, help="images to make")
    gen.add_argument("--out", default="generated", help="folder for the images (SEED-INDEX.png)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


# -- checks made before any model is loaded ------------------------------------------------------------------


def _device(choice: str | None) -> torch.device:
    try:
        device = torch.device(choice) if choice else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise InvalidInput(f"--device {choice!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"--device {choice} asks for CUDA, which this machine does not have; use --device cpu")
    return device


def _read_options_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"options file {file} does not exist" if not file.exists() else f"{file} is not a file")
    try:
        values = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InvalidInput(f"options file {file} is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InvalidInput(f"options file {file} is not valid JSON (line {error.lineno}, column {error.colno}: "
                           f"{error.msg})") from None
    if not isinstance(values, dict):
        raise InvalidInput(f"options file {file} must hold a JSON object of options, not {type(values).__name__}")
    return values


def _config_from(args: argparse.Namespace, base: dict) -> TrainConfig:
    """``base`` (demo options or an --options file) with every flag given on the command line on top."""
    values = dict(base)
    if getattr(args, "name", None):
        values["name"] = args.name
    if getattr(args, "image", None):
        values["images"] = list(args.image)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NOT_OPTIONS and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    preview = values.get("preview", {})
    if isinstance(preview, dict):  # anything else is refused by from_dict with a sentence
        preview = dict(preview)
        for f in dataclasses.fields(PreviewConfig):
            value = getattr(args, "preview_" + f.name, None)
            if value is not None:
                preview[f.name] = value
    values["preview"] = preview
    return TrainConfig.from_dict(values)


def _train_inputs(args: argparse.Namespace) -> tuple[Path, Path | None, TrainConfig]:
    """(output folder, model path or None for the toy world's model, config); InvalidInput when something lacks."""
    if args.demo:
        given = [flag for flag, value in (("--image", args.image), ("--name", args.name), ("--model", args.model),
                                          ("--config", args.config), ("--options", args.options)) if value]
        if given:
            # The demo teaches the toy world its own picture: a user's image or name there would give results
            # that look like a real run of theirs. Say so instead of silently ignoring them.
            raise InvalidInput(f"--demo teaches the toy world its own picture as {DEMO_NAME!r} and takes no "
                               f"{', '.join(given)}; drop --demo to train your own images with --model")
        from .toy import demo

        return Path(args.out or "demo-out"), None, _config_from(args, demo.dreamartist_options(demo.REFERENCE_FILE))
    base = _read_options_file(args.options) if args.options else {}
    missing = [flag for flag, value in (("--model", args.model), ("--name", args.name or base.get("name")),
                                        ("--image", args.image or base.get("images")), ("--out", args.out))
               if not value]
    if missing:
        raise InvalidInput(f"train needs {', '.join(missing)} (or --demo)")
    from .diffusers_binding import check_model_files

    check_model_files(args.model, args.config)
    return Path(args.out), Path(args.model), _config_from(args, base)


# -- training ------------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace, prog: str) -> int:
    from .diffusers_binding import native_size_of
    from .outputs import OutputLayout
    from .preparation import prepare_run

    out, model_path, config = _train_inputs(args)
    device = _device(args.device)
    layout = OutputLayout.under(out)  # prepare_run checks its folders (under out) can be written
    native = native_size_of(model_path or TOY_MODEL, args.config)
    prepared = prepare_run(config, layout, resume=args.resume, overwrite=args.overwrite or args.demo,
                           continue_existing=args.continue_existing, native_size=native)
    if not args.demo:
        return _train(args, prog, prepared, model_path, device, out)
    from .toy import demo

    baseline = prepare_run(demo.plain_ti(config), OutputLayout.under(out / "plain-ti"), overwrite=True,
                           native_size=native)
    print(demo.INTRO.format(reference=config.images[0]))
    for label, run, folder in (("DreamArtist", prepared, out), ("plain textual inversion", baseline, out / "plain-ti")):
        print(f"== {label} ==")
        status = _train(args, prog, run, TOY_MODEL, device, folder)
        if status:
            return status
    demo.report(TOY_MODEL, [("DreamArtist", out, True), ("plain TI", out / "plain-ti", False)],
                Path(config.images[0]), device)
    print(f"\nnext: {prog} generate --demo --concepts {shlex.quote(str(out))} --prompt "
          f"'a {DEMO_NAME} on a black background' --out {shlex.quote(str(out / 'generated'))}")
    return 0


def _train(args: argparse.Namespace, prog: str, prepared, model_path: Path, device: torch.device, out: Path) -> int:
    from .diffusers_binding import DiffusersBinding
    from .trainer import TrainCallbacks, Trainer

    started = time.perf_counter()
    binding = DiffusersBinding.load(model_path, config=args.config, device=device)
    trainer = Trainer(binding, prepared, callbacks=TrainCallbacks(preview=_previewer(binding, prepared.config)))
    progress = _Progress(prepared.config.name, prepared.steps_total, prepared.start_step)  # drawn once all is well
    trainer.callbacks.on_step = progress.step
    before = _file_states(out)
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        progress.close()
        written = _changed_files(out, before)
        if not written:
            print("\ninterrupted before the first step; nothing was written", file=sys.stderr)
        else:  # a second Ctrl-C while saving: every file is whole, written to a temporary file and renamed
            print("\ninterrupted again while saving; these files were written, each complete:", file=sys.stderr)
            for path in written:
                print(f"  {path}", file=sys.stderr)
        return INTERRUPTED
    finally:
        progress.close()
    print(f"\n{result.status}: {result.message} in {time.perf_counter() - started:.1f} s")
    _print_files(result, prepared.layout)
    if result.status == "interrupted" and result.checkpoints:
        print(f"\nto continue from step {result.step}:\n  {_resume_command(prog, result.checkpoints[-1])}")
        return INTERRUPTED
    return 0 if result.status == "finished" else 1


def _print_files(result, layout) -> None:
    print("files written:")
    for path in result.files:
        print(f"  {path}")
    earlier = [p for p in result.checkpoints if p not in result.files]
    if earlier:
        print(f"  earlier checkpoints of this run: {', '.join(p.name for p in earlier)} (in {layout.checkpoints_dir})")
    if result.previews:
        print(f"  {len(result.previews)} preview images in {layout.previews_dir}")


def _resume_command(prog: str, checkpoint: Path) -> str:
    """This command line again, resuming from ``checkpoint`` (an earlier --resume replaced)."""
    argv, kept, skip = sys.argv[1:], [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--resume":
            skip = True
        elif not item.startswith("--resume="):
            kept.append(item)
    return shlex.join([*shlex.split(prog), *kept, "--resume", str(checkpoint)])


def _file_states(root: Path) -> dict[Path, tuple[int, int]]:
    if not root.is_dir():
        return {}
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _changed_files(root: Path, before: dict[Path, tuple[int, int]]) -> list[Path]:
    return sorted(p for p, state in _file_states(root).items() if before.get(p) != state)


class _Progress:
    """A tqdm bar on a terminal; otherwise (a file, a pipe, CI) plain lines, about PLAIN_PROGRESS_LINES per run."""

    def __init__(self, name: str, total: int, start: int) -> None:
        self.total = total
        self.bar = None
        self.every = max(1, (total - start) // PLAIN_PROGRESS_LINES)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"training {name}", unit="step", dynamic_ncols=True)

    def step(self, report) -> None:
        loss = report.values.get("loss", float("nan"))
        if self.bar is not None:
            self.bar.n = report.step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{report.learning_rate:.2g}", refresh=False)
            self.bar.refresh()
        elif report.step % self.every == 0 or report.step == self.total:
            from .progress import progress_text

            print(progress_text(report.step, report.total, report.values, report.steps_per_second,
                                report.eta_seconds) + f" · lr {report.learning_rate:.2g}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _previewer(binding, config: TrainConfig):
    from .prompt_words import complete_negative
    from .sampling import SampleRequest, generate

    preview = config.preview

    def make(step: int):
        prompt = preview.prompt.replace("[name]", config.name)
        negative = preview.negative_prompt.replace("[name]", config.name)
        if config.use_negative:
            negative, _ = complete_negative(negative, [config.name])
        return generate(binding, SampleRequest(
            prompt, negative, steps=preview.steps, guidance=preview.guidance, seed=preview.seed,
            width=preview.width or config.width, height=preview.height or config.height, count=preview.count))

    return make


# -- generating ----------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    from .concepts import list_concepts, load_concept
    from .diffusers_binding import DiffusersBinding, check_model_files
    from .model import check_family
    from .outputs import OutputLayout, check_writable_folder
    from .prompt_words import complete_negative, find_learned_names
    from .sampling import SampleRequest, generate_with_concepts

    if args.demo:
        root = Path(args.concepts or "demo-out")
        model_path, concepts_root = Path(args.model) if args.model else TOY_MODEL, root
        prompt = args.prompt or f"a {DEMO_NAME} on a navy background"
        width, height = args.width or 64, args.height or 64
    else:
        if not (args.model and args.concepts and args.prompt):
            raise InvalidInput("generate needs --model, --concepts and --prompt (or --demo)")
        model_path, concepts_root, prompt = Path(args.model), Path(args.concepts), args.prompt
        width, height = args.width, args.height  # None: the model's native size, known once it is loaded
    if not concepts_root.is_dir():
        raise InvalidInput(f"--concepts {concepts_root} is not a folder (give a train --out folder)")
    for label, value, low, high in (("--steps", args.steps, 1, 1000), ("--count", args.count, 1, 64),
                                    ("--width", width, 64, 4096), ("--height", height, 64, 4096)):
        if value is not None and not low <= value <= high:
            raise InvalidInput(f"{label} {value} must be between {low} and {high}")
    check_model_files(model_path, args.config)
    out = Path(args.out)
    check_writable_folder(out)
    device = _device(args.device)
    layout = OutputLayout.under(concepts_root)
    names = [c.name for c in list_concepts(layout.embeddings_dir, layout.lora_dir)]
    used = find_learned_names(prompt, names)
    if not used:
        print(f"note: no learned concept of {layout.embeddings_dir} appears in the prompt", file=sys.stderr)
    concepts = [load_concept(name, layout.embeddings_dir, layout.lora_dir) for name in used]
    negative = args.negative
    if not args.no_auto_negative:
        negative, _ = complete_negative(negative, [c.name for c in concepts if c.negative is not None])
    binding = DiffusersBinding.load(model_path, config=args.config, device=device)
    for concept in concepts:
        check_family(binding, concept.metadata.get("architecture"), f"concept {concept.name}")
    width, height = width or binding.native_size, height or binding.native_size
    if width % binding.size_multiple or height % binding.size_multiple:
        raise InvalidInput(f"image size {width}x{height} must be a multiple of {binding.size_multiple} for this model")
    images = generate_with_concepts(binding, concepts, SampleRequest(
        prompt, negative, steps=args.steps, guidance=args.guidance, seed=args.seed, width=width, height=height,
        count=args.count), args.adapter_weight)
    from . import files

    out.mkdir(parents=True, exist_ok=True)
    print(f"prompt: {prompt}\nnegative: {negative}")
    for i, image in enumerate(images):
        path = files.atomic_write(out / f"{args.seed:06d}-{i}.png", lambda tmp, image=image: image.save(tmp, "PNG"))
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prog = prog or "dreamartist"
    args = build_parser(prog).parse_args(argv)
    try:
        return run_train(args, prog) if args.command == "train" else run_generate(args)
    except InvalidInput as error:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
