"""Consistency (LCM-style) sampling: timestep rules, step-for-step parity with diffusers' LCMScheduler,
the guidance-scale embedding, the exact result for point-mass data, argument errors.

No model is needed: a fixed nonlinear `fake_model` stands in for the UNet in the parity tests, and for
data that is a point mass at x0* the ideal eps-model is closed form, so the sampler's output is known
exactly (x0* up to the boundary terms c_skip, c_out).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from modelscope_t2v.diffusion import consistency as CM
from modelscope_t2v.diffusion import schedule as sched
from modelscope_t2v.schedulers import (
    LCMScheduler,
    LCMSchedulerOutput,
    make_sampler,
    released_scheduler_config,
    sampler_name,
    scheduler_from_config,
)

from refs import max_diff

diffusers = pytest.importorskip("diffusers")

AC = sched.make_alphas_cumprod()  # LCMScheduler's default schedule (scaled_linear 0.00085 -> 0.012), float32
AC64 = sched.make_alphas_cumprod(dtype=torch.float64)
B, C, F, H, W = 2, 4, 3, 5, 5  # a tiny video latent, stepped whole (b c f h w) as T2V-Turbo does


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed nonlinear function of (x, t) at the scale of a real eps-model (see tests/test_samplers.py)."""
    t = int(torch.as_tensor(t).reshape(-1)[0])
    abar = float(AC[t])
    phase = torch.tensor(t / 50.0, dtype=x.dtype)
    return (1 - abar) ** 0.5 * x + 0.1 * torch.tanh(2 * x + 0.3) * torch.cos(phase) + 0.05 * torch.sin(3 * x)


def x_T(dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, F, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diffusers_loop(scheduler, x, timesteps, generator, model=fake_model):
    """diffusers' LCM pipeline loop: step, carry prev_sample; the result is the last `denoised`."""
    steps = []
    for t in timesteps:
        out = scheduler.step(model(x, t), t, x, generator=generator)
        steps.append(out)
        x = out.prev_sample
    return steps


# ----------------------------------------------------------------------------------------------
# a) timestep rules


@pytest.mark.parametrize("original,strength", [(50, 1.0), (50, 0.6), (25, 1.0), (100, 0.35), (7, 1.0), (1000, 0.5)])
def test_lcm_timesteps_equal_diffusers(original, strength):
    ours = LCMScheduler()
    for steps in range(1, 9):
        ref = diffusers.LCMScheduler()
        if steps > int(original * strength):  # diffusers refuses these too
            with pytest.raises(ValueError):
                ref.set_timesteps(steps, original_inference_steps=original, strength=strength)
            with pytest.raises(ValueError, match="num_inference_steps"):
                ours.set_timesteps(steps, original_inference_steps=original, strength=strength)
            continue
        ref.set_timesteps(steps, original_inference_steps=original, strength=strength)
        ours.set_timesteps(steps, original_inference_steps=original, strength=strength)
        assert torch.equal(ours.timesteps, ref.timesteps), (steps, ours.timesteps, ref.timesteps)
        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == ref.num_inference_steps
        assert torch.equal(CM.lcm_timesteps(steps, 1000, original, strength), ref.timesteps)


def test_t2v_turbo_timesteps():
    assert CM.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert CM.t2v_turbo_timesteps(4).tolist() == [999, 759, 519, 279]
    assert CM.t2v_turbo_timesteps(2).tolist() == [999, 499]
    assert CM.t2v_turbo_timesteps(8).tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    s = LCMScheduler(lcm_timestep_rule="stride")
    for steps in range(1, 9):
        # T2V-Turbo's rule as its scheduler states it, on numpy's slicing
        origin = np.arange(1, 51) * (1000 // 50) - 1
        expected = origin[:: -(len(origin) // steps)][:steps].tolist()
        s.set_timesteps(steps)
        assert s.timesteps.tolist() == expected == CM.t2v_turbo_timesteps(steps).tolist()
    assert CM.t2v_turbo_timesteps(1).tolist() == CM.lcm_timesteps(1).tolist() == [999]


def test_custom_timesteps_follow_diffusers(recwarn):
    for ts, strength in [([999, 759, 519, 279], 1.0), ([999, 600, 259], 1.0), ([999, 759, 519, 279], 0.5)]:
        ref, ours = diffusers.LCMScheduler(), LCMScheduler()
        ref.set_timesteps(timesteps=ts, strength=strength)
        ours.set_timesteps(timesteps=ts, strength=strength)
        assert torch.equal(ours.timesteps, ref.timesteps) and ours.num_inference_steps == ref.num_inference_steps
    assert any("600" in str(w.message) for w in recwarn.list)  # 600 is off the distillation grid


# ----------------------------------------------------------------------------------------------
# b) step-for-step parity with diffusers' LCMScheduler


@pytest.mark.parametrize(
    "prediction_type,extra",
    [
        ("epsilon", {}),
        ("v_prediction", {}),
        ("sample", {}),
        ("epsilon", {"clip_sample": True, "clip_sample_range": 0.7}),
        ("epsilon", {"timestep_scaling": 0.005}),  # large boundary terms: c_skip = 0.13 at t = 259
    ],
)
def test_step_parity_with_diffusers(prediction_type, extra):
    cfg = {"prediction_type": prediction_type, **extra}
    ref, ours = diffusers.LCMScheduler(**cfg), LCMScheduler(**cfg)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    for s in (ref, ours):
        s.set_timesteps(4)
    expected = diffusers_loop(ref, x_T(), ref.timesteps, gen())
    got = diffusers_loop(ours, x_T(), ours.timesteps, gen())
    assert ours.step_index == ref.step_index == 4
    for i, (e, g) in enumerate(zip(expected, got)):
        assert isinstance(g, LCMSchedulerOutput) and torch.equal(g[0], g.prev_sample)
        assert max_diff(g.prev_sample, e.prev_sample) <= 1e-6, i
        assert max_diff(g.denoised, e.denoised) <= 1e-6, i
    assert torch.equal(got[-1].prev_sample, got[-1].denoised)  # the last step does not re-noise
    assert expected[-1].denoised.abs().max() < 10  # the fake model keeps the run O(1): 1e-6 is round-off


def test_stride_rule_equals_diffusers_with_t2v_turbo_timesteps():
    """T2V-Turbo's 4 steps through ours ("stride") and through diffusers (as custom timesteps)."""
    ref, ours = diffusers.LCMScheduler(), LCMScheduler(lcm_timestep_rule="stride")
    ref.set_timesteps(timesteps=[999, 759, 519, 279])
    ours.set_timesteps(4)
    expected = diffusers_loop(ref, x_T(), ref.timesteps, gen())[-1].denoised
    assert max_diff(ours.sample(fake_model, x_T(), generator=gen()), expected) <= 1e-6


# ----------------------------------------------------------------------------------------------
# c) the pure function path (what the pipelines call) against diffusers' loop


@pytest.mark.parametrize("steps,generator", [(4, "one"), (1, "one"), (6, "list"), (4, "none")])
def test_sample_equals_diffusers_loop(steps, generator):
    ref, ours = diffusers.LCMScheduler(), LCMScheduler()
    for s in (ref, ours):
        s.set_timesteps(steps)

    def make():
        return {"one": gen(), "list": [gen(1), gen(2)], "none": None}[generator]

    torch.manual_seed(0)  # generator=None: the global RNG, drawn the same way
    expected = diffusers_loop(ref, x_T(), ref.timesteps, make())[-1].denoised
    torch.manual_seed(0)
    got = ours.sample(fake_model, x_T(), generator=make())
    assert max_diff(got, expected) <= 1e-6
    if generator != "none":  # the adapter is the pure function on its schedule
        assert torch.equal(CM.lcm(fake_model, x_T(), AC, CM.lcm_timesteps(steps), generator=make()), got)


def test_fp16_latents_round_like_diffusers():
    ref, ours = diffusers.LCMScheduler(), LCMScheduler()
    for s in (ref, ours):
        s.set_timesteps(4)
    expected = diffusers_loop(ref, x_T(torch.float16), ref.timesteps, gen())[-1].denoised
    got = ours.sample(fake_model, x_T(torch.float16), generator=gen())
    assert got.dtype == expected.dtype == torch.float16
    assert max_diff(got, expected) <= 2e-3 * max(1.0, expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_latents_with_cpu_generator_match_diffusers():
    """Device latents, CPU coefficients and a CPU generator (drawn on the CPU, then moved)."""
    ref, ours = diffusers.LCMScheduler(), LCMScheduler()
    for s in (ref, ours):
        s.set_timesteps(4, device="cuda")
    expected = diffusers_loop(ref, x_T().cuda(), ref.timesteps, gen())[-1].denoised
    got = ours.sample(fake_model, x_T().cuda(), generator=gen())
    assert got.device.type == "cuda" and max_diff(got, expected) <= 1e-5
    assert max_diff(got.cpu(), ours.sample(fake_model, x_T(), generator=gen())) <= 1e-4


def test_truncated_run_with_begin_index_matches_diffusers():
    """Video-to-video as the pipelines run it: timesteps[t_start:], set_begin_index, add_noise at the first."""
    ref, ours = diffusers.LCMScheduler(), LCMScheduler()
    x0, noise = x_T(seed=1), x_T(seed=2)
    starts = []
    for s in (ref, ours):
        s.set_timesteps(6)
        s.set_begin_index(2)
        ts = s.timesteps[2:]
        starts.append((ts, s.add_noise(x0, noise, ts[:1].repeat(B))))
    assert torch.equal(starts[0][0], starts[1][0]) and max_diff(starts[0][1], starts[1][1]) <= 1e-6
    expected = diffusers_loop(ref, starts[0][1], starts[0][0], gen())
    got = diffusers_loop(ours, starts[1][1], starts[1][0], gen())
    assert max_diff(got[-1].denoised, expected[-1].denoised) <= 1e-6
    assert max_diff(ours.sample(fake_model, starts[1][1], starts[1][0], generator=gen()), expected[-1].denoised) <= 1e-6
    assert torch.equal(ours.get_velocity(x0, noise, starts[1][0][:1]), ref.get_velocity(x0, noise, starts[1][0][:1]))


def test_callback_sees_prev_sample_and_may_replace_it():
    ours = LCMScheduler()
    ours.set_timesteps(4)
    expected = diffusers_loop(diffusers_scheduler(), x_T(), ours.timesteps, gen())
    seen = []

    def cb(i, t, x):
        seen.append((i, int(t), x.clone()))
        return torch.zeros_like(x) if i == 3 else None

    out = ours.sample(fake_model, x_T(), generator=gen(), callback=cb)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(ours.timesteps.tolist()))
    for (_, _, x), e in zip(seen, expected):
        assert max_diff(x, e.prev_sample) <= 1e-6
    assert torch.equal(out, torch.zeros_like(out))  # the replacement of the last step is the result


def diffusers_scheduler():
    s = diffusers.LCMScheduler()
    s.set_timesteps(4)
    return s


# ----------------------------------------------------------------------------------------------
# d) configs: diffusers reads ours, we read diffusers', the sampler name


def _comparable(config, drop=("lcm_timestep_rule",)) -> dict:
    d = {k: v for k, v in dict(config).items() if k != "_diffusers_version" and k not in drop}
    d["_use_default_values"] = sorted(k for k in d.get("_use_default_values", []) if k not in drop)
    return d


def test_from_config_round_trips_with_diffusers(tmp_path):
    ours = LCMScheduler(original_inference_steps=25, timestep_scaling=5.0, prediction_type="v_prediction")
    theirs = diffusers.LCMScheduler.from_config(ours.config)
    assert _comparable(theirs.config) == _comparable(ours.config)
    back = LCMScheduler.from_config(theirs.config)
    assert _comparable(back.config) == _comparable(ours.config)
    assert back.config.lcm_timestep_rule == "linspace"  # diffusers does not keep our key

    # from the released DDIM config, as diffusers' LCMScheduler.from_config(pipe.scheduler.config)
    ref = diffusers.LCMScheduler.from_config(diffusers.DDIMScheduler.from_config(released_scheduler_config()).config)
    mine = make_sampler("lcm", scheduler_from_config(released_scheduler_config()).config)
    assert isinstance(mine, LCMScheduler) and _comparable(mine.config) == _comparable(ref.config)
    assert mine.config.steps_offset == 1 and mine.config.set_alpha_to_one is False and sampler_name("LCM") == "lcm"

    # our key survives our own save / load; diffusers loads the folder (ignoring it)
    stride = LCMScheduler(lcm_timestep_rule="stride")
    stride.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "LCMScheduler" and saved["lcm_timestep_rule"] == "stride"
    again = scheduler_from_config(saved)
    assert isinstance(again, LCMScheduler) and again.config.lcm_timestep_rule == "stride"
    assert make_sampler("lcm", saved).config.lcm_timestep_rule == "stride"
    loaded = diffusers.LCMScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in diffusers.LCMScheduler().config if not k.startswith("_")} == {
        k: stride.config[k] for k in diffusers.LCMScheduler().config if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# e) the guidance-scale embedding


@pytest.mark.parametrize("dim", [256, 255])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guidance_scale_embedding_equals_diffusers(dim, dtype):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([7.5, 7.5 - 1, 0.0, 13.25])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim, dtype=dtype)
    got = CM.guidance_scale_embedding(w, dim, dtype)
    assert got.shape == (4, dim) and got.dtype == dtype
    assert torch.equal(got, ref)
    assert (got[:, -1] == 0).all() == (dim % 2 == 1)  # the zero pad of an odd width


# ----------------------------------------------------------------------------------------------
# f) point-mass data: the ideal model is closed form, so is the sampler's output


X0_STAR = torch.linspace(-1.5, 1.5, 2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)


def ideal_eps(x: torch.Tensor, t) -> torch.Tensor:
    """E[eps | x_t] when x_0 = X0_STAR surely: x_t = sqrt(abar) x0* + sqrt(1 - abar) eps, solved for eps."""
    abar = float(AC64[int(t)])
    return (x - abar**0.5 * X0_STAR) / (1 - abar) ** 0.5


@pytest.mark.parametrize("steps,scaling,final", [(4, 10.0, 1.0), (4, 0.01, 1.0), (1, 0.01, 1.0), (3, 0.01, 0.9)])
def test_point_mass_data_is_recovered_up_to_the_boundary_terms(steps, scaling, final):
    """x0_hat = x0* exactly, so step i returns d_i = c_out_i x0* + c_skip_i x_i and the next x is
    sqrt(abar_{i+1}) d_i + sqrt(1 - abar_{i+1}) z_i: the result is that recursion's last d (re-noised to
    `final` when final < 1), with c_skip = 1/4 / (s^2 + 1/4), c_out = s / sqrt(s^2 + 1/4), s = t * scaling."""
    ts = CM.lcm_timesteps(steps)
    x = torch.randn(X0_STAR.shape, generator=gen(0), dtype=torch.float64)
    got = CM.lcm(ideal_eps, x.clone(), AC64, ts, timestep_scaling=scaling, final_alpha_cumprod=final, generator=gen(1))

    g = gen(1)  # the same draws, one per re-noising
    abars = [float(AC64[t]) for t in ts.tolist()] + ([final] if final < 1 else [])
    for i, t in enumerate(ts.tolist()):
        s = t * scaling
        c_skip, c_out = 0.25 / (s * s + 0.25), s / math.sqrt(s * s + 0.25)
        x = c_out * X0_STAR + c_skip * x
        if i + 1 < len(abars):
            z = torch.randn(X0_STAR.shape, generator=g, dtype=torch.float64)
            x = math.sqrt(abars[i + 1]) * x + math.sqrt(1 - abars[i + 1]) * z
    assert max_diff(got, x) <= 1e-12
    if final == 1.0 and scaling == 10.0:  # c_skip ~ 4e-8, 1 - c_out ~ 2e-8 at t = 259
        assert max_diff(got, X0_STAR) <= 1e-6
    else:  # the boundary terms (or the final re-noising) are visible, and reproduced above
        assert max_diff(got, X0_STAR) > 1e-3


# ----------------------------------------------------------------------------------------------
# g) argument errors


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: CM.lcm_timesteps(0), "steps"),
        (lambda: CM.lcm_timesteps(51), "steps"),
        (lambda: CM.lcm_timesteps(4, strength=0.0), "strength"),
        (lambda: CM.lcm_timesteps(4, original_steps=1001), "original_steps"),
        (lambda: CM.t2v_turbo_timesteps(0), "steps"),
        (lambda: CM.t2v_turbo_timesteps(51), "steps"),
        (lambda: CM.lcm(fake_model, x_T(), AC, [999, 499], prediction_type="x0"), "prediction_type"),
        (lambda: CM.lcm(fake_model, x_T(), AC, [499, 999]), "descending"),
        (lambda: CM.lcm(fake_model, x_T(), AC, [1000, 499]), "timesteps"),
        (lambda: CM.lcm(fake_model, x_T(), AC, [999], final_alpha_cumprod=0.0), "final_alpha_cumprod"),
        (lambda: CM.lcm(fake_model, x_T(), AC, [999], timestep_scaling=-1.0), "timestep_scaling"),
        (lambda: CM.guidance_scale_embedding(torch.tensor(7.5), 256), "w"),
        (lambda: CM.guidance_scale_embedding(torch.tensor([7.5]), 3), "dim"),
        (lambda: LCMScheduler(lcm_timestep_rule="trailing"), "lcm_timestep_rule"),
        (lambda: LCMScheduler(prediction_type="x0"), "prediction_type"),
        (lambda: LCMScheduler(thresholding=True), "thresholding"),
        (lambda: LCMScheduler(original_inference_steps=0), "original_inference_steps"),
        (lambda: LCMScheduler().set_timesteps(0), "num_inference_steps"),
        (lambda: LCMScheduler().set_timesteps(51), "num_inference_steps"),
        (lambda: LCMScheduler(lcm_timestep_rule="stride").set_timesteps(51), "num_inference_steps"),
        (lambda: LCMScheduler(lcm_timestep_rule="stride").set_timesteps(4, strength=0.5), "strength"),
        (lambda: LCMScheduler().set_timesteps(4, strength=1.5), "strength"),
        (lambda: LCMScheduler().set_timesteps(4, original_inference_steps=2000), "original_inference_steps"),
        (lambda: LCMScheduler().set_timesteps(timesteps=[259, 499, 999]), "descending"),
        (lambda: LCMScheduler().set_timesteps(timesteps=[1000, 499]), "timesteps"),
        (lambda: LCMScheduler().set_timesteps(4, timesteps=[999]), "exactly one"),
        (lambda: LCMScheduler().sample(fake_model, x_T()), "set_timesteps"),
        (lambda: LCMScheduler().step(x_T(), 999, x_T()), "set_timesteps"),
        (lambda: make_sampler("lcm", released_scheduler_config(), "trailing"), "spacing"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="steps"):
        CM.lcm_timesteps(4.0)
    with pytest.raises(TypeError, match="lcm_timestep_rulee"):
        LCMScheduler(lcm_timestep_rulee="stride")
