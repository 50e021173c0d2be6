"""T2V-Turbo-MS (Li et al. 2024, "T2V-Turbo", arXiv 2405.18750): ModelScope 1.7B distilled into a 4-step
consistency model, released as a LoRA plus a guidance-scale embedding.

    pipe = T2VTurboMSPipeline.from_pretrained("jiachenli-ucsb/T2V-Turbo-MS")   # base: damo-vilab/...-ms-1.7b
    video = pipe("a corgi running on the beach").frames[0]                    # 4 steps, w = 7.5, 16 x 256^2

What the release is (its app_ms.py, read for this): the base UNet rebuilt with `time_cond_proj_dim=256`
(a bias-free Linear(256 -> 320) added to the timestep's sinusoidal embedding: our UNetConfig.timestep_cond_dim),
the base weights loaded into it, and `unet_lora.pt` applied: a cloneofsimo list of (up, down) pairs, one per
Linear / Conv2d / Conv3d of diffusers' UNet3DConditionModel in `named_modules()` order (rank 32, capped at a
module's width; scale 1), merged into the weights. Sampling: no classifier-free guidance, the scale w enters
as `timestep_cond` = the LCM guidance embedding of w itself (not w - 1), and LCM multistep sampling on
T2V-Turbo's own timestep rule (4 steps: 999, 759, 519, 279; `LCMScheduler(lcm_timestep_rule="stride")`).

The file holds only the LoRA's update of `cond_proj`, not `cond_proj` itself: the demo leaves that weight at
the random init `UNet3DConditionModel.from_config` gives it. `cond_proj_init="demo"` redraws that init as a
process whose CPU generator starts at torch's long-standing default seed (67280421310721) does it: the draws of
conv_in, time_embedding.linear_1 and then cond_proj, the order diffusers builds them in (a test checks it against
diffusers' own from_config from that seed). This is the one uncertainty of this port: whether the demo's process
had drawn nothing before cannot be checked without that process, and torch 2.13 and 2.14 seed a new process's
generator at random (seen here), so the demo run on those gives a different cond_proj each run.
`cond_proj_init="zeros"` uses the LoRA's update alone.

Students of our own (`train.py trainer.target=lcd`, e.g. the bundled `shapes-turbo`) are folders holding the
LoRA (`pytorch_lora_weights.safetensors`) and `lora_run.json`, whose "distillation" entry names the base
model, the guidance embedding's width, the LCM scheduler config and the defaults; `from_pretrained` (and
`DiffusionPipeline.from_pretrained`, sample.py `model=`) read such a folder with `from_student`. Their
embedding starts at zero ("zeros"), so the file holds all of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import lora
from ..formats.folders import instantiate
from ..formats.files import LayoutError, read_json
from ..formats.locate import bundled_path, detect_layout, resolve, resolve_file
from ..formats.unet_layout import unet_config_from_diffusers
from ..formats.lora_layout import LORA_WEIGHT_NAME, STUDENT_FILE, read_lora, read_student
from ..models.unet import UNet3D, UNetConfig
from ..schedulers import LCMScheduler
from .text_to_video import TextToVideoSDPipeline

TURBO_REPO = "jiachenli-ucsb/T2V-Turbo-MS"
TURBO_WEIGHT_NAME = "unet_lora.pt"
BASE_REPO = "damo-vilab/text-to-video-ms-1.7b"  # app_ms.py names it ali-vilab/..., the same repository
GUIDANCE_EMBEDDING_DIM = 256
TORCH_DEFAULT_SEED = 67280421310721  # the seed older torch releases gave a new process's CPU generator
# the demo's defaults (app_ms.py, its pipeline): 4 steps, w 7.5, 16 frames at 256 x 256, 8 fps
TURBO_DEFAULTS = {"default_guidance_scale": 7.5, "default_num_inference_steps": 4, "default_num_frames": 16,
                  "default_height": 256, "default_width": 256}
COND_PROJ_INITS = ("demo", "zeros")


def turbo_scheduler() -> LCMScheduler:
    """T2V-Turbo's T2VTurboScheduler with its defaults, as diffusers' LCMScheduler plus its timestep rule."""
    return LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon",
                        lcm_timestep_rule="stride")


def demo_cond_proj_weight(config: UNetConfig, cond_dim: int = GUIDANCE_EMBEDDING_DIM) -> torch.Tensor:
    """(block_channels[0], cond_dim) float32: the `time_embedding.cond_proj.weight` that diffusers'
    UNet3DConditionModel.from_config(..., time_cond_proj_dim=cond_dim) draws from TORCH_DEFAULT_SEED: PyTorch's
    default init (Kaiming-uniform, a = sqrt 5; biases uniform in +-1/sqrt(fan_in)) of conv_in, then
    time_embedding.linear_1, then cond_proj."""
    g = torch.Generator().manual_seed(TORCH_DEFAULT_SEED)
    ch0 = config.block_channels[0]

    def layer(weight_shape: tuple[int, ...], bias: bool) -> torch.Tensor:
        w = torch.empty(weight_shape)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        if bias:
            fan_in = math.prod(weight_shape[1:])
            nn.init.uniform_(torch.empty(weight_shape[0]), -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=g)
        return w

    layer((ch0, config.in_channels, 3, 3), bias=True)  # conv_in
    layer((4 * ch0, ch0), bias=True)  # time_embedding.linear_1
    return layer((ch0, cond_dim), bias=False)  # time_embedding.cond_proj


def _check_cond_proj_init(value: str) -> None:
    if value not in COND_PROJ_INITS:
        raise ValueError(f"cond_proj_init must be one of {COND_PROJ_INITS}, got {value!r}")


def turbo_unet(base: UNet3D, cond_proj_init: str = "demo", cond_dim: int = GUIDANCE_EMBEDDING_DIM) -> UNet3D:
    """The base UNet with a guidance embedding added (its weights shared in value, copied), in the base's dtype."""
    _check_cond_proj_init(cond_proj_init)
    if base.config.timestep_cond_dim is not None:
        raise ValueError(f"the base UNet already has a guidance embedding (timestep_cond_dim="
                         f"{base.config.timestep_cond_dim}); T2V-Turbo-MS adapts the plain ModelScope UNet")
    config = dataclasses.replace(base.config, timestep_cond_dim=cond_dim)
    state = dict(lora.base_state_dict(base))
    weight = demo_cond_proj_weight(config, cond_dim) if cond_proj_init == "demo" else torch.zeros(
        config.block_channels[0], cond_dim)
    state["time_mlp.cond_proj.weight"] = weight.to(base.dtype)
    return instantiate(UNet3D, config, state, base.dtype).to(base.device).eval()


class T2VTurboMSPipeline(TextToVideoSDPipeline):
    """Text-to-video with T2V-Turbo-MS: TextToVideoSDPipeline over the turbo UNet and T2V-Turbo's scheduler,
    with its defaults (4 steps, w 7.5, 16 frames at 256 x 256). A saved one (save_pretrained) is a plain
    diffusers-layout folder that loads back as this class."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike = TURBO_REPO, *, base: str | os.PathLike = BASE_REPO,
                        weight_name: str | None = None, fuse_lora: bool = True, cond_proj_init: str = "demo",
                        torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        revision: str | None = None, **kwargs):
        """The release (a folder or hub id holding `unet_lora.pt`) applied to `base` (a folder or hub id of
        ModelScope 1.7B; offline from the cache with HF_HUB_OFFLINE=1), or a saved T2V-Turbo pipeline folder.
        `fuse_lora=False` keeps the LoRA as adapter "t2v_turbo" (then scale it, or unfuse / unload it)."""
        local = Path(path_or_repo_id).expanduser()
        if (local / "model_index.json").is_file():  # a saved pipeline folder: nothing to apply
            return super().from_pretrained(local, torch_dtype=torch_dtype, variant=variant, **kwargs)
        # a student of our own: a folder or a bundled name here (on the hub: DiffusionPipeline.from_pretrained)
        folder = local if local.is_dir() else bundled_path(str(path_or_repo_id))
        if folder is not None and read_student(folder) is not None:
            return cls.from_student(folder, base=None if base == BASE_REPO else base, fuse_lora=fuse_lora,
                                    torch_dtype=torch_dtype, variant=variant, **kwargs)
        _check_cond_proj_init(cond_proj_init)
        path = resolve_file(path_or_repo_id, weight_name, (TURBO_WEIGHT_NAME,), (".pt", ".safetensors"),
                            revision=revision, what="T2V-Turbo-MS LoRA")
        folder = resolve(base, variant=variant)
        weights = None
        if detect_layout(folder) == "diffusers":  # the LoRA checked against the base's config before any weight loads
            config = unet_config_from_diffusers(read_json(folder / "unet" / "config.json"))
            weights, _ = read_lora(path, dataclasses.replace(config, timestep_cond_dim=GUIDANCE_EMBEDDING_DIM))
        base_pipe = TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant, **kwargs)
        return cls.from_base(base_pipe, path, fuse_lora=fuse_lora, cond_proj_init=cond_proj_init, _weights=weights)

    @classmethod
    def from_base(cls, base_pipe: TextToVideoSDPipeline, lora_file, *, fuse_lora: bool = True,
                  cond_proj_init: str = "demo", cond_dim: int = GUIDANCE_EMBEDDING_DIM, scheduler=None,
                  defaults: dict | None = None, _weights=None) -> "T2VTurboMSPipeline":
        """`base_pipe`'s components with the turbo UNet (the LoRA of `lora_file` applied) and scheduler
        (default: T2V-Turbo-MS's) and defaults (default: T2V-Turbo-MS's); the LoRA is read and checked
        against the turbo UNet before anything is built from it (`_weights`: already read and checked against
        the same config by from_pretrained)."""
        weights = _weights
        if weights is None:
            config = dataclasses.replace(base_pipe.unet.config, timestep_cond_dim=cond_dim)
            weights, _ = read_lora(lora_file, config)
        unet = turbo_unet(base_pipe.unet, cond_proj_init, cond_dim)
        lora.load_adapter(unet, "t2v_turbo", weights)
        if fuse_lora:  # as the release's demo: merged, the LoRA layers removed
            lora.fuse(unet)
            lora.unload(unet)
        pipe = cls.from_pipe(base_pipe, unet=unet, scheduler=scheduler if scheduler is not None else turbo_scheduler())
        pipe.generation_defaults = {**base_pipe.generation_defaults, **(TURBO_DEFAULTS if defaults is None else defaults)}
        pipe.name_or_path = str(lora_file)
        return pipe

    @classmethod
    def from_student(cls, folder: str | os.PathLike, *, base: str | os.PathLike | TextToVideoSDPipeline | None = None,
                     fuse_lora: bool = True, torch_dtype: torch.dtype | None = None, variant: str | None = None,
                     **kwargs):
        """A distilled student of our own (see the module doc): its base model (lora_run.json's, or `base`: a
        folder, bundled name or hub id, e.g. when the run's relative path no longer resolves, or a loaded
        pipeline, e.g. a preset's), the LoRA, the guidance embedding, its LCM scheduler and defaults (4 steps,
        the middle of the trained guidance range)."""
        folder = resolve(folder)
        run = read_student(folder)
        if run is None:
            raise LayoutError(f"{folder} is not a distilled student's folder (no {STUDENT_FILE} with a "
                              f"\"distillation\" entry)")
        d = run["distillation"]
        _check_cond_proj_init(d["cond_proj_init"])
        scheduler = kwargs.pop("scheduler", None)
        if scheduler is None:
            scheduler = LCMScheduler.from_config(d["scheduler"])
        if isinstance(base, TextToVideoSDPipeline):
            base_pipe = base
        else:
            base_pipe = TextToVideoSDPipeline.from_pretrained(base if base is not None else run["base_model"],
                                                              torch_dtype=torch_dtype, variant=variant, **kwargs)
        defaults = {k: d[k] for k in ("default_guidance_scale", "default_num_inference_steps") if k in d}
        pipe = cls.from_base(base_pipe, folder / LORA_WEIGHT_NAME, fuse_lora=fuse_lora,
                             cond_proj_init=d["cond_proj_init"], cond_dim=int(d["guidance_embedding_dim"]),
                             scheduler=scheduler, defaults=defaults)
        pipe.name_or_path = str(folder)
        return pipe

