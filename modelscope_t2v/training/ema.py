"""Exponential moving average of a model's weights (Polyak averaging), for sampling from a trained model.

Why a class of our own: the shadow weights must live beside sharded (FSDP2 DTensor) parameters as well
as plain ones, be swapped into the live module for validation without a second module, and save and
load bit for bit, so a resumed run continues the same average.

    ema = EMA(model.named_parameters(), decay=0.9999, warmup=True)
    ema.update(model.parameters(), step)          # after every optimizer step
    with ema.swapped_into(model.parameters()):    # sample with the averaged weights
        ...

Decay: `decay` flat, or with `warmup` min(decay, (1 + n) / (10 + n)) after n updates (the rule of
the LDM / diffusers EMA without inv_gamma), so a short run's average is not stuck at the initial
weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor gathered to a plain tensor (a collective: every rank must call it); others as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like_param(full: Tensor, param: Tensor) -> Tensor:
    """`full` (a whole tensor) laid out like `param`: sharded the same way if `param` is a DTensor."""
    full = full.to(device=param.device, dtype=param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, param.placements)
    return full


class EMA:
    """Shadow copies (float32, same layout as the parameters) of a module's trainable parameters."""

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shadow = [p.detach().clone().float() for _, p in named]
        self.decay = float(decay)
        self.warmup = bool(warmup)

    def decay_at(self, num_updates: int) -> float:
        """The decay used for update number `num_updates` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))

    @torch.no_grad()
    def update(self, parameters: Iterable[Tensor], num_updates: int) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, i.e. lerp towards param by (1 - decay)."""
        params = [p.detach().float() for p in parameters if p.requires_grad]
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA.update got {len(params)} parameters, tracks {len(self.shadow)}")
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay_at(num_updates))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_into(self, parameters: Iterable[Tensor]) -> Iterator[None]:
        """Copy the averages into the parameters for the duration of the block, then restore them
        exactly (the live weights wait on the CPU meanwhile)."""
        params = [p for p in parameters if p.requires_grad]
        backup = [p.detach().to("cpu", copy=True) for p in params]
        try:
            for p, s in zip(params, self.shadow):
                p.copy_(s)
            yield
        finally:
            for p, b in zip(params, backup):
                p.copy_(b.to(p.device))

    def full_state_dict(self) -> dict[str, Tensor]:
        """name -> whole float32 tensor on the CPU (gathers shards: call on every rank)."""
        return {n: full_tensor(s).detach().cpu() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of `full_state_dict`; every tracked name must be present, with its shape."""
        missing = [n for n in self.names if n not in state]
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise KeyError(f"EMA state: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for n, s in zip(self.names, self.shadow):
            if tuple(state[n].shape) != tuple(s.shape):
                raise ValueError(f"EMA state: {n} has shape {tuple(state[n].shape)}, expected {tuple(s.shape)}")
            s.copy_(like_param(state[n].float(), s))
