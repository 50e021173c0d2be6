"""Generate a video from a text prompt (Hydra entry point; the work is done by `generate(cfg)`).

    python sample.py prompt="a red circle moving left" seed=0 out=x.mp4   # the bundled shapes model
    python sample.py prompt="..." model=damo-vilab/text-to-video-ms-1.7b sampler=dpm++2m steps=25
    python sample.py prompt="..." model=./my-checkpoint num_frames=24 width=576 height=320 out=clip.gif
    python sample.py prompt="..." model=cerspense/zeroscope_v2_576w \\
        upscale.model=cerspense/zeroscope_v2_XL upscale.strength=0.6      # zeroscope's upscaling recipe
    python sample.py --help                                               # every option with its default

`model` is a bundled model ("shapes", the default: the project's own model of the shapes world, no
download), a size preset (tiny, ms-1.7b, zeroscope-576w, zeroscope-xl: RANDOMLY INITIALISED weights of
that size, for tests and for training from scratch; the output is noise), a local folder in either
released layout (diffusers or original ModelScope), or a hub id. The path of the written video is the
last line of stdout; logs and the progress bar go to stderr.

From Python (no Hydra):

    from sample import SampleConfig, generate
    path = generate(SampleConfig(prompt="a red circle moving left", steps=5, num_frames=4))
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from modelscope_t2v import schedulers
from modelscope_t2v.diffusion.samplers import check_guidance_scale
from modelscope_t2v.formats.locate import bundled_models
from modelscope_t2v.models import UNET_PRESETS

log = logging.getLogger("sample")

# The model `python sample.py` uses when none is named: the project's own shapes model, bundled in the
# package (modelscope_t2v/weights/shapes; docs/shapes_model.md). Change it here (and only here).
DEFAULT_MODEL = "shapes"

# ---------------------------------------------------------------------------------------------------
# Config: typed dataclasses, registered with Hydra's ConfigStore by the entry point below, so a
# misspelt key (`promt=`) or a wrong type (`steps=abc`) is refused by Hydra before anything runs.


@dataclass
class UpscaleConfig:
    """Optional second pass: resize the frames, then video-to-video (SDEdit) with `model`."""

    model: Optional[str] = None  # null: no upscaling; else a preset, folder or hub id (cerspense/zeroscope_v2_XL)
    strength: float = 0.6  # how much noise is added to the resized video (0: none, 1: all); XL's card: 0.6-0.85
    width: int = 1024  # resized frame size (multiples of 8); zeroscope XL was trained at 1024x576
    height: int = 576
    steps: Optional[int] = None  # null: the first pass's `steps`; strength * steps of them run
    guidance: Optional[float] = None  # guidance scale of the pass; null: the model's default, else 15 (diffusers')


@dataclass
class SampleConfig:
    prompt: str = MISSING  # required
    negative_prompt: Optional[str] = None  # null: the empty prompt is the unconditional branch (as released)
    model: str = DEFAULT_MODEL  # bundled model, preset (random weights!), local folder (either layout) or hub id
    sampler: str = "ddim"  # ddim | dpm++2m | dpm++2m-sde | dpm++3m (spaces, case and '_' are ignored)
    steps: int = 50  # number of denoising steps
    guidance: Optional[float] = None  # classifier-free guidance scale (<= 1 switches it off); null: the model's
    # default_guidance_scale (its model_index.json; the bundled shapes model's), else 9.0 (diffusers')
    spacing: Optional[str] = None  # leading | linspace | trailing; null: the sampler's own default
    eta: float = 0.0  # DDIM's stochasticity (0: deterministic); ignored by the DPM-Solver samplers
    num_frames: int = 16
    height: Optional[int] = None  # pixels, multiple of 8; null: the model's native size (256 for ms-1.7b)
    width: Optional[int] = None
    seed: int = 0  # noise seed (CPU generator: the same video on any device, and the same as diffusers)
    fps: int = 8  # of the written file; the released models were trained on 8 fps clips
    out: Optional[str] = None  # .mp4 or .gif; null: outputs/<timestamp>-<prompt slug>.mp4
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    vae_slicing: bool = True  # decode one frame at a time: memory flat in the number of frames, same output
    progress: bool = True  # tqdm progress bar on stderr
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)


# ---------------------------------------------------------------------------------------------------
# Names accepted on the command line -> what they mean.

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPACINGS = ("leading", "linspace", "trailing")
OUT_SUFFIXES = (".mp4", ".gif")

# sampler names: modelscope_t2v.schedulers.SAMPLERS (ddim, dpm++2m, dpm++2m-sde, dpm++3m, with aliases)
SAMPLERS = schedulers.SAMPLERS
sampler_name = schedulers.sampler_name


def presets() -> list[str]:
    return sorted(UNET_PRESETS)


# ---------------------------------------------------------------------------------------------------
# Validation: every value checked before a model is loaded; each error names its field.


def _positive_int(name: str, v: Any, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def _multiple_of_8(name: str, v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8:
        raise ValueError(f"{name} must be a positive multiple of 8 (the autoencoder's factor), got {v!r}")


def _finite(name: str, v: Any, low: float | None = None, high: float | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {v!r}")


def _model_ref(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a preset name, a folder or a hub id, got {v!r}")
    if v in presets() or v in bundled_models() or Path(v).expanduser().is_dir():
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", v) and not v.startswith((".", "/", "~")):
        return  # a hub id (org/name); whether it exists is for the loader (and the cache / network) to say
    raise ValueError(f"{name}={v!r} is neither a bundled model {bundled_models()}, a preset {presets()}, "
                     "an existing folder, nor a hub id (org/name)")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available on this machine (use device=cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def validate(cfg: SampleConfig) -> None:
    """Check every field; raise ValueError naming the first bad one. Loads nothing."""
    if not isinstance(cfg.prompt, str) or not cfg.prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {cfg.prompt!r}")
    if cfg.negative_prompt is not None and not isinstance(cfg.negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string or null, got {cfg.negative_prompt!r}")
    _model_ref("model", cfg.model)
    sampler_name(cfg.sampler)
    _positive_int("steps", cfg.steps)
    if cfg.steps > 1000:
        raise ValueError(f"steps must be <= 1000 (the training schedule's length), got {cfg.steps}")
    if cfg.guidance is not None:
        check_guidance_scale(cfg.guidance, "guidance")
    if cfg.spacing is not None and cfg.spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {list(SPACINGS)} or null, got {cfg.spacing!r}")
    _finite("eta", cfg.eta, low=0.0, high=1.0)
    _positive_int("num_frames", cfg.num_frames)
    _multiple_of_8("height", cfg.height)
    _multiple_of_8("width", cfg.width)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {cfg.seed!r}")
    _positive_int("fps", cfg.fps)
    if cfg.out is not None and Path(cfg.out).suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"out must end in one of {list(OUT_SUFFIXES)}, got {cfg.out!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    resolve_device(cfg.device)
    up = cfg.upscale
    if up.model is not None:
        _model_ref("upscale.model", up.model)
        _finite("upscale.strength", up.strength, low=0.0, high=1.0)
        _multiple_of_8("upscale.width", up.width)
        _multiple_of_8("upscale.height", up.height)
        if up.steps is not None:
            _positive_int("upscale.steps", up.steps)
            if up.steps > 1000:
                raise ValueError(f"upscale.steps must be <= 1000, got {up.steps}")
        if up.guidance is not None:
            check_guidance_scale(up.guidance, "upscale.guidance")


def as_config(cfg: SampleConfig | DictConfig | dict) -> SampleConfig:
    """A SampleConfig from a SampleConfig, a Hydra/OmegaConf config or a plain dict (keys and types
    checked against the schema: unknown keys and wrong types are errors, as on the command line)."""
    if isinstance(cfg, SampleConfig):
        return cfg
    if isinstance(cfg, (dict, DictConfig)):
        merged = OmegaConf.merge(OmegaConf.structured(SampleConfig), cfg)
        return OmegaConf.to_object(merged)
    raise TypeError(f"cfg must be a SampleConfig, a DictConfig or a dict, got {type(cfg).__name__}")


# ---------------------------------------------------------------------------------------------------
# The pieces of a run.


def default_out(prompt: str, now: float | None = None, folder: str | Path = "outputs") -> Path:
    """outputs/<YYYYmmdd-HHMMSS>-<slug of the prompt>.mp4, not overwriting an existing file."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "video"
    path = Path(folder) / f"{stamp}-{slug}.mp4"
    n = 1
    while path.exists():
        path = Path(folder) / f"{stamp}-{slug}-{n}.mp4"
        n += 1
    return path


def load_pipeline(model: str, cls, torch_dtype: torch.dtype):
    """A preset name (random weights), a local folder or a hub id -> a pipeline of class `cls`."""
    if model in presets():
        log.warning("model=%s is a size preset: RANDOMLY INITIALISED weights (the video will be noise). "
                    "Pass a folder or a hub id for trained weights.", model)
        return cls.from_preset(model, seed=0, torch_dtype=torch_dtype)
    return cls.from_pretrained(model, torch_dtype=torch_dtype)


def set_sampler(pipe, sampler: str, spacing: str | None) -> None:
    """Replace pipe.scheduler by `sampler` built from the checkpoint's scheduler config."""
    pipe.scheduler = schedulers.make_sampler(sampler, pipe.scheduler.config, spacing)


def resize_frames(frames, width: int, height: int):
    """(f, h, w, 3) float frames in [0, 1] -> (f, height, width, 3), bicubic with antialiasing."""
    import numpy as np
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(np.asarray(frames, dtype=np.float32))).permute(0, 3, 1, 2)  # f 3 h w
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)  # f 3 H W
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # f H W 3


def generate(cfg: SampleConfig | DictConfig | dict) -> Path:
    """Run one generation (and the optional upscaling pass); write the video; return its path."""
    from modelscope_t2v.pipelines import TextToVideoSDPipeline, VideoToVideoSDPipeline
    from modelscope_t2v.video_io import export_to_gif, export_to_video

    cfg = as_config(cfg)
    validate(cfg)
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("dtype=fp16 on the CPU is slow and some kernels lack it; fp32 or bf16 are the CPU choices")
    out = Path(cfg.out) if cfg.out is not None else default_out(cfg.prompt)

    pipe = load_pipeline(cfg.model, TextToVideoSDPipeline, dtype).to(device)
    set_sampler(pipe, cfg.sampler, cfg.spacing)
    pipe.set_progress_bar_config(disable=not cfg.progress, file=sys.stderr)
    if cfg.vae_slicing:
        pipe.enable_vae_slicing()
    guidance = pipe.resolve_guidance_scale(cfg.guidance)
    log.info("model %s, sampler %s (%s spacing), %d steps, guidance %g%s, %d frames, %s, %s",
             cfg.model, sampler_name(cfg.sampler), pipe.scheduler.config.timestep_spacing, cfg.steps,
             guidance, " (the model's default)" if cfg.guidance is None and pipe.default_guidance_scale is not None
             else "", cfg.num_frames, device, cfg.dtype)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    frames = pipe(
        cfg.prompt, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
        num_inference_steps=cfg.steps, guidance_scale=guidance, negative_prompt=cfg.negative_prompt,
        eta=cfg.eta, generator=generator, output_type="np",
    ).frames[0]  # f h w 3 in [0, 1]

    up = cfg.upscale
    if up.model is not None:
        if up.model == cfg.model:
            upscaler = VideoToVideoSDPipeline(**pipe.components)  # same weights (and sampler): no second copy
            upscaler.default_guidance_scale = pipe.default_guidance_scale
        else:
            del pipe  # free the first model before loading the second
            upscaler = load_pipeline(up.model, VideoToVideoSDPipeline, dtype).to(device)
            set_sampler(upscaler, cfg.sampler, cfg.spacing)
        upscaler.set_progress_bar_config(disable=not cfg.progress, file=sys.stderr)
        if cfg.vae_slicing:
            upscaler.enable_vae_slicing()
        steps = up.steps or cfg.steps
        up_guidance = upscaler.resolve_guidance_scale(up.guidance, video_to_video=True)
        log.info("upscaling to %dx%d with %s: strength %g, %d of %d steps, guidance %g",
                 up.width, up.height, up.model, up.strength, int(steps * up.strength), steps, up_guidance)
        frames = upscaler(
            cfg.prompt, video=resize_frames(frames, up.width, up.height), strength=up.strength,
            num_inference_steps=steps, guidance_scale=up_guidance, negative_prompt=cfg.negative_prompt,
            eta=cfg.eta, generator=generator, output_type="np",
        ).frames[0]

    export = export_to_gif if out.suffix.lower() == ".gif" else export_to_video
    return Path(export(frames, out, fps=cfg.fps))


# ---------------------------------------------------------------------------------------------------
# Hydra entry point: configs/sample.yaml on top of the schema; no chdir, no output folders.
#
# configs/ is shared with train.py, whose config groups (configs/model/, configs/data/, ...) Hydra
# would otherwise see: `model=<folder>` would then select a `model` group option instead of setting
# this config's plain string. So configs/sample.yaml is read here and handed to Hydra through the
# ConfigStore, with no config directory on Hydra's search path.

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "sample.yaml"


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="sample", node=OmegaConf.load(CONFIG_FILE))


# Free-text fields: `prompt=an astronaut riding a horse, 4k` is what users type, but commas, `!`, quotes
# and `${` mean something to Hydra's override grammar. Unless the value is already quoted, quote it.
FREE_TEXT = ("prompt", "negative_prompt")


def quote_free_text(args: list[str]) -> list[str]:
    """['prompt=a, b!'] -> ["prompt='a, b!'"] (Hydra's quoted-string escapes); other arguments as they are."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in FREE_TEXT and value and value[0] not in "'\"":
            # backslashes before a quote or the end are doubled, quotes escaped, interpolations disarmed
            value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
            value = value.replace("${", "\\${")
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def _hydra_main() -> None:
    import hydra

    _register()
    sys.argv[1:] = quote_free_text(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=None, config_name="sample")
    def main(cfg: DictConfig) -> None:
        try:
            path = generate(cfg)
        except ValueError as e:  # a bad value: one clear line, no traceback
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(path)  # the last line of stdout

    main()


if __name__ == "__main__":
    _hydra_main()
