"""Checkpoint layouts in and out: the diffusers folder and the original ModelScope folder.

Why: users hold the released files in two layouts (and hub ids that point at them); the converter and
the pipelines need the same thing from both: each component's config plus its tensors *in our own key
space*, checked strictly. Readers return `(config, state)` per component so that a conversion holds one
component at a time; writers take the same pair.

Layouts
- "diffusers": model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/ (damo-vilab/
  text-to-video-ms-1.7b, cerspense/zeroscope_v2_*; also what `save_pretrained` and the converter write).
- "modelscope": configuration.json + text2video_pytorch_model.pth + VQGAN_autoencoder.pth (a whole
  Lightning checkpoint) + open_clip_pytorch_model.bin (damo-vilab/modelscope-damo-text-to-video-synthesis).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bundled import bundled_path
from .convert import apply_table, invert, shapes_of
from .safe_pickle import CheckpointReadError, safe_torch_load
from .text import (
    build_text_encoder,
    build_tokenizer,
    clip_text_to_open_clip,
    diffusers_text_ignored,
    diffusers_text_table,
    open_clip_to_clip_text,
    save_tokenizer,
    text_config_from_open_clip,
    text_config_to_diffusers,
)
from .unet import (
    UNet3D,
    UNetConfig,
    unet_config_from_diffusers,
    unet_config_from_original,
    unet_config_to_diffusers,
    unet_config_to_original,
    unet_diffusers_table,
    unet_original_table,
)
from .vae import (
    AutoencoderKL,
    VAEConfig,
    vae_config_from_diffusers,
    vae_config_from_original,
    vae_config_to_diffusers,
    vae_config_to_original,
    vae_diffusers_table,
    vae_original_table,
)

LAYOUTS = ("diffusers", "modelscope")
DIFFUSERS_VERSION = "0.42.1"  # written into the configs we produce; the reference we test against

# The original layout's file names (configuration.json's model.model_args names them too).
MS_UNET, MS_VAE, MS_CLIP = "text2video_pytorch_model.pth", "VQGAN_autoencoder.pth", "open_clip_pytorch_model.bin"
MS_VAE_PREFIX = "first_stage_model."  # the autoencoder's keys inside the Lightning checkpoint

# The weights file stem of each diffusers component.
DIFFUSERS_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


class LayoutError(ValueError):
    """A folder is not a checkpoint layout we know, or lacks a file that its layout needs."""


# ---------------------------------------------------------------------------------------------------
# Finding the folder: a local path, or a hub id resolved through huggingface_hub (and its cache).


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str:
    # Read at call time (huggingface_hub reads its constants once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _wanted_files(files: list[str], variant: str | None) -> list[str]:
    """Of a repo's files, the configs plus one weights file per component (safetensors before .bin,
    the requested variant before the plain file)."""
    wanted = [f for f in files if f.endswith((".json", ".txt")) and f.count("/") <= 1]
    wanted += [f for f in files if f in (MS_UNET, MS_VAE, MS_CLIP)]
    for component, stem in DIFFUSERS_WEIGHTS.items():
        pick = _pick_weights([f for f in files if f.startswith(component + "/")], f"{component}/{stem}", variant)
        if pick is not None:
            wanted.append(pick)
    return sorted(set(wanted))


def _pick_weights(files: list[str], stem: str, variant: str | None) -> str | None:
    names = []
    if variant:
        names += [f"{stem}.{variant}.safetensors", f"{stem}.{variant}.bin"]
    names += [f"{stem}.safetensors", f"{stem}.bin"]
    for n in names:
        if n in files:
            return n
    return None


def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, variant: str | None = None) -> Path:
    """A local folder as is; a bundled model's name (`bundled.BUNDLED`) gives its folder in the package;
    otherwise a hub id, downloaded (only the files of the chosen variant and
    format) or, with HF_HUB_OFFLINE=1, found in the Hugging Face cache (HF_HUB_CACHE / HF_HOME)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    bundled = bundled_path(str(path_or_repo_id))
    if bundled is not None:
        return bundled
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or local.exists():
        raise LayoutError(f"{repo_id!r} is neither a folder nor a hub id of the form 'org/name'")
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = _hub_cache_dir()
    offline = _env_flag("HF_HUB_OFFLINE")
    if offline:
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError as e:
            raise LayoutError(
                f"{repo_id!r} is not in the Hugging Face cache at {cache_dir} and HF_HUB_OFFLINE is set"
            ) from e
    files = list_repo_files(repo_id, revision=revision)
    return Path(
        snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_wanted_files(files, variant)
        )
    )


def detect_layout(folder: Path) -> str:
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if (folder / "configuration.json").is_file():
        return "modelscope"
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise LayoutError(
        f"{folder}: neither a diffusers folder (model_index.json) nor an original ModelScope folder "
        f"(configuration.json); it holds {present}"
    )


# ---------------------------------------------------------------------------------------------------
# Reading tensors: safetensors or (safely unpickled) .bin/.pth, every failure naming the file.


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{path}: unreadable or truncated safetensors file ({e})") from e
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LayoutError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from e


def _diffusers_weights(folder: Path, component: str, variant: str | None) -> Path:
    sub = folder / component
    stem = DIFFUSERS_WEIGHTS[component]
    files = [f"{component}/{p.name}" for p in sub.iterdir()] if sub.is_dir() else []
    pick = _pick_weights(files, f"{component}/{stem}", variant)
    if pick is None:
        raise LayoutError(f"{sub}: no {stem}.safetensors or {stem}.bin" + (f" (variant {variant!r})" if variant else ""))
    if variant and f".{variant}." not in pick:
        warnings.warn(f"{sub}: no {variant!r} variant; loading {Path(pick).name}", stacklevel=3)
    return folder / pick


def _ms_config(folder: Path) -> tuple[dict, dict]:
    cfg = _read_json(folder / "configuration.json")
    try:
        return cfg["model"]["model_args"], cfg["model"]["model_cfg"]
    except KeyError as e:
        raise LayoutError(f"{folder / 'configuration.json'}: no model.{e.args[0]}") from e


# ---------------------------------------------------------------------------------------------------
# Readers: (config, state in our key space), checked against the model built on the meta device.


def read_unet(folder: Path, layout: str, variant: str | None = None) -> tuple[UNetConfig, dict]:
    if layout == "diffusers":
        config = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
        path = _diffusers_weights(folder, "unet", variant)
        table = unet_diffusers_table(config)
        state = read_tensors(path)
    else:
        args, model_cfg = _ms_config(folder)
        path = folder / args.get("ckpt_unet", MS_UNET)
        state = read_tensors(path)
        config = unet_config_from_original(model_cfg, state)
        table = unet_original_table(config)
    with torch.device("meta"):
        shapes = shapes_of(UNet3D(config))
    return config, apply_table(state, table, shapes, what=str(path))


def read_vae(folder: Path, layout: str, variant: str | None = None) -> tuple[VAEConfig, dict]:
    if layout == "diffusers":
        config = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
        path = _diffusers_weights(folder, "vae", variant)
        state = read_tensors(path)
        table = vae_diffusers_table(config)
    else:
        args, _ = _ms_config(folder)
        path = folder / args.get("ckpt_autoencoder", MS_VAE)
        ckpt = read_tensors(path)
        # A Lightning checkpoint of a whole LDM: keep the autoencoder's keys; a bare state dict also works.
        inner = ckpt.get("state_dict", ckpt)
        if any(k.startswith(MS_VAE_PREFIX) for k in inner):
            state = {k[len(MS_VAE_PREFIX):]: v for k, v in inner.items() if k.startswith(MS_VAE_PREFIX)}
        else:
            state = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
        config = vae_config_from_original(state)
        table = vae_original_table(config)
    with torch.device("meta"):
        shapes = shapes_of(AutoencoderKL(config))
    return config, apply_table(state, table, shapes, what=str(path))


def read_text_encoder(folder: Path, layout: str, variant: str | None = None):
    """Returns (transformers CLIPTextConfig, state in CLIPTextModel keys)."""
    if layout == "modelscope":
        args, _ = _ms_config(folder)
        path = folder / args.get("ckpt_clip", MS_CLIP)
        state = read_tensors(path)
        config = text_config_from_open_clip(state)
        return config, open_clip_to_clip_text(state, config, what=str(path))
    config = _as_text_config(_read_json(folder / "text_encoder" / "config.json"))
    path = _diffusers_weights(folder, "text_encoder", variant)
    state = read_tensors(path)
    if not any(k.startswith("text_model.") for k in state):  # written by transformers 5's save_pretrained
        state = {"text_model." + k: v for k, v in state.items()}
    with torch.device("meta"):
        shapes = shapes_of(build_text_encoder(config))
    # released keys carry `text_model.`; this transformers version's CLIPTextModel may not
    return config, apply_table(state, diffusers_text_table(config), shapes, what=str(path), ignore=diffusers_text_ignored)


def _as_text_config(raw: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})


def read_tokenizer(folder: Path, layout: str):
    if layout == "diffusers" and (folder / "tokenizer").is_dir():
        return build_tokenizer(str(folder / "tokenizer"))
    return build_tokenizer(None)  # the original layout: CLIP BPE from open_clip's vocabulary, offline


def read_scheduler_config(folder: Path, layout: str) -> dict:
    from .schedulers import released_scheduler_config

    if layout == "diffusers" and (folder / "scheduler" / "scheduler_config.json").is_file():
        return _read_json(folder / "scheduler" / "scheduler_config.json")
    return released_scheduler_config()  # the original layout has none: the released DDIM config


def pipeline_class_name(folder: Path, layout: str) -> str:
    if layout == "diffusers":
        return _read_json(folder / "model_index.json").get("_class_name", "TextToVideoSDPipeline")
    return "TextToVideoSDPipeline"


# The guidance scale a model was measured best at, which the pipelines use when a call gives none (ours,
# like transformers' generation_config.json: a model trained here may need another scale than the
# released ones' 9). diffusers passes model_index.json's keys to the pipeline's __init__ and logs and
# drops the ones it does not take, so a folder carrying it still loads there (at diffusers' own default).
DEFAULT_GUIDANCE_KEY = "default_guidance_scale"


def check_guidance_scale(value, where: str) -> float:
    """A guidance scale: a finite number >= 0 (<= 1 switches guidance off), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: a guidance scale is a finite number >= 0, got {value!r}")
    return float(value)


def read_default_guidance_scale(folder: Path, layout: str) -> float | None:
    """model_index.json's `default_guidance_scale`, or None (absent; the original layout has no place for it)."""
    if layout != "diffusers":
        return None
    value = _read_json(folder / "model_index.json").get(DEFAULT_GUIDANCE_KEY)
    return None if value is None else check_guidance_scale(value, f"{folder / 'model_index.json'}: {DEFAULT_GUIDANCE_KEY}")


# ---------------------------------------------------------------------------------------------------
# Building modules from (config, state) without a second copy of the weights.


def instantiate(module_cls_or_fn, config, state: dict, dtype: torch.dtype | None) -> torch.nn.Module:
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


# ---------------------------------------------------------------------------------------------------
# Writers. Every file goes through a temporary name and os.replace, so a crash never leaves half a file.


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def write_pickle(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _weights_name(stem: str, variant: str | None) -> str:
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def write_diffusers_unet(folder: Path, config: UNetConfig, state: dict, variant: str | None = None) -> None:
    write_json(folder / "unet" / "config.json", unet_config_to_diffusers(config))
    out = apply_table(state, invert(unet_diffusers_table(config)), what="unet -> diffusers")
    write_safetensors(folder / "unet" / _weights_name(DIFFUSERS_WEIGHTS["unet"], variant), out)


def write_diffusers_vae(folder: Path, config: VAEConfig, state: dict, variant: str | None = None) -> None:
    write_json(folder / "vae" / "config.json", vae_config_to_diffusers(config))
    out = apply_table(state, invert(vae_diffusers_table(config)), what="vae -> diffusers")
    write_safetensors(folder / "vae" / _weights_name(DIFFUSERS_WEIGHTS["vae"], variant), out)


def write_diffusers_text_encoder(folder: Path, config, state: dict, variant: str | None = None) -> None:
    write_json(folder / "text_encoder" / "config.json", text_config_to_diffusers(config))
    out = apply_table(state, invert(diffusers_text_table(config)), what="text_encoder -> diffusers")
    write_safetensors(folder / "text_encoder" / _weights_name(DIFFUSERS_WEIGHTS["text_encoder"], variant), out)


def write_model_index(folder: Path, class_name: str = "TextToVideoSDPipeline", scheduler_class: str = "DDIMScheduler",
                      default_guidance_scale: float | None = None) -> None:
    index = {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if default_guidance_scale is not None:
        index[DEFAULT_GUIDANCE_KEY] = check_guidance_scale(default_guidance_scale, DEFAULT_GUIDANCE_KEY)
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
    write_json(
        folder / "configuration.json",
        {
            "framework": "pytorch",
            "task": "text-to-video-synthesis",
            "model": {
                "type": "latent-text-to-video-synthesis",
                "model_args": {
                    "ckpt_clip": MS_CLIP,
                    "ckpt_unet": MS_UNET,
                    "ckpt_autoencoder": MS_VAE,
                    "max_frames": max_frames,
                    "tiny_gpu": 1,
                },
                "model_cfg": model_cfg,
            },
            "pipeline": {"type": "latent-text-to-video-synthesis"},
        },
    )


def write_modelscope_unet(folder: Path, config: UNetConfig, state: dict) -> None:
    write_pickle(folder / MS_UNET, apply_table(state, invert(unet_original_table(config)), what="unet -> modelscope"))


def write_modelscope_vae(folder: Path, config: VAEConfig, state: dict) -> None:
    ldm = apply_table(state, invert(vae_original_table(config)), what="vae -> modelscope")
    # The original code reads ckpt['state_dict'] and keeps the 'first_stage_model.' keys.
    write_pickle(folder / MS_VAE, {"state_dict": {MS_VAE_PREFIX + k: v for k, v in ldm.items()}})


def write_modelscope_text_encoder(folder: Path, config, state: dict) -> None:
    write_pickle(folder / MS_CLIP, clip_text_to_open_clip(state, config))


# ---------------------------------------------------------------------------------------------------
# Layout -> layout conversion, one component in memory at a time.

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# component -> (reader, diffusers writer, original-layout writer)
COMPONENT_IO = {
    "unet": (read_unet, write_diffusers_unet, write_modelscope_unet),
    "vae": (read_vae, write_diffusers_vae, write_modelscope_vae),
    "text_encoder": (read_text_encoder, write_diffusers_text_encoder, write_modelscope_text_encoder),
}


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    variant: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    default_guidance_scale: float | None = None,
) -> Path:
    """Convert any supported layout (folder or hub id) into `to` ("diffusers" or "modelscope").

    `default_guidance_scale` sets model_index.json's (the guidance the pipelines use when a call gives
    none); None carries the source's. The original layout has no place for it.

    The result is assembled in a temporary sibling folder and moved into place at the end, so `dst`
    is either the old folder, or the complete new one. `variant` selects the source weights (e.g.
    "fp16") and, for `to="diffusers"`, names the written files the same way; `dtype` casts the tensors.
    """
    from tqdm.auto import tqdm

    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if default_guidance_scale is not None:
        if to != "diffusers":
            raise ValueError("default_guidance_scale: the original ModelScope layout has no place for it "
                             "(only the diffusers layout's model_index.json)")
        default_guidance_scale = check_guidance_scale(default_guidance_scale, "default_guidance_scale")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite)")
    folder = resolve(src, revision=revision, variant=variant)
    layout = detect_layout(folder)
    cast = DTYPES.get(dtype) if dtype else None

    def casted(state: dict) -> dict:
        if cast is None:
            return state
        return {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        steps = tqdm([*COMPONENT_IO, "tokenizer+scheduler"], desc=f"{layout} -> {to}", disable=not progress)
        unet_config = None
        for step in steps:
            steps.set_postfix_str(step)
            if step in COMPONENT_IO:
                read, write_diffusers, write_modelscope = COMPONENT_IO[step]
                config, state = read(folder, layout, variant)
                unet_config = config if step == "unet" else unet_config
                if to == "diffusers":
                    write_diffusers(tmp, config, casted(state), variant)
                else:
                    write_modelscope(tmp, config, casted(state))
            else:
                if to == "diffusers":
                    write_tokenizer(tmp, read_tokenizer(folder, layout))
                    write_scheduler(tmp, read_scheduler_config(folder, layout))
                    guidance = default_guidance_scale
                    if guidance is None:
                        guidance = read_default_guidance_scale(folder, layout)
                    write_model_index(tmp, pipeline_class_name(folder, layout), default_guidance_scale=guidance)
                else:
                    max_frames = _ms_config(folder)[0].get("max_frames", 16) if layout == "modelscope" else 16
                    dropped = read_default_guidance_scale(folder, layout)
                    if dropped is not None:
                        warnings.warn(f"{DEFAULT_GUIDANCE_KEY}={dropped:g} of {folder} is not carried: the original "
                                      "ModelScope layout has no place for it", stacklevel=2)
                    write_modelscope_config(tmp, unet_config, max_frames)
            state = None  # free this component before reading the next
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
