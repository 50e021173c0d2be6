"""diffusers' LCMScheduler as a thin adapter over `diffusion.consistency` (for T2V-Turbo-MS and other
consistency-distilled ModelScope models)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..diffusion import consistency, samplers
from ..diffusion.noise import Generator
from ..diffusion.schedule import add_noise, velocity
from .base import _require, _require_off, _Scheduler, _StepIndex


@dataclass
class LCMSchedulerOutput:
    """What `LCMScheduler.step` returns (diffusers' LCMSchedulerOutput); `out[0]` also works."""

    prev_sample: torch.Tensor  # the latents for the next step (the denoised sample at the last step)
    denoised: torch.Tensor | None = None  # the consistency function's output f(x_t, t) at this step

    def __getitem__(self, index: int) -> torch.Tensor:
        items = tuple(v for v in (self.prev_sample, self.denoised) if v is not None)
        return items[index]


class LCMScheduler(_StepIndex, _Scheduler):
    """Multistep consistency sampling (LCM, Luo et al. 2023) with diffusers' LCMScheduler config and
    numerics, over `consistency.lcm`.

    Config keys and defaults are diffusers 0.42's, plus one of ours:
      lcm_timestep_rule  "linspace" (default): diffusers' rule, `consistency.lcm_timesteps`;
                         "stride": T2V-Turbo's scheduler's rule, `consistency.t2v_turbo_timesteps`
                         (4 steps: 999, 759, 519, 279), what T2V-Turbo-MS was evaluated with.
                         diffusers' LCMScheduler ignores the key (and so samples "linspace").
    As in diffusers, `timestep_spacing` and `steps_offset` are kept but unused (the timesteps come from
    the distillation grid of `original_inference_steps`), and `set_alpha_to_one` has no effect: the
    last step returns the denoised sample. `thresholding` is not supported (ValueError).
    """

    _defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,  # the distillation grid: T // 50 apart (LCM, T2V-Turbo)
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,  # s = 10 t in the boundary scalings c_skip, c_out
        "rescale_betas_zero_snr": False,
        "lcm_timestep_rule": "linspace",  # ours, see the class doc
    }
    TIMESTEP_RULES: ClassVar[tuple[str, ...]] = ("linspace", "stride")

    def _setup(self) -> None:
        cfg = self._config
        _require(cfg, "prediction_type", samplers.PREDICTION_TYPES)
        _require(cfg, "lcm_timestep_rule", self.TIMESTEP_RULES)
        _require_off(cfg, "thresholding")
        self._check_original_steps(cfg.original_inference_steps)
        consistency._check_positive(cfg.timestep_scaling, "timestep_scaling", allow_zero=True)
        if cfg.clip_sample:
            consistency._check_positive(cfg.clip_sample_range, "clip_sample_range")
        self._set_discrete_schedule()
        self.custom_timesteps = False
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _check_original_steps(self, value: Any) -> int:
        n_train = self._config.num_train_timesteps
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n_train:
            raise ValueError(f"`original_inference_steps` must be an int in [1, num_train_timesteps={n_train}], "
                             f"got {value!r}")
        return value

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: samplers.Timesteps | None = None,
        strength: float = 1.0,
    ) -> None:
        """`num_inference_steps` timesteps of the distillation grid by `lcm_timestep_rule`, or custom
        `timesteps` (descending, in [0, T-1]; a warning for any off the grid). `strength` < 1 takes the
        steps from the grid's low-noise part ("linspace") or, for custom timesteps, keeps their last
        int(n * strength), as diffusers does."""
        cfg = self._config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`")
        if original_inference_steps is None:
            original_inference_steps = cfg.original_inference_steps
        original = self._check_original_steps(original_inference_steps)
        consistency._check_fraction(strength, "strength")
        n_train = cfg.num_train_timesteps
        if timesteps is not None:
            ts = samplers._as_timesteps(timesteps, n_train)
            if not bool((ts[1:] < ts[:-1]).all()):
                raise ValueError(f"`timesteps` must be strictly descending, got {ts.tolist()}")
            grid = set(consistency._origin_grid(n_train, original, original).tolist())
            off = [t for t in ts.tolist() if t not in grid]
            if off:
                warnings.warn(f"timesteps {off} are not on the distillation grid of original_inference_steps="
                              f"{original}; a consistency model may not have been trained there", stacklevel=2)
            n = len(ts)
            kept = min(int(n * strength), n)
            ts = ts[n - kept:]  # diffusers' truncation; num_inference_steps stays the full count
            self.custom_timesteps = True
        else:
            self._check_steps(num_inference_steps)
            n = num_inference_steps
            if cfg.lcm_timestep_rule == "stride":
                if strength != 1:
                    raise ValueError(f"`strength`={strength} needs lcm_timestep_rule='linspace'; the 'stride' rule "
                                     "(T2V-Turbo's) has no partial schedule")
                if n > original:
                    raise ValueError(f"`num_inference_steps` must be <= original_inference_steps={original}, got {n}")
                ts = consistency.t2v_turbo_timesteps(n, n_train, original)
            else:
                limit = int(original * strength)
                if n > limit:
                    raise ValueError(f"`num_inference_steps` must be <= int(original_inference_steps * strength) = "
                                     f"{limit} (original_inference_steps={original}, strength={strength}), got {n}")
                ts = consistency.lcm_timesteps(n, n_train, original, strength)
            self.custom_timesteps = False
        self.num_inference_steps = n
        self.timesteps = ts.to(device=device, dtype=torch.int64)
        self._step_index = None
        self._begin_index = None

    def _clip(self) -> float | None:
        return float(self._config.clip_sample_range) if self._config.clip_sample else None

    def _sample(self, model_fn, x, ts, generator, callback, eta) -> torch.Tensor:
        """`consistency.lcm`; returns the last step's denoised sample. `eta` is ignored (as diffusers'
        LCMScheduler takes none)."""
        cfg = self._config
        return consistency.lcm(model_fn, x, self.alphas_cumprod, ts, prediction_type=cfg.prediction_type,
                               timestep_scaling=cfg.timestep_scaling, clip_sample=self._clip(), generator=generator,
                               callback=callback)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None, return_dict: bool = True):
        """One consistency step (diffusers API, stateful: it steps to the schedule's next timestep);
        prefer `sample`. Returns (prev_sample, denoised)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        cfg = self._config
        i, t = self._current_step_index(timestep), int(timestep)
        # diffusers' rule: the last step is the step_index num_inference_steps - 1 (past the end of a
        # truncated custom schedule, the step re-noises to its own timestep).
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        last = i == self.num_inference_steps - 1
        prev, denoised = consistency.lcm_step(
            model_output,
            sample,
            t,
            self.alphas_cumprod[t],
            None if last else self.alphas_cumprod[t_next],
            generator=generator,
            prediction_type=cfg.prediction_type,
            timestep_scaling=cfg.timestep_scaling,
            clip_sample=self._clip(),
        )
        self._step_index += 1
        return LCMSchedulerOutput(prev, denoised) if return_dict else (prev, denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(original_samples, noise, self.alphas_cumprod, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return velocity(sample, noise, self.alphas_cumprod, timesteps)
