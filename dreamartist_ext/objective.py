"""One DreamArtist loss evaluation on a model: the method in one function.

The trainer draws the randomness (images, prompts, timesteps, noise) and calls :func:`dreamartist_loss`; tests
call it with fixed tensors and compare against the formula computed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .guidance import GuidanceSchedule
from .losses import (
    LossTerms,
    PerceptualLoss,
    guided_noise,
    noised_latents,
    predicted_clean_latents,
    prediction_target,
    weighted_l1,
    weighted_mse,
)
from .model import NEG, POS, DiffusionBinding


@dataclass
class LossInputs:
    latents: torch.Tensor  # clean scaled latents [B, 4, h, w]
    noise: torch.Tensor  # eps, same shape (the target is eps or v, as the model predicts)
    timesteps: torch.Tensor  # [B] long
    positive_prompts: list[str]  # prompts with the positive word
    negative_prompts: list[str] | None  # same prompts with the negative word; None = plain textual inversion
    latent_weight: torch.Tensor | None = None  # [B, 1, h, w]
    pixels: torch.Tensor | None = None  # reference images [B, 3, H, W] in [-1, 1] (reconstruction only)
    pixel_weight: torch.Tensor | None = None  # [B, 1, H, W]
    crop: tuple[int, int, int, int] | None = None  # (top, left, height, width) latent window to reconstruct


def dreamartist_loss(
    binding: DiffusionBinding,
    inputs: LossInputs,
    *,
    guidance: GuidanceSchedule,
    reconstruction_weight: float = 0.0,
    perceptual: PerceptualLoss | None = None,
    perceptual_weight: float = 0.0,
) -> LossTerms:
    batch = inputs.latents.shape[0]
    alpha_bar = binding.alphas_cumprod[inputs.timesteps]
    noisy = noised_latents(inputs.latents, inputs.noise, alpha_bar)
    image_size = tuple(side * binding.vae_downscale for side in inputs.latents.shape[-2:])
    if inputs.negative_prompts is not None:
        # One text-encoder call and one U-Net call for both branches: rows [negative; positive].
        branches = [NEG] * batch + [POS] * batch
        cond = binding.encode_prompts(
            list(inputs.negative_prompts) + list(inputs.positive_prompts), branches, image_size)
        output = binding.predict(
            torch.cat([noisy, noisy]), torch.cat([inputs.timesteps, inputs.timesteps]), cond, branches
        )
        out_neg, out_pos = output.chunk(2)
        out_hat = guided_noise(out_neg, out_pos, guidance(inputs.timesteps, binding.num_timesteps))
    else:
        cond = binding.encode_prompts(inputs.positive_prompts, [POS] * batch, image_size)
        out_hat = binding.predict(noisy, inputs.timesteps, cond, [POS] * batch)
    target = prediction_target(inputs.latents, inputs.noise, alpha_bar, binding.prediction_type)
    denoise = weighted_mse(out_hat, target, inputs.latent_weight).mean()
    terms = LossTerms(total=denoise, denoise=denoise)
    if reconstruction_weight > 0 or (perceptual is not None and perceptual_weight > 0):
        if inputs.pixels is None:
            raise ValueError("the reconstruction loss needs the reference pixels")
        clean = predicted_clean_latents(noisy, out_hat, alpha_bar, binding.prediction_type)
        pixels, pixel_weight = inputs.pixels, inputs.pixel_weight
        if inputs.crop is not None:
            top, left, height, width = inputs.crop
            scale = binding.vae_downscale
            clean = clean[..., top:top + height, left:left + width]
            rows, cols = slice(top * scale, (top + height) * scale), slice(left * scale, (left + width) * scale)
            pixels = pixels[..., rows, cols]
            pixel_weight = pixel_weight[..., rows, cols] if pixel_weight is not None else None
        decoded = binding.decode_latents(clean)  # with gradient: this is what the term trains
        terms.reconstruction = weighted_l1(decoded, pixels, pixel_weight).mean()
        terms.total = terms.total + reconstruction_weight * terms.reconstruction
        if perceptual is not None and perceptual_weight > 0:
            terms.perceptual = perceptual(decoded, pixels).mean()
            terms.total = terms.total + perceptual_weight * terms.perceptual
    return terms
