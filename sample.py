"""Generate videos from text prompts (Hydra entry point; the work is done by `generate(cfg)`).

    python sample.py prompt="a red circle moving left" seed=0 out=x.mp4   # the bundled shapes model
    python sample.py prompt="..." model=damo-vilab/text-to-video-ms-1.7b sampler=dpm++2m steps=25
    python sample.py prompt="..." model=./my-checkpoint num_frames=24 width=576 height=320 out=clip.gif
    python sample.py prompt="..." model=cerspense/zeroscope_v2_576w \\
        upscale.model=cerspense/zeroscope_v2_XL upscale.strength=0.6      # zeroscope's upscaling recipe
    python sample.py prompts=prompts.txt num_videos_per_prompt=4 out_dir=videos/   # many videos, resumable
    torchrun --nproc_per_node=8 sample.py prompts=prompts.csv out_dir=videos/      # each rank its share
    python sample.py -m prompt="a red circle moving left","a blue square moving up" seed=0,1   # a sweep
    python sample.py --help                                               # every option with its default

`model` is a bundled model ("shapes", the default: the project's own model of the shapes world, no
download), a size preset (tiny, ms-1.7b, zeroscope-576w, zeroscope-xl: RANDOMLY INITIALISED weights of
that size, for tests and for training from scratch; the output is noise), a local folder in either
released layout (diffusers or original ModelScope), or a hub id.

One video (`prompt=`): written to `out` (default outputs/<time>-s<seed>-<prompt>.mp4), its path the last
line of stdout. Several (`prompts=FILE`, a prompt a line or a CSV with prompt[,seed][,negative_prompt]
columns, and/or num_videos_per_prompt > 1): written to `out_dir` as NNNN-s<seed>-<prompt>.mp4, video j of a
prompt with seed seed + j, and out_dir/manifest.jsonl (its path the last line of stdout). Beside every video
<name>.json holds every setting that made it and the command that makes it again; a rerun skips the videos
already there and never overwrites one made otherwise (overwrite=true to replace). Under torchrun each
rank makes every WORLD_SIZE-th video. Logs and the progress bar go to stderr.

From Python (no Hydra):

    from sample import SampleConfig, generate
    path = generate(SampleConfig(prompt="a red circle moving left", steps=5, num_frames=4))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from modelscope_t2v import jobs, schedulers
from modelscope_t2v.diffusion.samplers import check_guidance_scale
from modelscope_t2v.formats.locate import BUNDLED_LORAS, bundled_lora_path, bundled_models
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
    prompt: Optional[str] = None  # the prompt (or prompts=FILE: one of the two is required)
    prompts: Optional[str] = None  # a file: a prompt a line, or a .csv with prompt[,seed][,negative_prompt] columns
    negative_prompt: Optional[str] = None  # null: the empty prompt is the unconditional branch (as released)
    num_videos_per_prompt: int = 1  # videos per prompt, with seeds seed, seed + 1, ...
    model: str = DEFAULT_MODEL  # bundled model, preset (random weights!), local folder (either layout) or hub id
    # ddim | dpm++2m | dpm++2m-karras | dpm++2m-sde | dpm++3m | euler | euler-a | unipc | lcm (spaces, case and
    # '_' are ignored); null: the model's own scheduler (DDIM for the released and shapes models, LCM for a
    # distilled student such as shapes-turbo)
    sampler: Optional[str] = None
    steps: Optional[int] = None  # number of denoising steps; null: the model's default (a student's 4), else 50
    guidance: Optional[float] = None  # classifier-free guidance scale (<= 1 switches it off); null: the model's
    # default_guidance_scale (its model_index.json; the bundled shapes model's), else 9.0 (diffusers')
    spacing: Optional[str] = None  # leading | linspace | trailing; null: the sampler's own default
    eta: float = 0.0  # DDIM's stochasticity (0: deterministic); ignored by the other samplers
    num_frames: Optional[int] = None  # null: the model's (what it was trained at, if its folder says; else 16)
    height: Optional[int] = None  # pixels, multiple of 8; null: the model's native size (256 for ms-1.7b)
    width: Optional[int] = None
    seed: int = 0  # noise seed (CPU generator: the same video on any device, and the same as diffusers)
    fps: int = 8  # of the written file; the released models were trained on 8 fps clips
    out: Optional[str] = None  # one video: .mp4 or .gif; null: outputs/<timestamp>-s<seed>-<prompt slug>.mp4
    out_dir: Optional[str] = None  # several videos: their folder; null: outputs/<timestamp>/
    format: str = "mp4"  # of videos in out_dir: mp4 | gif
    overwrite: bool = False  # replace a video that is there from another request (never silently)
    batch_size: int = 4  # videos per pipeline call (several videos)
    # fp32 | fp16 | bf16. bf16 computes in bf16, on a CPU too (fast where the CPU has bf16 units: AVX512-BF16, AMX);
    # fp16 weights on a CPU compute in fp32 (the CPU lacks fp16 kernels; docs/design.md)
    dtype: str = "fp32"
    device: str = "auto"  # auto (cuda if available; under torchrun cuda:LOCAL_RANK) | cpu | cuda | cuda:N
    vae_slicing: bool = True  # decode one frame at a time: memory flat in the number of frames, same output
    progress: bool = True  # tqdm progress bar on stderr
    # LoRA(s) applied to the model: a file, a folder holding pytorch_lora_weights.safetensors, or a hub id;
    # several as a list: lora=[style.safetensors,motion.pt]. Any layout pipe.load_lora_weights reads.
    lora: Any = None
    lora_scale: Any = 1.0  # the LoRA's weight, or one per LoRA: lora_scale=[0.8,1.0] (0: the base model)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    # Long videos and pinned frames (pipelines/long_video.py, docs/long_video.md)
    image: Optional[str] = None  # an image file the video starts from (image-to-video), resized to the video
    last_image: Optional[str] = None  # an image file the video ends on
    loop: bool = False  # the last frame leads back to the first
    image_strength: float = 1.0  # how hard image / last_image are held (1: exactly their frames)
    pin_noise: float = 0.3  # pinned frames are re-noised to this fraction of the current timestep
    clips: int = 1  # > 1: that many clips of num_frames, each continuing the last clip_overlap frames of the one before
    clip_overlap: int = 4
    free_noise: bool = False  # FreeNoise: windowed temporal attention, rescheduled noise (context 16, stride 4)
    sliding_windows: bool = False  # the whole UNet over overlapping 16-frame windows, averaged (the baseline)
    freeu: Optional[list] = None  # [s1, s2, b1, b2], e.g. [0.9, 0.2, 1.2, 1.4]
    free_init: Optional[int] = None  # FreeInit iterations (e.g. 3; butterworth filter, diffusers' defaults)
    # Approximate speed-ups (pipelines/acceleration.py, docs/benchmarks.md)
    deepcache: Optional[int] = None  # DeepCache's cache_interval (e.g. 3): the whole UNet every that many steps
    deepcache_branch: int = 0  # DeepCache's cache_branch_id: the skip connection the shallow steps run up to
    guidance_cache: Optional[int] = None  # the unconditional branch every that many steps (e.g. 2), reused between
    compile: bool = False  # torch.compile the UNet and the autoencoder (the first video of a size compiles: minutes)


# ---------------------------------------------------------------------------------------------------
# Names accepted on the command line -> what they mean.

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPACINGS = ("leading", "linspace", "trailing")
OUT_SUFFIXES = (".mp4", ".gif")

# sampler names: modelscope_t2v.schedulers.SAMPLERS (ddim, dpm++2m, dpm++2m-karras, dpm++2m-sde, dpm++3m, euler,
# euler-a, unipc, lcm; with aliases)
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


def loras(cfg: SampleConfig) -> list[tuple[str, float]]:
    """(LoRA reference, weight) pairs of `lora=` and `lora_scale=`; ValueError naming a bad one. Loads nothing."""
    refs = [] if cfg.lora is None else [cfg.lora] if isinstance(cfg.lora, str) else cfg.lora
    if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ValueError(f"lora must be a path or hub id, or a list of them: lora=[a.safetensors,b.pt]; got {cfg.lora!r}")
    for r in refs:
        local = Path(r).expanduser()
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", r) and not r.startswith((".", "/", "~"))
        if not local.exists() and not hub_id and bundled_lora_path(r) is None:
            raise ValueError(f"lora={r!r}: no such file or folder, not a bundled LoRA {sorted(BUNDLED_LORAS)}, "
                             "and not a hub id (org/name)")
    scales = cfg.lora_scale if isinstance(cfg.lora_scale, (list, tuple)) else [cfg.lora_scale] * len(refs)
    if len(scales) != len(refs):
        raise ValueError(f"lora_scale: {len(scales)} weights for {len(refs)} LoRA(s); give one, or one per LoRA")
    for v in scales:
        _finite("lora_scale", v)
    return [(r, float(v)) for r, v in zip(refs, scales)]


def apply_loras(pipe, pairs: list[tuple[str, float]]) -> None:
    """Load each LoRA into `pipe` (adapters lora0, lora1, ...) and make them the active ones at their weights."""
    if not pairs:
        return
    names = [pipe.load_lora_weights(ref, adapter_name=f"lora{i}") for i, (ref, _) in enumerate(pairs)]
    pipe.set_adapters(names, [w for _, w in pairs])
    log.info("LoRA: %s", ", ".join(f"{ref} (weight {w:g})" for ref, w in pairs))


resolve_device = jobs.resolve_device


def validate(cfg: SampleConfig) -> None:
    """Check every field; raise ValueError naming the first bad one. Loads nothing."""
    if cfg.prompt is None and cfg.prompts is None:
        raise ValueError("prompt= is required (the text of the video), or prompts=FILE (a prompt a line, or a CSV "
                         "with a prompt column); e.g. python sample.py prompt=\"a red circle moving left\"")
    if cfg.prompt is not None and cfg.prompts is not None:
        raise ValueError("prompt and prompts: give one of them, not both")
    if cfg.prompt is not None and (not isinstance(cfg.prompt, str) or not cfg.prompt.strip()):
        raise ValueError(f"prompt must be a non-empty string, got {cfg.prompt!r}")
    if cfg.prompts is not None and not Path(cfg.prompts).is_file():
        raise ValueError(f"prompts: no such file {cfg.prompts!r}")
    if cfg.negative_prompt is not None and not isinstance(cfg.negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string or null, got {cfg.negative_prompt!r}")
    _model_ref("model", cfg.model)
    if cfg.sampler is not None:
        sampler_name(cfg.sampler)
    if cfg.steps is not None:
        _positive_int("steps", cfg.steps)
        if cfg.steps > 1000:
            raise ValueError(f"steps must be <= 1000 (the training schedule's length), got {cfg.steps}")
    if cfg.guidance is not None:
        check_guidance_scale(cfg.guidance, "guidance")
    if cfg.spacing is not None and cfg.spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {list(SPACINGS)} or null, got {cfg.spacing!r}")
    _finite("eta", cfg.eta, low=0.0, high=1.0)
    if cfg.num_frames is not None:
        _positive_int("num_frames", cfg.num_frames)
    _positive_int("num_videos_per_prompt", cfg.num_videos_per_prompt)
    _positive_int("batch_size", cfg.batch_size)
    _multiple_of_8("height", cfg.height)
    _multiple_of_8("width", cfg.width)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {cfg.seed!r}")
    _positive_int("fps", cfg.fps)
    if cfg.out is not None and Path(cfg.out).suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"out must end in one of {list(OUT_SUFFIXES)}, got {cfg.out!r}")
    if cfg.out is not None and (cfg.out_dir is not None or several(cfg)):
        raise ValueError("out names one video; several (prompts=FILE, num_videos_per_prompt > 1) go to out_dir")
    if f".{cfg.format}" not in OUT_SUFFIXES:
        raise ValueError(f"format must be one of {[x[1:] for x in OUT_SUFFIXES]}, got {cfg.format!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    resolve_device(cfg.device)
    loras(cfg)
    _check_long(cfg)
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


def _check_long(cfg: SampleConfig) -> None:
    """The long-video and pinned-frame fields (image files opened here, before any model loads)."""
    from PIL import Image, UnidentifiedImageError

    for name in ("image", "last_image"):
        path = getattr(cfg, name)
        if path is not None:
            try:
                with Image.open(path) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"{name}: {path!r} is not an image file ({type(e).__name__})") from None
    if cfg.loop and cfg.last_image is not None:
        raise ValueError("loop=true leads the last frame back to the first: it cannot also take last_image")
    _finite("image_strength", cfg.image_strength, low=0.0, high=1.0)
    _finite("pin_noise", cfg.pin_noise, low=0.0, high=1.0)
    _positive_int("clips", cfg.clips)
    _positive_int("clip_overlap", cfg.clip_overlap)
    if cfg.clips > 1 and (cfg.image is not None or cfg.last_image is not None or cfg.loop):
        raise ValueError("clips > 1 chains clips by continuation; image, last_image and loop are for one clip")
    if cfg.clips > 1 and cfg.num_frames is not None and cfg.clip_overlap >= cfg.num_frames:
        raise ValueError(f"clip_overlap={cfg.clip_overlap} frames of each {cfg.num_frames}-frame clip continue the "
                         "one before, leaving none to generate; use clip_overlap < num_frames")
    if cfg.clips > 1 and cfg.upscale.model is not None:
        raise ValueError("clips > 1 and upscale.model: upscale the chained video in a second run")
    if cfg.freeu is not None and (len(cfg.freeu) != 4 or not all(isinstance(v, (int, float)) for v in cfg.freeu)):
        raise ValueError(f"freeu must be [s1, s2, b1, b2] (four numbers), got {cfg.freeu!r}")
    if cfg.free_init is not None:
        _positive_int("free_init", cfg.free_init)
    if (cfg.free_noise or cfg.sliding_windows) and cfg.num_frames is not None and cfg.num_frames < 16:
        raise ValueError(f"free_noise / sliding_windows work in windows of 16 frames; num_frames={cfg.num_frames} is shorter")
    if cfg.free_noise and cfg.sliding_windows:
        raise ValueError("free_noise and sliding_windows: choose one way of windowing a long video")
    if cfg.deepcache is not None:
        _positive_int("deepcache", cfg.deepcache)
        if isinstance(cfg.deepcache_branch, bool) or not isinstance(cfg.deepcache_branch, int) or cfg.deepcache_branch < 0:
            raise ValueError(f"deepcache_branch must be an int >= 0, got {cfg.deepcache_branch!r}")
        if cfg.sliding_windows:
            raise ValueError("deepcache and sliding_windows: DeepCache keeps one feature per step; choose one")
    if cfg.guidance_cache is not None:
        _positive_int("guidance_cache", cfg.guidance_cache)


def _long_switches(cfg: SampleConfig, pipe) -> None:
    if cfg.deepcache is not None:
        pipe.enable_deepcache(cache_interval=cfg.deepcache, cache_branch_id=cfg.deepcache_branch)
    if cfg.guidance_cache is not None:
        pipe.enable_guidance_cache(cache_interval=cfg.guidance_cache)
    if cfg.compile:
        pipe.compile()
    if cfg.free_noise:
        pipe.enable_free_noise()
    if cfg.sliding_windows:
        pipe.enable_sliding_windows()
    if cfg.freeu is not None:
        pipe.enable_freeu(*cfg.freeu)
    if cfg.free_init is not None:
        pipe.enable_free_init(num_iters=cfg.free_init)


def several(cfg: SampleConfig) -> bool:
    """Whether the run makes several videos (into out_dir, with a manifest) rather than one."""
    return cfg.prompts is not None or cfg.num_videos_per_prompt > 1 or cfg.out_dir is not None


def _unknown_keys(cfg, schema, prefix: str = "") -> list[str]:
    """Keys of `cfg` that `schema` (a dataclass) has no field for; `+key=value` adds such keys past Hydra."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in cfg:
        if key not in names:
            out.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(names[key].default_factory() if callable(names[key].default_factory) else None) \
                and isinstance(cfg[key], (dict, DictConfig)):
            out += _unknown_keys(cfg[key], type(names[key].default_factory()), f"{prefix}{key}.")
    return out


def as_config(cfg: SampleConfig | DictConfig | dict) -> SampleConfig:
    """A SampleConfig from a SampleConfig, a Hydra/OmegaConf config or a plain dict (keys and types
    checked against the schema: unknown keys and wrong types are errors, as on the command line)."""
    if isinstance(cfg, SampleConfig):
        return cfg
    if isinstance(cfg, (dict, DictConfig)):
        merged = OmegaConf.merge(OmegaConf.structured(SampleConfig), cfg)
        unknown = _unknown_keys(cfg, SampleConfig)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}: SampleConfig has no such field (python sample.py --help)")
        return OmegaConf.to_object(merged)
    raise TypeError(f"cfg must be a SampleConfig, a DictConfig or a dict, got {type(cfg).__name__}")


# ---------------------------------------------------------------------------------------------------
# The pieces of a run.


def default_out(prompt: str, now: float | None = None, folder: str | Path = "outputs", seed: int | None = None) -> Path:
    """outputs/<YYYYmmdd-HHMMSS>[-s<seed>]-<slug of the prompt>.mp4, not overwriting an existing file."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    stem = f"{stamp}-s{seed}-{jobs.slug(prompt)}" if seed is not None else f"{stamp}-{jobs.slug(prompt)}"
    path = Path(folder) / f"{stem}.mp4"
    n = 1
    while path.exists():
        path = Path(folder) / f"{stem}-{n}.mp4"
        n += 1
    return path


def load_pipeline(model: str, cls, torch_dtype: torch.dtype):
    """A preset name (random weights), a local folder or a hub id -> a pipeline of class `cls`."""
    if model in presets():
        log.warning("model=%s is a size preset: RANDOMLY INITIALISED weights (the video will be noise). "
                    "Pass a folder or a hub id for trained weights.", model)
        return cls.from_preset(model, seed=0, torch_dtype=torch_dtype)
    return cls.from_pretrained(model, torch_dtype=torch_dtype)


def set_sampler(pipe, sampler: str | None, spacing: str | None) -> None:
    """Replace pipe.scheduler by `sampler` built from the checkpoint's scheduler config (None: keep the model's
    own scheduler, with `spacing` if given)."""
    if sampler is not None:
        pipe.scheduler = schedulers.make_sampler(sampler, pipe.scheduler.config, spacing)
    elif spacing is not None:
        if type(pipe.scheduler).__name__ == "LCMScheduler":
            raise ValueError(f"spacing={spacing!r} does not apply to the model's LCM sampler (a distilled student's "
                             "timesteps come from its distillation grid); leave it null")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=spacing)


def sampler_label(pipe, sampler: str | None) -> str:
    """The sampler's name for the log: the one asked for, or the model's own scheduler's class."""
    return sampler_name(sampler) if sampler is not None else f"{type(pipe.scheduler).__name__} (the model's own)"


def resize_frames(frames, width: int, height: int):
    """(f, h, w, 3) float frames in [0, 1] -> (f, height, width, 3), bicubic with antialiasing."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(np.asarray(frames, dtype=np.float32))).permute(0, 3, 1, 2)  # f 3 h w
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)  # f 3 H W
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # f H W 3


def _request(cfg: SampleConfig) -> dict[str, Any]:
    """The settings that decide a video besides its prompt and seed (a sidecar's key to resume by)."""
    keep = ("model", "sampler", "steps", "guidance", "spacing", "eta", "num_frames", "height", "width", "fps",
            "dtype", "image", "last_image", "loop", "image_strength", "pin_noise", "clips", "clip_overlap", "free_noise",
            "sliding_windows", "freeu", "free_init", "deepcache", "deepcache_branch",
            "guidance_cache")
    up = dataclasses.asdict(cfg.upscale) if cfg.upscale.model is not None else None
    pairs = loras(cfg)
    lora = {"lora": [r for r, _ in pairs], "lora_scale": [w for _, w in pairs]} if pairs else {}
    sampler = sampler_name(cfg.sampler) if cfg.sampler is not None else None  # None: the model's own
    return {**{k: getattr(cfg, k) for k in keep}, "sampler": sampler, **lora, "upscale": up}


def _warn_beyond_the_model(cfg: SampleConfig, videos: list[jobs.Video]) -> None:
    """The bundled shapes model knows one grammar and one clip size: say so where a request leaves them."""
    from modelscope_t2v.data.shapes import parse_shapes_caption
    from modelscope_t2v.formats.locate import bundled_path

    if cfg.model not in bundled_models() or Path(cfg.model).is_dir() or bundled_path(cfg.model) is None:
        return
    outside = sorted({v.prompt for v in videos if not _parses(parse_shapes_caption, v.prompt)})
    still = sorted({v.prompt for v in videos if v.prompt.strip().endswith("standing still")} - set(outside))
    if still and not loras(cfg):
        log.warning("model=%s never saw \"standing still\" (%r): the LoRA lora=shapes-still teaches it "
                    "(docs/lora.md)", cfg.model, still[0])
    if outside:
        log.warning("model=%s knows only prompts \"a {color} {shape} moving {direction}\" (docs/shapes_model.md); "
                    "it was never shown %s", cfg.model, ", ".join(repr(p) for p in outside[:3]) + (" ..." if len(outside) > 3 else ""))
    size = (cfg.num_frames or 16, cfg.height or 64, cfg.width or 64)
    if size != (16, 64, 64):
        log.warning("model=%s was trained on 16 frames at 64x64; %d frames at %dx%d is outside what it learned",
                    cfg.model, *size)


def _parses(parse, prompt: str) -> bool:
    try:
        parse(prompt)
        return True
    except ValueError:
        return False


def _plan(cfg: SampleConfig) -> tuple[list[jobs.Video], Path | None, Path | None]:
    """(every video of the run, the one video's path or None, the folder of several or None)."""
    rows = jobs.read_prompts(cfg.prompts) if cfg.prompts is not None else [(cfg.prompt, None, None)]
    videos = jobs.video_list(rows, cfg.seed, cfg.num_videos_per_prompt, cfg.negative_prompt)
    if not several(cfg):
        out = Path(cfg.out) if cfg.out is not None else default_out(cfg.prompt, seed=cfg.seed)
        jobs.check_writable(out)
        return videos, out, None
    folder = Path(cfg.out_dir) if cfg.out_dir is not None else Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
    jobs.check_writable(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out_dir: {folder} is a file")
    return videos, None, folder


def generate(cfg: SampleConfig | DictConfig | dict) -> Path:
    """Make the run's videos (and the optional upscaling pass); write them with their sidecars; return the
    video's path (one video) or the manifest's (several)."""
    from modelscope_t2v.pipelines import TextToVideoSDPipeline, VideoToVideoSDPipeline

    cfg = as_config(cfg)
    validate(cfg)
    videos, out, folder = _plan(cfg)
    _warn_beyond_the_model(cfg, videos)
    rank, world, device = jobs.processes(cfg.device)
    suffix = out.suffix.lower() if out is not None else f".{cfg.format}"
    request = _request(cfg)
    mine = [(v, out if out is not None else folder / jobs.file_name(v, suffix)) for v in jobs.share(videos, rank, world)]
    todo = [(v, p) for v, p in mine if not jobs.is_done(p, v, request, overwrite=cfg.overwrite)]  # checked before loading
    if len(todo) < len(mine):
        log.info("%d of %d videos are already there (same request): skipped", len(mine) - len(todo), len(mine))
    dtype = DTYPES[cfg.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("dtype=fp16 on the CPU is slow and some kernels lack it; fp32 or bf16 are the CPU choices")
    if todo:
        pipe = load_pipeline(cfg.model, TextToVideoSDPipeline, dtype).to(device)
        pipe.cpu_upcast = dtype != torch.bfloat16
        set_sampler(pipe, cfg.sampler, cfg.spacing)
        apply_loras(pipe, loras(cfg))
        _long_switches(cfg, pipe)
        pipe.set_progress_bar_config(disable=not cfg.progress, file=sys.stderr)
        if cfg.vae_slicing:
            pipe.enable_vae_slicing()
        _warn_beyond_the_training_size(cfg, pipe)
        guidance = pipe.resolve_guidance_scale(cfg.guidance)
        log.info("model %s, sampler %s (%s spacing), %d steps, guidance %g%s, %s, %s: %d video(s)",
                 cfg.model, sampler_label(pipe, cfg.sampler), pipe.scheduler.config.timestep_spacing,
                 cfg.steps or pipe.default_num_inference_steps or 50, guidance,
                 " (the model's default)" if cfg.guidance is None and pipe.default_guidance_scale is not None else "",
                 device, cfg.dtype, len(todo))
        upscaler = None
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            generators = [torch.Generator("cpu").manual_seed(v.seed) for v, _ in batch]
            frames, resolved = _first_pass(cfg, pipe, guidance, [v for v, _ in batch], generators)
            if cfg.upscale.model is not None:
                if upscaler is None:
                    if len(todo) == 1 and cfg.upscale.model != cfg.model:
                        del pipe  # one video: free the first model before loading the second
                        pipe = None
                    upscaler = _upscaler(cfg, pipe, VideoToVideoSDPipeline, dtype, device)
                frames = _upscale_pass(cfg, upscaler, [v for v, _ in batch], generators, frames, resolved)
            for (video, path), video_frames in zip(batch, frames):
                # the sidecar first: a video beside its sidecar is complete (both are written atomically),
                # and a crash between the two leaves a sidecar without its video, which a rerun makes
                jobs.write_sidecar(path, video, request, resolved)
                _write(video_frames, path, cfg.fps)
                if folder is not None:
                    print(path, flush=True)
    if folder is None:
        return out
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:
            return folder / jobs.MANIFEST
    return jobs.write_manifest(folder, videos, suffix)


def _upscaler(cfg: SampleConfig, pipe, cls, dtype: torch.dtype, device: torch.device):
    """The video-to-video pipeline of the upscaling pass, or None: the same weights when the model is."""
    up = cfg.upscale
    if up.model is None:
        return None
    if up.model == cfg.model:
        upscaler = cls.from_pipe(pipe)  # same weights (and sampler): no second copy
    else:
        upscaler = load_pipeline(up.model, cls, dtype).to(device)
        upscaler.cpu_upcast = dtype != torch.bfloat16
        set_sampler(upscaler, cfg.sampler, cfg.spacing)
    upscaler.set_progress_bar_config(disable=not cfg.progress, file=sys.stderr)
    if cfg.vae_slicing:
        upscaler.enable_vae_slicing()
    return upscaler


def _warn_beyond_the_training_size(cfg: SampleConfig, pipe) -> None:
    trained = (pipe.default_num_frames, pipe.default_height, pipe.default_width)
    asked = (cfg.num_frames, cfg.height, cfg.width)
    if all(t is not None for t in trained) and any(a is not None and a != t for a, t in zip(asked, trained)):
        log.warning("model=%s was trained on %d frames at %dx%d; asked for %s frames at %sx%s", cfg.model, *trained,
                    *(a if a is not None else t for a, t in zip(asked, trained)))


def _prompts(videos: list[jobs.Video]) -> tuple[list[str], list[str] | None]:
    negatives = [v.negative_prompt or "" for v in videos] if any(v.negative_prompt for v in videos) else None
    return [v.prompt for v in videos], negatives


def _first_pass(cfg: SampleConfig, pipe, guidance: float, videos: list[jobs.Video], generators: list) -> tuple[list, dict]:
    """(frames per video, f h w 3 in [0, 1]; what the batch resolved to): one pipeline call, each video's noise
    from its own CPU generator (a video does not depend on the batch it ran in)."""
    prompts, negatives = _prompts(videos)
    kw = dict(height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, num_inference_steps=cfg.steps,
              guidance_scale=guidance, eta=cfg.eta)
    if cfg.clips > 1:  # one chained video at a time, each clip continuing the last
        frames = np.stack([pipe.generate_continued(v.prompt, cfg.clips, cfg.clip_overlap, generator=g,
                                                   negative_prompt=v.negative_prompt, pin_noise=cfg.pin_noise, **kw)
                           for v, g in zip(videos, generators)])
    else:
        from PIL import Image

        pins = {k: Image.open(getattr(cfg, k)).convert("RGB") for k in ("image", "last_image") if getattr(cfg, k)}
        frames = pipe(prompts, negative_prompt=negatives, generator=generators, output_type="np", loop=cfg.loop,
                      image_strength=cfg.image_strength, pin_noise=cfg.pin_noise, **pins, **kw).frames  # b f h w 3
    resolved = {"num_frames": frames.shape[1], "height": frames.shape[2], "width": frames.shape[3],
                "guidance": guidance, "spacing": pipe.scheduler.config.timestep_spacing,
                "steps": cfg.steps or pipe.default_num_inference_steps or 50, "scheduler": type(pipe.scheduler).__name__}
    return list(frames), resolved


def _upscale_pass(cfg: SampleConfig, upscaler, videos: list[jobs.Video], generators: list, frames: list,
                  resolved: dict) -> list:
    """The frames resized to upscale.width x height, then video-to-video with the upscaler (the generators go
    on from where the first pass left them)."""
    up = cfg.upscale
    steps = up.steps or cfg.steps or upscaler.default_num_inference_steps or 50
    up_guidance = upscaler.resolve_guidance_scale(up.guidance, video_to_video=True)
    log.info("upscaling to %dx%d with %s: strength %g, %d of %d steps, guidance %g",
             up.width, up.height, up.model, up.strength, int(steps * up.strength), steps, up_guidance)
    resized = [resize_frames(f, up.width, up.height) for f in frames]
    prompts, negatives = _prompts(videos)
    out = upscaler(
        prompts, video=resized[0] if len(resized) == 1 else np.stack(resized), strength=up.strength,
        num_inference_steps=steps, guidance_scale=up_guidance, negative_prompt=negatives, eta=cfg.eta,
        generator=generators, output_type="np", loop=cfg.loop,  # a loop stays one
    ).frames
    resolved["upscale"] = {"steps": steps, "guidance": up_guidance, "height": up.height, "width": up.width}
    return list(out)


def _write(frames, path: Path, fps: int) -> Path:
    from modelscope_t2v import video_io

    export = video_io.export_to_gif if path.suffix.lower() == ".gif" else video_io.export_to_video
    return Path(export(frames, path, fps=fps))


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
# and `${` mean something to Hydra's override grammar. Unless the value is already quoted, quote it (but for
# -m: there the commas of `prompt=a,b` make a sweep over two prompts).
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
    if not {"-m", "--multirun"} & set(sys.argv[1:]):  # a sweep's commas separate its values
        sys.argv[1:] = quote_free_text(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=None, config_name="sample")
    def main(cfg: DictConfig) -> None:
        try:
            path = generate(cfg)
        except (ValueError, OSError, FloatingPointError) as e:  # a bad value, file or number: one clear line
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(path)  # the last line of stdout

    main()


if __name__ == "__main__":
    _hydra_main()
