"""Benchmark checkpoints: SD1-architecture weights with random init, built once and cached outside the repo.

The figures are about cost, not quality, so no weights are downloaded: the checkpoint is built with the host's own
``ldm`` classes by the integration tier's builder (tests/integration/build_tiny_checkpoint.py), from

* ``sd15``: the host's ``configs/v1-inference.yaml`` (full SD1.5 sizes: U-Net 859.5 M, CLIP-L text 123.1 M,
  VAE 83.7 M parameters), and
* ``tiny``: tests/integration/tiny-sd1.yaml (tiny U-Net/VAE, full CLIP-L text encoder) for quick runs.

The cache key is a hash of the builder and the yaml, so a change to either rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILDER = REPO / "tests" / "integration" / "build_tiny_checkpoint.py"
CLIP_REPO = "models--openai--clip-vit-large-patch14"


def model_yaml(model: str, webui: Path) -> Path:
    if model == "sd15":
        return webui / "configs" / "v1-inference.yaml"
    if model == "tiny":
        return REPO / "tests" / "integration" / "tiny-sd1.yaml"
    raise ValueError(f"unknown bench model {model!r} (sd15 or tiny)")


def hf_home(cache: Path) -> Path:
    """An offline Hugging Face cache with the CLIP-L tokenizer (the host's text encoder loads it by name)."""
    given = os.environ.get("HF_HOME")
    if given and list(Path(given, "hub", CLIP_REPO, "snapshots").glob("*/vocab.json")):
        return Path(given)
    source = Path(os.environ.get("CLIP_TOKENIZER_DIR") or REPO.parent / "shared" / "webui" / "clip-vit-large-patch14")
    if not (source / "vocab.json").exists():
        raise SystemExit("no offline CLIP tokenizer: set HF_HOME (with openai/clip-vit-large-patch14) or "
                         "CLIP_TOKENIZER_DIR")
    home = cache / "hf"
    snapshot = home / "hub" / CLIP_REPO / "snapshots" / "local"
    if not (snapshot / "vocab.json").exists():
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            shutil.copyfile(file, snapshot / file.name)
        (home / "hub" / CLIP_REPO / "refs").mkdir(parents=True, exist_ok=True)
        (home / "hub" / CLIP_REPO / "refs" / "main").write_text("local")
        (home / "hub" / "version.txt").write_text("1")
    return home


def host_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HOME=str(hf_home(cache)), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               # the host's hash cache outlives the temporary data dirs: no 2 GB sha256 per configuration
               SD_WEBUI_CACHE_FILE=str(cache / "host-cache.json"), SD_WEBUI_CACHE_DIR=str(cache / "host-cache"))
    return env


def checkpoint(model: str, *, webui: Path, python: Path, cache: Path) -> Path:
    """Path of the cached ``<model>.safetensors`` (with its yaml beside it), building it first if needed."""
    yaml = model_yaml(model, webui)
    key = hashlib.sha256(BUILDER.read_bytes() + yaml.read_bytes()).hexdigest()[:12]
    folder = cache / f"{model}-{key}"
    path = folder / "models" / "Stable-diffusion" / f"{model}.safetensors"
    if not path.exists():
        print(f"building the {model} checkpoint (random init, host's ldm classes) -> {path}", flush=True)
        subprocess.run([str(python), str(BUILDER), str(folder), "--webui", str(webui), "--yaml", str(yaml),
                        "--name", model], check=True, env=host_env(cache), cwd=str(webui), timeout=1800)
    return path
