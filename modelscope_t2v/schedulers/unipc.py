"""diffusers' UniPCMultistepScheduler as a thin adapter over `diffusion.sigma_samplers.unipc`."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..diffusion import samplers, sigma_samplers
from ..diffusion.schedule import alphas_cumprod as cumprod_alphas
from ..diffusion.schedule import karras_sigmas, make_timesteps, sigma_to_t, vp_sigmas
from .base import _SCHEDULE_DEFAULTS, SchedulerConfig, SchedulerOutput, _betas, _require, _require_off, _Scheduler, _StepIndex


class UniPCMultistepScheduler(_StepIndex, _Scheduler):
    """UniPC (Zhao et al. 2023) with diffusers' UniPCMultistepScheduler config and numerics: data prediction
    (predict_x0), solver_type "bh2" (default) or "bh1", solver_order 1-3, the corrector after every step but those
    in `disable_corrector`, integer spacings (as DPM-Solver's) or Karras sigmas. Not supported (ValueError naming
    the key): predict_x0=False, solver_p, thresholding, exponential / beta / flow sigmas, dynamic shifting."""

    _defaults: ClassVar[dict[str, Any]] = {
        **_SCHEDULE_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    unknown_timestep_is_last: ClassVar[bool] = True  # diffusers' rule

    def _setup(self) -> None:
        cfg = self._config
        if cfg.solver_type in ("midpoint", "heun", "logrho"):  # diffusers' alias: DPM-Solver configs convert
            self._config = cfg = SchedulerConfig({**cfg, "solver_type": "bh2"})
        _require(cfg, "prediction_type", samplers.PREDICTION_TYPES)
        _require(cfg, "solver_type", sigma_samplers.UNIPC_SOLVER_TYPES)
        _require(cfg, "solver_order", (1, 2, 3))
        _require(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        _require(cfg, "timestep_spacing", ("linspace", "leading", "trailing"))
        _require(cfg, "predict_x0", (True,))
        if cfg.solver_order > 1 and not cfg.lower_order_final and cfg.final_sigmas_type == "zero":
            raise ValueError("`lower_order_final=False` with `final_sigmas_type='zero'`: a last step of order > 1 "
                             "divides by a zero step to sigma 0 (NaN, in diffusers too); keep lower_order_final=True "
                             "or end at 'sigma_min'")
        _require_off(cfg, "thresholding", "solver_p", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                     "use_dynamic_shifting", "shift_terminal")
        self.betas = _betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = cumprod_alphas(self.betas)
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # diffusers' nudge: sigma_vp finite at T - 1
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas = torch.from_numpy(vp_sigmas(self.alphas_cumprod)).float()
        self.num_inference_steps: int | None = None
        self._run: sigma_samplers.UniPC | None = None
        self._step_index = self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._check_steps(num_inference_steps)
        cfg = self._config
        full = vp_sigmas(self.alphas_cumprod)
        if cfg.use_karras_sigmas:  # between the training sigmas' ends (configured sigma_min / sigma_max win)
            lo = cfg.sigma_min if cfg.sigma_min is not None else float(full[0])
            hi = cfg.sigma_max if cfg.sigma_max is not None else float(full[-1])
            sigmas = karras_sigmas(lo, hi, num_inference_steps)
            ts = sigma_to_t(sigmas, np.log(full)).round().astype(np.int64)
            last = sigmas[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
        else:
            ts = make_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                                steps_offset=cfg.steps_offset, drop_final=True).numpy()
            self._check_range(torch.from_numpy(ts), num_inference_steps)
            sigmas = np.interp(ts, np.arange(len(full)), full)
            last = full[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.int64)).to(device)
        self.num_inference_steps = len(ts)
        self._run = None
        self._step_index = self._begin_index = None

    def _options(self) -> dict:
        cfg = self._config
        return dict(order=cfg.solver_order, solver_type=cfg.solver_type, lower_order_final=cfg.lower_order_final,
                    disable_corrector=tuple(cfg.disable_corrector), prediction_type=cfg.prediction_type)

    def _sample(self, model_fn, x, ts, generator, callback, eta) -> torch.Tensor:
        """`sigma_samplers.unipc` over the sigmas of `ts` (a suffix of the schedule for video-to-video)."""
        start = len(self.timesteps) - len(ts)
        options = self._options()  # disable_corrector holds steps of the whole schedule, as diffusers counts them
        options["disable_corrector"] = tuple(d - start for d in options["disable_corrector"])
        return sigma_samplers.unipc(model_fn, x, self.sigmas[start:], ts, callback=callback, **options)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **unused):
        """One UniPC step (diffusers API, stateful: the corrector uses the previous step's sample); prefer `sample`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        i = self._current_step_index(timestep)
        if self._run is None:
            self._run = sigma_samplers.UniPC(self.sigmas, **self._options())
        prev = self._run.step(i, model_output, sample)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process at each timestep's sigma of this schedule, as diffusers computes it."""
        s = self._sigmas_at(timesteps, original_samples)
        alpha = 1 / (s**2 + 1) ** 0.5
        return alpha * original_samples + s * alpha * noise
