"""Few-step sampling of consistency-distilled models (LCM-style; T2V-Turbo-MS), as pure functions.

    lcm(model_fn, x, alphas_cumprod, timesteps, *, generator=None, callback=None, ...) -> x_0

The conventions of `samplers.py`: `model_fn(x, t)` returns the model output at the 0-dim int64
timestep t (eps, v or x_0 by `prediction_type`), `alphas_cumprod` is abar_t for t = 0 .. T-1,
`timesteps` the descending integer timesteps the model is called at, `callback(i, t, x)` may replace x.

A consistency model f(x_t, t) maps every point of a probability-flow trajectory to its origin x_0
(Song et al. 2023, "Consistency Models", sec. 3). LCM (Luo et al. 2023, "Latent Consistency Models",
sec. 4.1) builds f from a diffusion model's output, turned into a data prediction x0_hat:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),    c_skip(0) = 1, c_out(0) = 0,

the boundary condition f(x_0, 0) = x_0 that makes f a consistency function. Multistep consistency
sampling (Song et al. 2023, Alg. 1) alternates: denoise with f, re-noise the result to the next
timestep with fresh Gaussian noise; the last denoised value is the sample.

Distilled models are trained on one timestep grid (`original_steps` = 50 of the 1000 for LCM and
T2V-Turbo) and sampled on a subset of it; the two rules in use are `lcm_timesteps` (diffusers'
LCMScheduler) and `t2v_turbo_timesteps` (T2V-Turbo's own scheduler). They agree when the step count
divides `original_steps` and may differ otherwise (4 steps: 999, 759, 499, 259 vs 999, 759, 519, 279).

Reproducibility with diffusers' LCMScheduler (same numbers for the same seed): coefficients are 0-dim
tensors of alphas_cumprod's dtype computed as diffusers computes them (float32 for the released
schedule), the step noise is drawn after the model call, in the latents' own layout (diffusers'
`randn_tensor` on what the scheduler is given: AnimateDiff's and T2V-Turbo's pipelines step whole
`b c f h w` latents), with the rules of `noise.randn` (a CPU generator draws on the CPU; a list of
generators draws one batch entry each), and none is drawn at the last step.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .noise import Generator, randn
from .samplers import (
    Callback,
    ModelFn,
    Timesteps,
    _as_timesteps,
    _check_prediction_type,
    _maybe_replace,
)

SIGMA_DATA = 0.5  # the data standard deviation the boundary scalings assume (LCM's and diffusers' value)


# ----------------------------------------------------------------------------------------------
# Argument checks.


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"`{name}` must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def _check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}")
    return float(value)


def _origin_grid(num_train_timesteps: int, original_steps: int, count: int) -> torch.Tensor:
    """The first `count` timesteps of the distillation grid k - 1, 2k - 1, ... (k = T // original_steps),
    ascending: the timesteps LCM-style distillation trains the consistency function at."""
    k = num_train_timesteps // original_steps
    return torch.arange(1, count + 1, dtype=torch.int64) * k - 1


# ----------------------------------------------------------------------------------------------
# Timestep rules. Each returns a descending int64 tensor on the CPU.


def lcm_timesteps(
    steps: int, num_train_timesteps: int = 1000, original_steps: int = 50, strength: float = 1.0
) -> torch.Tensor:
    """diffusers' LCMScheduler.set_timesteps rule: `steps` timesteps evenly spaced *in index* over the
    first int(original_steps * strength) points of the distillation grid, largest first.

    4 steps -> 999, 759, 499, 259; 1 -> 999; 2 -> 999, 499. strength < 1 (image/video-to-video)
    keeps only the grid's low-noise part: 4 steps at strength 0.5 -> 499, 379, 259, 139.
    """
    _check_int(num_train_timesteps, "num_train_timesteps", 1)
    _check_int(original_steps, "original_steps", 1, num_train_timesteps)
    _check_fraction(strength, "strength")
    count = int(original_steps * strength)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"`steps` must be an int, got {steps!r}")
    if not 1 <= steps <= count:
        raise ValueError(
            f"`steps` must be in [1, int(original_steps * strength) = {count}] (original_steps={original_steps}, "
            f"strength={strength}), got {steps}"
        )
    origin = _origin_grid(num_train_timesteps, original_steps, count).flip(0)  # descending
    # floor(linspace(0, count, steps, endpoint=False)), in float64 as numpy computes it: i * (count / steps)
    index = torch.floor(torch.arange(steps, dtype=torch.float64) * (count / steps)).to(torch.int64)
    return origin[index]


def t2v_turbo_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> torch.Tensor:
    """T2V-Turbo's scheduler rule: every (original_steps // steps)-th point of the distillation grid,
    from its top. 4 steps -> 999, 759, 519, 279; 2 -> 999, 499; 8 -> 999, 879, ..., 159.

    Its stride is an integer, so unlike `lcm_timesteps` the schedule can stop higher when `steps` does
    not divide `original_steps` (4 of 50: stride 12 -> ends at 279, not 259).
    """
    _check_int(num_train_timesteps, "num_train_timesteps", 1)
    _check_int(original_steps, "original_steps", 1, num_train_timesteps)
    _check_int(steps, "steps", 1, original_steps)
    origin = _origin_grid(num_train_timesteps, original_steps, original_steps).flip(0)  # descending
    return origin[:: original_steps // steps][:steps]


# ----------------------------------------------------------------------------------------------
# The consistency function's parameterisation and the guidance-scale condition.


def boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out) of f = c_skip x_t + c_out x0_hat at the discrete timestep t.

    With s = t * timestep_scaling (LCM, Luo et al. 2023, sec. 4.1, in the form of its code and diffusers):
        c_skip = sigma_data^2 / (s^2 + sigma_data^2),   c_out = s / sqrt(s^2 + sigma_data^2),
    so c_skip(0) = 1, c_out(0) = 0 (the boundary condition); at the usual scaling 10 (LCM's, T2V-Turbo's)
    c_skip and 1 - c_out are below 1e-5 on the whole grid (t >= 19). Song et al. 2023 (App. C) have
    c_out with an extra factor sigma_data and t measured from epsilon; distilled models need the form
    they were trained with.
    T2V-Turbo writes the same thing as t / 0.1.

    `t` a number gives floats; a tensor gives tensors in its (floating) dtype, as diffusers' pipelines
    compute them (a 0-dim int64 t: float32).
    """
    _check_positive(timestep_scaling, "timestep_scaling", allow_zero=True)
    _check_positive(sigma_data, "sigma_data")
    s = t * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_scale_embedding(w, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of a guidance scale, (b,) -> (b, dim): the `timestep_cond` of guidance-distilled
    models (LCM's w-conditioning; T2V-Turbo-MS: dim 256, added to the UNet's time embedding).

    w * 1000, frequencies exp(-log(10000) i / (dim//2 - 1)), [sin, cos] (sin first), one zero column when
    `dim` is odd; diffusers' `LatentConsistencyModelPipeline.get_guidance_scale_embedding` to the bit.

    Which w to pass is the caller's: it must be what the model was distilled with. diffusers' LCM pipelines
    pass w = guidance_scale - 1 (the "w" of the LCM paper's CFG form eps_u + (w + 1)(eps_c - eps_u)), while
    T2V-Turbo's pipeline passes w = guidance_scale itself (`torch.tensor(guidance_scale).repeat(bs)`,
    default 7.5).
    """
    w = torch.as_tensor(w)
    if w.ndim != 1:
        raise ValueError(f"`w` must be 1-D (one guidance scale per batch item), got shape {tuple(w.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:
        raise ValueError(f"`dim` must be an int >= 4 (dim // 2 - 1 frequencies divide log 10000), got {dim!r}")
    half = dim // 2
    # The constant in float32 on the CPU, then everything in `dtype`: the rounding diffusers' code has.
    scale = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -scale)  # (half,)
    angles = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]  # (b, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (b, 2 half)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))  # (b, dim)
    return emb


# ----------------------------------------------------------------------------------------------
# The consistency step and the multistep sampler.


def _scalar(value, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0-dim CPU tensor; a tensor keeps its dtype (alphas_cumprod[t]), a number becomes `dtype`. CPU
    0-dim coefficients multiply latents on any device without promoting their dtype, as in diffusers."""
    if torch.is_tensor(value):
        return value.detach().cpu().reshape(())
    return torch.tensor(float(value), dtype=dtype)


def _data_prediction(model_output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction_type: str):
    """x0_hat from the model output at abar, with float32 (or abar's dtype) sqrt(abar), sqrt(1 - abar)."""
    if prediction_type == "epsilon":
        return (x - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * x - (1 - abar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    _check_prediction_type(prediction_type)
    raise AssertionError  # unreachable


def lcm_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t,
    abar_t,
    abar_next=None,
    *,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One consistency step at timestep t; returns (x_next, denoised).

    denoised = c_out(t) x0_hat + c_skip(t) x                       (`boundary_scalings`)
    x_next   = sqrt(abar_next) denoised + sqrt(1 - abar_next) z   (z: `noise`, else drawn from `generator`)
    abar_next=None is the last step: x_next is `denoised` and no noise is drawn. `abar_t` / `abar_next`
    are numbers or 0-dim tensors (alphas_cumprod[t]: its dtype sets the coefficients'); the
    coefficients are computed in that dtype as diffusers' LCMScheduler.step does. `clip_sample` clamps
    x0_hat to [-clip_sample, clip_sample] before the boundary scalings (diffusers' `clip_sample_range`).
    """
    if noise is not None and generator is not None:
        raise ValueError("pass either `noise` or `generator`, not both")
    abar = _scalar(abar_t)
    x0 = _data_prediction(model_output, x, abar, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    c_skip, c_out = boundary_scalings(_scalar(t).to(abar.dtype), timestep_scaling)
    denoised = c_out * x0 + c_skip * x
    if abar_next is None:
        return denoised, denoised
    if noise is None:
        noise = randn(model_output.shape, generator, model_output.device, denoised.dtype)
    a_next = _scalar(abar_next, abar.dtype)
    return a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise, denoised


@torch.no_grad()
def lcm(
    model_fn: ModelFn,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: Timesteps,
    *,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    final_alpha_cumprod: float = 1.0,
    clip_sample: float | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM's sampler) over `timesteps`.

    Step i calls the model at t_i, denoises with `lcm_step` and, except at the last step, re-noises the
    denoised value to abar[t_{i+1}] with fresh noise from `generator` (see the module doc). Returns the
    last step's denoised value: what diffusers' LCM pipelines and T2V-Turbo decode.

    timesteps: strictly descending (`lcm_timesteps` or `t2v_turbo_timesteps`; a tail of one for
        video-to-video).
    final_alpha_cumprod: the level the last step hands over at. 1.0 (default): the clean sample, no
        noise drawn (diffusers' LCMScheduler whatever its `set_alpha_to_one`); a value in (0, 1)
        re-noises the last denoised value to that abar instead (to hand the latents to another sampler).
    callback(i, t, x): x is what step i hands on, diffusers' `prev_sample`: the re-noised latents at
        abar[t_{i+1}], and at the last step the denoised sample; a returned tensor replaces it. (The
        intermediate `denoised` values are not passed; diffusers' LCM pipeline offers them to its
        step-end callback, which cannot change what it decodes.)
    clip_sample: clamp x0_hat to [-clip_sample, clip_sample] (None: no clipping).
    """
    _check_prediction_type(prediction_type)
    _check_positive(timestep_scaling, "timestep_scaling", allow_zero=True)
    _check_fraction(final_alpha_cumprod, "final_alpha_cumprod")
    if clip_sample is not None:
        _check_positive(clip_sample, "clip_sample")
    ts = _as_timesteps(timesteps, alphas_cumprod.shape[0])
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"`timesteps` must be strictly descending, got {ts.tolist()}")
    abar = alphas_cumprod.detach().cpu()
    final = None if final_alpha_cumprod == 1 else _scalar(final_alpha_cumprod, abar.dtype)
    n = ts.numel()
    for i, t in enumerate(ts.tolist()):
        t_model = torch.tensor(t, dtype=torch.int64, device=x.device)
        out = model_fn(x, t_model)
        abar_next = abar[ts[i + 1]] if i + 1 < n else final
        x, _ = lcm_step(out, x, t, abar[t], abar_next, generator=generator, prediction_type=prediction_type,
                        timestep_scaling=timestep_scaling, clip_sample=clip_sample)
        x = _maybe_replace(callback, i, t_model, x)
    return x

