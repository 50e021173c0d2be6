"""diffusers' LoRA methods on the pipelines (the names of its StableDiffusionLoraLoaderMixin), for UNet LoRAs.

    pipe.load_lora_weights("path/or/folder/or/org-repo", weight_name=None, adapter_name="style")
    pipe.set_adapters(["style", "motion"], adapter_weights=[0.8, 1.0])
    pipe(prompt, cross_attention_kwargs={"scale": 0.5})   # every active adapter's update times 0.5
    pipe.fuse_lora(lora_scale=1.0); pipe.unfuse_lora(); pipe.unload_lora_weights()

Any layout of formats.lora_layout loads (diffusers', Text-To-Video-Finetuning's stable LoRA and its webui
file, cloneofsimo lists such as T2V-Turbo-MS's), checked against the UNet before anything changes. A newly
loaded adapter joins the active ones with weight 1 (as the A1111 extension applies every LoRA it is given);
`set_adapters` chooses exactly. What runs is peft (lora.adapters).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .. import lora
from ..formats.locate import bundled_lora_path, resolve_file
from ..formats.lora_layout import LORA_WEIGHT_NAME, convert_lora, read_lora, write_diffusers_lora

_COMPONENTS = ("unet",)


def _check_components(components, what: str) -> None:
    if components is None:
        return
    components = [components] if isinstance(components, str) else list(components)
    unsupported = [c for c in components if c not in ("unet", "text_encoder")]
    if unsupported:
        raise ValueError(f"{what}: unknown components {unsupported}; LoRAs here adapt the 'unet'")


class LoraMethods:
    """Mixed into the pipelines: UNet LoRA loading, weighting, fusing and saving."""

    unet: torch.nn.Module

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping,
                          weight_name: str | None = None, adapter_name: str | None = None, *,
                          subfolder: str | None = None, revision: str | None = None) -> str:
        """Load a LoRA (a file, a folder holding `pytorch_lora_weights.safetensors` or one LoRA file, a hub id,
        a bundled LoRA's name such as "shapes-still", or a state dict) into the UNet as adapter `adapter_name`
        (default `default_<n>`); returns the name. A file that does not fit this UNet raises before anything
        changes."""
        name = adapter_name if adapter_name is not None else self._next_adapter_name()
        if name in lora.adapter_names(self.unet):
            raise ValueError(f"an adapter named {name!r} is already loaded; choose another adapter_name "
                             f"(loaded: {lora.adapter_names(self.unet)})")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            weights, _ = convert_lora(dict(source), {}, self.unet.config, "the state dict given")
        else:
            if not isinstance(source, (str, os.PathLike)):
                raise TypeError(f"load_lora_weights needs a path, hub id or state dict, got {type(source).__name__}")
            bundled = bundled_lora_path(str(source)) if not Path(source).expanduser().exists() else None
            source = bundled if bundled is not None else source  # a bundled LoRA's name (formats.locate)
            path = resolve_file(source, weight_name, (LORA_WEIGHT_NAME,), (".safetensors", ".pt", ".bin", ".pth"),
                                subfolder=subfolder, revision=revision, what="LoRA")
            weights, _ = read_lora(path, self.unet.config)
        lora.load_adapter(self.unet, name, weights)
        return name

    def _next_adapter_name(self) -> str:
        names, i = lora.adapter_names(self.unet), 0
        while f"default_{i}" in names:
            i += 1
        return f"default_{i}"

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None):
        """The active adapters and their weights (each update times its weight)."""
        lora.set_adapters(self.unet, adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return lora.active_adapters(self.unet)

    def get_list_adapters(self) -> dict[str, list[str]]:
        names = lora.adapter_names(self.unet)
        return {"unet": names} if names else {}

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        lora.delete_adapters(self.unet, adapter_names)

    def disable_lora(self) -> None:
        """Run the base UNet (the adapters stay loaded; `enable_lora` turns them back on)."""
        for layer in lora.lora_layers(self.unet).values():
            layer.enable_adapters(False)

    def enable_lora(self) -> None:
        for layer in lora.lora_layers(self.unet).values():
            layer.enable_adapters(True)
        if lora.lora_layers(self.unet):  # peft's enable makes adapters trainable; inference keeps them frozen
            lora.set_adapters(self.unet, lora.active_adapters(self.unet))

    def fuse_lora(self, components: Sequence[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active adapters (or `adapter_names`), times `lora_scale`, into the UNet's weights: the
        model then runs at the base model's cost. `safe_fusing` refuses a fusion that gives non-finite weights."""
        _check_components(components, "fuse_lora")
        lora.fuse(self.unet, lora_scale, adapter_names)
        if safe_fusing:
            bad = [k for k, v in lora.base_state_dict(self.unet).items() if v.is_floating_point()
                   and not bool(torch.isfinite(v).all())]
            if bad:
                lora.unfuse(self.unet)
                raise ValueError(f"fuse_lora(safe_fusing=True): fusing gives non-finite values in {bad[0]!r}; "
                                 "nothing was fused")

    def unfuse_lora(self, components: Sequence[str] | None = None) -> None:
        _check_components(components, "unfuse_lora")
        lora.unfuse(self.unet)

    def unload_lora_weights(self) -> None:
        """Remove every adapter (a fused LoRA stays in the weights, as in diffusers)."""
        lora.unload(self.unet)

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                          weight_name: str | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write one adapter (default: the only one loaded) in diffusers' LoRA layout:
        `save_directory/pytorch_lora_weights.safetensors` (or `weight_name`)."""
        names = lora.adapter_names(self.unet)
        if adapter_name is None:
            if len(names) != 1:
                raise ValueError(f"save_lora_weights: {len(names)} adapters are loaded ({names}); pass adapter_name=")
            adapter_name = names[0]
        weights = lora.adapter_weights(self.unet, adapter_name)
        target = Path(save_directory) / (weight_name or LORA_WEIGHT_NAME)
        return write_diffusers_lora(target, weights, self.unet.config, dtype=dtype)
