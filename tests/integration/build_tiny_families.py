"""Build tiny, randomly initialised SDXL and SD 2.x-v checkpoints for AUTOMATIC1111 with the host's own classes.

Usage (run with the host's venv, cwd = the webui dir, no network):

    <venv>/bin/python build_tiny_families.py <data-dir> --webui <webui dir> --hf-home <HF_HOME>

``HF_HOME`` must already hold the CLIP-L tokenizer as ``openai/clip-vit-large-patch14`` (see webui_host.py).
This script adds the three local Hugging Face cache repos the yamls name (they do not exist online):

- ``local-tiny/clip-vit-l-text-2l``      the CLIP-L tokenizer files + a 2-layer CLIPTextConfig (config.json)
- ``local-tiny/open-clip-bigG-text-2l``  open_clip_config.json (ViT-bigG text tower, 2 layers) + a placeholder
- ``local-tiny/open-clip-h-text-2l``     open_clip_config.json (ViT-H text tower, 2 layers) + a placeholder

open_clip builds a model from an arch name (``hf-hub:<repo>``) and then loads ``open_clip_pytorch_model.bin``
strictly, even with ``pretrained=None``; the placeholder holds every key of that model as a constant, stride-0
tensor (a few KiB). The checkpoint's weights overwrite it when the host loads the model.

Writes ``<data-dir>/models/Stable-diffusion/tiny-sdxl.{safetensors,yaml}`` and ``tiny-sd2v.{safetensors,yaml}``.
``CLIPTextModel.from_pretrained`` would need weights the cache does not have: while the model is instantiated it
is answered with a randomly initialised model of the cached config (scoped to this process and this call).
Every all-zero parameter is then set to N(0, 0.02) (else the U-Net output is identically zero).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

SPEC = Path(os.environ.get("TINY_FAMILIES_SPEC", Path(__file__).resolve().parents[3] / "shared" / "webui"
                           / "tiny-sdxl-sd2"))
HERE = Path(__file__).resolve().parent
CLIP_REPO = "models--openai--clip-vit-large-patch14"
MODELS = ("tiny-sdxl", "tiny-sd2v")


def spec_dir() -> Path:
    """The yamls and encoder configs: a copy beside this file (tiny-families/) or the shared folder."""
    local = HERE / "tiny-families"
    return local if (local / "tiny-sdxl.yaml").exists() else SPEC


def _repo_dir(hf_home: Path, repo: str) -> Path:
    return hf_home / "hub" / ("models--" + repo.replace("/", "--"))


def _write_repo(hf_home: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    root = _repo_dir(hf_home, repo)
    snapshot = root / "snapshots" / "local"
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("local")
    (hf_home / "hub" / "version.txt").write_text("1")
    return snapshot


def _open_clip_placeholder(config_path: Path, out: Path) -> None:
    import open_clip
    import torch

    cfg = json.loads(config_path.read_text())["model_cfg"]
    with torch.device("meta"):
        model = open_clip.model.CLIP(**cfg)
    state = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}
    torch.save(state, out)


def lay_out_caches(hf_home: Path, spec: Path) -> None:
    snapshots = list((hf_home / "hub" / CLIP_REPO / "snapshots").glob("*/vocab.json"))
    if not snapshots:
        raise SystemExit(f"{hf_home} has no {CLIP_REPO} tokenizer")
    tokenizer = {f.name: f for f in snapshots[0].parent.iterdir() if f.name != "config.json" and f.is_file()}
    _write_repo(hf_home, "local-tiny/clip-vit-l-text-2l",
                {**tokenizer, "config.json": spec / "clip-vit-l-text-2l.config.json"})
    for repo in ("open-clip-bigG-text-2l", "open-clip-h-text-2l"):
        config = spec / f"{repo}.open_clip_config.json"
        snapshot = _write_repo(hf_home, f"local-tiny/{repo}", {"open_clip_config.json": config})
        _open_clip_placeholder(config, snapshot / "open_clip_pytorch_model.bin")


def setup_host_paths(webui: Path) -> None:
    for sub in ("stable-diffusion-stability-ai", "generative-models"):
        path = str(webui / "repositories" / sub)
        if path not in sys.path:
            sys.path.insert(0, path)
    if "pytorch_lightning.utilities.distributed" not in sys.modules:
        import pytorch_lightning
        sys.modules["pytorch_lightning.utilities.distributed"] = pytorch_lightning.utilities.rank_zero


@contextlib.contextmanager
def random_clip_text_models():
    """``CLIPTextModel.from_pretrained(name)`` -> a random model of the cached config, for this call only."""
    from transformers import CLIPTextConfig, CLIPTextModel

    own = "from_pretrained" in CLIPTextModel.__dict__
    original = CLIPTextModel.__dict__.get("from_pretrained")

    def from_config(cls, name, *args, **kwargs):
        return cls(CLIPTextConfig.from_pretrained(name, local_files_only=True))

    CLIPTextModel.from_pretrained = classmethod(from_config)
    try:
        yield
    finally:
        if own:
            CLIPTextModel.from_pretrained = original
        else:
            del CLIPTextModel.from_pretrained


def build(yaml_path: Path, seed: int, std: float):
    import torch
    from omegaconf import OmegaConf

    config = OmegaConf.load(yaml_path)
    target = config.model.target
    if target.startswith("sgm."):
        from sgm.util import instantiate_from_config
    else:
        from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    with random_clip_text_models():
        model = instantiate_from_config(config.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.is_floating_point() and not torch.any(p):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--webui", default=os.getcwd())
    p.add_argument("--hf-home", default=os.environ.get("HF_HOME"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    args = p.parse_args(argv)
    hf_home, spec = Path(args.hf_home), spec_dir()
    os.environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    lay_out_caches(hf_home, spec)
    setup_host_paths(Path(args.webui).resolve())

    import torch
    from safetensors.torch import save_file

    out = Path(args.data_dir).resolve() / "models" / "Stable-diffusion"
    out.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        model = build(spec / f"{name}.yaml", args.seed, args.std)
        state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().clone()
                 for k, v in model.state_dict().items()}
        ckpt = out / f"{name}.safetensors"
        save_file(state, str(ckpt) + ".tmp")
        os.replace(str(ckpt) + ".tmp", ckpt)
        shutil.copyfile(spec / f"{name}.yaml", out / f"{name}.yaml")
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters -> {ckpt} "
              f"({ckpt.stat().st_size / 2**20:.0f} MiB)")
        del model, state


if __name__ == "__main__":
    main()
