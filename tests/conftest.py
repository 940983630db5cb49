"""Shared fixtures: a tiny random Stable-Diffusion-architecture model (written once per session, tokenizer
included) and a fresh binding on it for every test that needs one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamartist_ext.diffusers_binding import DiffusersBinding
from dreamartist_ext.tiny import save_tiny_model
from support import write_image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture()
def binding(tiny_model_dir) -> DiffusersBinding:
    return DiffusersBinding.load(tiny_model_dir)


@pytest.fixture()
def reference_image(tmp_path) -> Path:
    return write_image(tmp_path / "images" / "ref.png")
