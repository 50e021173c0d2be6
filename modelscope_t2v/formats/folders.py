"""Pipeline folders in and out, per component: the diffusers layout and the original ModelScope layout.

Why: users hold the released files in two layouts; the pipelines, the converter and the trainer need the
same thing from both: each component's config plus its tensors *in our own key space*, checked strictly.
Readers return `(config, state)` so that a conversion holds one component at a time; writers take the same
pair. `COMPONENTS` says, per component, how to build it and which reader and writers serve it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..diffusion.samplers import check_guidance_scale
from ..models.text import build_text_encoder, build_tokenizer, save_tokenizer, text_config
from ..models.unet import UNet3D, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from .files import LayoutError, check_weights, read_json, read_tensors, write_json, write_pickle, write_safetensors
from .locate import DIFFUSERS_WEIGHTS, MS_CLIP, MS_UNET, MS_VAE, pick_weights
from .tables import apply_table, invert, shapes_of
from .text_layout import (
    clip_text_to_open_clip,
    diffusers_text_ignored,
    diffusers_text_table,
    open_clip_to_clip_text,
    text_config_from_open_clip,
    text_config_to_diffusers,
)
from .unet_layout import (
    unet_config_from_diffusers,
    unet_config_from_original,
    unet_config_to_diffusers,
    unet_config_to_original,
    unet_diffusers_table,
    unet_original_table,
)
from .vae_layout import (
    vae_config_from_diffusers,
    vae_config_from_original,
    vae_config_to_diffusers,
    vae_config_to_original,
    vae_diffusers_table,
    vae_original_table,
)

DIFFUSERS_VERSION = "0.42.1"  # written into the configs we produce; the reference we test against
MS_VAE_PREFIX = "first_stage_model."  # the autoencoder's keys inside the Lightning checkpoint

# The scheduler of the released ModelScope T2V checkpoints (diffusers layout, damo-vilab/text-to-video-ms-1.7b
# and the zeroscope fine-tunes): what the original layout, which has no scheduler folder, is read with.
MODELSCOPE_T2V_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "trained_betas": None,
    }
)


def released_scheduler_config() -> dict[str, Any]:
    """A fresh, mutable copy of `MODELSCOPE_T2V_SCHEDULER_CONFIG`."""
    return dict(MODELSCOPE_T2V_SCHEDULER_CONFIG)


# Generation defaults (ours, like transformers' generation_config.json), which the pipelines use when a
# call gives none: the guidance scale a model was measured best at (a model trained here may need another
# than the released ones' 9) and the clip size it was trained at (a training checkpoint records its data's).
# diffusers passes model_index.json's keys to the pipeline's __init__ and logs and drops the ones it does not
# take, so a folder carrying them still loads there (at diffusers' own defaults).
DEFAULT_GUIDANCE_KEY = "default_guidance_scale"
GENERATION_DEFAULTS = (DEFAULT_GUIDANCE_KEY, "default_num_frames", "default_height", "default_width",
                       "default_num_inference_steps")


def check_generation_defaults(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The generation defaults in `values` (None entries dropped), each checked: a guidance scale, or a
    positive integer; ValueError naming `where` and the key otherwise."""
    out: dict[str, Any] = {}
    for key in GENERATION_DEFAULTS:
        value = values.get(key)
        if value is None:
            continue
        if key == DEFAULT_GUIDANCE_KEY:
            out[key] = check_guidance_scale(value, f"{where}: {key}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Locating a component's files.


def _diffusers_weights(folder: Path, component: str, variant: str | None) -> Path:
    sub = folder / component
    stem = DIFFUSERS_WEIGHTS[component]
    files = [f"{component}/{p.name}" for p in sub.iterdir()] if sub.is_dir() else []
    pick = pick_weights(files, f"{component}/{stem}", variant)
    if pick is None:
        raise LayoutError(f"{sub}: no {stem}.safetensors or {stem}.bin" + (f" (variant {variant!r})" if variant else ""))
    if variant and f".{variant}." not in pick:
        warnings.warn(f"{sub}: no {variant!r} variant; loading {Path(pick).name}", stacklevel=2)
    return folder / pick


def modelscope_config(folder: Path) -> tuple[dict, dict]:
    """configuration.json's (model.model_args, model.model_cfg) of an original-layout folder."""
    cfg = read_json(folder / "configuration.json")
    try:
        args, model_cfg = cfg["model"]["model_args"], cfg["model"]["model_cfg"]
    except KeyError as e:
        raise LayoutError(f"{folder / 'configuration.json'}: no model.{e.args[0]}") from None
    except TypeError:
        raise LayoutError(f"{folder / 'configuration.json'}: `model` must be an object") from None
    if not isinstance(args, dict) or not isinstance(model_cfg, dict):
        raise LayoutError(f"{folder / 'configuration.json'}: model.model_args and model.model_cfg must be objects")
    return args, model_cfg


# ---------------------------------------------------------------------------------------------------
# Readers: (config, state in our key space), checked against the model built on the meta device.


def _ours(build: Callable, config, state: dict, table, path: Path, ignore=()) -> tuple[Any, dict]:
    with torch.device("meta"):
        shapes = shapes_of(build(config))
    ours = apply_table(state, table, shapes, what=str(path), ignore=ignore)
    check_weights(ours, path)
    return config, ours


def _config(path: Path, parse: Callable, *args):
    """parse(*args), its ValueError / TypeError turned into a LayoutError naming the config file."""
    try:
        return parse(*args)
    except (ValueError, TypeError) as e:
        raise LayoutError(f"{path}: {e}") from None


def _read_diffusers(folder: Path, name: str, variant: str | None, config_from: Callable, table: Callable,
                    build: Callable) -> tuple[Any, dict]:
    config_path = folder / name / "config.json"
    config = _config(config_path, config_from, read_json(config_path))
    path = _diffusers_weights(folder, name, variant)
    return _ours(build, config, read_tensors(path), table(config), path)


def _read_modelscope(folder: Path, arg: str, default: str) -> tuple[Path, dict, dict]:
    """(path, tensors, model.model_cfg) of an original-layout weights file (model_args names it)."""
    args, model_cfg = modelscope_config(folder)
    path = folder / args.get(arg, default)
    return path, read_tensors(path), model_cfg


def read_unet(folder: Path, layout: str, variant: str | None = None) -> tuple[UNetConfig, dict]:
    if layout == "diffusers":
        return _read_diffusers(folder, "unet", variant, unet_config_from_diffusers, unet_diffusers_table, UNet3D)
    path, state, model_cfg = _read_modelscope(folder, "ckpt_unet", MS_UNET)
    config = _config(folder / "configuration.json", unet_config_from_original, model_cfg, state)
    return _ours(UNet3D, config, state, unet_original_table(config), path)


def read_vae(folder: Path, layout: str, variant: str | None = None) -> tuple[VAEConfig, dict]:
    if layout == "diffusers":
        return _read_diffusers(folder, "vae", variant, vae_config_from_diffusers, vae_diffusers_table, AutoencoderKL)
    path, ckpt, _ = _read_modelscope(folder, "ckpt_autoencoder", MS_VAE)
    # A Lightning checkpoint of a whole LDM: keep the autoencoder's keys; a bare state dict also works.
    inner = ckpt.get("state_dict", ckpt)
    if any(k.startswith(MS_VAE_PREFIX) for k in inner):
        state = {k[len(MS_VAE_PREFIX):]: v for k, v in inner.items() if k.startswith(MS_VAE_PREFIX)}
    else:
        state = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    config = _config(path, vae_config_from_original, state)
    return _ours(AutoencoderKL, config, state, vae_original_table(config), path)


def read_text_encoder(folder: Path, layout: str, variant: str | None = None):
    """Returns (transformers CLIPTextConfig, state in CLIPTextModel keys)."""
    if layout == "modelscope":
        path, state, _ = _read_modelscope(folder, "ckpt_clip", MS_CLIP)
        config = _config(path, text_config_from_open_clip, state)
        ours = open_clip_to_clip_text(state, config, what=str(path))
        check_weights(ours, path)
        return config, ours
    config_path = folder / "text_encoder" / "config.json"
    raw = read_json(config_path)
    config = _config(config_path, text_config, {k: v for k, v in raw.items() if not k.startswith("_")})
    path = _diffusers_weights(folder, "text_encoder", variant)
    state = read_tensors(path)
    if not any(k.startswith("text_model.") for k in state):  # written by transformers 5's save_pretrained
        state = {"text_model." + k: v for k, v in state.items()}
    # released keys carry `text_model.`; this transformers version's CLIPTextModel may not
    return _ours(build_text_encoder, config, state, diffusers_text_table(config), path, diffusers_text_ignored)


def read_tokenizer(folder: Path, layout: str):
    if layout == "diffusers" and (folder / "tokenizer").is_dir():
        return build_tokenizer(str(folder / "tokenizer"))
    return build_tokenizer(None)  # the original layout: CLIP BPE from open_clip's vocabulary, offline


def read_scheduler_config(folder: Path, layout: str) -> dict:
    if layout == "diffusers" and (folder / "scheduler" / "scheduler_config.json").is_file():
        return read_json(folder / "scheduler" / "scheduler_config.json")
    return released_scheduler_config()  # the original layout has none: the released DDIM config


def pipeline_class_name(folder: Path, layout: str) -> str:
    if layout == "diffusers":
        return read_json(folder / "model_index.json").get("_class_name", "TextToVideoSDPipeline")
    return "TextToVideoSDPipeline"


def read_generation_defaults(folder: Path, layout: str) -> dict[str, Any]:
    """model_index.json's generation defaults (GENERATION_DEFAULTS; the original layout has no place for them)."""
    if layout != "diffusers":
        return {}
    path = folder / "model_index.json"
    return _config(path, check_generation_defaults, read_json(path), str(path))


# ---------------------------------------------------------------------------------------------------
# Building modules from (config, state) without a second copy of the weights.


def instantiate(module_cls_or_fn, config, state: dict, dtype: torch.dtype | None) -> nn.Module:
    """Build on the meta device, then adopt the tensors (strict: every key, every shape)."""
    with torch.device("meta"):
        model = module_cls_or_fn(config)
    model.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):  # transformers' non-persistent arange buffer
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            ids = torch.arange(buf.shape[-1]).expand(buf.shape)
            owner.register_buffer(name.rpartition(".")[2], ids, persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LayoutError(f"{type(model).__name__}: tensors not provided by the checkpoint: {left[:5]}")
    model.to(dtype or torch.float32)
    return model.eval().requires_grad_(False)


def load_component(name: str, folder: Path, layout: str, variant: str | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Component `name` ("unet", "vae", "text_encoder") of a folder, built and loaded strictly, eval mode."""
    part = COMPONENTS[name]
    return instantiate(part.build, *part.read(folder, layout, variant), dtype)


# ---------------------------------------------------------------------------------------------------
# Writers (every file atomic: files.atomic_path).


def weights_name(stem: str, variant: str | None) -> str:
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def _write_diffusers(name: str, config_json: dict, table) -> Callable:
    """The diffusers writer of component `name`: config.json and its weights under the released keys."""

    def write(folder: Path, config, state: dict, variant: str | None = None) -> None:
        write_json(folder / name / "config.json", config_json(config))
        out = apply_table(state, invert(table(config)), what=f"{name} -> diffusers")
        write_safetensors(folder / name / weights_name(DIFFUSERS_WEIGHTS[name], variant), out)

    return write


def write_modelscope_unet(folder: Path, config: UNetConfig, state: dict) -> None:
    write_pickle(folder / MS_UNET, apply_table(state, invert(unet_original_table(config)), what="unet -> modelscope"))


def write_modelscope_vae(folder: Path, config: VAEConfig, state: dict) -> None:
    ldm = apply_table(state, invert(vae_original_table(config)), what="vae -> modelscope")
    # The original code reads ckpt['state_dict'] and keeps the 'first_stage_model.' keys.
    write_pickle(folder / MS_VAE, {"state_dict": {MS_VAE_PREFIX + k: v for k, v in ldm.items()}})


def write_modelscope_text_encoder(folder: Path, config, state: dict) -> None:
    write_pickle(folder / MS_CLIP, clip_text_to_open_clip(state, config))


def write_model_index(folder: Path, class_name: str = "TextToVideoSDPipeline", scheduler_class: str = "DDIMScheduler",
                      defaults: Mapping[str, Any] | None = None) -> None:
    """model_index.json, with the generation `defaults` (GENERATION_DEFAULTS keys) that are set."""
    index = {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    index.update(check_generation_defaults(defaults or {}, "model_index.json"))
    write_json(folder / "model_index.json", index)


def write_scheduler(folder: Path, scheduler_config: Mapping) -> None:
    cfg = {k: v for k, v in dict(scheduler_config).items() if k != "_use_default_values"}  # in-memory only
    cfg.setdefault("_class_name", "DDIMScheduler")
    cfg["_diffusers_version"] = DIFFUSERS_VERSION
    write_json(folder / "scheduler" / "scheduler_config.json", cfg)


def write_tokenizer(folder: Path, tokenizer) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=folder))
    try:
        save_tokenizer(tokenizer, str(tmp))
        dst = folder / "tokenizer"
        dst.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_modelscope_config(folder: Path, unet_config: UNetConfig, max_frames: int = 16) -> None:
    model_cfg = dict(unet_config_to_original(unet_config))
    model_cfg.update(num_timesteps=1000, mean_type="eps", var_type="fixed_small", loss_type="mse")
    model_args = {"ckpt_clip": MS_CLIP, "ckpt_unet": MS_UNET, "ckpt_autoencoder": MS_VAE, "max_frames": max_frames,
                  "tiny_gpu": 1}
    write_json(folder / "configuration.json", {
        "framework": "pytorch",
        "task": "text-to-video-synthesis",
        "model": {"type": "latent-text-to-video-synthesis", "model_args": model_args, "model_cfg": model_cfg},
        "pipeline": {"type": "latent-text-to-video-synthesis"},
    })


# ---------------------------------------------------------------------------------------------------
# The table: per component, how to build it and which reader and writers serve it.


@dataclass(frozen=True)
class Component:
    build: Callable[[Any], nn.Module]  # config -> a randomly initialised module (meta device: its shapes)
    read: Callable[..., tuple[Any, dict]]  # (folder, layout, variant) -> (config, state in our keys)
    write_diffusers: Callable[..., None]  # (folder, config, state, variant)
    write_modelscope: Callable[..., None]  # (folder, config, state)
    config_from_diffusers: Callable[[dict], Any]  # its config.json -> config
    to_original: Callable[[Any], Any]  # config -> the original layout's; ValueError for what it cannot hold


COMPONENTS: Mapping[str, Component] = MappingProxyType({
    "unet": Component(UNet3D, read_unet, _write_diffusers("unet", unet_config_to_diffusers, unet_diffusers_table),
                      write_modelscope_unet, unet_config_from_diffusers, unet_config_to_original),
    "vae": Component(AutoencoderKL, read_vae, _write_diffusers("vae", vae_config_to_diffusers, vae_diffusers_table),
                     write_modelscope_vae, vae_config_from_diffusers, vae_config_to_original),
    "text_encoder": Component(build_text_encoder, read_text_encoder,
                              _write_diffusers("text_encoder", text_config_to_diffusers, diffusers_text_table),
                              write_modelscope_text_encoder, text_config, text_config),
})


def write_diffusers_component(name: str, folder: Path, config, state: dict, variant: str | None = None) -> None:
    """Write component `name` ("unet", "vae", "text_encoder") into a diffusers-layout folder."""
    COMPONENTS[name].write_diffusers(folder, config, state, variant)
