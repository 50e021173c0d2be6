"""Samplers for discrete-time VP diffusion models, as pure functions with one signature.

    sampler(model_fn, x, alphas_cumprod, timesteps, *, generator=None, callback=None, ...) -> x

- `model_fn(x, t)` returns the model output at integer timestep `t` (a 0-dim int64 tensor on
  x's device): eps (`prediction_type="epsilon"`), v = sqrt(abar) eps - sqrt(1 - abar) x_0
  (`"v_prediction"`, Salimans & Ho 2022) or x_0 (`"sample"`). Build the classifier-free-guidance
  model_fn once with `cfg_model_fn`.
- `alphas_cumprod` is abar_t for t = 0 .. T-1 (see `schedule.py`); `timesteps` the descending
  integer timesteps the model is called at (a spacing from `schedule.py`, possibly truncated for
  video-to-video).
- `callback(i, t, x)` runs after step i with the new x; if it returns a tensor, that tensor
  replaces x (diffusers' `callback_on_step_end` may edit latents).

Methods (notation x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1-abar_t),
lambda_t = log(alpha_t / sigma_t)):
- `ddim`: Song et al. 2021 ("Denoising Diffusion Implicit Models") eq. 12, with
  sigma_t(eta) from eq. 16; eta = 0 is the deterministic DDIM sampler, eta = 1 DDPM-like.
- `dpm_solver_multistep`: DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
  Sampling of Diffusion Probabilistic Models"): Alg. 1 (first order, = DDIM) and Alg. 2
  (multistep second order, "2M"), plus the multistep third-order update of the authors' code as
  diffusers ships it; data prediction. Its SDE variant "sde-dpmsolver++" integrates the reverse
  SDE with the same exponential integrator (weights in e^{-2h}) and fresh noise each step.
  All updates: x_t = sigma_t/sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda)
  d lambda with x0(lambda) replaced by its Taylor expansion / finite differences (eq. 8-9).

Reproducibility with diffusers (same numbers for the same seed):
- DDIM computes in x's dtype with 0-dim float32 coefficients, as diffusers' DDIMScheduler does;
  DPM-Solver++ converts the model output to x_0 in the model's dtype, does the update in float32
  and casts the result back to the model output's dtype, as DPMSolverMultistepScheduler does.
  So fp16 / bf16 latents work and round the way diffusers rounds.
- Stochastic steps draw `torch.randn` with the generator once per step, after the model call, in
  the dtype diffusers uses (DDIM: the model output's dtype; SDE-DPM-Solver++: float32). For a
  video x of shape (b, c, f, h, w) the noise is drawn as (b, f, c, h, w) and permuted, the order
  of diffusers' video pipelines, which fold frames into the batch before `scheduler.step`.
- DPM-Solver++ indexes its noise levels as diffusers does: sigma_vp = sqrt((1 - abar) / abar) in
  float32, then alpha = 1 / sqrt(1 + sigma_vp^2), sigma = sigma_vp * alpha.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .noise import Generator, randn_like

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]
Timesteps = Union[torch.Tensor, Sequence[int]]


# ----------------------------------------------------------------------------------------------
# Small helpers: argument checks, scalar coefficients.


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _as_timesteps(timesteps: Timesteps, num_train_timesteps: int, name: str = "timesteps") -> torch.Tensor:
    """A 1-D int64 CPU tensor; each entry in [0, T-1] (checked before any model call)."""
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of ints, got shape {tuple(ts.shape)}")
    if ts.is_floating_point() and not torch.equal(ts, ts.round()):
        raise ValueError(f"`{name}` must hold integer timesteps, got {ts.tolist()}")
    ts = ts.to(torch.int64)
    if int(ts.min()) < 0 or int(ts.max()) >= num_train_timesteps:
        raise ValueError(f"`{name}` must lie in [0, {num_train_timesteps - 1}], got {ts.tolist()}")
    return ts


def _coef(value: float) -> torch.Tensor:
    """A 0-dim float32 CPU tensor: the type diffusers' schedulers multiply latents by, so that
    both promote and round alike on every backend and dtype."""
    return torch.tensor(value, dtype=torch.float32)


def _maybe_replace(callback: Optional[Callback], i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if callback is None:
        return x
    out = callback(i, t, x)
    return x if out is None else out


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance.


def cfg_model_fn(model_fn: ModelFn, guidance_scale: float) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) around a model that takes the doubled batch.

    `model_fn(torch.cat([x, x]), t)` must return the unconditional outputs for the first half and
    the conditional ones for the second (the text embeddings are batched the same way), as
    diffusers' pipelines do; the guided output is uncond + scale * (cond - uncond).
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = model_fn(torch.cat([x, x]), t).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return guided


def check_guidance_scale(value, where: str) -> float:
    """A guidance scale: a finite number >= 0 (<= 1 switches guidance off), as a float; ValueError naming
    `where` otherwise (model_index.json, the converter, sample.py, the trainer's validation all use this)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: a guidance scale is a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, eq. 12).


def ddim_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    abar_t: float,
    abar_prev: float,
    *,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
    prediction_type: str = "epsilon",
    clip_sample: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from abar_t to abar_prev; returns (x_prev, predicted x_0).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,       (eq. 12)
    s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).  (eq. 16)
    `noise` (z) is needed only when eta > 0. `clip_sample` clamps x0 to [-c, c] (eps is not
    recomputed, as diffusers' default).
    """
    a_t, a_prev = float(abar_t), float(abar_prev)
    if prediction_type == "epsilon":
        x0 = (x - _coef((1 - a_t) ** 0.5) * model_output) / _coef(a_t**0.5)
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = _coef(a_t**0.5) * x - _coef((1 - a_t) ** 0.5) * model_output
        eps = _coef(a_t**0.5) * model_output + _coef((1 - a_t) ** 0.5) * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - _coef(a_t**0.5) * x0) / _coef((1 - a_t) ** 0.5)
    else:
        _check_prediction_type(prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    x_prev = _coef(a_prev**0.5) * x0 + _coef(max(1 - a_prev - std**2, 0.0) ** 0.5) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("`noise` is required when `eta` > 0")
        x_prev = x_prev + _coef(std) * noise
    return x_prev, x0


@torch.no_grad()
def ddim(
    model_fn: ModelFn,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: Timesteps,
    *,
    prev_timesteps: Optional[Timesteps] = None,
    eta: float = 0.0,
    generator: Generator = None,
    callback: Optional[Callback] = None,
    final_alpha_cumprod: Optional[float] = None,
    prediction_type: str = "epsilon",
    clip_sample: Optional[float] = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over `timesteps`.

    prev_timesteps: the timestep each step goes to; default the next entry of `timesteps`, the
        last step going to `final_alpha_cumprod`. A negative entry also means `final_alpha_cumprod`.
        diffusers' DDIMScheduler and the original ModelScope loop step to t - T // n
        (`schedule.stride_prev_timesteps`), which differs from "the next entry" for linspace /
        trailing spacings.
    final_alpha_cumprod: abar after the last step; default alphas_cumprod[0] (the released
        config's `set_alpha_to_one=False`, and the original ModelScope loop); 1.0 ends at x_0.
    eta: 0 deterministic; > 0 adds s * z each step (eq. 16), z from `generator` (see
        `noise.randn_like`); with `generator=None` the global RNG.
    clip_sample: clamp predicted x_0 to [-clip_sample, clip_sample] (None: no clipping).
    """
    _check_prediction_type(prediction_type)
    if eta < 0:
        raise ValueError(f"`eta` must be >= 0, got {eta}")
    n_train = alphas_cumprod.shape[0]
    ts = _as_timesteps(timesteps, n_train)
    if prev_timesteps is None:
        prev = torch.cat([ts[1:], torch.tensor([-1])])
    else:
        prev = torch.as_tensor(prev_timesteps, dtype=torch.int64).cpu()
        if prev.shape != ts.shape or int(prev.max()) >= n_train:
            raise ValueError(
                f"`prev_timesteps` must match `timesteps` in length and be < {n_train}, got {prev.tolist()}"
            )
    abar = alphas_cumprod.detach().double().cpu().tolist()
    final = abar[0] if final_alpha_cumprod is None else float(final_alpha_cumprod)
    for i, (t, t_prev) in enumerate(zip(ts.tolist(), prev.tolist())):
        t_model = torch.tensor(t, dtype=torch.int64, device=x.device)
        out = model_fn(x, t_model)
        noise = randn_like(out, generator) if eta > 0 else None
        x, _ = ddim_step(
            out,
            x,
            abar[t],
            abar[t_prev] if t_prev >= 0 else final,
            eta=eta,
            noise=noise,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
        )
        x = _maybe_replace(callback, i, t_model, x)
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022), multistep, orders 1-3, ODE and SDE.


def vp_alpha_sigma(abar: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of abar_t the way diffusers' DPM-Solver indexes them: through the
    float32 sigma_vp = sqrt((1 - abar) / abar). abar = 1 gives (1, 0)."""
    a = torch.tensor(abar, dtype=torch.float32)
    s_vp = ((1 - a) / a) ** 0.5
    alpha = 1 / (s_vp**2 + 1) ** 0.5
    return float(alpha), float(s_vp * alpha)


def to_x0(
    model_output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str
) -> torch.Tensor:
    """The data prediction x_0 from a model output at (alpha, sigma), in the model's dtype."""
    if prediction_type == "epsilon":
        return (x - _coef(sigma) * model_output) / _coef(alpha)
    if prediction_type == "v_prediction":
        return _coef(alpha) * x - _coef(sigma) * model_output
    if prediction_type == "sample":
        return model_output
    _check_prediction_type(prediction_type)
    raise AssertionError  # unreachable


def _lambda(alpha: float, sigma: float) -> float:
    """Half log-SNR log(alpha / sigma); +inf at sigma = 0."""
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def dpm_solver_update(
    x: torch.Tensor,
    x0s: Sequence[torch.Tensor],
    alphas: Sequence[float],
    sigmas: Sequence[float],
    *,
    algorithm: str = "dpmsolver++",
    solver_type: str = "midpoint",
    noise: Optional[torch.Tensor] = None,
    third_order: str = "diffusers",
) -> torch.Tensor:
    """One multistep DPM-Solver++ update of order k = len(x0s) (1, 2 or 3), in float32.

    x0s:    the last k data predictions, oldest first (x0s[-1] is at the current point s0).
    alphas, sigmas: k + 1 values: the points of x0s, oldest first, then the target t.
    With h = lambda_t - lambda_s0 and r_j = h_j / h the previous step ratios, the ODE update is
      x_t = sigma_t/sigma_s0 x + alpha_t (1 - e^-h) D0 + alpha_t ((e^-h - 1)/h + 1) D1
            - alpha_t ((e^-h - 1 + h)/h^2 - 1/2) D2                (Lu et al. 2022, Alg. 2, App. B)
    with D0 = x0_s0 and D1, D2 finite differences in lambda; order 2 "midpoint" uses
    alpha_t (1 - e^-h) D1 / 2 instead. The SDE variant (algorithm "sde-dpmsolver++") replaces h by
    2h in the exponentials, scales x by e^-h and adds sigma_t sqrt(1 - e^-2h) z.

    third_order: which order-3 update.
      "diffusers": the published multistep formula (DPM-Solver / diffusers / k-diffusion) with
          D2 = (D1_0 - D1_1) / (r0 + r1). That D2 estimates h^2 x0''/2 where the weight above
          expects h^2 x0'', so the update is exact only up to linear x0(lambda) and converges at
          order ~2 (measured in tests/test_samplers.py). For "sde-dpmsolver++" it also keeps
          diffusers 0.42's sign of the 1/2 in the D2 weight (+1/2 instead of -1/2). Default, for
          seed-for-seed parity with diffusers.
      "taylor": D2 = 2 (D1_0 - D1_1) / (r0 + r1) and the SDE weight derived the same way: exact
          for quadratic x0(lambda), third-order convergence.
    """
    k = len(x0s)
    if third_order not in ("diffusers", "taylor"):
        raise ValueError(f"`third_order` must be 'diffusers' or 'taylor', got {third_order!r}")
    if k not in (1, 2, 3) or len(alphas) != k + 1 or len(sigmas) != k + 1:
        raise ValueError(f"need 1-3 data predictions and one more alpha/sigma, got {k}, {len(alphas)}, {len(sigmas)}")
    if algorithm not in DPM_ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {DPM_ALGORITHMS}, got {algorithm!r}")
    if solver_type not in DPM_SOLVER_TYPES:
        raise ValueError(f"`solver_type` must be one of {DPM_SOLVER_TYPES}, got {solver_type!r}")
    sde = algorithm == "sde-dpmsolver++"
    if sde and noise is None:
        raise ValueError("`noise` is required for algorithm 'sde-dpmsolver++'")
    lams = [_lambda(a, s) for a, s in zip(alphas, sigmas)]
    alpha_t, sigma_t, sigma_s0 = alphas[-1], sigmas[-1], sigmas[-2]
    h = lams[-1] - lams[-2]
    if h == 0:  # a step to the same noise level (Karras sigmas ending at sigma_min twice): the identity
        return x.to(torch.float32)
    # With m = 2 for the SDE: the exponential integrator's weights phi_1 = 1 - e^{-mh} etc.
    m = 2.0 if sde else 1.0
    e = -math.expm1(-m * h) if math.isfinite(h) else 1.0  # 1 - e^{-mh}
    x32 = x.to(torch.float32)
    if sde:
        out = _coef(sigma_t / sigma_s0 * math.exp(-h)) * x32
    else:
        out = _coef(sigma_t / sigma_s0) * x32
    d0 = x0s[-1]
    out = out + _coef(alpha_t * e) * d0
    if k >= 2:
        r0 = (lams[-2] - lams[-3]) / h
        d1 = _coef(1.0 / r0) * (x0s[-1] - x0s[-2])
        phi2 = (1.0 - e / (m * h))  # = (e^{-mh} - 1)/(mh) + 1
        if k == 3:
            r1 = (lams[-3] - lams[-4]) / h
            d1_1 = _coef(1.0 / r1) * (x0s[-2] - x0s[-3])
            taylor = third_order == "taylor"
            d2 = _coef((2.0 if taylor else 1.0) / (r0 + r1)) * (d1 - d1_1)
            d1 = d1 + _coef(r0 / (r0 + r1)) * (d1 - d1_1)
            phi3 = (m * h - e) / (m * h) ** 2 - 0.5  # (e^{-mh} - 1 + mh)/(mh)^2 - 1/2
            if sde and not taylor:
                phi3 += 1.0  # diffusers 0.42's sign of the 1/2 for the SDE
            out = out + _coef(alpha_t * phi2) * d1 - _coef(alpha_t * phi3) * d2
        elif solver_type == "midpoint":
            out = out + _coef(0.5 * alpha_t * e) * d1
        else:
            out = out + _coef(alpha_t * phi2) * d1
    if sde:
        out = out + _coef(sigma_t * math.sqrt(e)) * noise.to(torch.float32)
    return out


def dpm_solver_step_order(i: int, n: int, history: int, *, lower_order_final: bool, first_order_final: bool) -> int:
    """The order of step i of n, given `history` data predictions at hand (at most the solver's order):
    the last step is first order with `lower_order_final` or `first_order_final` (a step to sigma = 0, or
    euler_at_final), the one before at most second order with `lower_order_final` (diffusers' rule)."""
    if i == n - 1 and (lower_order_final or first_order_final):
        return 1
    if i == n - 2 and lower_order_final:
        return min(history, 2)
    return history


@torch.no_grad()
def dpm_solver_multistep(
    model_fn: ModelFn,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: Timesteps,
    *,
    sigmas: Optional[Sequence[float]] = None,
    order: int = 2,
    algorithm: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: Optional[bool] = None,
    euler_at_final: bool = False,
    final_timestep: Optional[int] = None,
    generator: Generator = None,
    callback: Optional[Callback] = None,
    prediction_type: str = "epsilon",
    third_order: str = "diffusers",
) -> torch.Tensor:
    """Multistep DPM-Solver++ (Lu et al. 2022, Alg. 2) over `timesteps`, ending at x_0.

    order: 1 (= DDIM), 2 ("2M") or 3; the first steps use lower orders while the history fills.
    algorithm: "dpmsolver++" (ODE) or "sde-dpmsolver++" (fresh float32 noise from `generator`
        every step, including the last; see `noise.randn_like`).
    solver_type: second-order form, "midpoint" (Alg. 2) or "heun" (ignored by order 3).
    lower_order_final: drop to order 1 at the last step and to at most order 2 at the one before
        (stabilises few-step sampling). None = diffusers' rule: only when len(timesteps) < 15.
        A truncated schedule (video-to-video) should pass the rule's value for the full one.
    euler_at_final: order 1 at the last step whatever `lower_order_final` says.
    final_timestep: None steps to sigma = 0 (the clean sample; the last step is then always
        first order, diffusers' final_sigmas_type="zero"); an int t ends at alphas_cumprod[t]
        (0 = diffusers' final_sigmas_type="sigma_min").
    third_order: "diffusers" (default, parity) or "taylor" (truly third order); see
        `dpm_solver_update`.
    sigmas: the noise levels sigma_vp of the steps and of the end (len(timesteps) + 1, e.g. Karras
        sigmas), in place of the training ones at `timesteps` and at `final_timestep`.
    """
    _check_prediction_type(prediction_type)
    if order not in (1, 2, 3):
        raise ValueError(f"`order` must be 1, 2 or 3, got {order!r}")
    if algorithm not in DPM_ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {DPM_ALGORITHMS}, got {algorithm!r}")
    if solver_type not in DPM_SOLVER_TYPES:
        raise ValueError(f"`solver_type` must be one of {DPM_SOLVER_TYPES}, got {solver_type!r}")
    n_train = alphas_cumprod.shape[0]
    ts = _as_timesteps(timesteps, n_train)
    if final_timestep is not None and not 0 <= int(final_timestep) < n_train:
        raise ValueError(f"`final_timestep` must be None or in [0, {n_train - 1}], got {final_timestep}")
    n = ts.numel()
    if lower_order_final is None:
        lower_order_final = n < 15
    if sigmas is not None:
        levels = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
        if levels.numel() != n + 1:
            raise ValueError(f"`sigmas` must hold len(timesteps) + 1 = {n + 1} entries, got {levels.numel()}")
        alphas = 1 / (levels**2 + 1) ** 0.5  # as diffusers from its float32 sigmas
        points = [(float(a), float(s * a)) for a, s in zip(alphas, levels)]
    else:
        abar = alphas_cumprod.detach().double().cpu().tolist()
        points = [vp_alpha_sigma(abar[t]) for t in ts.tolist()]
        points.append((1.0, 0.0) if final_timestep is None else vp_alpha_sigma(abar[int(final_timestep)]))

    x0s: list[torch.Tensor] = []
    for i, t in enumerate(ts.tolist()):
        t_model = torch.tensor(t, dtype=torch.int64, device=x.device)
        out = model_fn(x, t_model)
        alpha_s, sigma_s = points[i]
        x0s = (x0s + [to_x0(out, x, alpha_s, sigma_s, prediction_type)])[-order:]
        k = dpm_solver_step_order(i, n, len(x0s), lower_order_final=lower_order_final,
                                  first_order_final=final_timestep is None or euler_at_final)
        noise = randn_like(out, generator, torch.float32) if algorithm == "sde-dpmsolver++" else None
        alphas = [p[0] for p in points[i + 1 - k : i + 2]]
        sigmas = [p[1] for p in points[i + 1 - k : i + 2]]
        x = dpm_solver_update(
            x, x0s[-k:], alphas, sigmas, algorithm=algorithm, solver_type=solver_type, noise=noise,
            third_order=third_order,
        ).to(out.dtype)
        x = _maybe_replace(callback, i, t_model, x)
    return x
