"""The training objectives as pure functions of tensors (the trainer's objectives call these).

- diffusion: x_t from the forward process at drawn timesteps, the target eps / v / x_0 the model is
  trained to predict, and the MSE between them (Ho et al. 2020 eq. 14; v: Salimans & Ho 2022);
- autoencoder: reconstruction + kl_weight * KL, both per pixel (the LDM autoencoder loss without its
  perceptual and adversarial terms);
- latent consistency distillation (LCM, Luo et al. 2023, Alg. 1; T2V-Turbo's recipe): points of the
  distillation grid, a guided DDIM step of the teacher, the consistency function's output, the
  pseudo-Huber loss (Song & Dhariwal 2023, sec. 3.3).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .consistency import boundary_scalings
from .schedule import _per_sample, velocity

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


# ----------------------------------------------------------------------------------------------
# Latent consistency distillation. The student f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t) is trained so
# that f at a grid point t_n equals f at the point one teacher step earlier, t_n - k (LCM eq. 9-10).


def distillation_timesteps(n: int, num_train_timesteps: int, num_ddim_timesteps: int,
                           generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(t, t_prev), int64 on the CPU, n each: t drawn uniformly from the grid k - 1, 2k - 1, ..., T - 1
    (k = T // num_ddim_timesteps: the grid `consistency.lcm_timesteps` samples on), t_prev = t - k, which is
    -1 for the grid's first point (there the target is the teacher's x_0 itself: see `consistency_output`)."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    index = torch.randint(0, num_ddim_timesteps, (n,), generator=generator)
    t = (index + 1) * k - 1
    return t, t - k


def abar_at(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """abar_t per sample, broadcastable against `like`; t = -1 (before the first timestep) gives abar_0,
    as diffusers' LCD scripts take it (`alpha_cumprods_prev`)."""
    return _per_sample(alphas_cumprod, t.clamp(min=0), like)


def split_prediction(output: Tensor, x: Tensor, abar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (abar per sample)."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, s * x + a * output
    if prediction_type == "sample":
        return output, (x - a * output) / s
    raise ValueError(f"prediction_type must be one of {TRAIN_PREDICTION_TYPES}, got {prediction_type!r}")


def guided_ddim_step(cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor], guidance_scale: Tensor,
                     abar_prev: Tensor) -> Tensor:
    """The teacher's step from t to t_prev: DDIM (eta 0) on the guided (x0, eps) = u + g (c - u), with the
    conditional and unconditional (x0, eps) and g per sample, broadcastable (diffusers' form: g = 1 is the
    conditional model alone; LCM and T2V-Turbo write it c + w (c - u), w = g - 1)."""
    g = guidance_scale
    x0 = uncond[0] + g * (cond[0] - uncond[0])
    eps = uncond[1] + g * (cond[1] - uncond[1])
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def consistency_output(x: Tensor, x0: Tensor, t: Tensor, timestep_scaling: float = 10.0) -> Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat (`consistency.boundary_scalings` at max(t, 0): at t = 0
    and at the grid's t_prev = -1, f is x_t itself, the boundary condition)."""
    c_skip, c_out = boundary_scalings(t.clamp(min=0).to(torch.float32), timestep_scaling)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return c_skip.to(x).reshape(shape) * x + c_out.to(x).reshape(shape) * x0


def pseudo_huber_loss(prediction: Tensor, target: Tensor, c: float) -> Tensor:
    """mean(sqrt((p - y)^2 + c^2) - c) in float32 (Song & Dhariwal 2023, eq. 8, per element as LCM's and
    T2V-Turbo's scripts compute it); c = 0 is the mean absolute error."""
    if not c >= 0:
        raise ValueError(f"the pseudo-Huber c must be >= 0, got {c}")
    diff = prediction.float() - target.float()
    return (torch.sqrt(diff.pow(2) + c * c) - c).mean()
