"""The command line as a newcomer uses it: real processes, real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dreamartist_ext import files
from support import tree_snapshot, write_image

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dreamartist_ext", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_demo_trains_and_generates(tmp_path):
    out = tmp_path / "demo"
    run = cli("train", "--demo", "--out", str(out), "--steps", "4", "--save-every", "2", "--preview-every", "2",
              cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "TINY RANDOM model" in run.stdout and "meaningless" in run.stdout
    assert "finished: trained dreamdemo for 4 steps" in run.stdout
    for path in ("embeddings/dreamdemo.safetensors", "embeddings/dreamdemo-neg.safetensors",
                 "lora/dreamdemo.safetensors", "lora/dreamdemo-neg.safetensors", "log/loss.png", "log/loss.csv"):
        assert (out / path).is_file(), path
    _, meta = files.load_embedding(out / "embeddings/dreamdemo.safetensors")
    assert meta["step"] == 4
    assert len(list((out / "log" / "previews").glob("*.png"))) == 4  # 2 images at step 2 and at step 4

    gen = cli("generate", "--demo", "--concepts", str(out), "--out", str(tmp_path / "gen"), "--steps", "3",
              "--count", "2", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert "negative: dreamdemo-neg" in gen.stdout
    assert len(list((tmp_path / "gen").glob("*.png"))) == 2


def test_train_on_a_diffusers_folder_with_options(tiny_model_dir, tmp_path):
    image = write_image(tmp_path / "ref.png", size=(80, 64))
    (tmp_path / "ref.txt").write_text("red, smooth, gradient")
    options = tmp_path / "options.json"
    options.write_text('{"template": "subject_filewords", "unet_rank": 0, "text_rank": 0, "reconstruction_weight": 0}')
    run = cli("train", "--model", str(tiny_model_dir), "--image", str(image), "--name", "smooth", "--out",
              str(tmp_path / "out"), "--options", str(options), "--width", "32", "--height", "32", "--steps", "2",
              "--save-every", "0", "--preview-every", "0", "--guidance", "1-5:cos", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    _, meta = files.load_embedding(tmp_path / "out/embeddings/smooth.safetensors")
    assert meta["hyperparameters"]["guidance"] == "1-5:cos"
    assert meta["hyperparameters"]["template"] == "subject_filewords"
    assert not (tmp_path / "out/lora").exists() or not any((tmp_path / "out/lora").iterdir())


def test_bad_input_gives_a_message_and_writes_nothing(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    run = cli("train", "--model", str(tiny_model_dir), "--image", str(broken), "--name", "x", "--out",
              str(tmp_path / "out"), "--width", "32", "--height", "32", cwd=tmp_path)
    assert run.returncode == 2
    assert "broken.png" in run.stderr and "Traceback" not in run.stderr
    assert tree_snapshot(tmp_path / "out") == {}

    run = cli("train", "--model", str(tiny_model_dir), "--image", str(broken), "--name", "a/b", "--out",
              str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "'/'" in run.stderr

    run = cli("train", "--image", str(broken), cwd=tmp_path)
    assert run.returncode == 2 and "--model" in run.stderr
