"""Integration tier helpers: the REAL AUTOMATIC1111 WebUI with this extension linked in.

Runs when ``SD_WEBUI_DIR`` points at a webui v1.10.x checkout (with its ``repositories/``) whose Python has the
host's requirements plus peft and lpips; skipped with the reason otherwise. Nothing in the checkout is touched:
each session builds a tiny random checkpoint with the host's own ldm classes (cached between sessions) and
starts the host with ``--data-dir`` in a temporary folder whose ``extensions/`` links to this repository.

Environment:
    SD_WEBUI_DIR        the webui checkout (required)
    SD_WEBUI_PYTHON     its interpreter (default: <dir>/venv/bin/python, then <dir>/../venv/bin/python)
    HF_HOME             a Hugging Face cache holding openai/clip-vit-large-patch14's tokenizer, or
    CLIP_TOKENIZER_DIR  a folder with that tokenizer's files, laid out as an offline cache by the fixture
    DREAMARTIST_TEST_CACHE  where the tiny checkpoint is cached (default: ~/.cache/dreamartist-tests)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))  # support.py
CLIP_REPO = "models--openai--clip-vit-large-patch14"


def _host_python(webui: Path) -> Path | None:
    if os.environ.get("SD_WEBUI_PYTHON"):
        return Path(os.environ["SD_WEBUI_PYTHON"])
    for candidate in (webui / "venv" / "bin" / "python", webui.parent / "venv" / "bin" / "python"):
        if candidate.exists():
            return candidate
    return None


def _hf_home(cache: Path) -> Path | None:
    """An offline HF cache with the CLIP-L tokenizer: the given HF_HOME, or one laid out from CLIP_TOKENIZER_DIR."""
    given = os.environ.get("HF_HOME")
    if given and list(Path(given, "hub", CLIP_REPO, "snapshots").glob("*/vocab.json")):
        return Path(given)
    source = os.environ.get("CLIP_TOKENIZER_DIR") or str(REPO.parent / "shared" / "webui" / "clip-vit-large-patch14")
    if not Path(source, "vocab.json").exists():
        return None
    return lay_out_tokenizer_cache(Path(source), cache / "hf")


def lay_out_tokenizer_cache(source: Path, home: Path) -> Path:
    """``home`` as an offline Hugging Face cache holding the tokenizer files of ``source`` as
    openai/clip-vit-large-patch14 (also run by setup_host.sh: ``python webui_host.py SOURCE HOME``)."""
    snapshot = home / "hub" / CLIP_REPO / "snapshots" / "local"
    if not (snapshot / "vocab.json").exists():
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in Path(source).iterdir():
            shutil.copyfile(file, snapshot / file.name)
        (home / "hub" / CLIP_REPO / "refs").mkdir(parents=True, exist_ok=True)
        (home / "hub" / CLIP_REPO / "refs" / "main").write_text("local")
        (home / "hub" / "version.txt").write_text("1")
    return home


@dataclass
class HostSetup:
    webui: Path
    python: Path
    hf_home: Path
    checkpoint_dir: Path  # holds tiny.safetensors + tiny.yaml

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HF_HOME=str(self.hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        return env


def prepare_host() -> HostSetup:
    """Everything needed to start the host, or pytest.skip with the reason."""
    webui = os.environ.get("SD_WEBUI_DIR")
    if not webui:
        pytest.skip("SD_WEBUI_DIR is not set: the integration tier needs an AUTOMATIC1111 webui checkout")
    webui = Path(webui)
    if not (webui / "launch.py").exists() or not (webui / "repositories" / "stable-diffusion-stability-ai").is_dir():
        pytest.skip(f"SD_WEBUI_DIR={webui} is not a webui checkout with repositories/")
    python = _host_python(webui)
    if python is None:
        pytest.skip("no Python for the webui: set SD_WEBUI_PYTHON")
    cache = Path(os.environ.get("DREAMARTIST_TEST_CACHE", Path.home() / ".cache" / "dreamartist-tests"))
    hf_home = _hf_home(cache)
    if hf_home is None:
        pytest.skip("no offline CLIP tokenizer: set HF_HOME (with openai/clip-vit-large-patch14) or CLIP_TOKENIZER_DIR")
    builder = HERE / "build_tiny_checkpoint.py"
    yaml = HERE / "tiny-sd1.yaml"
    key = hashlib.sha256(builder.read_bytes() + yaml.read_bytes()).hexdigest()[:12]
    checkpoint_dir = cache / f"tiny-{key}" / "models" / "Stable-diffusion"
    setup = HostSetup(webui, python, hf_home, checkpoint_dir)
    if not (checkpoint_dir / "tiny.safetensors").exists():
        subprocess.run([str(python), str(builder), str(checkpoint_dir.parents[1]), "--webui", str(webui),
                        "--yaml", str(yaml)], check=True, env=setup.env(), cwd=str(webui), timeout=600)
    return setup


def prepare_families(setup: HostSetup) -> HostSetup:
    """The tiny SDXL and SD 2.x-v checkpoints (build_tiny_families.py, cached like the SD1 one) and an HF cache
    holding the local-tiny/* text-encoder repos they name (a copy of the given cache: it is not written to)."""
    builder = HERE / "build_tiny_families.py"
    spec = HERE / "tiny-families"
    key = hashlib.sha256(builder.read_bytes() + b"".join(f.read_bytes() for f in sorted(spec.iterdir()))
                         ).hexdigest()[:12]
    root = setup.checkpoint_dir.parents[2] / f"families-{key}"
    hf_home = root / "hf"
    checkpoint_dir = root / "models" / "Stable-diffusion"
    families = HostSetup(setup.webui, setup.python, hf_home, checkpoint_dir)
    if not (checkpoint_dir / "tiny-sd2v.safetensors").exists():
        source = next((setup.hf_home / "hub" / CLIP_REPO / "snapshots").glob("*/vocab.json")).parent
        lay_out_tokenizer_cache(source, hf_home)
        subprocess.run([str(setup.python), str(builder), str(root), "--webui", str(setup.webui),
                        "--hf-home", str(hf_home)], check=True, env=families.env(), cwd=str(setup.webui),
                       timeout=900)
    return families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebUI:
    """A running host. ``call`` speaks JSON; errors come back as (status, body) instead of raising."""

    url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen
    auth: tuple[str, str] | None = None
    _log_offset: int = field(default=0)

    def call(self, method: str, path: str, body=None, *, auth: tuple[str, str] | None | bool = True,
             timeout: float = 600) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        credentials = self.auth if auth is True else (auth or None)
        if credentials:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            raw, status = error.read(), error.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.call("POST", path, body if body is not None else {}, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while text not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"webui exited ({self.process.returncode}); log:\n{self.log()[-4000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"no {text!r} in the webui log after {timeout:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def link_extension(target: Path) -> None:
    """The repository as an extension folder: links to its top-level entries, without .git (the host would
    otherwise look up the checkout's git remote and log a traceback when there is none)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name in (".git", ".venv", "demo-out") or (target / entry.name).exists():
            continue
        (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


def mentions_us(text: str) -> bool:
    """Whether a log line or block names this extension: its name outside the host's own install paths (a host
    set up under e.g. ~/.cache/dreamartist-host has "dreamartist" in every path of its venv)."""
    webui, python, hf_home = (os.environ.get(key) for key in ("SD_WEBUI_DIR", "SD_WEBUI_PYTHON", "HF_HOME"))
    host_paths = [Path(webui).parent if webui else None, Path(python).parents[2] if python else None, hf_home]
    for prefix in sorted({str(p) for p in host_paths if p}, key=len, reverse=True):
        text = text.replace(prefix, "")
    return "dreamartist" in text.lower()


def tracebacks(log: str) -> list[str]:
    """Every traceback block in a host log."""
    blocks, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback") or line.lstrip().startswith("Traceback (most recent call last)"):
            current = [line]
            blocks.append(current)
        elif current is not None:
            current.append(line)
            if line and not line.startswith(" ") and not line.startswith("Traceback"):
                current = None
    return ["\n".join(b) for b in blocks]


def start_webui(setup: HostSetup, data_dir: Path, extra_args: list[str] = (), auth=None, checkpoint: str = "tiny",
                options: dict | None = None) -> WebUI:
    """Start the host on a free port with this repository as an extension; returns once the model is loaded.
    ``options`` go into the data dir's config.json before the start (e.g. ``live_previews_enable: False`` for
    SDXL: its live preview downloads vaeapprox-sdxl.pt, and offline the generation then fails)."""
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    if options:
        config = data_dir / "config.json"
        current = json.loads(config.read_text()) if config.exists() else {}
        config.write_text(json.dumps({**current, **options}))
    models = data_dir / "models" / "Stable-diffusion"
    if not models.exists():
        models.symlink_to(setup.checkpoint_dir, target_is_directory=True)
    link_extension(data_dir / "extensions" / "dreamartist")
    port = _free_port()
    log_path = data_dir / "webui.log"
    command = [
        str(setup.python), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
        "--skip-version-check", "--no-download-sd-model", "--use-cpu", "all", "--no-half", "--precision", "full",
        "--api", "--server-name", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
        "--ckpt", str(models / f"{checkpoint}.safetensors"), *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=str(setup.webui), env=setup.env(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    host = WebUI(f"http://127.0.0.1:{port}", data_dir, log_path, process, auth)
    try:
        host.wait_for_log("Startup time:")  # a request before this line kills the server
        host.wait_for_log("Model loaded in")
    except BaseException:
        host.stop()
        raise
    return host


def png_b64(size=(96, 96), seed=0) -> str:
    """A base64 PNG of a smooth random picture (for API requests)."""
    from support import make_image

    buffer = io.BytesIO()
    make_image(size, seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


if __name__ == "__main__":
    lay_out_tokenizer_cache(Path(sys.argv[1]), Path(sys.argv[2]))
