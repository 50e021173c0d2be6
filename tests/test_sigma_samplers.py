"""Euler, Euler ancestral, UniPC and DPM++ 2M with Karras sigmas (issue 16): step for step equal to diffusers'
schedulers (timesteps, sigmas, every step, the stateful API, truncated runs, zero terminal SNR), and the
convergence order each should have on the exactly solvable Gaussian problem of test_samplers."""

from __future__ import annotations

import math

import pytest
import torch

from modelscope_t2v.diffusion import schedule as sched
from modelscope_t2v.diffusion import sigma_samplers as SS
from modelscope_t2v.schedulers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
    make_sampler,
    sampler_name,
    scheduler_from_config,
)

from refs import max_diff
from test_samplers import AC64, MU, RELEASED, SD, fake_model, fold, gen, ideal_eps, pf_ode_solution, unfold, x_T

diffusers = pytest.importorskip("diffusers")
OURS = {c.__name__: c for c in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, UniPCMultistepScheduler,
                                 DPMSolverMultistepScheduler)}


def diffusers_scaled_loop(scheduler, x, model=fake_model, generator=None):
    """diffusers' pipeline loop for any scheduler: x * init_noise_sigma, scale_model_input, step (frames folded)."""
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        kw = {"generator": generator} if generator is not None else {}
        x = unfold(scheduler.step(fold(out), t, fold(x), **kw).prev_sample)
    return x


def pair(name: str, steps: int, **cfg):
    ref = getattr(diffusers, name).from_config({**RELEASED, **cfg})
    ours = OURS[name].from_config({**RELEASED, **cfg})
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    return ref, ours


def ours_run(ours, generator=None):
    return ours.sample(fake_model, x_T() * ours.init_noise_sigma, generator=generator)


def to_diffusers_form(ours, x):
    """Our VP latents at the last sigma in diffusers' Euler form (times sqrt(1 + sigma^2); 1 at sigma 0)."""
    return x * (float(ours.sigmas[-1]) ** 2 + 1) ** 0.5


EULER_CASES = [(spacing, pt, karras, final) for spacing in ("linspace", "leading", "trailing")
               for pt in ("epsilon", "v_prediction") for karras, final in ((False, "zero"), (True, "zero"), (False, "sigma_min"))]


@pytest.mark.parametrize("spacing,prediction_type,karras,final", EULER_CASES)
def test_euler_equals_diffusers_euler_discrete(spacing, prediction_type, karras, final):
    ref, ours = pair("EulerDiscreteScheduler", 25, timestep_spacing=spacing, prediction_type=prediction_type,
                     use_karras_sigmas=karras, final_sigmas_type=final)
    assert torch.allclose(ours.timesteps, ref.timesteps) and torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)
    expected = diffusers_scaled_loop(ref, x_T())
    assert max_diff(to_diffusers_form(ours, ours_run(ours)), expected) <= 2e-5
    ours.set_timesteps(25)  # the stateful API: diffusers' loop, on VP latents
    stepped = diffusers_scaled_loop(ours, x_T())
    assert max_diff(to_diffusers_form(ours, stepped), expected) <= 2e-5
    assert expected.abs().max() < 10


@pytest.mark.parametrize("spacing,prediction_type", [("linspace", "epsilon"), ("trailing", "v_prediction"), ("leading", "epsilon")])
def test_euler_ancestral_equals_diffusers_draw_for_draw(spacing, prediction_type):
    ref, ours = pair("EulerAncestralDiscreteScheduler", 20, timestep_spacing=spacing, prediction_type=prediction_type)
    assert torch.allclose(ours.timesteps, ref.timesteps) and torch.allclose(ours.sigmas, ref.sigmas)
    expected = diffusers_scaled_loop(ref, x_T(), generator=gen())
    assert max_diff(ours_run(ours, gen()), expected) <= 2e-5
    ours.set_timesteps(20)
    assert max_diff(diffusers_scaled_loop(ours, x_T(), generator=gen()), expected) <= 2e-5
    assert max_diff(ours_run(ours, gen(6)), expected) > 1e-2  # another seed, another video


UNIPC_CASES = [(order, st, pt, spacing, False, ()) for order in (1, 2, 3) for st in ("bh1", "bh2")
               for pt, spacing in (("epsilon", "linspace"), ("v_prediction", "trailing"))] + [
    (2, "bh2", "epsilon", "leading", True, ()), (3, "bh2", "epsilon", "linspace", True, ()),
    (2, "bh2", "epsilon", "linspace", False, (0, 3)),
]


@pytest.mark.parametrize("order,solver_type,prediction_type,spacing,karras,disable", UNIPC_CASES)
def test_unipc_equals_diffusers_unipc_multistep(order, solver_type, prediction_type, spacing, karras, disable):
    # bh1 steps to sigma 0 as NaN in diffusers (B(h) = h = -inf times a zero residual); ours takes the limit, so
    # bh1 is compared ending at sigma_min
    final = "sigma_min" if solver_type == "bh1" else "zero"
    ref, ours = pair("UniPCMultistepScheduler", 12, solver_order=order, solver_type=solver_type,
                     prediction_type=prediction_type, timestep_spacing=spacing, use_karras_sigmas=karras,
                     disable_corrector=list(disable), final_sigmas_type=final)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.allclose(ours.sigmas, ref.sigmas)
    expected = diffusers_scaled_loop(ref, x_T())
    assert max_diff(ours_run(ours), expected) <= 1e-5
    ours.set_timesteps(12)
    assert max_diff(diffusers_scaled_loop(ours, x_T()), expected) <= 1e-5


@pytest.mark.parametrize("prediction_type,final", [("epsilon", "zero"), ("v_prediction", "sigma_min")])
def test_dpm_solver_2m_karras_equals_diffusers(prediction_type, final):
    ref, ours = pair("DPMSolverMultistepScheduler", 15, use_karras_sigmas=True, prediction_type=prediction_type,
                     final_sigmas_type=final)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.allclose(ours.sigmas, ref.sigmas)
    expected = diffusers_scaled_loop(ref, x_T())
    assert max_diff(ours_run(ours), expected) <= 1e-5
    ours.set_timesteps(15)
    assert max_diff(diffusers_scaled_loop(ours, x_T()), expected) <= 1e-5


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_zero_snr_and_truncated_runs_equal_diffusers(name):
    # the bundled shapes model's schedule (zero terminal SNR, v, trailing), and a video-to-video suffix of it
    cfg = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    ref, ours = pair(name, 10, **cfg)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    g = (lambda: gen()) if "Ancestral" in name else (lambda: None)
    assert max_diff(ours_run(ours, g()), diffusers_scaled_loop(ref, x_T(), generator=g())) <= 2e-5
    x0, noise = x_T(seed=1), x_T(seed=2)
    start = 4
    for s in (ref, ours):
        s.set_timesteps(10)
        s.set_begin_index(start)
    t0 = ref.timesteps[start:start + 1].repeat(fold(x0).shape[0])
    noisy_ref = unfold(ref.add_noise(fold(x0), fold(noise), t0))
    noisy = unfold(ours.add_noise(fold(x0), fold(noise), t0))
    sigma0 = float(ours.sigmas[start]) if "UniPC" not in name else 0.0
    assert max_diff(noisy * (sigma0**2 + 1) ** 0.5, noisy_ref) <= 1e-5  # VP form vs diffusers' form
    x, kw = noisy_ref, ({"generator": g()} if "Ancestral" in name else {})
    for t in ref.timesteps[start:]:
        x = unfold(ref.step(fold(fake_model(ref.scale_model_input(x, t), t)), t, fold(x), **kw).prev_sample)
    got = ours.sample(fake_model, noisy, ours.timesteps[start:], generator=g())
    assert max_diff(got, x) <= 2e-5


def test_sampler_names_and_conversions():
    assert sampler_name("DPM++ 2M Karras") == "dpm++2m-karras" and sampler_name("Euler a") == "euler-a"
    assert sampler_name("UniPC") == "unipc" and sampler_name("euler") == "euler"
    k = make_sampler("dpm++2m-karras", RELEASED)
    assert isinstance(k, DPMSolverMultistepScheduler) and k.config.use_karras_sigmas
    for name, cls in (("euler", EulerDiscreteScheduler), ("euler-a", EulerAncestralDiscreteScheduler),
                      ("unipc", UniPCMultistepScheduler)):
        s = make_sampler(name, {**RELEASED, "_class_name": "DDIMScheduler"}, "trailing")
        assert isinstance(s, cls) and s.config.timestep_spacing == "trailing"
        back = scheduler_from_config(dict(s.config))  # the class name travels with the config
        assert type(back) is cls
    with pytest.raises(ValueError, match="use_exponential_sigmas"):
        EulerDiscreteScheduler(use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="predict_x0"):
        UniPCMultistepScheduler(predict_x0=False)
    with pytest.raises(ValueError, match="sigmas"):
        SS.euler(fake_model, x_T(), [1.0, 0.0], [999, 500])


# ----------------------------------------------------------------------------------------------
# Convergence on Gaussian data (the exact probability-flow solution of test_samplers), t = 999 -> 39.


def _run(method: str, n: int) -> float:
    x = torch.randn(2048, generator=gen(0), dtype=torch.float64)
    grid = torch.linspace(999, 39, n + 1).round().long()
    abar = AC64[grid]
    sigmas = ((1 - abar) / abar).sqrt()
    model = lambda x_, t: ideal_eps(x_, int(t))  # noqa: E731
    ref = pf_ode_solution(x, 999, 39)
    if method == "euler":
        out = SS.euler(model, x, sigmas, grid[:-1])
    else:
        out = SS.unipc(model, x, sigmas, grid[:-1], order=int(method[-1]), lower_order_final=False)
    return max_diff(out.double(), ref)


@pytest.mark.parametrize("method,low,high", [("euler", 0.8, 1.3), ("unipc1", 1.6, 2.4), ("unipc2", 2.2, 3.5)])
def test_convergence_orders(method, low, high):
    # UniPC-p with its corrector converges at order p + 1 (Zhao et al. 2023, Thm 3.1); measured 1.82 / 2.56 here
    errs = [_run(method, n) for n in (48, 96)]
    order = math.log2(errs[0] / errs[1])
    print(method, errs, order)
    assert low <= order <= high, (method, errs, order)
    if method == "unipc2":  # more accurate than DPM++ 2M at the same steps (7.4e-4 vs 3.1e-4 when written)
        from modelscope_t2v.diffusion.samplers import dpm_solver_multistep

        x = torch.randn(2048, generator=gen(0), dtype=torch.float64)
        grid = torch.linspace(999, 39, 97).round().long()
        dpm = dpm_solver_multistep(lambda x_, t: ideal_eps(x_, int(t)), x, AC64, grid[:-1], order=2, final_timestep=39,
                                   lower_order_final=False)
        assert errs[1] < 0.5 * max_diff(dpm, pf_ode_solution(x, 999, 39))


def test_truncated_unipc_counts_disable_corrector_on_the_whole_schedule():
    ref, ours = pair("UniPCMultistepScheduler", 10, disable_corrector=[5, 7])
    start = 4
    for s in (ref, ours):
        s.set_begin_index(start)
    x = x_T(seed=3)
    expected = x
    for t in ref.timesteps[start:]:
        expected = unfold(ref.step(fold(fake_model(expected, t)), t, fold(expected)).prev_sample)
    assert max_diff(ours.sample(fake_model, x, ours.timesteps[start:]), expected) <= 1e-5


def test_karras_timesteps_for_cosine_betas_and_refusals():
    ref, ours = pair("DPMSolverMultistepScheduler", 10, use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(ours.timesteps, ref.timesteps)  # truncated, not rounded, as diffusers does for cosine betas
    euler = EulerDiscreteScheduler.from_config(RELEASED)
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 500 is not in this schedule"):
        euler.add_noise(x_T(), x_T(seed=1), torch.tensor([500.0]))
    with pytest.raises(ValueError, match="lower_order_final=False"):
        UniPCMultistepScheduler(lower_order_final=False)
    assert not make_sampler("dpm++2m", {**RELEASED, "use_karras_sigmas": True}).config.use_karras_sigmas
