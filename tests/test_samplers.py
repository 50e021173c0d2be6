"""Noise schedule, samplers and scheduler adapters: exact spacings, parity with diffusers and with
the original ModelScope loop, convergence orders on an exactly solvable problem, argument errors.

No model is needed: a fixed nonlinear `fake_model` stands in for the UNet in parity tests, and for
Gaussian data x0 ~ N(mu, s^2 I) the ideal denoiser and the probability-flow ODE solution are closed
form, so a sampler's error and its empirical order can be measured exactly.
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch

from modelscope_t2v.diffusion import noise as N
from modelscope_t2v.diffusion import samplers as S
from modelscope_t2v.diffusion import schedule as sched
from modelscope_t2v.schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    MODELSCOPE_T2V_SCHEDULER_CONFIG,
    released_scheduler_config,
    scheduler_from_config,
)

from refs import max_diff, modelscope_reference

diffusers = pytest.importorskip("diffusers")

RELEASED = {k: v for k, v in MODELSCOPE_T2V_SCHEDULER_CONFIG.items() if not k.startswith("_")}
AC = sched.make_alphas_cumprod()  # the released schedule, float32 as diffusers
B, C, F, H, W = 1, 4, 3, 6, 6  # a tiny video latent


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed nonlinear function of (x, t) with the scale of a real eps-model: the ideal eps for
    N(0, I) data (sqrt(1 - abar) x) plus nonlinear terms, so x stays O(1) over a whole sampling run."""
    t = int(torch.as_tensor(t).reshape(-1)[0])
    abar = float(AC[t])
    phase = torch.tensor(t / 50.0, dtype=x.dtype)
    return (1 - abar) ** 0.5 * x + 0.1 * torch.tanh(2 * x + 0.3) * torch.cos(phase) + 0.05 * torch.sin(3 * x)


def fold(x: torch.Tensor) -> torch.Tensor:  # b c f h w -> (b f) c h w, as diffusers' video pipelines step
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold(x: torch.Tensor, f: int = F) -> torch.Tensor:
    bf, c, h, w = x.shape
    return x.reshape(bf // f, f, c, h, w).permute(0, 2, 1, 3, 4)


def x_T(dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, F, H, W, generator=g).to(dtype)


def diffusers_loop(scheduler, x, timesteps, model=fake_model, **step_kwargs):
    """diffusers' TextToVideoSDPipeline loop: fold frames into the batch, step, unfold."""
    for t in timesteps:
        out = model(x, t)
        x = unfold(scheduler.step(fold(out), t, fold(x), **step_kwargs).prev_sample)
    return x


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# a) schedules and spacings


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_equal_diffusers(kind):
    ref = diffusers.DDIMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
    ours = sched.make_betas(kind, 0.00085, 0.012, 1000)
    assert torch.equal(ours, ref.betas)
    assert torch.equal(sched.alphas_cumprod(ours), ref.alphas_cumprod)


@pytest.mark.parametrize("steps", [1, 7, 20, 25, 50, 333, 999])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("linspace", 0), ("trailing", 0)])
def test_ddim_spacings_equal_diffusers(steps, spacing, offset):
    ref = diffusers.DDIMScheduler(**{**RELEASED, "steps_offset": offset, "timestep_spacing": spacing})
    ref.set_timesteps(steps)
    ours = DDIMScheduler(**{**RELEASED, "steps_offset": offset, "timestep_spacing": spacing})
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(sched.make_timesteps(spacing, steps, steps_offset=offset), ref.timesteps)


@pytest.mark.parametrize("steps", [1, 10, 25, 50, 997])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_dpm_spacings_equal_diffusers(steps, spacing, offset):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DPMSolverMultistepScheduler(**kw, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = DPMSolverMultistepScheduler(**kw, timestep_spacing=spacing, steps_offset=offset)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    drop = spacing != "trailing"
    assert torch.equal(sched.make_timesteps(spacing, steps, steps_offset=offset, drop_final=drop), ref.timesteps)


def test_released_spacings():
    assert sched.leading_timesteps(50, 1000, 1).tolist() == list(range(981, 0, -20))
    dpm = DPMSolverMultistepScheduler.from_config(DDIMScheduler.from_config(released_scheduler_config()).config)
    dpm.set_timesteps(25)
    assert dpm.timesteps[:3].tolist() == [999, 959, 919] and dpm.timesteps[-1] == 40 and len(dpm.timesteps) == 25
    # The original ModelScope loop: the same as leading+1 when the count divides 1000, one extra step otherwise.
    assert torch.equal(sched.modelscope_timesteps(50), sched.leading_timesteps(50, 1000, 1))
    assert sched.modelscope_timesteps(30).tolist()[:2] == [991, 958] and len(sched.modelscope_timesteps(30)) == 31
    assert sched.modelscope_timesteps(1000)[:2].tolist() == [999, 999]


def _comparable(config) -> dict:
    d = {k: v for k, v in dict(config).items() if k != "_diffusers_version"}
    d["_use_default_values"] = sorted(d.get("_use_default_values", []))
    return d


def test_from_config_conversions_match_diffusers(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(MODELSCOPE_T2V_SCHEDULER_CONFIG)))
    ref_ddim = diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    ours_ddim = DDIMScheduler.from_pretrained(tmp_path)
    assert _comparable(ours_ddim.config) == _comparable(ref_ddim.config)

    ref_dpm = diffusers.DPMSolverMultistepScheduler.from_config(ref_ddim.config)
    ours_dpm = DPMSolverMultistepScheduler.from_config(ours_ddim.config)
    assert _comparable(ours_dpm.config) == _comparable(ref_dpm.config)
    cfg = ours_dpm.config
    assert (cfg.algorithm_type, cfg.solver_order, cfg.timestep_spacing, cfg["steps_offset"]) == (
        "dpmsolver++", 2, "linspace", 1)
    assert cfg.clip_sample is False and cfg._class_name == "DPMSolverMultistepScheduler"  # kept for the way back
    ref_dpm.set_timesteps(25)
    ours_dpm.set_timesteps(25)
    assert torch.equal(ours_dpm.timesteps, ref_dpm.timesteps)
    assert ours_dpm.timesteps[:3].tolist() == [999, 959, 919] and ours_dpm.timesteps[-1] == 40

    back = DDIMScheduler.from_config(ours_dpm.config)
    ref_back = diffusers.DDIMScheduler.from_config(ref_dpm.config)
    assert _comparable(back.config) == _comparable(ref_back.config)
    assert back.config.timestep_spacing == "leading" and back.config.set_alpha_to_one is False

    # Interop both ways: diffusers reads our config and our saved folder, we read diffusers' folder.
    assert _comparable(diffusers.DPMSolverMultistepScheduler.from_config(ours_ddim.config).config) == _comparable(cfg)
    ours_dpm.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler" and "_use_default_values" not in saved
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "ours")
    assert {k: loaded.config[k] for k in DPMSolverMultistepScheduler._defaults} == {
        k: cfg[k] for k in DPMSolverMultistepScheduler._defaults}
    ref_dpm.save_pretrained(tmp_path / "theirs")
    again = scheduler_from_config(json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text()))
    assert isinstance(again, DPMSolverMultistepScheduler)
    assert {k: again.config[k] for k in again._defaults} == {k: cfg[k] for k in again._defaults}
    assert isinstance(scheduler_from_config(released_scheduler_config()), DDIMScheduler)
    assert DDIMScheduler.from_pretrained(tmp_path / "ours", subfolder=None).config.clip_sample is False


def test_config_is_frozen_and_readable():
    s = DDIMScheduler.from_config(released_scheduler_config(), num_train_timesteps=1000)
    assert s.config.num_train_timesteps == s.config["num_train_timesteps"] == 1000
    assert s.order == 1 and s.init_noise_sigma == 1.0 and len(s) == 1000
    with pytest.raises(TypeError):
        s.config["beta_end"] = 0.02
    with pytest.raises(TypeError):
        s.config.beta_end = 0.02
    with pytest.raises(AttributeError):
        s.config.no_such_key
    assert torch.equal(s.scale_model_input(AC, 3), AC)
    assert copy.deepcopy(s.config) == s.config and pickle.loads(pickle.dumps(s.config)) == s.config


# ----------------------------------------------------------------------------------------------
# b) step-for-step parity with diffusers


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize(
    "spacing,prediction_type", [("leading", "epsilon"), ("trailing", "v_prediction"), ("linspace", "epsilon")]
)
def test_ddim_parity_with_diffusers(eta, spacing, prediction_type):
    cfg = {**RELEASED, "timestep_spacing": spacing, "prediction_type": prediction_type}
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(20)
    expected = diffusers_loop(ref, x_T(), ref.timesteps, eta=eta, generator=gen())
    ours = DDIMScheduler(**cfg)
    ours.set_timesteps(20)
    got = ours.sample(fake_model, x_T(), generator=gen(), eta=eta)
    assert max_diff(got, expected) <= 1e-5
    # the stateful diffusers-style API gives the same numbers
    stepped = diffusers_loop(ours, x_T(), ours.timesteps, eta=eta, generator=gen())
    assert max_diff(stepped, expected) <= 1e-5
    assert expected.abs().max() < 10  # the fake model keeps the run O(1), so 1e-5 is ~fp32 round-off


DPM_CASES = [
    ("dpmsolver++", order, pt, st, n)
    for order in (1, 2, 3)
    for pt in ("epsilon", "v_prediction")
    for st, n in (("midpoint", 20), ("heun", 10))
] + [("sde-dpmsolver++", order, "epsilon", "midpoint", n) for order in (1, 2, 3) for n in (10, 20)] + [
    ("sde-dpmsolver++", 2, "v_prediction", "heun", 20)
]


@pytest.mark.parametrize("algorithm,order,prediction_type,solver_type,steps", DPM_CASES)
def test_dpm_parity_with_diffusers(algorithm, order, prediction_type, solver_type, steps):
    cfg = dict(
        RELEASED, solver_order=order, algorithm_type=algorithm, prediction_type=prediction_type, solver_type=solver_type
    )
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    expected = diffusers_loop(ref, x_T(), ref.timesteps, generator=gen())
    ours = DPMSolverMultistepScheduler.from_config(cfg)
    ours.set_timesteps(steps)
    got = ours.sample(fake_model, x_T(), generator=gen())
    assert max_diff(got, expected) <= 1e-5
    stepped = diffusers_loop(ours, x_T(), ours.timesteps, generator=gen())
    assert max_diff(stepped, expected) <= 1e-5
    pure = S.dpm_solver_multistep(  # the pure function's defaults are diffusers' (lower_order_final rule)
        fake_model, x_T(), AC, ref.timesteps, order=order, algorithm=algorithm, solver_type=solver_type,
        prediction_type=prediction_type, generator=gen(),
    )
    assert torch.equal(pure, got)


@pytest.mark.parametrize(
    "final_sigmas_type,euler_at_final,lower_order_final",
    [("sigma_min", False, True), ("sigma_min", True, False), ("zero", False, False)],
)
def test_dpm_final_step_options_parity(final_sigmas_type, euler_at_final, lower_order_final):
    cfg = dict(RELEASED, solver_order=3, final_sigmas_type=final_sigmas_type, euler_at_final=euler_at_final,
               lower_order_final=lower_order_final)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ours = DPMSolverMultistepScheduler.from_config(cfg)
    for s in (ref, ours):
        s.set_timesteps(8)
    assert torch.equal(ours.sigmas, ref.sigmas)
    expected = diffusers_loop(ref, x_T(), ref.timesteps)
    assert max_diff(ours.sample(fake_model, x_T()), expected) <= 1e-5


@pytest.mark.parametrize("cls_name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_video_to_video_truncated_run_and_add_noise_parity(cls_name):
    """diffusers' VideoToVideoSDPipeline: timesteps[t_start:], set_begin_index, add_noise at the first."""
    cfg = dict(RELEASED, algorithm_type="sde-dpmsolver++") if cls_name.startswith("DPM") else RELEASED
    ref = getattr(diffusers, cls_name).from_config(cfg)
    ours = scheduler_from_config({**cfg, "_class_name": cls_name})
    steps, strength = 20, 0.6
    t_start = steps - int(steps * strength)
    x0, noise = x_T(seed=1), x_T(seed=2)
    results = []
    for s in (ref, ours):
        s.set_timesteps(steps)
        timesteps = s.timesteps[t_start:]
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(t_start)
        latent_t = timesteps[:1].repeat(B * F)
        results.append((timesteps, unfold(s.add_noise(fold(x0), fold(noise), latent_t))))
    assert torch.equal(results[0][0], results[1][0])
    assert max_diff(results[0][1], results[1][1]) <= 1e-6
    expected = diffusers_loop(ref, results[0][1], results[0][0], generator=gen())
    got = ours.sample(fake_model, results[1][1], results[1][0], generator=gen())
    assert max_diff(got, expected) <= 1e-5


def test_zero_snr_v_prediction_parity():
    cfg = dict(RELEASED, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        ref = getattr(diffusers, name).from_config(cfg)
        ours = scheduler_from_config({**cfg, "_class_name": name})
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        ref.set_timesteps(12)
        ours.set_timesteps(12)
        assert ours.timesteps[0] == 999
        expected = diffusers_loop(ref, x_T(), ref.timesteps)
        assert max_diff(ours.sample(fake_model, x_T()), expected) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_low_precision_latents_round_like_diffusers(dtype, name):
    """Half-precision latents: the same dtype flow as diffusers, so the results agree to an ulp
    (bit-identical on the CPU this was written on)."""
    ref = getattr(diffusers, name).from_config(RELEASED)
    ours = scheduler_from_config({**RELEASED, "_class_name": name})
    for s in (ref, ours):
        s.set_timesteps(10)
    step_kwargs = dict(eta=0.5, generator=gen()) if name.startswith("DDIM") else {}
    expected = diffusers_loop(ref, x_T(dtype), ref.timesteps, **step_kwargs)
    got = ours.sample(fake_model, x_T(dtype), generator=gen(), eta=0.5)
    assert got.dtype == dtype and expected.dtype == dtype
    ulp = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert max_diff(got, expected) <= ulp * max(1.0, expected.abs().max().item())
    assert max_diff(got, ours.sample(fake_model, x_T(), generator=gen(), eta=0.5)) < 0.1  # close to fp32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_cuda_latents_with_cpu_generator_match_diffusers(name):
    """Device latents, CPU coefficients and a CPU generator (drawn on the CPU, then moved)."""
    cfg = dict(RELEASED, algorithm_type="sde-dpmsolver++") if name.startswith("DPM") else RELEASED
    ref = getattr(diffusers, name).from_config(cfg)
    ours = scheduler_from_config({**cfg, "_class_name": name})
    for s in (ref, ours):
        s.set_timesteps(10, device="cuda")
    step_kwargs = dict(eta=0.5, generator=gen()) if name.startswith("DDIM") else dict(generator=gen())
    expected = diffusers_loop(ref, x_T().cuda(), ref.timesteps, **step_kwargs)
    got = ours.sample(fake_model, x_T().cuda(), generator=gen(), eta=0.5)
    assert got.device.type == "cuda" and max_diff(got, expected) <= 1e-5
    assert max_diff(got.cpu(), ours.sample(fake_model, x_T(), generator=gen(), eta=0.5)) <= 1e-4


def test_add_noise_and_velocity_match_diffusers():
    ref = diffusers.DDIMScheduler(**RELEASED)
    x0, noise = x_T(seed=1), x_T(seed=2)
    t = torch.tensor([3])
    for dtype in (torch.float32, torch.float16):
        a, n = x0.to(dtype), noise.to(dtype)
        assert torch.equal(sched.add_noise(a, n, AC, t), ref.add_noise(a, n, t))
        assert torch.equal(sched.velocity(a, n, AC, t), ref.get_velocity(a, n, t))
    # v = sqrt(abar) eps - sqrt(1-abar) x0 is what a v-model must output: DDIM then recovers x0 exactly.
    xt = sched.add_noise(x0, noise, AC, 500)
    v = sched.velocity(x0, noise, AC, 500)
    _, x0_hat = S.ddim_step(v, xt, float(AC[500]), float(AC[0]), prediction_type="v_prediction")
    assert max_diff(x0_hat, x0) < 1e-5


def test_step_noise_follows_diffusers_draw_order():
    """Seeds carry over: a (b c f h w) tensor gets the numbers diffusers draws for ((b f) c h w)."""
    from diffusers.utils.torch_utils import randn_tensor

    like = x_T()
    got = N.randn_like(like, gen(3))
    expected = unfold(randn_tensor((B * F, C, H, W), generator=gen(3), dtype=torch.float32))
    assert torch.equal(got, expected)
    assert torch.equal(N.randn_like(like, gen(3), frames_first=False), torch.randn(like.shape, generator=gen(3)))


def test_callback_sees_every_step_and_may_replace_x():
    seen = []

    def cb(i, t, x):
        seen.append((i, int(t)))
        return torch.zeros_like(x) if i == 3 else None

    ts = sched.leading_timesteps(5, 1000, 1)
    out = S.ddim(lambda x, t: torch.zeros_like(x), x_T(), AC, ts, callback=cb)
    assert seen == list(enumerate(ts.tolist()))
    assert torch.equal(out, torch.zeros_like(out))  # the replacement at step 3 carried to the end


def test_cfg_model_fn_batches_uncond_then_cond():
    calls = []

    def model(x2, t):
        calls.append(x2.shape[0])
        return torch.cat([torch.full_like(x2[:1], 1.0), torch.full_like(x2[1:], 3.0)])

    out = S.cfg_model_fn(model, 9.0)(torch.zeros(1, 2), torch.tensor(5))
    assert calls == [2] and torch.equal(out, torch.full((1, 2), 1.0 + 9.0 * 2.0))


# ----------------------------------------------------------------------------------------------
# c) convergence orders against the exact probability-flow ODE solution for Gaussian data

MU, SD, T_END = 0.5, 0.5, 39  # data N(MU, SD^2); integrate t = 999 -> 39 (abar 0.0047 -> 0.966)
AC64 = sched.make_alphas_cumprod(dtype=torch.float64)


def ideal_eps(x: torch.Tensor, t) -> torch.Tensor:
    """E[eps | x_t] for x0 ~ N(MU, SD^2 I): sigma (x - alpha MU) / (alpha^2 SD^2 + sigma^2)."""
    abar = float(AC64[int(t)])
    return (1 - abar) ** 0.5 * (x - abar**0.5 * MU) / (abar * SD**2 + 1 - abar)


def pf_ode_solution(x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """The probability-flow ODE keeps the standardised value (x_t - alpha_t MU) / std_t fixed."""
    a0, a1 = float(AC64[t0]), float(AC64[t1])
    z = (x - a0**0.5 * MU) / math.sqrt(a0 * SD**2 + 1 - a0)
    return a1**0.5 * MU + math.sqrt(a1 * SD**2 + 1 - a1) * z


def run_to(method: str, x: torch.Tensor, n: int) -> torch.Tensor:
    grid = torch.linspace(999, T_END, n + 1).round().long()
    ts = grid[:-1]
    if method == "ddim":
        return S.ddim(ideal_eps, x, AC64, ts, prev_timesteps=grid[1:])
    order = {"dpm1": 1, "dpm2": 2, "dpm3": 3, "dpm3-taylor": 3}[method]
    variant = "taylor" if method.endswith("taylor") else "diffusers"
    return S.dpm_solver_multistep(
        ideal_eps, x, AC64, ts, order=order, final_timestep=T_END, lower_order_final=False, third_order=variant
    )


def measured(method: str, ns: list[int]) -> tuple[list[float], list[float]]:
    x = torch.randn(2048, generator=gen(0), dtype=torch.float64)
    ref = pf_ode_solution(x, 999, T_END)
    errs = [max_diff(run_to(method, x.clone(), n), ref) for n in ns]
    return errs, [math.log2(errs[i] / errs[i + 1]) for i in range(len(ns) - 1)]


def test_ddim_is_first_order_and_equals_dpm_solver_1():
    errs, orders = measured("ddim", [24, 48, 96])
    print("DDIM errors", errs, "orders", orders)
    assert all(0.8 <= p <= 1.3 for p in orders), orders
    dpm1, _ = measured("dpm1", [24])
    assert abs(dpm1[0] - errs[0]) < 1e-5  # DPM-Solver-1 is DDIM (Lu et al. 2022, Prop. 4.1 / eq. 6)


def test_dpm_solver_2m_is_second_order():
    errs, orders = measured("dpm2", [48, 96, 192])
    print("DPM++2M errors", errs, "orders", orders)
    assert all(1.6 <= p <= 2.6 for p in orders), orders
    ddim, _ = measured("ddim", [48])
    assert errs[0] < ddim[0] / 10


def test_third_order_variants():
    """diffusers' 3M converges at order ~2 (its D2 is half the Taylor term it multiplies); the
    "taylor" variant is third order and far more accurate at the same step count."""
    errs, orders = measured("dpm3", [48, 96, 192])
    print("DPM++3M (diffusers) errors", errs, "orders", orders)
    assert 1.6 <= orders[-1] <= 2.6, orders
    t_errs, t_orders = measured("dpm3-taylor", [12, 24, 48])
    print("DPM++3M (taylor) errors", t_errs, "orders", t_orders)
    assert 2.5 <= t_orders[0] <= 4.5, t_orders  # (24 -> 48 already reaches the float32 floor ~3e-5)
    assert t_errs[2] < errs[0] / 10


def _exact_update(lams, alphas, coeffs, sde):
    """alpha_t int w(u) p(u) du for x0(lambda) = polynomial p in u = lambda - lambda_s0 (Simpson)."""
    h = lams[-1] - lams[-2]
    u = torch.linspace(0, h, 20001, dtype=torch.float64)
    p = sum(c * u**k for k, c in enumerate(coeffs))
    w = 2 * torch.exp(-2 * (h - u)) if sde else torch.exp(-(h - u))
    f = w * p
    integral = (h / 20000 / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return alphas[-1] * float(integral)


@pytest.mark.parametrize("sde", [False, True])
def test_updates_are_exact_for_polynomial_data_predictions(sde):
    """Order k (heun form for k = 2, "taylor" form for k = 3) integrates x0(lambda) of degree k-1
    exactly; x = 0 and zero noise isolate the integral term."""
    lams = [-1.0, -0.7, -0.45, -0.2]
    alphas = [1 / math.sqrt(1 + math.exp(-2 * lam)) for lam in lams]
    sigmas = [a * math.exp(-lam) for a, lam in zip(alphas, lams)]
    for k, coeffs in [(1, [0.7]), (2, [0.7, 0.3]), (3, [0.7, 0.3, -0.4])]:
        lk, ak, sk = lams[-(k + 1):], alphas[-(k + 1):], sigmas[-(k + 1):]
        x0s = [
            torch.tensor([sum(c * (lam - lk[-2]) ** j for j, c in enumerate(coeffs))], dtype=torch.float64)
            for lam in lk[:-1]
        ]
        got = S.dpm_solver_update(
            torch.zeros(1), x0s, ak, sk, algorithm="sde-dpmsolver++" if sde else "dpmsolver++",
            solver_type="heun", noise=torch.zeros(1), third_order="taylor",
        ).item()
        assert abs(got - _exact_update(lk, ak, coeffs, sde)) < 1e-6, k


# ----------------------------------------------------------------------------------------------
# d) the original ModelScope DDIM loop


@pytest.mark.parametrize("steps,eta,guide_scale", [(50, 0.0, None), (30, 0.0, 9.0), (20, 0.5, None)])
def test_original_modelscope_ddim_loop_parity(steps, eta, guide_scale):
    ref_mod = modelscope_reference("diffusion")
    betas = ref_mod.beta_schedule("linear_sd", 1000, init_beta=0.00085, last_beta=0.012)
    diffusion = ref_mod.GaussianDiffusion(betas, mean_type="eps", var_type="fixed_small", loss_type="mse")
    assert torch.equal(sched.make_betas(dtype=torch.float64), betas)

    def original_model(x, t, y=1.0):  # the original calls model(x, t, **kwargs) with t of shape (b,)
        return fake_model(x, t) * (0.8 + 0.2 * y)

    # eta > 0 draws from the global RNG each step (the original draws even at eta 0); a 4-D batch
    # keeps the original's draw layout.
    x = x_T()[:, :, 0] if eta > 0 else x_T()
    torch.manual_seed(123)
    kwargs = [{"y": 1.0}, {"y": 0.0}] if guide_scale else {}
    expected = diffusion.ddim_sample_loop(x.clone(), original_model, kwargs, guide_scale=guide_scale,
                                          ddim_timesteps=steps, eta=eta)

    def batched(x2, t):  # uncond first, then cond, in one "forward"
        n = x2.shape[0] // 2
        return torch.cat([original_model(x2[:n], t, 0.0), original_model(x2[n:], t, 1.0)])

    model_fn = S.cfg_model_fn(batched, guide_scale) if guide_scale else original_model
    torch.manual_seed(123)
    got = S.ddim(
        model_fn,
        x.clone(),
        sched.alphas_cumprod(sched.make_betas(dtype=torch.float64)),
        sched.modelscope_timesteps(steps),
        prev_timesteps=sched.modelscope_prev_timesteps(steps),
        eta=eta,
    )
    assert max_diff(got, expected) <= 1e-5


# ----------------------------------------------------------------------------------------------
# e) zero terminal SNR, argument errors


def test_zero_terminal_snr_rescale_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = sched.make_betas()
    ours = sched.rescale_zero_terminal_snr(betas)
    assert torch.equal(ours, rescale_zero_terminal_snr(betas.clone()))
    ac = sched.make_alphas_cumprod(zero_terminal_snr=True)
    assert ac[-1] == 0 and torch.allclose(ac[0], AC[0])
    assert torch.all(ac[1:] < ac[:-1])


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: sched.leading_timesteps(0), "steps"),
        (lambda: sched.linspace_timesteps(1001), "steps"),
        (lambda: sched.make_timesteps("karras", 10), "spacing"),
        (lambda: sched.make_betas("cosine"), "kind"),
        (lambda: S.ddim(fake_model, x_T(), AC, [981, 961], prediction_type="x0"), "prediction_type"),
        (lambda: S.ddim(fake_model, x_T(), AC, [1000]), "timesteps"),
        (lambda: S.dpm_solver_multistep(fake_model, x_T(), AC, [999], order=4), "order"),
        (lambda: S.dpm_solver_multistep(fake_model, x_T(), AC, [999], algorithm="dpmsolver"), "algorithm"),
        (lambda: DDIMScheduler(prediction_type="noise"), "prediction_type"),
        (lambda: DDIMScheduler(timestep_spacing="karras"), "timestep_spacing"),
        (lambda: DDIMScheduler(beta_schedule="cosine"), "beta_schedule"),
        (lambda: DDIMScheduler(thresholding=True), "thresholding"),
        (lambda: DDIMScheduler().set_timesteps(0), "num_inference_steps"),
        (lambda: DDIMScheduler(steps_offset=1).set_timesteps(1000), "steps_offset"),
        (lambda: DDIMScheduler(timestep_spacing="trailing").set_timesteps(998), "num_inference_steps"),
        (
            lambda: DPMSolverMultistepScheduler(steps_offset=1, timestep_spacing="leading").set_timesteps(999),
            "steps_offset",
        ),
        (lambda: DDIMScheduler().sample(fake_model, x_T()), "set_timesteps"),
        (lambda: DPMSolverMultistepScheduler(use_exponential_sigmas=True), "use_exponential_sigmas"),
        (lambda: DPMSolverMultistepScheduler(solver_order=4), "solver_order"),
        (lambda: scheduler_from_config({"_class_name": "PNDMScheduler"}), "PNDMScheduler"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_unknown_keys_are_type_errors():
    with pytest.raises(TypeError, match="beta_startt"):
        DDIMScheduler(beta_startt=0.1)
    with pytest.raises(TypeError, match="solver_order"):
        DDIMScheduler.from_config(released_scheduler_config(), solver_order=2)
