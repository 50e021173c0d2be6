"""diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler as thin adapters over
`diffusion.sigma_samplers.euler`.

The adapters keep latents in VP form (x_0 alpha + eps sigma, as every scheduler here; see the sampler's module):
diffusers' Euler latents are these times sqrt(1 + sigma^2), so `init_noise_sigma` is diffusers' divided by
sqrt(1 + sigma_0^2), `scale_model_input` is the identity, and the clean sample at the end is the same.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..diffusion import sigma_samplers
from ..diffusion.noise import Generator, randn_like
from ..diffusion.schedule import fractional_timesteps, karras_sigmas, sigma_to_t, vp_sigmas
from ..diffusion.schedule import alphas_cumprod as cumprod_alphas
from .base import _SCHEDULE_DEFAULTS, SchedulerConfig, SchedulerOutput, _betas, _require, _require_off, _Scheduler, _StepIndex


class EulerDiscreteScheduler(_StepIndex, _Scheduler):
    """Euler (Karras et al. 2022) with diffusers' EulerDiscreteScheduler config and numerics: linear
    interpolation of the training sigmas at the (fractional) timesteps, or Karras sigmas
    (`use_karras_sigmas`, the timesteps then fractional too); final sigma 0 or sigma_min. Not supported
    (ValueError naming the key): exponential / beta sigmas, log_linear interpolation, continuous timesteps."""

    _defaults: ClassVar[dict[str, Any]] = {
        **_SCHEDULE_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    ancestral: ClassVar[bool] = False

    @property
    def _euler(self):
        """The config with the plain Euler keys (the ancestral scheduler has fewer; it fixes the rest)."""
        return self._config

    def _setup(self) -> None:
        cfg = self._euler
        _require(cfg, "prediction_type", ("epsilon", "v_prediction"))
        _require(cfg, "timestep_spacing", ("linspace", "leading", "trailing"))
        _require(cfg, "interpolation_type", ("linear",))
        _require(cfg, "timestep_type", ("discrete",))
        _require(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        _require_off(cfg, "use_exponential_sigmas", "use_beta_sigmas")
        self.betas = _betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = cumprod_alphas(self.betas)
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # diffusers' nudge: sigma_vp finite at T - 1
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.sigmas = torch.cat([torch.from_numpy(vp_sigmas(self.alphas_cumprod)[::-1].copy()).float(), torch.zeros(1)])
        self._step_index = self._begin_index = None

    def _karras(self, sigmas: np.ndarray, steps: int) -> np.ndarray:
        cfg = self._euler
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
        return karras_sigmas(lo, hi, steps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._check_steps(num_inference_steps)
        cfg = self._euler
        ts = fractional_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps, cfg.steps_offset)
        self._check_range(torch.from_numpy(ts), num_inference_steps)
        full = vp_sigmas(self.alphas_cumprod)
        sigmas = np.interp(ts, np.arange(len(full)), full)
        if cfg.use_karras_sigmas:
            sigmas = self._karras(sigmas, num_inference_steps)
            ts = sigma_to_t(sigmas, np.log(full))
        last = full[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index = self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """diffusers' initial noise scale (sigma_max for "linspace" / "trailing", else sqrt(sigma_max^2 + 1)) in
        VP form: over sqrt(1 + sigma_0^2). Slightly below 1 where diffusers starts at sigma_max, as it does."""
        top = float(self.sigmas.max())
        scale = top if self._config.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        return scale / (float(self.sigmas[0]) ** 2 + 1) ** 0.5

    def _offset(self, ts: torch.Tensor) -> int:
        return len(self.timesteps) - len(ts)  # a truncated run (video-to-video) is a suffix of the schedule

    def _sample(self, model_fn, x, ts, generator, callback, eta) -> torch.Tensor:
        """`sigma_samplers.euler` over the sigmas of `ts`; `eta` is ignored (diffusers' Euler takes none)."""
        start = self._offset(ts)
        return sigma_samplers.euler(model_fn, x, self.sigmas[start:], ts, ancestral=self.ancestral, generator=generator,
                                    callback=callback, prediction_type=self._config.prediction_type)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: Generator = None,
             return_dict: bool = True, **unused):
        """One step (diffusers API, stateful, on VP latents); prefer `sample`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        i = self._current_step_index(timestep)
        noise = randn_like(model_output, generator, model_output.dtype, frames_first=False) if self.ancestral else None
        prev = sigma_samplers.euler_step(model_output, sample, self.sigmas[i], self.sigmas[i + 1], noise=noise,
                                         prediction_type=self._config.prediction_type)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The VP forward process at each timestep's sigma (diffusers' x_0 + sigma noise, over sqrt(1 + sigma^2))."""
        s = self._sigmas_at(timesteps, original_samples)
        return (original_samples + noise * s) / (s**2 + 1) ** 0.5


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta 1) with diffusers'
    EulerAncestralDiscreteScheduler config and numerics: fresh noise every step, drawn as diffusers draws it."""

    _defaults: ClassVar[dict[str, Any]] = {
        **_SCHEDULE_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    ancestral: ClassVar[bool] = True

    _FIXED: ClassVar[dict[str, Any]] = {  # the plain Euler's keys, at the values diffusers' ancestral one hard-codes
        "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None, "timestep_type": "discrete",
        "final_sigmas_type": "zero"}

    @property
    def _euler(self):
        return SchedulerConfig({**self._config, **self._FIXED})
