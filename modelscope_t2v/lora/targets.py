"""Which modules of the UNet a LoRA adapts: named groups, presets over them, and the spec of a new LoRA.

Why groups: the fine-tuning community adapts parts of this UNet for different ends (the spatial layers to
change what things look like or remove a watermark, the temporal ones to add a motion), and a group name
says that in a config where a list of 400 module paths would not. Every adaptable module (exactly
nn.Linear, Conv2d, Conv3d) is in exactly one group (a test pins this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ..formats.lora_layout import adaptable_modules
from ..models.base import require_float, require_ints

_TEMPORAL = r"(^temporal_attention_in|\.temporal_attention)"
_ATTN = r"\.block\.(self_attn|cross_attn)\.(q|k|v|out)_proj$"

# group -> pattern over our module paths (models.unet names)
GROUPS: dict[str, str] = {
    "spatial_attention": r"\.spatial_attention" + _ATTN,  # q/k/v/out of self- and cross-attention to the text
    "spatial_ff": r"\.spatial_attention\.block\.ff\.proj_(in|out)$",
    "spatial_proj": r"\.spatial_attention\.proj_(in|out)$",
    "temporal_attention": _TEMPORAL + _ATTN,  # both self-attentions over frames, incl. the one after conv_in
    "temporal_ff": _TEMPORAL + r"\.block\.ff\.proj_(in|out)$",
    "temporal_proj": _TEMPORAL + r"\.proj_(in|out)$",
    "temporal_conv": r"\.temporal_conv\.convs\.\d+$",  # the (3,1,1) Conv3d layers
    "resnet": r"\.resnet\.(in_conv|out_conv|shortcut|time_proj)$",
    "resample": r"\.(downsample|upsample)\.conv$",
    "stem": r"^(conv_in|conv_out|time_mlp\.(fc1|fc2|cond_proj))$",
}

PRESETS: dict[str, tuple[str, ...]] = {
    # diffusers' usual UNet LoRA targets (to_q, to_k, to_v, to_out.0 of every attention)
    "attention": ("spatial_attention", "temporal_attention"),
    # what a frame looks like: the spatial transformers only (the temporal layers are left as they are)
    "spatial": ("spatial_attention", "spatial_ff", "spatial_proj"),
    # how frames move: the temporal transformers and convs only
    "temporal": ("temporal_attention", "temporal_ff", "temporal_proj", "temporal_conv"),
    "transformers": ("spatial_attention", "spatial_ff", "spatial_proj", "temporal_attention", "temporal_ff",
                     "temporal_proj"),
    # every Linear and conv (what Text-To-Video-Finetuning's stable LoRA and cloneofsimo LoRA adapt)
    "all": tuple(GROUPS),
}


def resolve_groups(target: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name, a group name, or a list of either -> the group names, in GROUPS order."""
    items = [target] if isinstance(target, str) else list(target)
    if not items:
        raise ValueError("LoRA target is empty; give a preset " f"{sorted(PRESETS)} or groups {sorted(GROUPS)}")
    groups: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"LoRA target entries must be strings, got {item!r}")
        if item in PRESETS:
            groups.update(PRESETS[item])
        elif item in GROUPS:
            groups.add(item)
        else:
            raise ValueError(f"unknown LoRA target {item!r}; presets: {sorted(PRESETS)}; groups: {sorted(GROUPS)}")
    return tuple(g for g in GROUPS if g in groups)


def target_modules(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """The paths of `model`'s adaptable modules that `target` selects, in registration order."""
    patterns = [re.compile(GROUPS[g]) for g in resolve_groups(target)]
    names = [n for n in adaptable_modules(model) if any(p.search(n) for p in patterns)]
    if not names:
        raise ValueError(f"LoRA target {target!r} selects no module of this UNet")
    return names


def group_of(name: str) -> str:
    """The group of one module path (ValueError if none: a module the groups do not know)."""
    found = [g for g, p in GROUPS.items() if re.search(p, name)]
    if len(found) != 1:
        raise ValueError(f"module {name!r} is in groups {found}, expected exactly one")
    return found[0]


@dataclass
class LoraSpec:
    """A new LoRA to train: rank, scale, dropout and what it adapts."""

    rank: int = 16
    # the update is (alpha / rank) * B A; None means alpha = rank (scale 1, as diffusers' default)
    alpha: float | None = None
    dropout: float = 0.0  # on the LoRA branch's input, in training
    target: str | tuple[str, ...] = "attention"  # a preset, a group, or a list of them

    def __post_init__(self) -> None:
        require_ints(self, "rank")
        if self.alpha is not None:
            require_float(self, "alpha", 0.0, open_low=True)
        require_float(self, "dropout", 0.0, 1.0)
        if not isinstance(self.target, str):
            self.target = tuple(self.target)
        resolve_groups(self.target)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank
