"""Scheduler classes by config `_class_name`, and the sampler names of the scripts and notebooks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .base import _Scheduler
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .lcm import LCMScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS: Mapping[str, type] = MappingProxyType({
    "DDIMScheduler": DDIMScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "LCMScheduler": LCMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
})


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
# "lcm" is for consistency-distilled checkpoints (T2V-Turbo-MS: 4 steps, no classifier-free guidance);
# built from such a checkpoint's own LCMScheduler config it keeps its keys (lcm_timestep_rule included).
# It runs on a plain diffusion model too, which was not trained for consistency steps.

SAMPLERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                     "use_karras_sigmas": False}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                 "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2, "use_karras_sigmas": False}),
    "lcm": ("LCMScheduler", {}),
})
SAMPLER_ALIASES: Mapping[str, str] = MappingProxyType({
    "dpm++sde": "dpm++2m-sde", "dpm++2msde": "dpm++2m-sde", "dpmpp2m": "dpm++2m", "dpmpp2m-sde": "dpm++2m-sde",
    "dpmpp3m": "dpm++3m", "dpm++": "dpm++2m", "dpm++2mkarras": "dpm++2m-karras", "dpmpp2m-karras": "dpm++2m-karras",
    "euler-ancestral": "euler-a", "eulera": "euler-a", "euler-ancestral-discrete": "euler-a", "unipc-bh2": "unipc",
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
    prediction type kept); `spacing` (leading | linspace | trailing) overrides the timestep spacing. "lcm"
    takes no `spacing`: its timesteps come from the distillation grid (`lcm_timestep_rule`)."""
    class_name, overrides = SAMPLERS[sampler_name(name)]
    overrides = dict(overrides)
    if spacing is not None:
        if class_name == "LCMScheduler":
            raise ValueError(f"spacing={spacing!r} does not apply to the lcm sampler (its timesteps come from the "
                             "distillation grid: original_inference_steps, lcm_timestep_rule); leave it null")
        overrides["timestep_spacing"] = spacing
    return SCHEDULERS[class_name].from_config(config, **overrides)
