"""diffusers-compatible scheduler objects: thin adapters over `diffusion/schedule.py`,
`diffusion/samplers.py` and `diffusion/consistency.py`.

    base.py        the frozen config, diffusers' ConfigMixin semantics, shared checks (`_Scheduler`)
    ddim.py        DDIMScheduler                  -> samplers.ddim
    dpm_solver.py  DPMSolverMultistepScheduler    -> samplers.dpm_solver_multistep
    lcm.py         LCMScheduler                   -> consistency.lcm (consistency-distilled models)
    euler.py       EulerDiscreteScheduler, EulerAncestralDiscreteScheduler -> sigma_samplers.euler
    unipc.py       UniPCMultistepScheduler        -> sigma_samplers.unipc
    factory.py     classes by `_class_name`, the sampler names of sample.py / evaluate.py / the notebooks

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

from ..formats.folders import MODELSCOPE_T2V_SCHEDULER_CONFIG, released_scheduler_config
from .base import CONFIG_NAME, SchedulerConfig, SchedulerOutput, load_scheduler_config
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .unipc import UniPCMultistepScheduler
from .factory import (
    SAMPLER_ALIASES,
    SAMPLERS,
    SCHEDULERS,
    make_sampler,
    sampler_name,
    scheduler_from_config,
)
from .lcm import LCMScheduler, LCMSchedulerOutput

__all__ = [
    "CONFIG_NAME",
    "MODELSCOPE_T2V_SCHEDULER_CONFIG",
    "SAMPLERS",
    "SAMPLER_ALIASES",
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "LCMSchedulerOutput",
    "SchedulerConfig",
    "SchedulerOutput",
    "load_scheduler_config",
    "make_sampler",
    "released_scheduler_config",
    "sampler_name",
    "scheduler_from_config",
]
