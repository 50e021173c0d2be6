"""diffusers' DDIMScheduler as a thin adapter over `diffusion.samplers.ddim`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..diffusion import samplers
from ..diffusion.noise import Generator, randn_like
from ..diffusion.schedule import (
    add_noise,
    make_timesteps,
    stride_prev_timesteps,
    velocity,
)
from .base import (
    _SCHEDULE_DEFAULTS,
    SchedulerOutput,
    _require,
    _require_off,
    _Scheduler,
)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021) with diffusers' DDIMScheduler config and numerics.

    Steps go from t to t - T // num_inference_steps (diffusers' rule for every spacing); a negative
    target means `final_alpha_cumprod` (1 with set_alpha_to_one, else alphas_cumprod[0]).
    """

    _defaults: ClassVar[dict[str, Any]] = {
        **_SCHEDULE_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    SPACINGS: ClassVar[tuple[str, ...]] = ("leading", "linspace", "trailing")

    def _setup(self) -> None:
        cfg = self._config
        _require(cfg, "prediction_type", samplers.PREDICTION_TYPES)
        _require(cfg, "timestep_spacing", self.SPACINGS)
        _require_off(cfg, "thresholding")
        self._set_discrete_schedule()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._check_steps(num_inference_steps)
        cfg = self._config
        ts = make_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                            steps_offset=cfg.steps_offset)
        self._check_range(ts, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = ts.to(device)

    def _stride(self) -> int:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        return self._config.num_train_timesteps // self.num_inference_steps

    def landing_timesteps(self, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """t - T // num_inference_steps for every t (-1 or below: clean): where diffusers' DDIM steps go, which
        for "linspace" and "trailing" is not the next timestep of the schedule."""
        ts = torch.as_tensor(self.timesteps if timesteps is None else timesteps).cpu()
        return stride_prev_timesteps(ts, self._stride()).clamp(min=-1)

    def _clip(self) -> float | None:
        return float(self._config.clip_sample_range) if self._config.clip_sample else None

    def _sample(self, model_fn, x, ts, generator, callback, eta) -> torch.Tensor:
        """`samplers.ddim`, stepping to t - T // num_inference_steps as diffusers does."""
        stride = self._stride()
        return samplers.ddim(
            model_fn,
            x,
            self.alphas_cumprod,
            ts,
            prev_timesteps=stride_prev_timesteps(ts, stride),
            eta=eta,
            generator=generator,
            callback=callback,
            final_alpha_cumprod=float(self.final_alpha_cumprod),
            prediction_type=self._config.prediction_type,
            clip_sample=self._clip(),
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One DDIM step (diffusers API); prefer `sample`."""
        t = int(timestep)
        t_prev = t - self._stride()
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either `generator` or `variance_noise`, not both")
            noise = variance_noise
            if noise is None:
                noise = randn_like(model_output, generator, frames_first=False)
        prev, x0 = samplers.ddim_step(
            model_output,
            sample,
            float(self.alphas_cumprod[t]),
            float(abar_prev),
            eta=eta,
            noise=noise,
            prediction_type=self._config.prediction_type,
            clip_sample=self._clip(),
        )
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(original_samples, noise, self.alphas_cumprod, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return velocity(sample, noise, self.alphas_cumprod, timesteps)
