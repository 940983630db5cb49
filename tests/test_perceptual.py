"""The optional LPIPS term: it trains when it can load, and says clearly why when it cannot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from dreamartist_ext.embeddings import EmbeddingPair
from dreamartist_ext.guidance import GuidanceSchedule
from dreamartist_ext.losses import PerceptualLoss
from dreamartist_ext.model import frozen
from dreamartist_ext.objective import LossInputs, dreamartist_loss

REPO = Path(__file__).resolve().parents[1]


def test_lpips_term_enters_the_loss_and_trains_the_embeddings(binding):
    # The shipped linear heads on an untrained AlexNet trunk: no download, real LPIPS code path.
    perceptual = PerceptualLoss(binding.device, random_trunk=True)
    pair = EmbeddingPair("cube", torch.randn(3, binding.token_dim), torch.randn(3, binding.token_dim)).trainable(
        binding.device)
    g = torch.Generator().manual_seed(0)
    inputs = LossInputs(
        latents=torch.randn(1, 4, 8, 8, generator=g), noise=torch.randn(1, 4, 8, 8, generator=g),
        timesteps=torch.tensor([150]), positive_prompts=["cube"], negative_prompts=["cube-neg"],
        pixels=torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
    )
    with frozen(binding.trainable_roots()), binding.learned_words(pair.words()):
        terms = dreamartist_loss(binding, inputs, guidance=GuidanceSchedule.parse("3"), reconstruction_weight=0.0,
                                 perceptual=perceptual, perceptual_weight=2.0)
        terms.perceptual.backward()
    assert terms.reconstruction is not None and terms.perceptual is not None
    torch.testing.assert_close(terms.total, terms.denoise + 2.0 * terms.perceptual)
    assert pair.positive.grad is not None and pair.positive.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in perceptual.net.parameters())


def test_lpips_without_its_weights_gives_a_clear_error(tmp_path):
    """Real failure: an empty TORCH_HOME and no way to download (every proxy points at a closed local port)."""
    code = (
        "from dreamartist_ext.losses import PerceptualLoss, PerceptualLossUnavailable\n"
        "import torch\n"
        "try:\n"
        "    PerceptualLoss(torch.device('cpu'))\n"
        "except PerceptualLossUnavailable as error:\n"
        "    print('UNAVAILABLE', error)\n"
    )
    closed = "http://127.0.0.1:9"
    env = {"PYTHONPATH": str(REPO), "TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin",
           "http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "UNAVAILABLE" in run.stdout
    assert "AlexNet weights" in run.stdout and "LPIPS weight to 0" in run.stdout
