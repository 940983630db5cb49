"""Zero-terminal-SNR schedules (v-prediction finetunes such as NoobAI's, and the toy world's model): the last
timestep is pure noise, sampling starts there ("trailing" spacing), and an epsilon model on such a schedule is
refused, since nothing can be predicted from pure noise in epsilon space."""

from __future__ import annotations

import shutil

import pytest
import torch

from dreamartist_ext.diffusers_binding import DiffusersBinding
from dreamartist_ext.model import UnsupportedModelError
from dreamartist_ext.guidance import GuidanceSchedule
from dreamartist_ext.objective import LossInputs, dreamartist_loss
from dreamartist_ext.sampling import SampleRequest, ddim_timesteps, generate


def _zero_snr_copy(tiny_model_dir, tmp_path, prediction_type):
    from diffusers import DDPMScheduler

    folder = tmp_path / f"zero-snr-{prediction_type}"
    shutil.copytree(tiny_model_dir, folder)
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_timestep_spacings_are_diffusers_own(steps):
    from diffusers import DDIMScheduler

    for spacing, trailing in (("leading", False), ("trailing", True)):
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(1000, steps, trailing=trailing) == scheduler.timesteps.tolist(), spacing


def test_an_epsilon_model_on_a_zero_snr_schedule_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="zero terminal SNR.*v-prediction"):
        DiffusersBinding.load(_zero_snr_copy(tiny_model_dir, tmp_path, "epsilon"))


def test_a_zero_snr_v_model_trains_at_pure_noise_and_samples_from_it(tiny_model_dir, tmp_path):
    binding = DiffusersBinding.load(_zero_snr_copy(tiny_model_dir, tmp_path, "v_prediction"))
    assert binding.zero_terminal_snr and float(binding.alphas_cumprod[-1]) == 0.0
    assert not DiffusersBinding.load(tiny_model_dir).zero_terminal_snr
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    inputs = LossInputs(latents=latents, noise=torch.randn(2, 4, 8, 8, generator=generator),
                        timesteps=torch.tensor([999, 999]), positive_prompts=["a photo"] * 2,
                        negative_prompts=["a photo"] * 2, pixels=torch.zeros(2, 3, 64, 64))
    with torch.no_grad():
        terms = dreamartist_loss(binding, inputs, guidance=GuidanceSchedule.parse("3"), reconstruction_weight=1.0)
        # at pure noise the v target is -z and the U-Net's input is the noise alone
        cond = binding.encode_prompts(["a photo"] * 2, ["pos"] * 2, (64, 64))
        out = binding.predict(inputs.noise, inputs.timesteps, cond, ["pos"] * 2)
    torch.testing.assert_close(terms.denoise, ((out + latents) ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(terms.total)
    images = generate(binding, SampleRequest("a photo", steps=4, guidance=3.0, width=64, height=64, count=1))
    assert images[0].size == (64, 64)
