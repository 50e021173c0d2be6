"""LoRA: which modules (targets), adapters on a model through peft (adapters), files (formats.lora_layout)."""

from ..formats.lora_layout import (
    LAYOUTS,
    LORA_WEIGHT_NAME,
    LoraEntry,
    LoraFormatError,
    LoraWeights,
    read_lora,
    write_diffusers_lora,
)
from .adapters import (
    active_adapters,
    adapter_names,
    adapter_parameters,
    adapter_weights,
    add_adapter,
    base_state_dict,
    delete_adapters,
    disabled,
    fuse,
    has_unfused,
    is_fused,
    load_adapter,
    lora_layers,
    scaled,
    set_adapters,
    unfuse,
    unload,
)
from .targets import GROUPS, PRESETS, LoraSpec, group_of, resolve_groups, target_modules

__all__ = [
    "GROUPS", "LAYOUTS", "LORA_WEIGHT_NAME", "PRESETS", "LoraEntry", "LoraFormatError", "LoraSpec", "LoraWeights",
    "active_adapters", "adapter_names", "adapter_parameters", "adapter_weights", "add_adapter", "base_state_dict",
    "delete_adapters", "disabled", "fuse", "group_of", "has_unfused", "is_fused", "load_adapter", "lora_layers", "read_lora",
    "resolve_groups", "scaled", "set_adapters", "target_modules", "unfuse", "unload", "write_diffusers_lora",
]
