"""Layout -> layout conversion of a whole checkpoint, one component in memory at a time
(`convert_weights.py` is its command line)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..diffusion.samplers import check_guidance_scale
from .folders import (
    COMPONENTS,
    modelscope_config,
    pipeline_class_name,
    read_generation_defaults,
    read_scheduler_config,
    read_tokenizer,
    write_model_index,
    write_modelscope_config,
    write_scheduler,
    write_tokenizer,
)
from .files import read_json
from .locate import DIFFUSERS_WEIGHTS, LAYOUTS, MS_CLIP, MS_UNET, MS_VAE, detect_layout, resolve

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What the converter writes, per layout: the top-level entries, and the files of each component folder
_WRITES = {
    "diffusers": {"model_index.json": None,
                  **{name: (r"config\.json", rf"{re.escape(stem)}(\.[\w-]+)?\.safetensors")
                     for name, stem in DIFFUSERS_WEIGHTS.items()},
                  "tokenizer": (r"vocab\.json", r"merges\.txt", r"special_tokens_map\.json", r"tokenizer_config\.json"),
                  "scheduler": (r"scheduler_config\.json",)},
    "modelscope": {"configuration.json": None, MS_UNET: None, MS_VAE: None, MS_CLIP: None},
}


def check_original_layout_holds(folder: Path) -> None:
    """ValueError naming what the original ModelScope layout cannot hold (its code hard-codes parts of the
    architecture), from a diffusers folder's configs alone: no tensor is read."""
    problems = []
    for name in ("unet", "vae"):
        part = COMPONENTS[name]
        try:
            part.to_original(part.config_from_diffusers(read_json(folder / name / "config.json")))
        except ValueError as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise ValueError(f"{folder} cannot be written in the original ModelScope layout: " + "; ".join(problems))


def check_replaceable(dst: Path, source: Path) -> None:
    """Refuse (FileExistsError naming the path) to replace `dst` unless it is empty or a model folder this
    converter could have written: never the source folder or a folder that contains it, never a folder
    holding anything else (a file of its own, a training run, a cache)."""
    if not dst.exists():
        return
    d, s = dst.resolve(), source.resolve()
    if d == s:
        raise FileExistsError(f"{dst} is the source folder; convert into another folder")
    if d in s.parents:
        raise FileExistsError(f"{dst} contains the source {source}; replacing it would delete the source")
    entries = sorted(dst.iterdir())
    if not entries:
        return
    layout = "diffusers" if (dst / "model_index.json").is_file() else "modelscope"
    writes = _WRITES[layout]
    foreign = []
    for entry in entries:
        files = writes.get(entry.name, False)
        if files is None and entry.is_file():
            continue
        if files and entry.is_dir() and not entry.is_symlink():
            foreign += [f for f in sorted(entry.iterdir())
                        if not (f.is_file() and any(re.fullmatch(p, f.name) for p in files))]
            continue
        foreign.append(entry)
    if foreign:
        shown = ", ".join(str(p.relative_to(dst)) for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{dst} is not a model folder this converter writes (it holds {shown}); "
                              "refusing to replace it: choose another destination or remove those yourself")



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
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite)")
    folder = resolve(src, revision=revision, variant=variant)
    layout = detect_layout(folder)
    check_replaceable(dst, folder)
    defaults = read_generation_defaults(folder, layout)
    if to == "modelscope" and layout == "diffusers":
        check_original_layout_holds(folder)  # before a progress bar and a long write
    cast = DTYPES.get(dtype) if dtype else None

    def casted(state: dict) -> dict:
        if cast is None:
            return state
        return {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        steps = tqdm([*COMPONENTS, "tokenizer+scheduler"], desc=f"{layout} -> {to}", disable=not progress)
        unet_config = None
        for step in steps:
            steps.set_postfix_str(step)
            if step in COMPONENTS:
                part = COMPONENTS[step]
                config, state = part.read(folder, layout, variant)
                unet_config = config if step == "unet" else unet_config
                if to == "diffusers":
                    part.write_diffusers(tmp, config, casted(state), variant)
                else:
                    part.write_modelscope(tmp, config, casted(state))
            else:
                if to == "diffusers":
                    write_tokenizer(tmp, read_tokenizer(folder, layout))
                    write_scheduler(tmp, read_scheduler_config(folder, layout))
                    if default_guidance_scale is not None:
                        defaults["default_guidance_scale"] = default_guidance_scale
                    write_model_index(tmp, pipeline_class_name(folder, layout), defaults=defaults)
                else:
                    max_frames = modelscope_config(folder)[0].get("max_frames", 16) if layout == "modelscope" else 16
                    if defaults:
                        warnings.warn(f"{', '.join(f'{k}={v:g}' for k, v in defaults.items())} of {folder} not carried: "
                                      "the original ModelScope layout has no place for them", stacklevel=2)
                    write_modelscope_config(tmp, unet_config, max_frames)
            state = None  # free this component before reading the next
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old)  # onto the empty folder just made: nothing else is touched
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------------
# A LoRA file of any layout -> diffusers' layout (`convert_weights.py --lora-for MODEL`).


def convert_lora_file(src, dst, model, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Read the LoRA `src` (a file, a folder or a hub id; any layout of formats.lora_layout) for the UNet of
    `model` (a folder, bundled model or hub id: its UNet config says which modules exist) and write it in
    diffusers' layout: `dst` a folder (then `pytorch_lora_weights.safetensors` in it) or a `.safetensors` path.

    A distilled student's folder (trainer.target=lcd) is read against `model`'s UNet with the student's guidance
    embedding, and `dst` (a folder) gets its lora_run.json too, with `model` as its base: the bundled
    shapes-turbo is `convert_weights.py runs/.../last modelscope_t2v/weights/shapes-turbo --lora-for shapes`."""
    import dataclasses

    from .files import write_json
    from .folders import read_unet
    from .locate import resolve_file
    from .lora_layout import LORA_WEIGHT_NAME, STUDENT_FILE, read_lora, read_student, write_diffusers_lora
    from .unet_layout import unet_config_from_diffusers

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = resolve(model)
    layout = detect_layout(folder)
    config = (unet_config_from_diffusers(read_json(folder / "unet" / "config.json")) if layout == "diffusers"
              else read_unet(folder, layout)[0])
    path = resolve_file(src, None, (LORA_WEIGHT_NAME,), (".safetensors", ".pt", ".bin", ".pth"), what="LoRA")
    target = Path(dst)
    target = target if target.suffix == ".safetensors" else target / LORA_WEIGHT_NAME
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if target.resolve() == path.resolve():
        raise FileExistsError(f"{target} is the source file; write elsewhere")
    student = read_student(src) if Path(src).is_dir() else None
    if student is not None:
        if Path(dst).suffix == ".safetensors":
            raise ValueError(f"{src} is a distilled student: write it to a folder (the LoRA and {STUDENT_FILE}), "
                             f"not to the file {dst}")
        config = dataclasses.replace(config, timestep_cond_dim=int(student["distillation"]["guidance_embedding_dim"]))
    weights, _ = read_lora(path, config)
    out = write_diffusers_lora(target, weights, config, dtype=DTYPES[dtype] if dtype else None)
    if student is not None:
        write_json(target.parent / STUDENT_FILE, {**student, "base_model": str(model)})
    return out
