"""LoRA fine-tuning (`trainer.lora.rank=16`): only the adapter is trained, averaged (EMA), checkpointed and
resumed; the base model stays as it was loaded, and no checkpoint copies it.

A LoRA run's step folder is a LoRA folder that `pipe.load_lora_weights` and `sample.py lora=` read:

    step-00000500/
      pytorch_lora_weights.safetensors    the adapter in diffusers' layout (its EMA weights if the run keeps
                                          an EMA), fp32
      lora_run.json                       the base model it adapts (model.name_or_path) and the LoRA's settings
                                          (trainer.target=lcd: also "distillation", the student's pipeline)
      raw/pytorch_lora_weights.safetensors   the raw adapter the optimizer trains (with an EMA only)
      training_state/                     optimizer (by parameter name), grad scaler, trainer_state.json

Resuming rebuilds the base exactly as the run began (the same checkpoint, or the same seeded preset),
attaches the adapter and loads raw/, the EMA and the optimizer: bit for bit the uninterrupted run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import lora
from ..formats.files import read_json, write_json
from ..formats.lora_layout import LORA_WEIGHT_NAME, LoraEntry, LoraWeights, read_lora, write_diffusers_lora

ADAPTER = "default"  # the trained adapter's name inside the UNet (parameter names `...lora_A.default.weight`)
RUN_FILE = "lora_run.json"


@dataclass
class LoraTrainConfig:
    # the LoRA's rank; null trains the whole model (no LoRA)
    rank: Optional[int] = None
    alpha: Optional[float] = None  # the update is alpha / rank * B A; null: alpha = rank
    dropout: float = 0.0  # dropout on the LoRA branch's input
    # what it adapts: a preset ("attention", "spatial", "temporal", "transformers", "all"), a group
    # (modelscope_t2v.lora.GROUPS) or a list of them. "spatial" changes what frames look like and leaves
    # motion to the base; "temporal" the reverse
    target: Any = "attention"
    # prior preservation (DreamBooth's prior loss, the base model its own teacher): a regex over the captions
    # that marks what the LoRA is to teach; every other sample, and every caption dropped to "", is trained
    # toward the base model's prediction (the adapter off) instead of toward the data, so that the LoRA learns
    # to leave what the base model already does as it was. null: every sample trains toward the data
    new_concept: Optional[str] = None
    prior_loss_weight: float = 1.0  # the weight of the preserved samples' squared error


def check_preservation(lc: LoraTrainConfig) -> str | None:
    """Why trainer.lora's prior-preservation fields cannot run, or None."""
    if lc.new_concept is None:
        return None
    if lc.rank is None:
        return "trainer.lora.new_concept is set but trainer.lora.rank is null: prior preservation needs a LoRA"
    if not isinstance(lc.new_concept, str) or not lc.new_concept:
        return f"trainer.lora.new_concept must be a non-empty regex, got {lc.new_concept!r}"
    try:
        re.compile(lc.new_concept)
    except re.error as e:
        return f"trainer.lora.new_concept {lc.new_concept!r} is not a regex: {e}"
    w = lc.prior_loss_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
        return f"trainer.lora.prior_loss_weight must be a finite number >= 0, got {w!r}"
    return None


def preserved(lc: LoraTrainConfig, captions: Sequence[str], used: Sequence[str]) -> list[bool] | None:
    """Which samples train toward the base model: captions that do not match trainer.lora.new_concept, and
    those dropped to "" (`used` are the captions after caption dropout). None when preservation is off."""
    if lc.rank is None or lc.new_concept is None:
        return None
    pattern = re.compile(lc.new_concept)
    return [u == "" or pattern.search(c) is None for c, u in zip(captions, used)]


def lora_spec(lc: LoraTrainConfig) -> lora.LoraSpec | None:
    """The LoraSpec of trainer.lora, None when trainer.lora.rank is null; ValueError naming a bad field."""
    if lc.rank is None:
        return None
    target = lc.target if isinstance(lc.target, str) else tuple(lc.target)
    try:
        return lora.LoraSpec(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target=target)
    except (ValueError, TypeError) as e:
        raise ValueError(f"trainer.lora: {e}".replace("LoraSpec.", "trainer.lora.")) from None


def attach(unet: nn.Module, spec: lora.LoraSpec) -> list[str]:
    """Add the trained adapter to `unet` and freeze everything else; returns the adapted module paths."""
    targets = lora.add_adapter(unet, ADAPTER, spec)
    unet.requires_grad_(False)
    for p in lora.adapter_parameters(unet, ADAPTER).values():
        p.requires_grad_(True)
    return targets


def _weights(named: Mapping[str, Tensor], unet: nn.Module) -> LoraWeights:
    """`...<module>.lora_A.default.weight`-named tensors (the trained parameters, or their EMA) -> LoraWeights."""
    layers = lora.lora_layers(unet)
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in named.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.{ADAPTER}.weight"
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            raise KeyError(f"{key!r} is not a parameter of the LoRA adapter")
    return {m: LoraEntry(p["lora_A"], p["lora_B"], float(layers[m].lora_alpha[ADAPTER])) for m, p in out.items()}


def _named(weights: LoraWeights) -> dict[str, Tensor]:
    """The inverse of `_weights`."""
    named = {}
    for module, e in weights.items():
        named[f"{module}.lora_A.{ADAPTER}.weight"] = e.down
        named[f"{module}.lora_B.{ADAPTER}.weight"] = e.up
    return named


def write_checkpoint(folder: Path, *, unet: nn.Module, shown: Mapping[str, Tensor], raw: Mapping[str, Tensor] | None,
                     base: str, spec: lora.LoraSpec, optimizer: tuple[dict, dict], scaler: dict | None,
                     trainer_state: dict, extra: Mapping[str, Any] | None = None) -> None:
    """Fill a (temporary) step folder of a LoRA run (see the module doc); `shown` and `raw` are the adapter's
    parameters by name (EMA and raw; raw None without an EMA); `extra` goes into lora_run.json beside the
    settings (the objective's `run_metadata`: a distilled student's pipeline settings)."""
    from .checkpoints import write_training_state

    config = unet.config
    write_diffusers_lora(folder / LORA_WEIGHT_NAME, _weights(shown, unet), config, spec.dropout, dtype=torch.float32)
    if raw is not None:
        write_diffusers_lora(folder / "raw" / LORA_WEIGHT_NAME, _weights(raw, unet), config, spec.dropout,
                             dtype=torch.float32)
    write_json(folder / RUN_FILE, {"base_model": base, "rank": spec.rank, "alpha": spec.alpha,
                                   "dropout": spec.dropout, "target": spec.target,
                                   "modules": len(lora.adapter_parameters(unet, ADAPTER)) // 2, **(extra or {})})
    write_training_state(folder, optimizer, scaler, trainer_state)


def restore(folder: Path, unet: nn.Module, *, ema: bool) -> dict[str, Tensor] | None:
    """Load the raw adapter of step folder `folder` into `unet`'s trained adapter; returns the EMA weights
    by parameter name (None without an EMA)."""
    read_json(folder / RUN_FILE)  # an error naming the file if this is not a LoRA run's folder; the settings
    # themselves are checked through the config on resume
    raw_file = folder / "raw" / LORA_WEIGHT_NAME if ema else folder / LORA_WEIGHT_NAME
    raw, _ = read_lora(raw_file, unet.config)
    params = lora.adapter_parameters(unet, ADAPTER)
    named = _named(raw)
    if set(named) != set(params):
        raise ValueError(f"{raw_file}: the saved adapter does not fit trainer.lora (modules differ: "
                         f"{sorted(set(named) ^ set(params))[:3]})")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(named[key])
    if not ema:
        return None
    shown, _ = read_lora(folder / LORA_WEIGHT_NAME, unet.config)
    return _named(shown)

