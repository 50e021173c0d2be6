"""LoRA adapters on a model, through peft: add, load, weigh, scale, fuse, unfuse, remove.

Why peft: it is the maintained implementation (the one diffusers uses), so a LoRA here computes what it
computes in the ecosystem; this module only decides *which* modules (lora.targets), moves weights in and out
in our module names (formats.lora_layout.LoraWeights), and keeps the bookkeeping exact:
- a failed load leaves the model as it was (the new adapter is removed from every layer it reached);
- a per-call scale and `set_adapters` weights are exact: peft's `scaling` dicts are saved and restored,
  never divided back (scale 0 gives the base model's output bit for bit: the adapter branch adds zeros);
- `fuse` merges the active adapters into the base weights and `unfuse` subtracts the same products (the
  base weights come back within fp32 round-off); `unload` removes the LoRA layers and keeps what is fused.
The model may be any nn.Module; the UNet is the one used here.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from ..formats.lora_layout import ADAPTABLE, LoraEntry, LoraWeights, adaptable_modules
from .targets import LoraSpec, target_modules


def _peft():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    return LoraConfig, inject_adapter_in_model, LoraLayer


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> peft LoRA layer, for every adapted module of `model`."""
    _, _, LoraLayer = _peft()
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on `model`, in the order they were added."""
    return list(getattr(model, "peft_config", {}) or {})


def active_adapters(model: nn.Module) -> list[str]:
    layers = lora_layers(model)
    return list(next(iter(layers.values())).active_adapters) if layers else []


def is_fused(model: nn.Module) -> bool:
    return any(layer.merged for layer in lora_layers(model).values())


def _check_name(model: nn.Module, name: str, *, new: bool) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter_name must be letters, digits, '_' or '-', got {name!r}")
    if new and name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already loaded; choose another adapter_name "
                         f"(loaded: {adapter_names(model)})")
    if not new and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; loaded: {adapter_names(model)}")


def _require_unfused(model: nn.Module, what: str) -> None:
    if is_fused(model):
        raise RuntimeError(f"{what}: a LoRA is fused into the weights; call unfuse_lora() first")


def _inject(model: nn.Module, name: str, config, targets: Sequence[str]) -> None:
    """peft's injection of adapter `name`; on any error, everything it added is removed again."""
    _, inject_adapter_in_model, _ = _peft()
    before = active_adapters(model)
    try:
        with warnings.catch_warnings():  # peft warns that a second adapter makes the model hold several
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, model, adapter_name=name)
        missing = [t for t in targets if t not in lora_layers(model) or name not in lora_layers(model)[t].lora_A]
        if missing:
            raise RuntimeError(f"peft did not adapt {missing[:3]}")
    except BaseException:
        delete_adapters(model, [name], _force=True)
        raise
    set_adapters(model, before + [name], trainable=False)


def add_adapter(model: nn.Module, name: str, spec: LoraSpec) -> list[str]:
    """A new trainable adapter (peft's init: A Kaiming-uniform, B zero, so the model is unchanged until
    trained) on the modules `spec.target` selects; returns their paths. It becomes the only active one."""
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"add_adapter needs a LoraSpec, got {type(spec).__name__}")
    _check_name(model, name, new=True)
    _require_unfused(model, "add_adapter")
    LoraConfig, _, _ = _peft()
    targets = target_modules(model, spec.target)
    alpha = spec.rank if spec.alpha is None else spec.alpha
    config = LoraConfig(r=spec.rank, lora_alpha=alpha, lora_dropout=spec.dropout, target_modules=targets,
                        init_lora_weights=True)
    _inject(model, name, config, targets)
    set_adapters(model, [name], trainable=True)
    return targets


def load_adapter(model: nn.Module, name: str, weights: LoraWeights, *, active: bool = True) -> None:
    """Adapter `name` holding `weights` (our module paths, as formats.lora_layout reads them), added to the
    active adapters (weight 1) when `active`. Every entry is checked first; nothing changes on an error."""
    _check_name(model, name, new=True)
    _require_unfused(model, "load_lora_weights")
    if not weights:
        raise ValueError(f"adapter {name!r}: the LoRA holds no entries")
    modules = adaptable_modules(model) if not lora_layers(model) else _base_modules(model)
    unknown = sorted(set(weights) - set(modules))
    if unknown:
        raise ValueError(f"adapter {name!r}: {unknown[0]!r} is not an adaptable module of this model")
    LoraConfig, _, _ = _peft()
    ranks = [e.rank for e in weights.values()]
    r = max(set(ranks), key=ranks.count)
    alphas = [e.alpha for e in weights.values()]
    alpha = max(set(alphas), key=alphas.count)
    # peft matches these as regexes against the end of a module path: anchored and escaped, one per module
    rank_pattern = {f"^{re.escape(m)}": e.rank for m, e in weights.items() if e.rank != r}
    alpha_pattern = {f"^{re.escape(m)}": e.alpha for m, e in weights.items() if e.alpha != alpha}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(weights), rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, init_lora_weights=False)
    before = active_adapters(model)
    _inject(model, name, config, list(weights))
    layers = lora_layers(model)
    try:
        with torch.no_grad():
            for module, e in weights.items():
                layer = layers[module]
                for param, value in ((layer.lora_A[name].weight, e.down), (layer.lora_B[name].weight, e.up)):
                    if param.shape != value.shape:
                        raise ValueError(f"adapter {name!r}: {module!r} needs {tuple(param.shape)}, "
                                         f"the LoRA holds {tuple(value.shape)}")
                    param.copy_(value)
                # in the dtype of the weight it adapts (peft keeps half-precision adapters in float32): a
                # pipeline that casts its models for a call and back then gives the same output every call
                dtype = layer.get_base_layer().weight.dtype
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)
    except BaseException:
        delete_adapters(model, [name], _force=True)
        raise
    set_adapters(model, before + [name] if active else before, trainable=False)


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable modules by path, looking through LoRA layers to the modules they wrap."""
    layers = lora_layers(model)
    out = {}
    for name, m in model.named_modules():
        if name in layers:
            out[name] = layers[name].get_base_layer()
        elif type(m) in ADAPTABLE and not name.endswith(".base_layer") \
                and ".lora_" not in name:
            out[name] = m
    return out


def set_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float] | float | None = None, *,
                 trainable: bool = False) -> None:
    """Make `names` the active adapters, each scaled by its weight (default 1.0): the update of adapter a
    is weight_a * alpha_a / r_a * B_a A_a. Only trainable adapters get requires_grad."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _check_name(model, n, new=False)
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapters: names repeat: {names}")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(names)} adapters but {len(weights)} adapter_weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
            raise ValueError(f"set_adapters: adapter weights must be finite numbers, got {w!r}")
    _require_unfused(model, "set_adapters")
    for layer in lora_layers(model).values():
        layer.set_adapter(names, inference_mode=not trainable)
        for n, w in zip(names, weights):
            if n in layer.lora_A:
                layer.set_scale(n, float(w))


@contextlib.contextmanager
def scaled(model: nn.Module, scale: float) -> Iterator[None]:
    """Multiply every active adapter's update by `scale` inside the block (diffusers'
    `cross_attention_kwargs={"scale": s}`); the exact scalings come back afterwards."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    layers = lora_layers(model)
    if scale == 1.0 or not layers:
        yield
        return
    saved = {path: dict(layer.scaling) for path, layer in layers.items()}
    try:
        for layer in layers.values():
            for n in layer.active_adapters:
                if n in layer.scaling:
                    layer.scaling[n] = layer.scaling[n] * scale
        yield
    finally:
        for path, layer in layers.items():
            layer.scaling.clear()
            layer.scaling.update(saved[path])


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block: every LoRA layer skips its adapters (peft's
    `enable_adapters(False)`), so a call costs what the bare model costs, unlike `scaled(model, 0.0)`,
    which computes the updates and multiplies them by 0. Which parameters require grad comes back as it
    was (peft's toggle would otherwise freeze or unfreeze them)."""
    _require_unfused(model, "disabled")
    layers = lora_layers(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for layer in layers.values():
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers.values():
            layer.enable_adapters(True)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])


def fuse(model: nn.Module, scale: float = 1.0, names: Sequence[str] | None = None) -> None:
    """Merge the active adapters (or `names`), times `scale`, into the base weights; until `unfuse`, the
    model runs at the base model's cost and per-call scales have no effect."""
    _require_unfused(model, "fuse_lora")
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("fuse_lora: no LoRA is loaded")
    names = active_adapters(model) if names is None else list(names)
    for n in names:
        _check_name(model, n, new=False)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise ValueError(f"fuse_lora: lora_scale must be a finite number, got {scale!r}")
    for layer in layers.values():
        layer._scaling_before_fuse = dict(layer.scaling)  # restored by unfuse
        for n in names:
            if n in layer.scaling:
                layer.scaling[n] = layer.scaling[n] * scale
        with torch.no_grad():
            layer.merge(adapter_names=[n for n in names if n in layer.lora_A])


def unfuse(model: nn.Module) -> None:
    """Subtract what `fuse` merged (the same products), and restore the scalings."""
    layers = lora_layers(model)
    if not is_fused(model):
        raise RuntimeError("unfuse_lora: no LoRA is fused")
    for layer in layers.values():
        if layer.merged:
            with torch.no_grad():
                layer.unmerge()
        saved = getattr(layer, "_scaling_before_fuse", None)
        if saved is not None:
            layer.scaling.clear()
            layer.scaling.update(saved)
            del layer._scaling_before_fuse


def delete_adapters(model: nn.Module, names: Sequence[str], *, _force: bool = False) -> None:
    """Remove adapters; a layer left with none becomes the plain module again."""
    names = [names] if isinstance(names, str) else list(names)
    if not _force:
        for n in names:
            _check_name(model, n, new=False)
        _require_unfused(model, "delete_adapters")
    active = [a for a in active_adapters(model) if a not in names]
    for layer in lora_layers(model).values():
        for n in names:
            if n in layer.lora_A or n in layer.scaling:
                layer.delete_adapter(n)
    for n in names:
        getattr(model, "peft_config", {}).pop(n, None)
    _unwrap_empty(model)
    if lora_layers(model) and active:
        set_adapters(model, active)


def _unwrap_empty(model: nn.Module, everything: bool = False) -> None:
    for path, layer in list(lora_layers(model).items()):
        if everything or not layer.lora_A:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if not lora_layers(model) and hasattr(model, "peft_config"):
        del model.peft_config


def unload(model: nn.Module) -> None:
    """Remove every LoRA layer; a fused LoRA stays in the weights (diffusers' `unload_lora_weights`)."""
    for layer in lora_layers(model).values():
        if getattr(layer, "_scaling_before_fuse", None) is not None:
            del layer._scaling_before_fuse
    _unwrap_empty(model, everything=True)


def adapter_weights(model: nn.Module, name: str) -> LoraWeights:
    """Adapter `name` as LoraWeights (our module paths; copies on the CPU, in the adapter's dtype)."""
    _check_name(model, name, new=False)
    out: LoraWeights = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            out[path] = LoraEntry(layer.lora_A[name].weight.detach().cpu().clone(),
                                  layer.lora_B[name].weight.detach().cpu().clone(), float(layer.lora_alpha[name]))
    return out


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `name` by their path in `model` (what a LoRA trainer optimises and saves)."""
    _check_name(model, name, new=False)
    return {k: p for k, p in model.named_parameters() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` in the plain model's keys: LoRA tensors dropped, wrapped weights under their own
    names (with a fused LoRA, the fused weights)."""
    layers = lora_layers(model)
    if not layers:
        return model.state_dict()
    prefixes = tuple(f"{p}." for p in layers)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            path = next(p for p in layers if k.startswith(f"{p}."))
            rest = k[len(path) + 1:]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B / dropout state
            k = f"{path}.{rest[len('base_layer.'):]}"
        out[k] = v
    return out


def has_unfused(model: nn.Module) -> bool:
    """True if an adapter is loaded and not (fully) fused: the plain weights alone are not the model that runs."""
    layers = lora_layers(model)
    return bool(layers) and not all(layer.merged for layer in layers.values())
