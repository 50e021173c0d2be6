"""The training objectives as pure functions of tensors (the trainer's objectives call these).

- diffusion: x_t from the forward process at drawn timesteps, the target eps / v / x_0 the model is
  trained to predict, and the MSE between them (Ho et al. 2020 eq. 14; v: Salimans & Ho 2022);
- autoencoder: reconstruction + kl_weight * KL, both per pixel (the LDM autoencoder loss without its
  perceptual and adversarial terms).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import velocity

TIMESTEP_BIAS_STRATEGIES = ("none", "later", "earlier", "range")
TRAIN_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
RECON_LOSSES = ("l1", "mse")


def timestep_weights(num_train_timesteps: int, strategy: str, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> Tensor:
    """Unnormalised probability of training at each timestep (diffusers' SDXL timestep_bias_* names):
    ones, and `multiplier` on the biased ones ("later" / "earlier": the last / first `portion` of the
    timesteps; "range": [begin, end))."""
    n = num_train_timesteps
    w = torch.ones(n, dtype=torch.float64)
    if strategy == "none":
        return w
    if not multiplier >= 0:
        raise ValueError(f"timestep_bias_multiplier must be >= 0, got {multiplier}")
    if strategy in ("later", "earlier"):
        if not 0.0 < portion < 1.0:
            raise ValueError(f"timestep_bias_portion must be in (0, 1), got {portion}")
        k = max(1, int(round(portion * n)))
        biased = slice(n - k, n) if strategy == "later" else slice(0, k)
    elif strategy == "range":
        if not 0 <= begin < end <= n:
            raise ValueError(f"timestep_bias_begin / _end must satisfy 0 <= begin < end <= {n}, got {begin}, {end}")
        biased = slice(begin, end)
    else:
        raise ValueError(f"timestep_bias_strategy must be one of {TIMESTEP_BIAS_STRATEGIES}, got {strategy!r}")
    w[biased] *= multiplier
    if not w.sum() > 0:
        raise ValueError("timestep_bias_multiplier=0 over every timestep leaves none to train on")
    return w


def draw_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator,
                   weights: Optional[Tensor] = None) -> Tensor:
    """n training timesteps (int64, CPU): uniform, or drawn in proportion to `weights`."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def diffusion_target(x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, t: Tensor, prediction_type: str) -> Tensor:
    """What the model is trained to predict at x_t = add_noise(x0, noise, t): eps, v or x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, alphas_cumprod, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {TRAIN_PREDICTION_TYPES}, got {prediction_type!r}")


def diffusion_loss(prediction: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error over every element, in float32; with `weights` (b), each sample's mean squared
    error times its weight, averaged over the batch (all weights 1: the plain mean)."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)  # b
    return (weights.float() * per_sample).mean()


def autoencoder_loss(recon: Tensor, x: Tensor, kl: Tensor, kl_weight: float, recon_loss: str = "l1") -> Tensor:
    """Mean |x - x'| (or squared) + kl_weight * KL per image and pixel, for videos or images `b c f h w`;
    `kl` is the posterior's KL per sample (summed over frames, channels and pixels)."""
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
    diff = recon.float() - x
    rec = diff.abs().mean() if recon_loss == "l1" else diff.pow(2).mean()
    frames, pixels = x.shape[2], x.shape[1] * x.shape[3] * x.shape[4]
    return rec + kl_weight * ((kl.float() / frames).mean() / pixels)
