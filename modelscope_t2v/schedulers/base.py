"""What every scheduler adapter shares: the frozen config, diffusers' `ConfigMixin` semantics
(`from_config`, `from_pretrained`, `save_pretrained`), the betas a config describes, and the checks.

Why one base: diffusers' config semantics (see the package doc) are subtle, and each adapter must
reproduce them identically for `OtherScheduler.from_config(scheduler.config)` to convert as diffusers does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..diffusion import samplers
from ..diffusion.noise import Generator
from ..diffusion.schedule import BETA_SCHEDULES, make_betas, rescale_zero_terminal_snr
from ..diffusion.schedule import alphas_cumprod as cumprod_alphas
from ..formats.files import read_json, write_json

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
    pred_original_sample: torch.Tensor | None = None

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


class _StepIndex:
    """diffusers' step counter of the stateful multistep schedulers (DPM-Solver, LCM): `step_index` starts at
    `begin_index` (set by a truncated schedule) or at the position of the first step's timestep."""

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where a truncated schedule (video-to-video) starts, for `step` (and `add_noise`)."""
        self._begin_index = begin_index

    def _current_step_index(self, timestep) -> int:
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = begin if begin is not None else self._index_for_timestep(timestep)
        return self._step_index

    # diffusers' DPM-Solver and UniPC take the last step for a timestep their schedule does not hold; its Euler and
    # LCM schedulers fail there (IndexError), and so do ours, with a message: a fallback noises to the wrong sigma
    unknown_timestep_is_last: ClassVar[bool] = False

    def _index_for_timestep(self, timestep) -> int:
        index = self._match_index(self.timesteps, timestep)
        if index is not None:
            return index
        if self.unknown_timestep_is_last:
            return len(self.timesteps) - 1
        raise ValueError(f"timestep {float(torch.as_tensor(timestep)):g} is not in this schedule "
                         f"({[round(float(t), 3) for t in self.timesteps]}); pass one of scheduler.timesteps")

    def _sigmas_at(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """`self.sigmas` at each of `timesteps` as diffusers' `add_noise` indexes them (by timestep, or at the
        begin / step index once set), in like's dtype and device, shaped to broadcast against it."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            idx = [self._index_for_timestep(t) for t in timesteps]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)
        return self.sigmas.to(like.device, like.dtype)[idx].reshape(-1, *([1] * (like.ndim - 1)))

    @staticmethod
    def _match_index(schedule: torch.Tensor, timestep) -> int | None:
        """diffusers' rule: the second index of `timestep` in `schedule` if it occurs twice (image-to-image
        restarts), else the first; None if it does not occur."""
        hits = (schedule.cpu() == torch.as_tensor(timestep).cpu()).nonzero().flatten().tolist()
        if not hits:
            return None
        return hits[1] if len(hits) > 1 else hits[0]


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

    def _set_discrete_schedule(self) -> None:
        """DDIM's and LCM's tables: betas, alphas, their products, the product after the last step (1 with
        `set_alpha_to_one`, else abar_0), and the full descending integer timesteps."""
        cfg = self._config
        self.betas = _betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = cumprod_alphas(self.betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any):
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
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = "scheduler", **overrides: Any):
        """Read `folder/subfolder/scheduler_config.json` (or `folder/scheduler_config.json` when
        the subfolder is absent or None)."""
        config = load_scheduler_config(folder, subfolder)
        return cls.from_config(config, **overrides)

    def save_pretrained(self, folder: str | Path) -> Path:
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
        timesteps: samplers.Timesteps | None = None,
        *,
        generator: Generator = None,
        callback: samplers.Callback | None = None,
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

    def landing_timesteps(self, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep each step of `timesteps` (default `self.timesteps`) leaves the sample at: the next
        one of the schedule, -1 (clean) after the last. DDIM, which steps by T // n, overrides it."""
        ts = torch.as_tensor(self.timesteps if timesteps is None else timesteps).cpu()  # int, or Euler's floats
        return torch.cat([ts[1:], ts.new_full((1,), -1)])

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


def load_scheduler_config(folder: str | Path, subfolder: str | None = "scheduler") -> dict[str, Any]:
    """The parsed `scheduler_config.json` of a model folder (see `_Scheduler.from_pretrained`)."""
    folder = Path(folder)
    candidates = ([folder / subfolder / CONFIG_NAME] if subfolder else []) + [folder / CONFIG_NAME]
    for path in candidates:
        if path.is_file():
            return read_json(path)
    raise FileNotFoundError(f"no {CONFIG_NAME} in {', '.join(str(p.parent) for p in candidates)}")
