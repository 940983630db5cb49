"""The DreamArtist objective (paper eq. 3, 5, 6), in the model's own parameterization.

    out_hat = out_neg + g * (out_pos - out_neg)                  CFG-combined prediction
    L_da    = || target - out_hat ||^2                            mean squared error, per-pixel weighted
    z0_hat  = (z_t - sqrt(1 - abar_t) * out_hat) / sqrt(abar_t)   predicted clean latent (epsilon models)
    L_rec   = | D(z0_hat) - x |_1                                 pixel reconstruction, weighted
    L       = L_da + w_rec * L_rec (+ w_lpips * LPIPS(D(z0_hat), x))

For epsilon models (SD 1.x, SD 2.x base, SDXL) the output and the target are the noise eps; for v-prediction
models (SD 2.x 768-v, v-pred SDXL finetunes) they are v = sqrt(abar_t) eps - sqrt(1 - abar_t) z, and
z0_hat = sqrt(abar_t) z_t - sqrt(1 - abar_t) v_hat. Guidance is linear and both branches share z_t, so the
combination means the same in either space.

Every per-sample term is a (weighted) mean over that sample's pixels; the batch value is the mean over samples,
so k micro-batches of b samples add up to exactly one batch of k*b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import PREDICTION_TYPES


def guided_noise(eps_neg: torch.Tensor, eps_pos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """eps_neg + g * (eps_pos - eps_neg) with one g per sample."""
    g = scale.to(eps_pos.dtype).view(-1, *([1] * (eps_pos.dim() - 1)))
    return eps_neg + g * (eps_pos - eps_neg)


def _per_sample_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over everything but the batch dimension, weighted by ``weight`` [B, 1, H, W] when given."""
    dims = tuple(range(1, values.dim()))
    if weight is None:
        return values.mean(dim=dims)
    weight = weight.to(values.dtype).expand_as(values)
    return (values * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample (weighted) mean squared error [B], computed in float32."""
    return _per_sample_mean((pred.float() - target.float()) ** 2, weight)


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample (weighted) mean absolute error [B], computed in float32."""
    return _per_sample_mean((pred.float() - target.float()).abs(), weight)


def _per_sample(alpha_bar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alpha_bar.to(torch.float32).view(-1, *([1] * (like.dim() - 1)))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def prediction_target(
    latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """What the U-Net should output: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    a = _per_sample(alpha_bar, latents)
    return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()


def predicted_clean_latents(
    noisy: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """z0_hat from the (guided) output, with one abar_t per sample: (z_t - sqrt(1 - abar_t) eps_hat) /
    sqrt(abar_t), or sqrt(abar_t) z_t - sqrt(1 - abar_t) v_hat."""
    _check_prediction_type(prediction_type)
    a = _per_sample(alpha_bar, noisy)
    if prediction_type == "epsilon":
        return (noisy.float() - (1 - a).sqrt() * output.float()) / a.sqrt()
    return a.sqrt() * noisy.float() - (1 - a).sqrt() * output.float()


def predicted_noise(
    noisy: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """eps_hat from the output: itself, or sqrt(1 - abar_t) z_t + sqrt(abar_t) v_hat."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return output
    a = _per_sample(alpha_bar, noisy)
    return (1 - a).sqrt() * noisy.float() + a.sqrt() * output.float()


def noised_latents(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps."""
    a = alpha_bar.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return a.sqrt() * latents + (1 - a).sqrt() * noise


@dataclass
class LossTerms:
    """Batch-mean loss terms of one micro-batch; ``total`` is what gets back-propagated."""

    total: torch.Tensor
    denoise: torch.Tensor
    reconstruction: torch.Tensor | None = None
    perceptual: torch.Tensor | None = None

    @staticmethod
    def weighted_sum(parts: "list[tuple[LossTerms, float]]") -> "LossTerms":
        """sum_i w_i * terms_i, term by term (a term missing from any part is left out)."""

        def combine(name: str) -> torch.Tensor | None:
            values = [getattr(terms, name) for terms, _ in parts]
            if any(v is None for v in values):
                return None
            return sum(w * v for v, (_, w) in zip(values, parts))

        return LossTerms(total=combine("total"), denoise=combine("denoise"),
                         reconstruction=combine("reconstruction"), perceptual=combine("perceptual"))

    def as_floats(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach()), "loss_denoise": float(self.denoise.detach())}
        if self.reconstruction is not None:
            out["loss_rec"] = float(self.reconstruction.detach())
        if self.perceptual is not None:
            out["loss_lpips"] = float(self.perceptual.detach())
        return out


class PerceptualLossUnavailable(RuntimeError):
    pass


class PerceptualLoss:
    """LPIPS (AlexNet) between the reconstruction and the reference, frozen.

    The real metric needs AlexNet weights from download.pytorch.org (cached under TORCH_HOME); ``random_trunk``
    keeps LPIPS's shipped linear heads on an untrained trunk — only for tests, it measures nothing meaningful.
    """

    def __init__(self, device: torch.device, *, random_trunk: bool = False) -> None:
        try:
            import lpips  # noqa: PLC0415 - optional dependency, loaded only when the term is asked for
        except Exception as error:  # ImportError, or torchvision failing to import
            raise PerceptualLossUnavailable(
                f"the LPIPS term needs the 'lpips' package (pip install lpips): {error}"
            ) from error
        try:
            self.net = lpips.LPIPS(net="alex", pnet_rand=random_trunk, verbose=False)
        except Exception as error:
            raise PerceptualLossUnavailable(
                "the LPIPS term could not load its AlexNet weights (downloaded once from download.pytorch.org into "
                f"TORCH_HOME): {type(error).__name__}: {error}. Connect once or set the LPIPS weight to 0."
            ) from error
        self.net.eval().requires_grad_(False).to(device)

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS [B]; inputs in [-1, 1]."""
        return self.net(images.float(), reference.float()).flatten()
