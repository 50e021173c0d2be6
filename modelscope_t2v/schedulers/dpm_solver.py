"""diffusers' DPMSolverMultistepScheduler as a thin adapter over `diffusion.samplers.dpm_solver_multistep`."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from ..diffusion import samplers
from ..diffusion.noise import Generator, randn_like
from ..diffusion.schedule import alphas_cumprod as cumprod_alphas
from ..diffusion.schedule import karras_sigmas, make_timesteps, sigma_to_t, vp_sigmas
from .base import (
    _SCHEDULE_DEFAULTS,
    SchedulerConfig,
    SchedulerOutput,
    _betas,
    _require,
    _require_off,
    _Scheduler,
    _StepIndex,
)


class DPMSolverMultistepScheduler(_StepIndex, _Scheduler):
    """Multistep DPM-Solver++ (Lu et al. 2022) with diffusers' DPMSolverMultistepScheduler config
    and numerics: algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 1-3, integer
    timestep spacings or Karras sigmas (`use_karras_sigmas=True`: "DPM++ 2M Karras"; the spacing is then
    unused, the timesteps are the sigmas' rounded). Not supported (ValueError naming the key): exponential / beta /
    lu-lambda / flow sigmas, thresholding, learned variance, lambda_min_clipped, dynamic shifting,
    and the deprecated noise-prediction algorithms "dpmsolver" / "sde-dpmsolver".

    solver_order=3 reproduces diffusers' third-order update, which converges at order ~2 (and, for
    "sde-dpmsolver++", carries diffusers 0.42's sign slip); `samplers.dpm_solver_multistep(...,
    third_order="taylor")` is the truly third-order update (see `samplers.dpm_solver_update`).
    """

    _defaults: ClassVar[dict[str, Any]] = {
        **_SCHEDULE_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    SPACINGS: ClassVar[tuple[str, ...]] = ("linspace", "leading", "trailing")
    unknown_timestep_is_last: ClassVar[bool] = True  # diffusers' rule

    def _setup(self) -> None:
        cfg = self._config
        # diffusers' own aliases, so configs of DEIS / UniPC convert as they do there.
        aliases = {}
        if cfg.algorithm_type == "deis":
            aliases["algorithm_type"] = "dpmsolver++"
        if cfg.solver_type in ("logrho", "bh1", "bh2"):
            aliases["solver_type"] = "midpoint"
        if aliases:
            self._config = cfg = SchedulerConfig({**cfg, **aliases})
        _require(cfg, "prediction_type", samplers.PREDICTION_TYPES)
        _require(cfg, "algorithm_type", samplers.DPM_ALGORITHMS)
        _require(cfg, "solver_type", samplers.DPM_SOLVER_TYPES)
        _require(cfg, "solver_order", (1, 2, 3))
        _require(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        _require(cfg, "timestep_spacing", self.SPACINGS)
        _require_off(
            cfg,
            "thresholding",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
            "variance_type",
        )
        if cfg.lambda_min_clipped != -math.inf:
            raise ValueError(f"`lambda_min_clipped={cfg.lambda_min_clipped}` is not supported; leave it at -inf")
        self.betas = _betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = cumprod_alphas(self.betas)
        if cfg.rescale_betas_zero_snr:
            # abar = 0 would make sigma_vp infinite; diffusers nudges it to float32's 2^-24.
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = self.alphas_cumprod.sqrt()
        self.sigma_t = (1 - self.alphas_cumprod).sqrt()
        self.lambda_t = self.alpha_t.log() - self.sigma_t.log()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.num_inference_steps: int | None = None
        self._reset_state()
        self._begin_index: int | None = None

    def _reset_state(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self._config.solver_order
        self.lower_order_nums = 0
        self._step_index: int | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: samplers.Timesteps | None = None,
    ) -> None:
        """Timesteps for `num_inference_steps` steps with the configured spacing ("linspace" and
        "leading" lay out steps + 1 points and drop the final t = 0), or custom `timesteps`."""
        cfg = self._config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError("custom `timesteps` with use_karras_sigmas=True: the Karras sigmas set the timesteps")
        karras = None
        if timesteps is not None:
            ts = samplers._as_timesteps(timesteps, cfg.num_train_timesteps)
        elif cfg.use_karras_sigmas:  # Karras et al. 2022 between the training sigmas' ends; t = the rounded sigma_to_t
            self._check_steps(num_inference_steps)
            full = vp_sigmas(self.alphas_cumprod)
            karras = karras_sigmas(full[0], full[-1], num_inference_steps)
            t = sigma_to_t(karras, np.log(full))
            # diffusers rounds, except for cosine betas, where the int64 cast truncates
            ts = torch.from_numpy((t if cfg.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64))
        else:
            self._check_steps(num_inference_steps)
            ts = make_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                                steps_offset=cfg.steps_offset, drop_final=True)
            self._check_range(ts, num_inference_steps)
        sigma_vp = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        last = torch.zeros(1) if cfg.final_sigmas_type == "zero" else sigma_vp[:1]
        at = sigma_vp[ts] if karras is None else torch.from_numpy(karras)
        self.sigmas = torch.cat([at.to(torch.float32), last.to(torch.float32)])
        self.timesteps = ts.to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self._reset_state()
        self._begin_index = None

    def _lower_order_final(self) -> bool:
        # diffusers' rule, on the length of the whole schedule (also for a truncated run).
        return bool(self._config.lower_order_final and len(self.timesteps) < 15)

    def _sample(self, model_fn, x, ts, generator, callback, eta) -> torch.Tensor:
        """`samplers.dpm_solver_multistep`; `eta` is ignored (as diffusers ignores it for this scheduler)."""
        cfg = self._config
        return samplers.dpm_solver_multistep(
            model_fn, x, self.alphas_cumprod, ts,
            sigmas=self.sigmas[len(self.timesteps) - len(ts):] if cfg.use_karras_sigmas else None,
            order=cfg.solver_order,
            algorithm=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            lower_order_final=self._lower_order_final(),
            euler_at_final=cfg.euler_at_final,
            final_timestep=None if cfg.final_sigmas_type == "zero" else 0,
            generator=generator,
            callback=callback,
            prediction_type=cfg.prediction_type,
        )

    def _point(self, index: int) -> tuple[float, float]:
        s = self.sigmas[index].to(torch.float32)
        alpha = 1 / (s**2 + 1) ** 0.5
        return float(alpha), float(s * alpha)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One multistep DPM-Solver++ step (diffusers API, stateful); prefer `sample`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        cfg = self._config
        i, n = self._current_step_index(timestep), len(self.timesteps)
        alpha_s, sigma_s = self._point(i)
        x0 = samplers.to_x0(model_output, sample, alpha_s, sigma_s, cfg.prediction_type)
        self.model_outputs = self.model_outputs[1:] + [x0]
        k = samplers.dpm_solver_step_order(
            i, n, min(self.lower_order_nums + 1, cfg.solver_order), lower_order_final=self._lower_order_final(),
            first_order_final=cfg.euler_at_final or cfg.final_sigmas_type == "zero")
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            if variance_noise is not None:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            else:
                noise = randn_like(model_output, generator, torch.float32, frames_first=False)
        points = [self._point(j) for j in range(i + 1 - k, i + 2)]
        prev = samplers.dpm_solver_update(
            sample,
            self.model_outputs[-k:],
            [p[0] for p in points],
            [p[1] for p in points],
            algorithm=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            noise=noise,
        ).to(model_output.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process at `timesteps`, through this schedule's sigmas as diffusers computes
        it (indices from the timesteps, or the begin/step index once set)."""
        x0 = original_samples
        sigma = self._sigmas_at(timesteps, x0)
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t * x0 + sigma * alpha_t * noise
