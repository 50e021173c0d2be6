"""Key tables: moving state dicts between checkpoint layouts, strictly.

Why: a conversion that silently drops or invents a tensor produces a model that runs and is wrong.
Every table is a plain list of rules written out per component (`unet_layout.py`, `vae_layout.py`,
`text_layout.py`); `apply_table` fails unless every source key is consumed (or explicitly ignored) and
every target key is produced with the shape the target model expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch


class ConversionError(ValueError):
    """A state dict does not match the layout it claims to have."""


@dataclass(frozen=True)
class Rename:
    """One tensor moves from `src` to `dst`; unit dimensions may be added or dropped
    (Conv1d/Conv2d k=1 <-> Linear) when the target shape asks for it.

    src_ndim / dst_ndim: the rank of the tensor on that side where the two sides differ (a k=1 conv
    stored as a linear); writing a foreign layout has no target model to ask, so the rule says it."""

    src: str
    dst: str
    src_ndim: int | None = None
    dst_ndim: int | None = None


@dataclass(frozen=True)
class Split:
    """One fused tensor (e.g. open_clip's in_proj_weight) is chunked along dim 0 into `dst`."""

    src: str
    dst: tuple[str, ...]


@dataclass(frozen=True)
class Fuse:
    """Several tensors are concatenated along dim 0 into one (the inverse of `Split`)."""

    src: tuple[str, ...]
    dst: str


Rule = Union[Rename, Split, Fuse]
Table = Sequence[Rule]


def invert(table: Table) -> list[Rule]:
    """The table that undoes `table` (target layout -> source layout)."""
    out: list[Rule] = []
    for r in table:
        if isinstance(r, Rename):
            out.append(Rename(r.dst, r.src, r.dst_ndim, r.src_ndim))
        elif isinstance(r, Split):
            out.append(Fuse(r.dst, r.src))
        else:
            out.append(Split(r.dst, r.src))
    return out


def prefixed(table: Table, src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """The same rules with prefixes added to the source and/or target keys."""

    def s(k: str) -> str:
        return src_prefix + k

    def d(k: str) -> str:
        return dst_prefix + k

    out: list[Rule] = []
    for r in table:
        if isinstance(r, Rename):
            out.append(Rename(s(r.src), d(r.dst), r.src_ndim, r.dst_ndim))
        elif isinstance(r, Split):
            out.append(Split(s(r.src), tuple(d(k) for k in r.dst)))
        else:
            out.append(Fuse(tuple(s(k) for k in r.src), d(r.dst)))
    return out


def _fit(t: torch.Tensor, shape: torch.Size | None, key: str, src: str, what: str) -> torch.Tensor:
    if shape is None or tuple(t.shape) == tuple(shape):
        return t
    squeezed = [n for n in t.shape if n != 1]
    wanted = [n for n in shape if n != 1]
    if squeezed == wanted:  # only unit dims differ: a k=1 conv <-> linear
        return t.reshape(shape)
    raise ConversionError(
        f"{what}: tensor {src!r} has shape {tuple(t.shape)}, but {key!r} needs {tuple(shape)}"
    )


def _to_rank(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Add or drop trailing unit dims: (o, i) <-> (o, i, 1) <-> (o, i, 1, 1)."""
    while t.dim() > ndim and t.shape[-1] == 1:
        t = t.squeeze(-1)
    while t.dim() < ndim:
        t = t.unsqueeze(-1)
    return t


def with_src_ndim(table: Table, ndim: int, keys: Callable[[str], bool]) -> list[Rule]:
    """The same table with `src_ndim=ndim` on the Renames whose source key satisfies `keys`."""
    return [Rename(r.src, r.dst, ndim, r.dst_ndim) if isinstance(r, Rename) and keys(r.src) else r for r in table]


def apply_table(
    source: Mapping[str, torch.Tensor],
    table: Table,
    target_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    what: str = "state dict",
    ignore: Callable[[str], bool] | Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Apply `table` to `source` and check the result.

    target_shapes: the shape of every key the target must have (from the target model's state dict,
        built on the `meta` device); None skips the completeness and shape checks.
    ignore: source keys that may be left unconsumed (a predicate or a collection), e.g. the vision
        tower of an open_clip file or the other models inside a Lightning checkpoint.
    """
    skip = ignore if callable(ignore) else set(ignore).__contains__
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in source:
            raise ConversionError(f"{what}: missing tensor {key!r}")
        used.add(key)
        return source[key]

    def shape_of(key: str):
        if target_shapes is None:
            return None
        if key not in target_shapes:
            raise ConversionError(f"{what}: the table produces {key!r}, which the target model lacks")
        return torch.Size(target_shapes[key])

    for r in table:
        if isinstance(r, Rename):
            t = take(r.src)
            if r.dst_ndim is not None and t.dim() != r.dst_ndim:
                t = _to_rank(t, r.dst_ndim)
            out[r.dst] = _fit(t, shape_of(r.dst), r.dst, r.src, what)
        elif isinstance(r, Split):
            parts = take(r.src).chunk(len(r.dst), dim=0)
            for k, p in zip(r.dst, parts):
                out[k] = _fit(p, shape_of(k), k, r.src, what)
        else:
            fused = torch.cat([take(k) for k in r.src], dim=0)
            out[r.dst] = _fit(fused, shape_of(r.dst), r.dst, "+".join(r.src), what)

    leftover = sorted(k for k in source if k not in used and not skip(k))
    if leftover:
        more = f" (and {len(leftover) - 5} more)" if len(leftover) > 5 else ""
        raise ConversionError(f"{what}: unexpected tensor(s) {leftover[:5]}{more}")
    if target_shapes is not None:
        missing = sorted(k for k in target_shapes if k not in out)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ConversionError(f"{what}: missing tensor(s) {missing[:5]}{more}")
    return out


def shapes_of(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Parameter and buffer shapes of a module (build it on the `meta` device: it costs nothing)."""
    return {k: v.shape for k, v in module.state_dict().items()}
