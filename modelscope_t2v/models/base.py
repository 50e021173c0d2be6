"""What every model here shares: the dtype and device of its weights, as diffusers' models report them
(`pipe.unet.dtype`, `pipe.vae.device`), and the checks of its config's fields (a config may come from a
file: each error names the field and what it must be)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn


class Model(nn.Module):
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def require_ints(config, *names: str, low: int = 1) -> None:
    """Each field an integer >= low (bools are not integers here)."""
    for name in names:
        v = getattr(config, name)
        if not _is_int(v) or v < low:
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= {low}, got {v!r}")
        setattr(config, name, int(v))


def require_int_list(config, name: str, low: int = 1) -> tuple[int, ...]:
    v = getattr(config, name)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v or not all(_is_int(c) and c >= low for c in v):
        raise ValueError(f"{type(config).__name__}.{name} must be a non-empty list of integers >= {low}, got {v!r}")
    return tuple(int(c) for c in v)


def require_bool_list(config, name: str) -> tuple[bool, ...]:
    """true/false entries (0 and 1 taken as false and true)."""
    v = getattr(config, name)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(
            isinstance(a, bool) or _is_int(a) and a in (0, 1) for a in v):
        raise ValueError(f"{type(config).__name__}.{name} must be a list of true/false, got {v!r}")
    return tuple(bool(a) for a in v)


def require_bools(config, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{type(config).__name__}.{name} must be true or false, got {getattr(config, name)!r}")


def require_float(config, name: str, low: float, high: float | None = None, *, open_low: bool = False) -> None:
    """A finite number in [low, high] ((low, high] with open_low)."""
    v = getattr(config, name)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and (
        v > low if open_low else v >= low) and (high is None or v <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number {bound}, got {v!r}")
    setattr(config, name, float(v))
