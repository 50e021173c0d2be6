"""Approximate speed-ups of sampling, switched on the pipeline with their authors' names and measured in
docs/benchmarks.md: DeepCache (`enable_deepcache`, arXiv 2312.00858) reuses the UNet's deep features between
steps and runs only its shallow branch on the others; the guidance cache (`enable_guidance_cache`, FasterCache's
CFG-Cache idea, arXiv 2410.19355, without its frequency reweighting) runs the unconditional branch only every
few steps and reuses the last difference between the two branches in between.

`compile` (exact: the same computation, fused) puts the UNet and the autoencoder's decode and encode under
`torch.compile`; both trace without a graph break.

Together: a DeepCache full step is always a two-branch step (its stored feature then holds both branches, and a
one-branch step uses the conditional half), so the deep feature and the guidance difference come from the same
steps.

Why here: they change what is generated (a little), so they are never on by default and never silent; the
exact path (the same numbers as diffusers) stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.training_free import DeepCache, deepcache_full_steps
from .checks import positive_int


@dataclass
class DeepCacheRun:
    """One sampling run's DeepCache: its state and the steps that run the whole UNet."""

    state: DeepCache
    full_steps: set[int]

    def for_call(self, step: int, rows: int) -> DeepCache:
        """The state to give the UNet at `step` for a batch of `rows` = b x f frames: emptied on a full step (the
        UNet stores the feature anew); on a one-branch step of the guidance cache, a view holding the conditional
        half of the two-branch feature (the unconditional branch comes first)."""
        if step in self.full_steps:
            self.state.feature = None
        elif self.state.feature is not None and self.state.feature.shape[0] == 2 * rows:
            return DeepCache(self.state.branch, self.state.feature.chunk(2)[1])
        return self.state


@dataclass(frozen=True)
class DeepCacheSettings:
    cache_interval: int = 3
    cache_branch_id: int = 0
    uniform: bool = True
    pow: float = 1.4
    center: int = 15


class AccelerationMethods:
    """The pipeline methods of this module (mixed into TextToVideoSDPipeline)."""

    _deepcache: DeepCacheSettings | None = None
    _guidance_cache: int | None = None  # its cache_interval

    def enable_deepcache(self, cache_interval: int = 3, cache_branch_id: int = 0, uniform: bool = True,
                         pow: float = 1.4, center: int = 15):
        """DeepCache, as its helper names it: every `cache_interval`-th step runs the whole UNet and stores the up
        path's input at skip connection `cache_branch_id` (0: conv_in's, the shallowest and fastest; up to
        unet.num_skips - 1); the steps between run only the layers above that skip. `uniform=False`: the paper's
        non-uniform schedule, full steps denser around step `center` (exponent `pow`)."""
        positive_int("cache_interval", cache_interval)
        n = self.unet.num_skips
        if isinstance(cache_branch_id, bool) or not isinstance(cache_branch_id, int) or not 0 <= cache_branch_id < n:
            raise ValueError(f"cache_branch_id must be an int in [0, {n - 1}] (this UNet's skip connections), "
                             f"got {cache_branch_id!r}")
        if not isinstance(uniform, bool):
            raise TypeError(f"uniform must be True or False, got {uniform!r}")
        if isinstance(pow, bool) or not isinstance(pow, (int, float)) or not pow > 1:
            raise ValueError(f"pow must be a number > 1, got {pow!r}")
        if isinstance(center, bool) or not isinstance(center, int) or center < 0:
            raise ValueError(f"center must be an int >= 0, got {center!r}")
        self._deepcache = DeepCacheSettings(cache_interval, cache_branch_id, uniform, float(pow), center)

    def disable_deepcache(self):
        self._deepcache = None

    @property
    def deepcache_enabled(self) -> bool:
        return self._deepcache is not None

    def enable_guidance_cache(self, cache_interval: int = 2):
        """Classifier-free guidance with the unconditional branch every `cache_interval`-th step (and on every
        DeepCache full step): in between, guided = cond + (scale - 1) (cond - uncond) of the last two-branch step,
        one UNet batch instead of two. cache_interval=1 is plain guidance."""
        self._guidance_cache = positive_int("cache_interval", cache_interval)

    def disable_guidance_cache(self):
        self._guidance_cache = None

    def compile(self, **options):
        """torch.compile the UNet (`unet.compile`, in place) and the autoencoder's decode and encode, with
        torch.compile's `options` (mode=, backend=, fullgraph=, dynamic=, ...). The first call of each new shape
        compiles (minutes on a CPU); the numbers are the eager ones up to the fused kernels' round-off."""
        self.unet.compile(**options)
        self.vae.decode = torch.compile(self.vae.decode, **options)
        self.vae.encode = torch.compile(self.vae.encode, **options)
        return self

    def _check_acceleration(self) -> None:
        if self._deepcache is not None and getattr(self, "_sliding_windows", None) is not None:
            raise ValueError("enable_deepcache and enable_sliding_windows: DeepCache keeps one feature per step, the "
                             "sliding windows run the UNet once per window; disable one of them")

    def _deepcache_plan(self, steps: int) -> DeepCacheRun | None:
        """The DeepCache of one sampling run of `steps` steps, or None when DeepCache is off."""
        d = self._deepcache
        if d is None:
            return None
        return DeepCacheRun(DeepCache(d.cache_branch_id),
                            set(deepcache_full_steps(steps, d.cache_interval, d.uniform, d.pow, d.center)))

    def _guidance_plan(self, steps: int, deepcache: DeepCacheRun | None) -> set[int] | None:
        """The steps that run both guidance branches (every one when the guidance cache is off: None)."""
        if self._guidance_cache is None:
            return None
        return set(range(0, steps, self._guidance_cache)) | (deepcache.full_steps if deepcache else set())


def cached_guidance(model_fn: Callable, scale: float, two_branch_steps: set[int], step: Callable[[], int]) -> Callable:
    """A guided model_fn(x, t) over `model_fn`, which takes the doubled batch (the unconditional half first) or the
    conditional one alone: on `two_branch_steps` (and until a difference is stored) both branches, guided as
    `samplers.cfg_model_fn` guides them, storing cond - uncond; on the other steps `model_fn(x, t) + (scale - 1) *
    the stored difference`. `step()` is the index of the step being computed."""
    delta: list[torch.Tensor | None] = [None]

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if delta[0] is None or step() in two_branch_steps:
            uncond, c = model_fn(torch.cat([x, x]), t).chunk(2)
            delta[0] = c - uncond
            return uncond + scale * (c - uncond)
        return model_fn(x, t) + (scale - 1) * delta[0]

    return guided
