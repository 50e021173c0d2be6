"""The discrete-time VP noise schedule, its forward process, and the timestep spacings samplers walk over.

Why: a sampler is only as reproducible as the exact list of integer timesteps it visits and the
alpha it steps to after the last one. Every spacing is its own small function so that a pipeline,
a test or a notebook can say which one it uses, and each reproduces a reference to the integer:

- `leading_timesteps`   diffusers' "leading" (+ steps_offset): 50 of 1000 -> 981, 961, ..., 1, the
                        released ModelScope T2V / DDIM default.
- `linspace_timesteps`  diffusers' "linspace"; with `drop_final=True` the DPMSolverMultistep variant
                        (25 of 1000 -> 999, 959, ..., 40).
- `trailing_timesteps`  diffusers' "trailing" (Lin et al. 2023, Table 2): always starts at T - 1.
- `modelscope_timesteps` the original ModelScope `ddim_sample_loop` (same as leading + 1 when the
                        step count divides 1000; otherwise one extra step, see its docstring).

Notation (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar_t = prod_{s<=t}(1 - beta_s),
t = 0 .. T-1 (T = `num_train_timesteps`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing", "modelscope")


def _check_steps(steps: int, num_train_timesteps: int, name: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(steps).__name__}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)):
        raise TypeError(f"`num_train_timesteps` must be an int, got {type(num_train_timesteps).__name__}")
    if num_train_timesteps < 1:
        raise ValueError(f"`num_train_timesteps` must be >= 1, got {num_train_timesteps}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"`{name}` must be in [1, num_train_timesteps={num_train_timesteps}], got {steps}")


# ----------------------------------------------------------------------------------------------
# Betas and alphas_cumprod.


def make_betas(
    kind: str = "scaled_linear",
    start: float = 0.00085,
    end: float = 0.012,
    steps: int = 1000,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-step noise variances beta_t, t = 0 .. steps-1.

    kind:  "linear"            beta linear from `start` to `end` (Ho et al. 2020);
           "scaled_linear"     sqrt(beta) linear, the latent-diffusion / ModelScope schedule
                               (ModelScope calls it "linear_sd");
           "squaredcos_cap_v2" Nichol & Dhariwal 2021 eq. 17 cosine schedule, beta capped at 0.999
                               (`start` / `end` unused).
    dtype: float32 reproduces diffusers; float64 reproduces the original ModelScope code, which
           builds its schedule in double precision.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"`kind` must be one of {BETA_SCHEDULES}, got {kind!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}")
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=dtype)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=dtype) ** 2

    # Cosine: beta_t = 1 - abar(t+1)/abar(t) with abar(s) = cos^2((s/T + 0.008)/1.008 * pi/2).
    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)]
    return torch.tensor(betas, dtype=dtype)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), in the dtype of `betas`."""
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last step has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    The result has abar_{T-1} == 0 exactly: an epsilon-prediction model cannot be sampled from
    t = T-1 (x_0 = (x - eps) / 0); train/sample these with v-prediction.
    """
    sqrt_abar = alphas_cumprod(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def make_alphas_cumprod(
    kind: str = "scaled_linear",
    start: float = 0.00085,
    end: float = 0.012,
    steps: int = 1000,
    *,
    zero_terminal_snr: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`alphas_cumprod(make_betas(...))`, optionally rescaled to zero terminal SNR."""
    betas = make_betas(kind, start, end, steps, dtype=dtype)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod(betas)


# ----------------------------------------------------------------------------------------------
# The forward process and the v target, at integer timesteps.


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] in like's dtype/device, one entry per batch element, broadcastable against like."""
    v = values.to(device=like.device, dtype=like.dtype)[torch.as_tensor(t, device=like.device)].flatten()
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; `t` an int or one
    timestep per batch element. Computed in x0's dtype, as diffusers' `add_noise`."""
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t) -> torch.Tensor:
    """The v-prediction target (Salimans & Ho 2022, sec. 4): sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


# ----------------------------------------------------------------------------------------------
# Timestep spacings. Each returns a descending int64 tensor of the timesteps the model is called at.


def leading_timesteps(
    steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0, *, drop_final: bool = False
) -> torch.Tensor:
    """diffusers' "leading" spacing: multiples of a fixed integer stride, plus `steps_offset`.

    drop_final=False (DDIMScheduler): stride = T // steps, t_i = i * stride + offset, i < steps.
        50 steps, offset 1 -> 981, 961, ..., 21, 1.
    drop_final=True (DPMSolverMultistepScheduler): the grid has steps + 1 points whose last one
        (t = 0) is the clean sample the solver ends at: stride = T // (steps + 1), t_i = i * stride
        + offset for i = 1 .. steps.
    """
    _check_steps(steps, num_train_timesteps)
    n_points = steps + 1 if drop_final else steps
    stride = num_train_timesteps // n_points
    grid = np.arange(n_points) * stride
    grid = grid[::-1][:steps] if drop_final else grid[::-1]
    return torch.from_numpy(grid.astype(np.int64) + int(steps_offset))


def linspace_timesteps(steps: int, num_train_timesteps: int = 1000, *, drop_final: bool = False) -> torch.Tensor:
    """diffusers' "linspace" spacing: evenly spaced over [0, T-1], rounded half to even.

    drop_final=False (DDIMScheduler): `steps` points including 0 and T-1.
    drop_final=True (DPMSolverMultistepScheduler): steps + 1 points, the final 0 dropped
        (25 steps -> 999, 959, ..., 80, 40).
    """
    _check_steps(steps, num_train_timesteps)
    if drop_final:
        grid = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]
    else:
        grid = np.linspace(0, num_train_timesteps - 1, steps).round()[::-1]
    return torch.from_numpy(grid.astype(np.int64))


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers' "trailing" spacing (Lin et al. 2023, Table 2): T - 1 - round(i * T / steps),
    always starting at the last training timestep (needed with zero terminal SNR)."""
    _check_steps(steps, num_train_timesteps)
    grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return torch.from_numpy(grid)


def modelscope_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The original ModelScope `ddim_sample_loop` spacing: 1 + multiples of stride = T // steps,
    clamped to [0, T-1], descending. 50 steps -> 981, ..., 1 (as `leading` with offset 1).

    When `steps` does not divide T the original runs ceil(T / stride) steps (30 -> 31 steps:
    991, 958, ..., 1) and can repeat T-1; this is reproduced, not corrected. Its DDIM steps from t
    to abar[max(t - stride, 0)]: pass `prev_timesteps=t - stride` (and the default
    `final_alpha_cumprod`) to `samplers.ddim`; `modelscope_prev_timesteps` does that.
    """
    _check_steps(steps, num_train_timesteps)
    stride = num_train_timesteps // steps
    return (1 + torch.arange(0, num_train_timesteps, stride)).clamp(0, num_train_timesteps - 1).flip(0)


def stride_prev_timesteps(timesteps: torch.Tensor, stride: int) -> torch.Tensor:
    """`t - stride` for every t: the "previous" timesteps DDIM steps to in diffusers' DDIMScheduler
    (stride = T // num_inference_steps, whatever the spacing) and in the original ModelScope loop.
    A negative entry means "step to `final_alpha_cumprod`" (see `samplers.ddim`)."""
    return torch.as_tensor(timesteps, dtype=torch.int64) - int(stride)


def modelscope_prev_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The previous timesteps of `modelscope_timesteps(steps)` as the original loop uses them."""
    return stride_prev_timesteps(modelscope_timesteps(steps, num_train_timesteps), num_train_timesteps // steps)


def make_timesteps(
    spacing: str,
    steps: int,
    num_train_timesteps: int = 1000,
    *,
    steps_offset: int = 0,
    drop_final: bool = False,
) -> torch.Tensor:
    """Dispatch on the spacing's name ("leading", "linspace", "trailing", "modelscope")."""
    if spacing == "leading":
        return leading_timesteps(steps, num_train_timesteps, steps_offset, drop_final=drop_final)
    if spacing == "linspace":
        return linspace_timesteps(steps, num_train_timesteps, drop_final=drop_final)
    if spacing == "trailing":
        return trailing_timesteps(steps, num_train_timesteps)
    if spacing == "modelscope":
        return modelscope_timesteps(steps, num_train_timesteps)
    raise ValueError(f"`spacing` must be one of {SPACINGS}, got {spacing!r}")


# ----------------------------------------------------------------------------------------------
# Noise levels sigma = sqrt((1 - abar) / abar) (k-diffusion's parametrisation, x_sigma = x_0 + sigma eps, the VP
# sample times sqrt(1 + sigma^2)), for the samplers that take a schedule of sigmas (Euler, UniPC, Karras spacing).


def vp_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sqrt((1 - abar_t) / abar_t) for every training timestep, computed in alphas_cumprod's dtype (float32) and
    returned as numpy, as diffusers computes it (its interpolation and log then see exactly these values)."""
    abar = alphas_cumprod.detach().cpu()
    return (((1 - abar) / abar) ** 0.5).numpy()


def sigma_to_t(sigmas, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear in log sigma between the two neighbouring
    training timesteps, clipped to the schedule (diffusers' `_sigma_to_t`)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma.reshape(-1)[None, :] - log_sigmas[:, None]  # T n
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 ("Elucidating the Design Space...", eq. 5): `steps` sigmas from sigma_max down to
    sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)  # Python floats: float64 powers
    return (hi + ramp * (lo - hi)) ** rho


def fractional_timesteps(spacing: str, steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0) -> np.ndarray:
    """The float32 timesteps of diffusers' Euler schedulers: "linspace" is not rounded (50 steps: 999.0,
    978.6, ...), "leading" and "trailing" are the integer grids of the other schedulers."""
    _check_steps(steps, num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + steps_offset
    if spacing == "trailing":
        return np.arange(num_train_timesteps, 0, -num_train_timesteps / steps).round().astype(np.float32) - 1
    raise ValueError(f"`timestep_spacing` must be one of ('linspace', 'leading', 'trailing'), got {spacing!r}")
