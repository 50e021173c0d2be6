"""Samplers over a schedule of noise levels: Euler, Euler ancestral (Karras et al. 2022) and UniPC (Zhao et al.
2023), as pure functions with one signature.

    sampler(model_fn, x, sigmas, timesteps, *, generator=None, callback=None, prediction_type=..., ...) -> x

- `sigmas` are sigma_vp = sqrt((1 - abar) / abar) at each step and one more to end at (0: the clean sample),
  e.g. a Karras spacing (`schedule.karras_sigmas`) or the training sigmas at `timesteps`; `timesteps` are
  what the model is told at each step (fractional for Euler with Karras sigmas, as diffusers passes them).
- `x` is the VP sample alpha x_0 + sigma eps (alpha = 1 / sqrt(1 + sigma_vp^2)), as for the samplers of
  `samplers.py`, and `model_fn(x, t)` takes it unscaled: the k-diffusion sample x_0 + sigma_vp eps, which
  diffusers' Euler schedulers step in, is x * sqrt(1 + sigma_vp^2) and is formed only inside a step. So the
  pipelines, pinned frames and callbacks see one kind of latent whatever the sampler.

Reproducibility with diffusers: each step computes what diffusers' EulerDiscreteScheduler /
EulerAncestralDiscreteScheduler / UniPCMultistepScheduler compute, in the same dtypes (Euler upcasts the sample
to float32 and casts the result back to the model output's dtype; UniPC works in the sample's dtype with
float32 coefficients). In float32 the results agree to round-off; in half precision Euler rounds once more per
step than diffusers (it keeps the VP latent, from which x_0 + sigma eps is formed again), so fp16 runs are close,
not bit-identical; the Euler ancestral noise is drawn once per step after the model call, in the model
output's dtype, in the frame order of diffusers' video pipelines (`noise.randn_like`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .noise import Generator, randn_like
from .samplers import Callback, ModelFn, _check_prediction_type, _maybe_replace

UNIPC_SOLVER_TYPES = ("bh1", "bh2")


def _schedule(sigmas, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
    ts = torch.as_tensor(timesteps).detach().cpu().reshape(-1)
    if ts.numel() < 1 or sig.numel() != ts.numel() + 1:
        raise ValueError(f"`sigmas` must hold one entry per timestep and one to end at: {sig.numel()} sigmas for "
                         f"{ts.numel()} timesteps")
    if not torch.isfinite(sig).all() or (sig < 0).any():
        raise ValueError(f"`sigmas` must be finite and >= 0, got {sig.tolist()}")
    return sig, ts


def _alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process at sigma_vp = s, float32 (diffusers' `_sigma_to_alpha_sigma_t`)."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


# ----------------------------------------------------------------------------------------------
# Euler and Euler ancestral (Karras et al. 2022, Alg. 1 with the ODE's derivative; ancestral: k-diffusion's
# sample_euler_ancestral, eta 1).


def euler_step(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, *, noise=None,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """One Euler step of the VP sample `x` at sigma `s` to `s_next` given the model output `out`; with `noise`
    (ancestral) to sigma_down, then noise x sigma_up (sigma_down^2 + sigma_up^2 = s_next^2)."""
    xs = (x * (s**2 + 1) ** 0.5).to(torch.float32)  # x_0 + sigma eps, float32 as diffusers upcasts
    if prediction_type == "epsilon":
        x0 = xs - s * out
    elif prediction_type == "v_prediction":  # denoised = v c_out + x c_skip
        x0 = out * (-s / (s**2 + 1) ** 0.5) + xs / (s**2 + 1)
    else:
        raise ValueError(f"`prediction_type` must be 'epsilon' or 'v_prediction' for Euler, got {prediction_type!r}")
    derivative = (xs - x0) / s  # dx_sigma / dsigma of the probability-flow ODE
    if noise is None:
        xs = xs + derivative * (s_next - s)
    else:
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        down = (s_next**2 - up**2) ** 0.5
        xs = xs + derivative * (down - s) + noise * up
    return xs.to(out.dtype) / (s_next**2 + 1) ** 0.5


def euler(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas,
    timesteps,
    *,
    ancestral: bool = False,
    generator: Generator = None,
    callback: Optional[Callback] = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx_sigma/dsigma = (x_sigma - x_0) / sigma from each sigma to the
    next; `ancestral`: each step to sigma_down plus fresh noise of sigma_up (k-diffusion's eta = 1)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"`prediction_type` must be 'epsilon' or 'v_prediction' for Euler, got {prediction_type!r}")
    sig, ts = _schedule(sigmas, timesteps)
    for i in range(ts.numel()):
        t = ts[i].to(x.device)
        out = model_fn(x, t)
        noise = randn_like(out, generator, out.dtype) if ancestral else None
        x = euler_step(out, x, sig[i], sig[i + 1], noise=noise, prediction_type=prediction_type)
        x = _maybe_replace(callback, i, t, x)
    return x


# ----------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
# Models"), data prediction: the predictor UniP (Alg. 2) and the corrector UniC (Alg. 1) with B(h) = h ("bh1")
# or e^h - 1 ("bh2"), multistep.


def _unipc_coefficients(lambdas: Sequence[torch.Tensor], lam_s0: torch.Tensor, lam_t: torch.Tensor, order: int,
                        solver_type: str):
    """(h_phi_1, B_h, rks, R, b) of a UniP/UniC update from lambda_s0 to lambda_t with the history `lambdas`."""
    h = lam_t - lam_s0
    rks = [(lam - lam_s0) / h for lam in lambdas] + [torch.ones(())]
    rks = torch.stack(rks)
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    R, b, factorial = [], [], 1
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, B_h, rks, torch.stack(R), torch.stack(b)


def _weighted(rhos: torch.Tensor, diffs: list[torch.Tensor]):
    out = rhos[0] * diffs[0]
    for r, d in zip(rhos[1:], diffs[1:]):
        out = out + r * d
    return out


class UniPC:
    """The state of a UniPC run over `sigmas` (the last `order` data predictions, the sample before the last
    predictor step): `step(i, out, x)` takes the model output at step i and returns the sample at step i + 1."""

    def __init__(self, sigmas, *, order: int = 2, solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = (), prediction_type: str = "epsilon"):
        _check_prediction_type(prediction_type)
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"`order` must be 1, 2 or 3, got {order!r}")
        if solver_type not in UNIPC_SOLVER_TYPES:
            raise ValueError(f"`solver_type` must be one of {UNIPC_SOLVER_TYPES}, got {solver_type!r}")
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
        self.n = self.sigmas.numel() - 1
        self.order, self.solver_type, self.lower_order_final = order, solver_type, lower_order_final
        self.disable_corrector, self.prediction_type = set(disable_corrector), prediction_type
        self.points = [_alpha_sigma(s) for s in self.sigmas]
        self.lam = [torch.log(a) - torch.log(s) for a, s in self.points]  # +inf at sigma 0
        self.outs: list[torch.Tensor] = []  # the last `order` data predictions, oldest first
        self.last: Optional[torch.Tensor] = None
        self.this_order = 1

    def _update(self, x_s, s0: int, t: int, k: int, m_new: Optional[torch.Tensor]):
        """UniP from index s0 to t of order k (m_new None), or UniC of the sample at t (m_new: its output)."""
        outs, m0 = self.outs, self.outs[-1]
        history = [self.lam[s0 - j] for j in range(1, k)]  # the older points used
        h_phi_1, B_h, rks, R, b = _unipc_coefficients(history, self.lam[s0], self.lam[t], k, self.solver_type)
        diffs = [(outs[-(j + 1)] - m0) / rks[j - 1] for j in range(1, k)]
        alpha_t, sigma_t = self.points[t]
        x_t = sigma_t / self.points[s0][1] * x_s - alpha_t * h_phi_1 * m0
        if m_new is None:  # predictor
            if diffs:
                rhos = torch.ones(1, dtype=x_s.dtype) * 0.5 if k == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).to(x_s.dtype)
                x_t = x_t - alpha_t * B_h * _weighted(rhos, diffs)
        else:  # corrector
            rhos = torch.ones(1, dtype=x_s.dtype) * 0.5 if k == 1 else torch.linalg.solve(R, b).to(x_s.dtype)
            res = rhos[-1] * (m_new - m0)
            if diffs:
                res = _weighted(rhos[:-1], diffs) + res
            x_t = x_t - alpha_t * B_h * res
        return x_t.to(x_s.dtype)

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.points[i]
        if self.prediction_type == "epsilon":
            m = (x - sigma * out) / alpha
        elif self.prediction_type == "v_prediction":
            m = alpha * x - sigma * out
        else:
            m = out
        if i > 0 and (i - 1) not in self.disable_corrector and self.last is not None:
            x = self._update(self.last, i - 1, i, self.this_order, m)
        self.outs = (self.outs + [m])[-self.order:]
        k = min(self.order, self.n - i) if self.lower_order_final else self.order
        self.this_order = min(k, len(self.outs))  # warm-up: as many as the history holds
        self.last = x
        return self._update(x, i, i + 1, self.this_order, None)


def unipc(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas,
    timesteps,
    *,
    order: int = 2,
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    callback: Optional[Callback] = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """UniPC-`order` multistep: each step corrects the current sample with the new model output (UniC; not after
    the steps in `disable_corrector`; the first has nothing to correct) and predicts the next (UniP) from the
    last `order` data predictions. lower_order_final: order min(order, steps left), which keeps few-step runs
    stable (diffusers' default)."""
    sig, ts = _schedule(sigmas, timesteps)
    run = UniPC(sig, order=order, solver_type=solver_type, lower_order_final=lower_order_final,
                disable_corrector=disable_corrector, prediction_type=prediction_type)
    for i in range(ts.numel()):
        t = ts[i].to(x.device)
        x = run.step(i, model_fn(x, t), x)
        x = _maybe_replace(callback, i, t, x)
    return x
