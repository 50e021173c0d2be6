"""diffusers-compatible scheduler objects: thin adapters over `diffusion/schedule.py` and `diffusion/samplers.py`.

Why: checkpoints ship a `scheduler/scheduler_config.json` in diffusers' format and users write
`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`. These classes read and write that
format, convert between each other exactly as diffusers does, and offer diffusers' stateful
`set_timesteps` / `step` API for code written against it. The pipelines do not step: they call
`scheduler.sample(model_fn, x, timesteps, ...)`, which runs the pure sampler once.

Config semantics follow diffusers' `ConfigMixin`: `.config` is a frozen dict readable as items and
attributes; parameters that were not given explicitly are listed under `_use_default_values` and
are *not* carried over by `OtherScheduler.from_config(config)` (so the released DDIM config, which
has no `timestep_spacing`, gives DPM-Solver its own default "linspace"); keys a class does not take
(`clip_sample` for DPM-Solver, `_class_name`, ...) are ignored by it but kept in its config so a
round trip restores them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Optional, Union

import torch

from .diffusion import samplers
from .diffusion.noise import Generator, randn_like
from .diffusion.schedule import (
    BETA_SCHEDULES,
    add_noise,
    alphas_cumprod as cumprod_alphas,
    make_betas,
    make_timesteps,
    rescale_zero_terminal_snr,
    stride_prev_timesteps,
    velocity,
)
from .formats.files import read_json, write_json
from .formats.folders import MODELSCOPE_T2V_SCHEDULER_CONFIG, released_scheduler_config  # noqa: F401 (re-exported)

CONFIG_NAME = "scheduler_config.json"

class SchedulerConfig(dict):
    """A frozen dict whose keys also read as attributes (`config.num_train_timesteps`), like
    diffusers' FrozenDict; a dict subclass so diffusers' own `from_config` accepts it."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("a scheduler config is frozen; build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _frozen
    pop = popitem = clear = update = setdefault = _frozen

    def __reduce__(self):  # copy / deepcopy / pickle rebuild from a plain dict
        return (type(self), (dict(self),))


@dataclass
class SchedulerOutput:
    """What `step` returns (diffusers' DDIMSchedulerOutput / SchedulerOutput); `out[0]` also works."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None

    def __getitem__(self, index: int) -> torch.Tensor:
        items = tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)
        return items[index]


def _betas(cfg: SchedulerConfig) -> torch.Tensor:
    """The training betas a config describes (float32, as diffusers)."""
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule in BETA_SCHEDULES:
        betas = make_betas(cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    else:
        raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {cfg.beta_schedule!r}")
    return rescale_zero_terminal_snr(betas) if cfg.rescale_betas_zero_snr else betas


def _require(cfg: SchedulerConfig, key: str, allowed) -> None:
    if cfg[key] not in allowed:
        raise ValueError(f"`{key}` must be one of {tuple(allowed)}, got {cfg[key]!r}")


def _require_off(cfg: SchedulerConfig, *keys: str) -> None:
    for key in keys:
        if cfg[key]:
            raise ValueError(f"`{key}={cfg[key]!r}` is not supported by {cfg._class_name} here; leave it off")


# The training schedule's parameters and diffusers' defaults for them (every scheduler class takes these first).
_SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


class _Scheduler:
    """Config handling shared by the adapters (diffusers' ConfigMixin semantics, see module doc)."""

    # parameter name -> default, in diffusers' order; subclasses fill it.
    _defaults: ClassVar[dict[str, Any]] = {}
    order: ClassVar[int] = 1  # model calls per step, for diffusers-style progress bars
    init_noise_sigma: float = 1.0  # VP samplers start from unit-variance noise
    config_name: ClassVar[str] = CONFIG_NAME

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self._defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown config keys {unknown}; known: {list(self._defaults)}")
        values = {**self._defaults, **params}
        defaulted = sorted(set(self._defaults) - set(params))
        self._config = SchedulerConfig({**values, "_use_default_values": defaulted, "_class_name": type(self).__name__})
        if isinstance(values["num_train_timesteps"], bool) or not isinstance(values["num_train_timesteps"], int):
            raise TypeError(f"`num_train_timesteps` must be an int, got {values['num_train_timesteps']!r}")
        if values["num_train_timesteps"] < 1:
            raise ValueError(f"`num_train_timesteps` must be >= 1, got {values['num_train_timesteps']}")
        self._setup()

    def _setup(self) -> None:  # build the schedule; overridden
        raise NotImplementedError

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, **overrides: Any):
        """Build from any scheduler config mapping (diffusers' FrozenDict, a dict, another
        scheduler's `.config`). Keys this class does not take are ignored (and kept in the new
        config), keys listed in `_use_default_values` are dropped, `overrides` win."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(
                f"`config` must be a mapping, got {type(config).__name__}; use from_pretrained for a folder"
            )
        bad = sorted(set(overrides) - set(cls._defaults))
        if bad:
            raise TypeError(f"{cls.__name__}.from_config got unknown keys {bad}; known: {list(cls._defaults)}")
        defaulted = set(config.get("_use_default_values", None) or ())
        given = {k: v for k, v in config.items() if k not in defaulted and k != "_use_default_values"}
        params = {k: v for k, v in given.items() if k in cls._defaults}
        params.update(overrides)
        scheduler = cls(**params)
        hidden = {k: v for k, v in given.items() if k not in params and k != "_class_name"}
        if hidden:
            scheduler._config = SchedulerConfig({**scheduler._config, **hidden})
        return scheduler

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], subfolder: Optional[str] = "scheduler", **overrides: Any):
        """Read `folder/subfolder/scheduler_config.json` (or `folder/scheduler_config.json` when
        the subfolder is absent or None)."""
        config = load_scheduler_config(folder, subfolder)
        return cls.from_config(config, **overrides)

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write `folder/scheduler_config.json` (diffusers' format, with `_class_name`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self._config.items() if k != "_use_default_values"}
        data["_class_name"] = type(self).__name__
        path = folder / CONFIG_NAME
        write_json(path, data)
        return path

    def sample(
        self,
        model_fn: samplers.ModelFn,
        x: torch.Tensor,
        timesteps: Optional[samplers.Timesteps] = None,
        *,
        generator: Generator = None,
        callback: Optional[samplers.Callback] = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Run this scheduler's pure sampler once over `timesteps` (default: all of `self.timesteps`, as
        `set_timesteps` laid them out); `eta` is DDIM's. What the pipelines call instead of `step`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        ts = torch.as_tensor(self.timesteps if timesteps is None else timesteps).cpu()
        return self._sample(model_fn, x, ts, generator, callback, eta)

    def _sample(self, model_fn, x, ts, generator, callback, eta) -> torch.Tensor:  # overridden
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Identity: VP samplers feed x_t to the model unscaled (diffusers API compatibility)."""
        return sample

    def __len__(self) -> int:
        return self._config.num_train_timesteps

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._config.items() if not k.startswith("_")}
        return f"{type(self).__name__}({json.dumps(shown, default=str)})"

    def _check_range(self, ts: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        n_train = self._config.num_train_timesteps
        if int(ts.min()) < 0:  # diffusers' float arange for "trailing" overshoots, e.g. 998 of 1000
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} with spacing "
                f"{self._config.timestep_spacing!r} gives a negative timestep; choose another count"
            )
        if int(ts.max()) >= n_train:
            raise ValueError(
                f"`steps_offset`={self._config.steps_offset} with {len(ts)} steps gives timestep {int(ts.max())}, "
                f"past the last training timestep {n_train - 1}"
            )
        return ts

    def _check_steps(self, num_inference_steps: int) -> None:
        n_train = self._config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"`num_inference_steps` must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"`num_inference_steps` must be in [1, {n_train}], got {num_inference_steps}")


def load_scheduler_config(folder: Union[str, Path], subfolder: Optional[str] = "scheduler") -> dict[str, Any]:
    """The parsed `scheduler_config.json` of a model folder (see `_Scheduler.from_pretrained`)."""
    folder = Path(folder)
    candidates = ([folder / subfolder / CONFIG_NAME] if subfolder else []) + [folder / CONFIG_NAME]
    for path in candidates:
        if path.is_file():
            return read_json(path)
    raise FileNotFoundError(f"no {CONFIG_NAME} in {', '.join(str(p.parent) for p in candidates)}")


# ----------------------------------------------------------------------------------------------


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021) with diffusers' DDIMScheduler config and numerics.

    Steps go from t to t - T // num_inference_steps (diffusers' rule for every spacing); a negative
    target means `final_alpha_cumprod` (1 with set_alpha_to_one, else alphas_cumprod[0]).
    """

    _defaults = {
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
        self.betas = _betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = cumprod_alphas(self.betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
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

    def _clip(self) -> Optional[float]:
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
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: Generator = None,
        variance_noise: Optional[torch.Tensor] = None,
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


# ----------------------------------------------------------------------------------------------


class DPMSolverMultistepScheduler(_Scheduler):
    """Multistep DPM-Solver++ (Lu et al. 2022) with diffusers' DPMSolverMultistepScheduler config
    and numerics: algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 1-3, integer
    timestep spacings. Not supported (ValueError naming the key): karras / exponential / beta /
    lu-lambda / flow sigmas, thresholding, learned variance, lambda_min_clipped, dynamic shifting,
    and the deprecated noise-prediction algorithms "dpmsolver" / "sde-dpmsolver".

    solver_order=3 reproduces diffusers' third-order update, which converges at order ~2 (and, for
    "sde-dpmsolver++", carries diffusers 0.42's sign slip); `samplers.dpm_solver_multistep(...,
    third_order="taylor")` is the truly third-order update (see `samplers.dpm_solver_update`).
    """

    _defaults = {
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
            "use_karras_sigmas",
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
        self.num_inference_steps: Optional[int] = None
        self._reset_state()
        self._begin_index: Optional[int] = None

    def _reset_state(self) -> None:
        self.model_outputs: list[Optional[torch.Tensor]] = [None] * self._config.solver_order
        self.lower_order_nums = 0
        self._step_index: Optional[int] = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where a truncated schedule (video-to-video) starts, for `step` / `add_noise`."""
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[samplers.Timesteps] = None,
    ) -> None:
        """Timesteps for `num_inference_steps` steps with the configured spacing ("linspace" and
        "leading" lay out steps + 1 points and drop the final t = 0), or custom `timesteps`."""
        cfg = self._config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            ts = samplers._as_timesteps(timesteps, cfg.num_train_timesteps)
        else:
            self._check_steps(num_inference_steps)
            ts = make_timesteps(cfg.timestep_spacing, num_inference_steps, cfg.num_train_timesteps,
                                steps_offset=cfg.steps_offset, drop_final=True)
            self._check_range(ts, num_inference_steps)
        sigma_vp = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        last = torch.zeros(1) if cfg.final_sigmas_type == "zero" else sigma_vp[:1]
        self.sigmas = torch.cat([sigma_vp[ts], last]).to(torch.float32)
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
            model_fn,
            x,
            self.alphas_cumprod,
            ts,
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

    def _index_for_timestep(self, timestep, schedule: Optional[torch.Tensor] = None) -> int:
        # diffusers' rule: the second match if t occurs twice (image-to-image restarts), the last
        # index if it does not occur.
        schedule = self.timesteps if schedule is None else schedule
        hits = (schedule.cpu() == torch.as_tensor(timestep).cpu()).nonzero().flatten().tolist()
        if not hits:
            return len(schedule) - 1
        return hits[1] if len(hits) > 1 else hits[0]

    def _point(self, index: int) -> tuple[float, float]:
        s = self.sigmas[index].to(torch.float32)
        alpha = 1 / (s**2 + 1) ** 0.5
        return float(alpha), float(s * alpha)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Generator = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """One multistep DPM-Solver++ step (diffusers API, stateful); prefer `sample`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")
        cfg = self._config
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = begin if begin is not None else self._index_for_timestep(timestep)
        i, n = self._step_index, len(self.timesteps)
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
        sigmas = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            idx = [self._index_for_timestep(t) for t in timesteps]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)
        sigma = sigmas[idx].reshape(-1, *([1] * (x0.ndim - 1)))
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t * x0 + sigma * alpha_t * noise


# ----------------------------------------------------------------------------------------------

SCHEDULERS: Mapping[str, type] = MappingProxyType(
    {"DDIMScheduler": DDIMScheduler, "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler}
)


def scheduler_from_config(config: Mapping[str, Any], **overrides: Any) -> _Scheduler:
    """The scheduler `config["_class_name"]` names, built from `config`."""
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be a mapping, got {type(config).__name__}")
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"`_class_name` must be one of {sorted(SCHEDULERS)}, got {name!r} (unsupported scheduler)")
    return SCHEDULERS[name].from_config(config, **overrides)


# ----------------------------------------------------------------------------------------------
# Sampler names (sample.py, evaluate.py, the notebooks): name -> (scheduler class, config overrides
# applied through `from_config`, i.e. diffusers' `OtherScheduler.from_config(pipe.scheduler.config)`).

SAMPLERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
})
SAMPLER_ALIASES: Mapping[str, str] = MappingProxyType({
    "dpm++sde": "dpm++2m-sde", "dpm++2msde": "dpm++2m-sde", "dpmpp2m": "dpm++2m", "dpmpp2m-sde": "dpm++2m-sde",
    "dpmpp3m": "dpm++3m", "dpm++": "dpm++2m",
})


def sampler_name(name: str) -> str:
    """The canonical sampler name ('DPM++ 2M' -> 'dpm++2m'); ValueError naming `sampler` if unknown."""
    key = re.sub(r"\s+", "", str(name)).lower().replace("_", "-")
    key = SAMPLER_ALIASES.get(key, SAMPLER_ALIASES.get(key.replace("-", ""), key))
    if key not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not known; choose one of {sorted(SAMPLERS)}")
    return key


def make_sampler(name: str, config: Mapping[str, Any], spacing: str | None = None) -> _Scheduler:
    """The scheduler of sampler `name` built from a checkpoint's scheduler `config` (its betas, offset and
    prediction type kept); `spacing` (leading | linspace | trailing) overrides the timestep spacing."""
    class_name, overrides = SAMPLERS[sampler_name(name)]
    overrides = dict(overrides)
    if spacing is not None:
        overrides["timestep_spacing"] = spacing
    return SCHEDULERS[class_name].from_config(config, **overrides)
