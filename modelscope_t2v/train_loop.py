"""Training the space-time UNet (or the autoencoder) of ModelScope T2V: plain Python, callable from a notebook.

    from modelscope_t2v.train_loop import TrainConfig, train
    cfg = TrainConfig(run_dir="runs/a")
    cfg.trainer.max_steps = 30
    last = train(cfg)                       # -> runs/a/checkpoints/last, a loadable pipeline folder

`train.py` is the Hydra front end over the same dataclasses. The recipe (paper / VGen): frozen autoencoder
and text encoder, the UNet trained on the epsilon objective (v-prediction, zero-terminal-SNR and offset
noise as options), caption dropout to "" for classifier-free guidance, AdamW with warmup, mixed precision,
gradient clipping, EMA, gradient checkpointing, gradient accumulation, DDP or FSDP2 under torchrun.

What a resumed run keeps (and where VGen lost it):
- Every random draw of step s (timesteps, noise, caption dropout, posterior samples, dropout masks) comes
  from generators seeded with (seed, rank, s); the data stream is a pure function of (seed, batch index,
  rank, world size). So a run stopped at step 20 and resumed ends bit-identical to an uninterrupted one.
- The learning rate is a function of the step, never a scheduler object that restarts.
- Images and videos are mixed by the data stream, batch by batch, on every rank (not by GPU rank).
- Samples the data layer could not decode are skipped and counted (`skipped` in metrics.jsonl), never
  replaced by black clips.
- A non-finite loss stops the run with a message naming the last good checkpoint (or, with
  `on_nonfinite="skip"`, skips the update and counts it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpointing as ckpt
from . import data as data_lib
from . import loading
from .data import DataConfig
from .ema import EMA, full_tensor
from .pipelines import TextToVideoSDPipeline
from .samplers import add_noise, cfg_model_fn, velocity
from .schedulers import DDIMScheduler
from .text import build_text_encoder
from .unet import UNET_PRESETS, UNet3D, UNetConfig, unet_config_to_diffusers
from .vae import VAE_PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig

log = logging.getLogger("modelscope_t2v.train")


# ---------------------------------------------------------------------------------------------------
# Configs. Typed dataclasses: train.py registers them in Hydra's ConfigStore, so a misspelt key or a
# wrong type in an override is rejected before anything runs.


@dataclass
class ModelConfig:
    # a size preset ("tiny", "ms-1.7b", "zeroscope-576w", "zeroscope-xl": random init seeded by `seed`) or
    # a checkpoint to start from (a folder in either layout, or a hub id)
    name_or_path: str = "tiny"
    # field overrides of the preset's UNetConfig / VAEConfig, e.g. {"block_channels": [32, 64, 64]}
    # (random init only; a checkpoint's sizes are the checkpoint's: on a checkpoint only the UNet fields
    # that leave its tensors as they are, CHECKPOINT_UNET_FIELDS, may be changed)
    unet: Dict[str, Any] = field(default_factory=dict)
    vae: Dict[str, Any] = field(default_factory=dict)
    # take the autoencoder (weights, config, scaling_factor) from this checkpoint instead of a random
    # one: the second stage of training from scratch (trainer=vae first, then the UNet on its latents).
    # Fields given in `vae` must then agree with the loaded config (a check, not an override).
    vae_from: Optional[str] = None


@dataclass
class ValidationConfig:
    # prompts sampled every `validate_every` steps (EMA weights), written as mp4 and to tensorboard
    prompts: List[str] = field(default_factory=lambda: ["a red circle moving right", "a blue square moving up"])
    num_frames: Optional[int] = None  # default: data.num_frames
    height: Optional[int] = None  # default: data.height
    width: Optional[int] = None  # default: data.width
    num_inference_steps: int = 25
    guidance_scale: Optional[float] = None  # null: the model's default_guidance_scale, else 9.0
    seed: int = 0
    fps: int = 8
    # a low-variance loss on fixed batches (data seed + 1), fixed timesteps and fixed noise; it tracks
    # fitting, it is not a held-out metric unless the data source has a separate split
    loss_batches: int = 1
    loss_timesteps: int = 8


@dataclass
class TrainerConfig:
    target: str = "unet"  # "unet": the diffusion model; "vae": the autoencoder (reconstruction + KL)
    max_steps: int = 10000  # optimizer steps
    batch_size: int = 1  # per process and micro-batch; global batch = batch_size * grad_accum * world size
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0  # linear warmup from 0
    lr_schedule: str = "constant"  # after warmup: "constant" | "cosine" | "linear" (decay to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # VGen trains with 0
    grad_clip: float = 1.0  # max global grad norm; 0: no clipping (the norm is still logged)
    precision: str = "auto"  # "auto" (bf16 on a GPU that has it, else fp32) | "fp32" | "bf16" | "fp16" (+ grad scaler)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.9999  # 0: no EMA (checkpoints hold the raw weights)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    # objective (target unet)
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    zero_terminal_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. 2023); needs v_prediction
    offset_noise: float = 0.0  # add offset_noise * N(0, 1) per (sample, channel), constant over frames and pixels
    caption_dropout: float = 0.1  # probability of training on "" (the unconditional branch of CFG)
    # target unet: train the text encoder with it (one optimizer, EMA and checkpoint for both; one process,
    # no text cache). Why: a frozen encoder whose embeddings barely carry a word leaves the UNet nothing
    # to read it from (docs/shapes_model.md, stage 6)
    train_text_encoder: bool = False
    # which timesteps a sample is trained at: "none" draws t uniformly; "later" / "earlier" multiply the
    # probability of the last / first `timestep_bias_portion` of the timesteps by `timestep_bias_multiplier`;
    # "range" that of [timestep_bias_begin, timestep_bias_end). (The names of diffusers' SDXL training
    # script.) Why: where the caption alone must decide the layout (high noise) is a small slice of t.
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0  # 0 never draws the biased timesteps
    timestep_bias_portion: float = 0.25  # "later" / "earlier": the fraction of timesteps biased
    timestep_bias_begin: int = 0  # "range": first biased timestep
    timestep_bias_end: int = 1000  # "range": one past the last
    # objective (target vae): mean |x - x'| (or squared) + kl_weight * KL per image / pixels per image,
    # i.e. the LDM autoencoder loss without the perceptual and adversarial terms, divided by pixel count
    vae_kl_weight: float = 1e-6
    vae_recon_loss: str = "l1"  # "l1" | "mse"
    # target vae: each checkpoint's scaling_factor = 1 / std of the latents (posterior means, EMA weights)
    # of the fixed validation batches, so diffusion latents have unit variance (LDM's recipe); false
    # keeps the configured one
    vae_fit_scaling_factor: bool = True
    # caches (in memory, LRU, entries): text embeddings by caption; autoencoder posteriors by pixel hash
    # (computed one sample at a time, so a resumed run computes the same numbers)
    text_cache_size: int = 0
    latent_cache_size: int = 0
    on_nonfinite: str = "stop"  # non-finite loss or grad norm: "stop" | "skip" (no update, counted)
    max_nonfinite_skips: int = 10  # consecutive skips before stopping anyway
    checkpoint_every: int = 1000  # steps; 0: only at the end. Always at the end and on SIGTERM.
    keep_checkpoints: int = 0  # newest step checkpoints kept; 0: all
    fsync_checkpoints: bool = True
    log_every: int = 10
    validate_every: int = 0  # 0: never
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    parallel: str = "auto"  # under torchrun: "ddp" | "fsdp" | "auto" (FSDP for models of >= 500M parameters)
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if there is one, else cpu) | "cpu" | "cuda"
    num_workers: int = 0  # data loader processes per rank
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU bit-reproducibility, slower)
    progress_bar: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    run_dir: Optional[str] = None  # default: outputs/train/<time> (train.py: Hydra's run dir)
    resume: bool = False  # continue the run in run_dir from checkpoints/last (a fresh start if it has none)


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the message names the last good checkpoint."""


class ConfigError(ValueError):
    """A setting `train` cannot run with; the message names the field and the allowed values."""


_CHOICES = {
    "trainer.target": ("unet", "vae"),
    "trainer.lr_schedule": ("constant", "cosine", "linear"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.prediction_type": ("epsilon", "v_prediction"),
    "trainer.timestep_bias_strategy": ("none", "later", "earlier", "range"),
    "trainer.vae_recon_loss": ("l1", "mse"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.parallel": ("auto", "ddp", "fsdp"),
    "trainer.device": ("auto", "cpu", "cuda"),
}


# UNetConfig fields a run that starts from a checkpoint may change: they leave every tensor's shape alone
CHECKPOINT_UNET_FIELDS = ("dropout", "temporal_position_embedding", "spatial_position_embedding")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the field and its allowed values for anything `train` cannot run."""
    extra = _unknown_fields(cfg)
    if extra:  # e.g. Hydra's `+trainer.max_step=3`, which bypasses the schema's key check
        raise ConfigError(f"unknown config key(s) {extra}; see the dataclasses in modelscope_t2v/train_loop.py")
    t = cfg.trainer
    for key, allowed in _CHOICES.items():
        value = getattr(t, key.split(".")[1])
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    at_least = {
        "trainer.max_steps": (t.max_steps, 1), "trainer.batch_size": (t.batch_size, 1),
        "trainer.grad_accum": (t.grad_accum, 1), "trainer.warmup_steps": (t.warmup_steps, 0),
        "trainer.checkpoint_every": (t.checkpoint_every, 0), "trainer.keep_checkpoints": (t.keep_checkpoints, 0),
        "trainer.log_every": (t.log_every, 1), "trainer.validate_every": (t.validate_every, 0),
        "trainer.text_cache_size": (t.text_cache_size, 0), "trainer.latent_cache_size": (t.latent_cache_size, 0),
        "trainer.max_nonfinite_skips": (t.max_nonfinite_skips, 0), "trainer.num_workers": (t.num_workers, 0),
        "trainer.validation.num_inference_steps": (t.validation.num_inference_steps, 1),
        "trainer.validation.loss_batches": (t.validation.loss_batches, 0),
        "trainer.validation.loss_timesteps": (t.validation.loss_timesteps, 1),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if not t.lr > 0:
        raise ConfigError(f"trainer.lr must be > 0, got {t.lr}")
    for key, value in {"trainer.caption_dropout": t.caption_dropout, "trainer.min_lr_ratio": t.min_lr_ratio}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay must be in [0, 1) (0 disables EMA), got {t.ema_decay}")
    for key, value in {"trainer.grad_clip": t.grad_clip, "trainer.offset_noise": t.offset_noise,
                       "trainer.vae_kl_weight": t.vae_kl_weight, "trainer.weight_decay": t.weight_decay}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.validation.guidance_scale is not None:
        try:
            loading.check_guidance_scale(t.validation.guidance_scale, "trainer.validation.guidance_scale")
        except ValueError as e:
            raise ConfigError(f"{e} (or null: the model's default)") from None
    if t.train_text_encoder and t.target != "unet":
        raise ConfigError("trainer.train_text_encoder=true needs trainer.target=unet")
    if t.train_text_encoder and t.text_cache_size:
        raise ConfigError(f"trainer.train_text_encoder=true needs trainer.text_cache_size=0 (the embeddings change "
                          f"every step), got {t.text_cache_size}")
    if t.timestep_bias_strategy != "none":
        try:
            timestep_weights(1000, t.timestep_bias_strategy, t.timestep_bias_multiplier, t.timestep_bias_portion,
                             t.timestep_bias_begin, t.timestep_bias_end)
        except ValueError as e:
            raise ConfigError(f"trainer.{e}") from e
    if t.zero_terminal_snr and t.prediction_type != "v_prediction":
        raise ConfigError(
            "trainer.zero_terminal_snr=true needs trainer.prediction_type=v_prediction: at zero SNR the "
            "epsilon objective cannot give x_0 (Lin et al. 2023)"
        )
    is_preset = cfg.model.name_or_path in UNET_PRESETS
    if cfg.model.vae_from is not None and cfg.trainer.target == "vae" and not is_preset:
        raise ConfigError("model.vae_from with trainer.target=vae: start from the checkpoint itself "
                          "(model.name_or_path) instead")
    if not is_preset and (cfg.model.vae or set(cfg.model.unet) - set(CHECKPOINT_UNET_FIELDS)):
        fixed = sorted(set(cfg.model.unet) - set(CHECKPOINT_UNET_FIELDS)) + sorted(f"vae.{k}" for k in cfg.model.vae)
        raise ConfigError(
            f"model.unet / model.vae overrides {fixed} apply to presets {sorted(UNET_PRESETS)} only, not to the "
            f"checkpoint {cfg.model.name_or_path!r} (its sizes are its tensors'); on a checkpoint only "
            f"model.unet.{{{', '.join(CHECKPOINT_UNET_FIELDS)}}} may change"
        )
    try:
        data_lib.check_data_config(data_lib.as_data_config(cfg.data))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data: {e}") from e
    for key, value in {"model.unet": cfg.model.unet, "model.vae": cfg.model.vae}.items():
        known = {f.name for f in dataclasses.fields(UNetConfig if key == "model.unet" else VAEConfig)}
        if set(value) - known:
            raise ConfigError(f"{key} has unknown field(s) {sorted(set(value) - known)}; known: {sorted(known)}")
    if is_preset and cfg.model.unet:
        # checkpoints are written in the diffusers layout: a UNet it cannot hold fails now, not at the first save
        try:
            unet_config_to_diffusers(UNetConfig.from_dict({**dataclasses.asdict(UNET_PRESETS[cfg.model.name_or_path]),
                                                           **cfg.model.unet}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.unet: {e}") from e


def _unknown_fields(obj: Any, prefix: str = "") -> list[str]:
    """Attributes of (nested) config dataclasses that are not fields of them."""
    if not dataclasses.is_dataclass(obj):
        return []
    names = {f.name for f in dataclasses.fields(obj)}
    out = [f"{prefix}{k}" for k in vars(obj) if k not in names and not k.startswith("_")]
    for name in names:
        out += _unknown_fields(getattr(obj, name), f"{prefix}{name}.")
    return out


def config_to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ---------------------------------------------------------------------------------------------------
# Small pure functions: learning rate, per-step seeds.


def lr_at(step: int, t: TrainerConfig) -> float:
    """Learning rate of the update that takes the model from step `step` to `step + 1`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * factor)


def step_seeds(seed: int, rank: int, step: int, n: int = 3) -> list[int]:
    """`n` well-mixed 63-bit seeds for step `step` on `rank` (a counter-based RNG: no state to save)."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2 * n, dtype=np.uint32)
    return [int(words[2 * i]) << 31 ^ int(words[2 * i + 1]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Processes and devices.


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but torch sees no CUDA device")
    dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
    return _Dist(rank, world, local_rank, dev, owns)


def _broadcast(obj: Any, d: _Dist) -> Any:
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ---------------------------------------------------------------------------------------------------
# Models.


def build_pipeline(mc: ModelConfig, seed: int) -> TextToVideoSDPipeline:
    """The starting pipeline: a preset's random init (seeded; `unet` / `vae` overrides applied) or a
    checkpoint, float32."""
    if mc.name_or_path not in UNET_PRESETS:
        pipe = TextToVideoSDPipeline.from_pretrained(mc.name_or_path)
        if mc.unet:  # CHECKPOINT_UNET_FIELDS only (check_config): the same tensors in a changed network
            unet = UNet3D(UNetConfig.from_dict({**dataclasses.asdict(pipe.unet.config), **mc.unet}))
            unet.load_state_dict(pipe.unet.state_dict())
            pipe.unet = unet.eval()
        if mc.vae_from is not None:
            pipe.vae = _read_vae(mc.vae_from, {})
        return pipe
    pipe = TextToVideoSDPipeline.from_preset(mc.name_or_path, seed=seed)
    if mc.unet:
        torch.manual_seed(seed + 1)
        base = dataclasses.asdict(UNET_PRESETS[mc.name_or_path])
        pipe.unet = UNet3D(UNetConfig.from_dict({**base, **mc.unet})).eval()
    if mc.vae_from is not None:
        pipe.vae = _read_vae(mc.vae_from, mc.vae)
    elif mc.vae:
        torch.manual_seed(seed + 2)
        base = dataclasses.asdict(VAE_PRESETS["tiny" if mc.name_or_path == "tiny" else "ms-1.7b"])
        pipe.vae = AutoencoderKL(VAEConfig(**{**base, **mc.vae})).eval()
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(
            f"model.unet.in_channels={pipe.unet.config.in_channels} must equal the autoencoder's "
            f"latent_channels={pipe.vae.config.latent_channels} (set model.unet.in_channels/out_channels)"
        )
    if pipe.unet.config.cross_attention_dim != pipe.text_encoder.config.hidden_size:
        raise ValueError(
            f"model.unet.cross_attention_dim={pipe.unet.config.cross_attention_dim} must equal the text "
            f"encoder width {pipe.text_encoder.config.hidden_size}"
        )
    return pipe


def _read_vae(path: str, expected: dict) -> AutoencoderKL:
    """The autoencoder of a pipeline folder (either layout) or hub id, float32, eval mode; its config must
    agree with the `expected` fields."""
    folder = loading.resolve(path)
    config, state = loading.read_vae(folder, loading.detect_layout(folder))
    wanted = dataclasses.asdict(VAEConfig(**{**dataclasses.asdict(config), **expected}))
    diff = {k: (getattr(config, k), wanted[k]) for k in expected if getattr(config, k) != wanted[k]}
    if diff:
        raise ValueError(f"model.vae_from={path!r}: its autoencoder differs from model.vae in "
                         + ", ".join(f"{k} (checkpoint {a!r}, model.vae {b!r})" for k, (a, b) in diff.items()))
    return loading.instantiate(AutoencoderKL, config, state, torch.float32).eval()


def training_scheduler(pipe: TextToVideoSDPipeline, t: TrainerConfig) -> DDIMScheduler:
    """The noise schedule trained on, as the DDIM scheduler a checkpoint ships for sampling."""
    overrides: dict[str, Any] = {"prediction_type": t.prediction_type}
    if t.zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDIMScheduler.from_config(pipe.scheduler.config, **overrides)


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _shard(model: nn.Module) -> None:
    """FSDP2: shard every space-time block (and the input temporal transformer / encoder levels), then
    the root; parameters become DTensors, the module keeps its class and names."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # the blocks return rearranged views; nothing downstream modifies them in place, which is what
    # this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if isinstance(model, UNet3D):
        units = [model.temporal_attention_in, *model.mid_blocks]
        for level in [*model.down_levels, *model.up_levels]:
            units += list(level.blocks)
    else:
        units = [m for m in model.modules() if type(m).__name__ in ("Level", "MidBlock")]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)


# ---------------------------------------------------------------------------------------------------
# Conditioning: text embeddings and latents from the frozen models, with optional caches.


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class UNetWithTextEncoder(nn.Module):
    """The UNet and the text encoder as one trained module (trainer.train_text_encoder), so that the
    optimizer, gradient clipping, EMA and checkpoints treat both alike; parameter names are prefixed
    `unet.` / `text_encoder.`. Called like the UNet: the text encoder runs in `_Frozen.trained_text` (the
    pipeline's encode_prompt, which holds the same module)."""

    def __init__(self, unet: UNet3D, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def forward(self, *args, **kwargs) -> Tensor:
        return self.unet(*args, **kwargs)


def split_state(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A UNetWithTextEncoder state dict -> {"unet": ..., "text_encoder": ...} without the prefixes."""
    parts: dict[str, dict[str, Tensor]] = {"unet": {}, "text_encoder": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        parts[head][rest] = value
    return parts


class _Frozen:
    """Text encoder and autoencoder, frozen; runs them under the training precision."""

    def __init__(self, pipe: TextToVideoSDPipeline, t: TrainerConfig, device: torch.device, amp: torch.dtype | None):
        self.pipe, self.device, self.amp = pipe, device, amp
        self.text_cache = _LRU(t.text_cache_size) if t.text_cache_size else None
        self.latent_cache = _LRU(t.latent_cache_size) if t.latent_cache_size else None

    def autocast(self, amp: torch.dtype | None | str = "train"):
        amp = self.amp if amp == "train" else amp
        return torch.autocast(self.device.type, dtype=amp, enabled=amp is not None)

    def trained_text(self, captions: list[str]) -> Tensor:
        """The embeddings with the graph kept (trainer.train_text_encoder)."""
        with self.autocast():
            return self.pipe.encode_prompt(captions, self.device, 1, do_classifier_free_guidance=False)[0].float()

    @torch.no_grad()
    def text(self, captions: list[str]) -> Tensor:
        def embed(prompts):
            with self.autocast():
                out = self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)[0]
            return out.float()

        if self.text_cache is None:
            return embed(captions)  # b n d
        return torch.cat([self.text_cache.get_or(c, lambda c=c: embed([c])) for c in captions])  # b n d

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> DiagonalGaussian:
        vae = self.pipe.vae

        def moments(x):
            # bf16 or fp32: the SD autoencoder is known to overflow in fp16
            with self.autocast(self.amp if self.amp == torch.bfloat16 else None):
                return vae.encode(x.to(self.device)).moments.float()

        if self.latent_cache is None:
            return DiagonalGaussian(moments(pixels))  # b 2z f h w
        rows = []
        for x in pixels.split(1):
            key = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
            rows.append(self.latent_cache.get_or(key, lambda x=x: moments(x).cpu()).to(self.device))
        return DiagonalGaussian(torch.cat(rows))  # b 2z f h w


# ---------------------------------------------------------------------------------------------------
# Objectives. `gens` = (cpu generator, device generator) of this step.


def timestep_weights(num_train_timesteps: int, strategy: str, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> Tensor:
    """Unnormalised probability of training at each timestep (TrainerConfig.timestep_bias_*): ones, and
    `multiplier` on the biased ones."""
    n = num_train_timesteps
    w = torch.ones(n, dtype=torch.float64)
    if strategy == "none":
        return w
    if not multiplier >= 0:
        raise ValueError(f"timestep_bias_multiplier must be >= 0, got {multiplier}")
    if strategy in ("later", "earlier"):
        if not 0.0 < portion < 1.0:
            raise ValueError(f"timestep_bias_portion must be in (0, 1), got {portion}")
        k = max(1, int(round(portion * n)))
        biased = slice(n - k, n) if strategy == "later" else slice(0, k)
    elif strategy == "range":
        if not 0 <= begin < end <= n:
            raise ValueError(f"timestep_bias_begin / _end must satisfy 0 <= begin < end <= {n}, got {begin}, {end}")
        biased = slice(begin, end)
    else:
        raise ValueError(f"timestep_bias_strategy must be one of ('none', 'later', 'earlier', 'range'), got {strategy!r}")
    w[biased] *= multiplier
    if not w.sum() > 0:
        raise ValueError("timestep_bias_multiplier=0 over every timestep leaves none to train on")
    return w


def draw_timesteps(n: int, num_train_timesteps: int, t: TrainerConfig, generator: torch.Generator) -> Tensor:
    """n training timesteps (int64, cpu): uniform, or from timestep_weights."""
    if t.timestep_bias_strategy == "none":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    w = timestep_weights(num_train_timesteps, t.timestep_bias_strategy, t.timestep_bias_multiplier,
                         t.timestep_bias_portion, t.timestep_bias_begin, t.timestep_bias_end)
    return torch.multinomial(w, n, replacement=True, generator=generator)


def diffusion_loss(model: nn.Module, frozen: _Frozen, batch: dict, alphas_cumprod: Tensor, t: TrainerConfig,
                   gens: tuple[torch.Generator, torch.Generator]) -> Tensor:
    """MSE between the UNet's output and eps (or v) at timesteps drawn by `draw_timesteps`."""
    cpu, dev = gens
    device = frozen.device
    captions = list(batch["captions"])
    if t.caption_dropout > 0:
        drop = torch.rand(len(captions), generator=cpu) < t.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    text = frozen.trained_text(captions) if t.train_text_encoder else frozen.text(captions)  # b n d
    scale = frozen.pipe.vae.config.scaling_factor
    latents = frozen.posterior(batch["pixels"]).sample(dev) * scale  # b c f h w
    noise = torch.randn(latents.shape, generator=dev, device=device)  # b c f h w
    if t.offset_noise > 0:
        b, c = latents.shape[:2]
        noise = noise + t.offset_noise * torch.randn((b, c, 1, 1, 1), generator=dev, device=device)
    timesteps = draw_timesteps(latents.shape[0], len(alphas_cumprod), t, cpu).to(device)  # b
    noisy = add_noise(latents, noise, alphas_cumprod, timesteps)  # b c f h w
    target = noise if t.prediction_type == "epsilon" else velocity(latents, noise, alphas_cumprod, timesteps)
    with frozen.autocast():
        pred = model(noisy, timesteps, text)  # b c f h w
    return F.mse_loss(pred.float(), target.float())


def vae_loss(model: nn.Module, frozen: _Frozen, batch: dict, t: TrainerConfig,
             gens: tuple[torch.Generator, torch.Generator], sample_posterior: bool = True) -> Tensor:
    """Reconstruction + kl_weight * KL, both per pixel (see TrainerConfig.vae_kl_weight)."""
    x = batch["pixels"].to(frozen.device)  # b c f h w
    with frozen.autocast():
        recon, posterior = model(x, sample_posterior=sample_posterior, generator=gens[1])  # b c f h w
    diff = recon.float() - x
    rec = diff.abs().mean() if t.vae_recon_loss == "l1" else diff.pow(2).mean()
    frames, pixels = x.shape[2], x.shape[1] * x.shape[3] * x.shape[4]
    kl = (posterior.kl().float() / frames).mean() / pixels  # per image, per pixel
    return rec + t.vae_kl_weight * kl


# ---------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl (one object per logged step) and tensorboard, on rank 0.


class _Metrics:
    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past the checkpoint we resume from
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a dependency, but the loop does not need it
            log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def _truncate(self, start_step: int) -> None:
        """Keep the lines of steps <= start_step (a killed run may have logged past its checkpoint and
        may have died mid-line)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= start_step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])

    def image(self, tag: str, chw: np.ndarray, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, chw, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _write_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    """frames f h w 3 uint8 -> mp4, or a GIF where the mp4 writer fails."""
    from .video_io import export_to_gif, export_to_video

    try:
        return Path(export_to_video(frames, path, fps=fps))
    except Exception as e:  # noqa: BLE001 - any writer failure falls back to a GIF
        log.warning("could not write %s (%s); writing a GIF", path, e)
        return Path(export_to_gif(frames, path.with_suffix(".gif"), fps=fps))


# ---------------------------------------------------------------------------------------------------
# The run.


class _Run:
    """One training run: setup (fresh or resumed), the step loop, checkpoints, logs, validation."""

    def __init__(self, cfg: TrainConfig):
        check_config(cfg)
        self.cfg, self.t = cfg, cfg.trainer
        self.d = _setup_distributed(self.t.device)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = _broadcast(cfg.run_dir or str(Path("outputs/train") / stamp), self.d)
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.amp = _amp_dtype(self.t.precision, self.d.device)
        self.stop_requested = False

    # -- setup ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t, d = self.cfg, self.t, self.d
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for p in ckpt.remove_partial(self.ckpt_root):
                log.info("removed the partial checkpoint %s left by an interrupted run", p.name)
        d.barrier()
        resume_from = ckpt.latest_checkpoint(self.ckpt_root)
        if resume_from is not None and not cfg.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints ({resume_from.name}); pass resume=true to continue "
                f"that run or choose another run_dir"
            )
        self.resume_from = resume_from if cfg.resume else None
        self.trains_text = t.target == "unet" and t.train_text_encoder
        if self.trains_text and d.world_size > 1:
            raise ConfigError("trainer.train_text_encoder=true runs in one process only (not under torchrun)")
        state: dict[str, Any] = {}
        if self.resume_from is not None:
            state = ckpt.read_json(self.resume_from / "training_state" / "trainer_state.json")
            self._check_resume_config(state)
            pipe = TextToVideoSDPipeline.from_pretrained(self.resume_from)
            read = loading.read_unet if t.target == "unet" else loading.read_vae
            cls = UNet3D if t.target == "unet" else AutoencoderKL
            raw = loading.instantiate(cls, *read(self.resume_from / "raw", "diffusers"), torch.float32)
            ema_weights = getattr(pipe, t.target).state_dict() if state.get("ema") else None
            setattr(pipe, t.target, raw)
            if self.trains_text:
                text_ema = pipe.text_encoder.state_dict() if state.get("ema") else None
                pipe.text_encoder = loading.instantiate(
                    build_text_encoder, *loading.read_text_encoder(self.resume_from / "raw", "diffusers"), torch.float32)
                if ema_weights is not None:
                    ema_weights = {**{f"unet.{k}": v for k, v in ema_weights.items()},
                                   **{f"text_encoder.{k}": v for k, v in text_ema.items()}}
            log.info("resuming %s from %s (step %d)", self.run_dir, self.resume_from.name, state["step"])
        else:
            if cfg.resume:
                log.info("resume=true but %s has no checkpoint: starting a fresh run", self.ckpt_root)
            pipe = build_pipeline(cfg.model, cfg.seed)
            ema_weights = None
        self.step = int(state.get("step", 0))
        self.counters = dict(state.get("counters", {}))
        for k in ("batches", "samples", "skipped", "image_samples", "video_samples", "nonfinite_steps"):
            self.counters.setdefault(k, 0)
        if self.step > t.max_steps:
            raise ConfigError(f"the run is at step {self.step}, past trainer.max_steps={t.max_steps}")

        factor = pipe.vae.config.downsample_factor
        if cfg.data.height % factor or cfg.data.width % factor:
            raise ConfigError(f"data.height and data.width must be multiples of the autoencoder's factor {factor}, "
                              f"got {cfg.data.height}x{cfg.data.width}")
        # frozen parts
        self.pipe = pipe
        self.scheduler = training_scheduler(pipe, t)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(d.device)
        needed = ("vae", "text_encoder") if t.target == "unet" else ()
        for name in ("unet", "vae", "text_encoder"):
            if name != t.target and not (self.trains_text and name == "text_encoder"):
                getattr(pipe, name).eval().requires_grad_(False)
            if name in needed:
                getattr(pipe, name).to(d.device)
        self.frozen = _Frozen(pipe, t, d.device, self.amp)

        # the trained module: float32 master weights, wrapped for several processes
        module = UNetWithTextEncoder(pipe.unet, pipe.text_encoder) if self.trains_text else getattr(pipe, t.target)
        module = module.to(d.device, torch.float32).train().requires_grad_(True)
        self.module = module
        if t.gradient_checkpointing:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            else:
                log.warning("%s has no gradient checkpointing; trainer.gradient_checkpointing ignored", t.target)
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.parallel = None
        if d.world_size > 1:
            self.parallel = t.parallel
            if self.parallel == "auto":
                self.parallel = "fsdp" if _count_params(module) >= 500_000_000 else "ddp"
            if self.parallel == "fsdp":
                _shard(module)
                self.model = module
            else:
                self.model = nn.parallel.DistributedDataParallel(
                    module, device_ids=[d.device.index] if d.device.type == "cuda" else None
                )
        else:
            self.model = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr_at(self.step, t), betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp == torch.float16)
        self.ema = EMA(module.named_parameters(), t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        if self.resume_from is not None:
            ts = self.resume_from / "training_state"
            ckpt.load_optimizer(ts, self.optimizer, self.param_names, self.params)
            if self.ema is not None:
                if ema_weights is None:
                    log.warning("the checkpoint has no EMA weights; the EMA restarts from the raw weights")
                else:
                    self.ema.load_full_state_dict({n: ema_weights[n] for n in self.ema.names})
            if self.scaler.is_enabled() and (ts / "scaler.json").exists():
                self.scaler.load_state_dict(ckpt.read_json(ts / "scaler.json"))
        if state and state.get("world_size", d.world_size) != d.world_size:
            log.warning("resuming a %s-process run on %d processes: the data order and random draws change",
                        state.get("world_size"), d.world_size)

        if d.main:
            ckpt.write_json(self.run_dir / "config.json", config_to_dict(cfg))
        self.metrics = _Metrics(self.run_dir, self.step, d.main)
        self.loader = data_lib.make_loader(
            cfg.data, batch_size=t.batch_size, seed=cfg.seed, start_batch=self.counters["batches"],
            num_workers=t.num_workers, rank=d.rank, world_size=d.world_size,
        )
        self._eval_batches: list[dict] | None = None
        self.last_saved = self.resume_from

    def _check_resume_config(self, state: dict) -> None:
        """Warn about settings that changed since the checkpoint (max_steps and logging may change freely)."""
        free = {"trainer.max_steps", "trainer.checkpoint_every", "trainer.log_every", "trainer.validate_every",
                "trainer.keep_checkpoints", "trainer.progress_bar", "trainer.num_workers", "resume", "run_dir"}
        before = _flatten(state.get("config", {}))
        now = _flatten(config_to_dict(self.cfg))
        changed = sorted(k for k in set(before) | set(now)
                         if before.get(k) != now.get(k) and k not in free and not k.startswith("trainer.validation."))
        if changed and self.d.main:
            log.warning("resuming with changed settings %s: the run will differ from an uninterrupted one",
                        {k: (before.get(k), now.get(k)) for k in changed})
        if before.get("trainer.target", self.t.target) != self.t.target:
            raise ConfigError(f"the checkpoint trained {before['trainer.target']!r}, not trainer.target={self.t.target!r}")

    # -- one step -------------------------------------------------------------------------------------

    def _loss(self, batch: dict, gens) -> Tensor:
        if self.t.target == "unet":
            return diffusion_loss(self.model, self.frozen, batch, self.alphas_cumprod, self.t, gens)
        return vae_loss(self.model, self.frozen, batch, self.t, gens)

    def _sync(self, last: bool):
        """No gradient all-reduce on the micro-batches before the last one."""
        if self.parallel == "ddp" and not last:
            return self.model.no_sync()
        if self.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns this step's statistics."""
        t, d, step = self.t, self.d, self.step
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        s_global, s_cpu, s_dev = step_seeds(self.cfg.seed, d.rank, step)
        torch.manual_seed(s_global)  # dropout masks
        gens = (torch.Generator().manual_seed(s_cpu), torch.Generator(d.device).manual_seed(s_dev))
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)  # summed on the device: one sync a step
        images, videos, skipped = 0, 0, 0
        for micro in range(t.grad_accum):
            batch = next(self.loader)
            self.counters["batches"] += 1
            skipped += int(batch.get("skipped", 0))
            n = batch["pixels"].shape[0]
            if batch.get("kind", "image" if batch["pixels"].shape[2] == 1 else "video") == "image":
                images += n
            else:
                videos += n
            with self._sync(micro == t.grad_accum - 1):
                loss = self._loss(batch, gens)
                self.scaler.scale(loss / t.grad_accum).backward()
            loss_sum += loss.detach().double()
        # one all-reduce for everything every rank must agree on
        counts = torch.tensor([t.grad_accum, skipped, images, videos, float(self.stop_requested)], dtype=torch.float64)
        stats = torch.cat([loss_sum.reshape(1), counts.to(d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        loss_mean = float(stats[0] / stats[1])
        self.counters["skipped"] += int(stats[2])
        self.counters["image_samples"] += int(stats[3])
        self.counters["video_samples"] += int(stats[4])
        self.counters["samples"] += int(stats[3] + stats[4])
        self.stop_requested = bool(stats[5] > 0)

        grad_norm = math.nan
        finite = math.isfinite(loss_mean)
        if finite:
            self.scaler.unscale_(self.optimizer)
            max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
            # with fp16 an inf gradient is the scaler's business (it skips the step and lowers the scale)
            finite = math.isfinite(grad_norm) or self.scaler.is_enabled()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(loss_mean, grad_norm)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.params, step + 1)
            self.consecutive_nonfinite = 0
        self.step = step + 1
        return {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "skipped_step": int(stats[2])}

    consecutive_nonfinite = 0

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        where = (f"the last good checkpoint is {self.last_saved}" if self.last_saved is not None
                 else "no checkpoint has been written yet")
        self.counters["nonfinite_steps"] += 1
        self.consecutive_nonfinite += 1
        if self.t.on_nonfinite == "skip" and self.consecutive_nonfinite <= self.t.max_nonfinite_skips:
            log.warning("non-finite %s at step %d: update skipped (%d in a row)", what, self.step + 1,
                        self.consecutive_nonfinite)
            return
        raise NonFiniteLossError(
            f"non-finite {what} at step {self.step + 1} (data batches up to {self.counters['batches']}); the run "
            f"stopped without saving this step, {where}. Lower trainer.lr, use precision=bf16/fp32, check the "
            f"data, then continue with resume=true; or set trainer.on_nonfinite=skip to skip such steps"
            + (f" (it skipped {self.consecutive_nonfinite - 1} in a row)" if self.t.on_nonfinite == "skip" else "")
        )

    # -- checkpoints ----------------------------------------------------------------------------------

    def _full_state(self) -> dict[str, Tensor]:
        return {k: full_tensor(v).detach().cpu() for k, v in self.module.state_dict().items()}

    def save(self) -> Path:
        """Checkpoint the current step (collective: every rank gathers, rank 0 writes)."""
        t = self.t
        path = None
        if self.d.main or self.parallel == "fsdp":  # gathering shards is a collective
            raw = self._full_state()
            ema = self.ema.full_state_dict() if self.ema is not None else None
            opt_tensors, opt_meta = ckpt.optimizer_full_state(self.optimizer, self.param_names)
        if self.d.main:
            cls = UNet3D if t.target == "unet" else AutoencoderKL
            config = self.module.config

            def module_from(state: dict[str, Tensor]) -> nn.Module:
                with torch.device("meta"):
                    m = cls(config)
                m.load_state_dict(state, strict=True, assign=True)
                return m

            full = {**raw, **ema} if ema is not None else raw
            if self.trains_text:  # the text encoder is written beside the UNet, EMA and raw alike
                text_config = self.pipe.text_encoder.config
                parts, raw_parts = split_state(full), split_state(raw)
                full, raw = parts["unet"], raw_parts["unet"]
                shown_text = loading.instantiate(build_text_encoder, text_config, parts["text_encoder"], None)
            shown = module_from(full)
            if t.target == "vae" and t.vae_fit_scaling_factor:
                config = dataclasses.replace(config, scaling_factor=self._fit_scaling_factor(shown))
                shown.config = config
            trainer_state = {
                "step": self.step, "counters": self.counters, "ema": ema is not None,
                "world_size": self.d.world_size, "target": t.target, "config": config_to_dict(self.cfg),
                "time": time.time(),
            }

            trained = {t.target} | ({"text_encoder"} if self.trains_text else set())
            frozen = [n for n in ("unet", "vae", "text_encoder", "tokenizer") if n not in trained]
            previous = self.last_saved if self.last_saved is not None and self.last_saved.is_dir() else None
            writer = loading.write_diffusers_unet if t.target == "unet" else loading.write_diffusers_vae

            def write(folder: Path) -> None:
                if previous is None or not all((previous / n).is_dir() for n in frozen):
                    components = {**self.pipe.components, t.target: shown, "scheduler": self.scheduler}
                    if self.trains_text:
                        components["text_encoder"] = shown_text
                    out = TextToVideoSDPipeline(**components)
                    out.default_guidance_scale = self.pipe.default_guidance_scale  # carried from the start model
                    out.save_pretrained(folder)
                else:
                    # the frozen parts never change within a run: hard-link them from the previous
                    # checkpoint (no 1.7 GB rewrite of text encoder + autoencoder at full size); the rest
                    # is what save_pretrained writes (tests/test_train.py compares the two file lists)
                    for name in frozen:
                        ckpt.link_tree(previous / name, folder / name)
                    writer(folder, config, shown.state_dict())
                    if self.trains_text:
                        loading.write_diffusers_text_encoder(folder, text_config, shown_text.state_dict())
                    loading.write_scheduler(folder, dict(self.scheduler.config))
                    loading.write_model_index(folder, TextToVideoSDPipeline.__name__, type(self.scheduler).__name__,
                                              self.pipe.default_guidance_scale)
                # raw/: the same pipeline with the raw weights (links to everything else)
                raw_dir = folder / "raw"
                if ema is not None:
                    writer(raw_dir, config, raw)
                    if self.trains_text:
                        loading.write_diffusers_text_encoder(raw_dir, text_config, raw_parts["text_encoder"])
                for entry in list(folder.iterdir()):
                    if entry.name != "raw" and (ema is None or entry.name not in trained):
                        ckpt.link_tree(entry, raw_dir / entry.name)
                ts = folder / "training_state"
                ts.mkdir()
                from safetensors.torch import save_file

                save_file(opt_tensors, str(ts / "optimizer.safetensors"))
                ckpt.write_json(ts / "optimizer.json", opt_meta)
                if self.scaler.is_enabled():
                    ckpt.write_json(ts / "scaler.json", self.scaler.state_dict())
                ckpt.write_json(ts / "trainer_state.json", trainer_state)  # written last

            path = ckpt.write_step_checkpoint(self.ckpt_root, self.step, write, fsync=t.fsync_checkpoints)
            ckpt.prune(self.ckpt_root, t.keep_checkpoints)
            log.info("saved %s", path)
        self.d.barrier()
        self.last_saved = _broadcast(path, self.d)
        return self.last_saved

    @torch.no_grad()
    def _fit_scaling_factor(self, vae: AutoencoderKL) -> float:
        """1 / std of the latents (posterior means) of the fixed validation batches."""
        batches = self._eval_data()
        if not batches:
            return vae.config.scaling_factor
        device = next(vae.parameters()).device
        z = torch.cat([vae.encode(b["pixels"].to(device)).mode().float().flatten() for b in batches])
        factor = float(1.0 / z.std())
        log.info("autoencoder scaling_factor = 1 / std(latents) = %.5f", factor)
        return factor

    # -- validation -----------------------------------------------------------------------------------

    def _eval_data(self) -> list[dict]:
        if self._eval_batches is None:
            v = self.t.validation
            loader = data_lib.make_loader(self.cfg.data, batch_size=self.t.batch_size, seed=self.cfg.seed + 1,
                                          start_batch=0, num_workers=0, rank=0, world_size=1)
            self._eval_batches = [next(loader) for _ in range(v.loss_batches)]
            if hasattr(loader, "close"):
                loader.close()
        return self._eval_batches

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Loss on the fixed batches, at `loss_timesteps` evenly spaced timesteps, with fixed noise."""
        v, module = self.t.validation, self.module
        batches = self._eval_data()
        if not batches:
            return math.nan
        total = 0.0
        gen = torch.Generator(self.d.device).manual_seed(1234)
        for batch in batches:
            if self.t.target == "vae":
                total += float(vae_loss(module, self.frozen, batch, self.t, (None, gen), sample_posterior=False))
                continue
            text = self.frozen.text(list(batch["captions"]))  # b n d
            latents = self.frozen.posterior(batch["pixels"]).mode() * self.pipe.vae.config.scaling_factor
            T = len(self.alphas_cumprod)
            for i in range(v.loss_timesteps):
                ts = torch.full((latents.shape[0],), int((i + 0.5) * T / v.loss_timesteps), device=self.d.device)
                noise = torch.randn(latents.shape, generator=gen, device=self.d.device)
                noisy = add_noise(latents, noise, self.alphas_cumprod, ts)
                target = noise if self.t.prediction_type == "epsilon" else velocity(
                    latents, noise, self.alphas_cumprod, ts)
                with self.frozen.autocast():
                    pred = module(noisy, ts, text)
                total += float(F.mse_loss(pred.float(), target)) / v.loss_timesteps
        return total / len(batches)

    @torch.no_grad()
    def validate(self) -> dict:
        """Eval losses (raw and EMA weights) and, for the UNet, sample videos with the EMA weights."""
        out: dict[str, Any] = {}
        module = self.module
        module.eval()
        sharded = self.parallel == "fsdp"  # sharded forward passes need every rank
        try:
            if self.d.main or sharded:
                out["eval_loss"] = self.eval_loss()
            ema_ctx = self.ema.swapped_into(self.params) if self.ema is not None else contextlib.nullcontext()
            with ema_ctx:
                if self.ema is not None and (self.d.main or sharded):
                    out["eval_loss_ema"] = self.eval_loss()
                if self.d.main or sharded:
                    self._samples()
        finally:
            module.train()
        self.d.barrier()
        return out if self.d.main else {}

    def _samples(self) -> None:
        v, data = self.t.validation, self.cfg.data
        folder = self.run_dir / "validation" / ckpt.step_dirname(self.step)
        videos: list[np.ndarray] = []  # f h w 3 uint8 each
        if self.t.target == "vae":
            batch = self._eval_data()[0] if self._eval_data() else None
            if batch is None:
                return
            with self.frozen.autocast():
                recon, _ = self.module(batch["pixels"].to(self.d.device), sample_posterior=False)
            both = torch.cat([batch["pixels"].to(recon.device), recon.float()], dim=-1)  # b c f h 2w
            videos = [_to_uint8(x) for x in both]
        else:
            if not v.prompts:
                return
            # self.pipe holds the trained modules themselves (EMA weights swapped in by the caller)
            pipe = TextToVideoSDPipeline(**{**self.pipe.components, "scheduler": self.scheduler})
            pipe.default_guidance_scale = self.pipe.default_guidance_scale
            guidance = pipe.resolve_guidance_scale(v.guidance_scale)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            frames = v.num_frames or data.num_frames
            height, width = v.height or data.height, v.width or data.width
            for i, prompt in enumerate(v.prompts):
                gen = torch.Generator(self.d.device).manual_seed(v.seed + i)
                video = _generate(pipe, prompt, frames, height, width, v.num_inference_steps, guidance, gen)
                videos.append(video)
        if not self.d.main:
            return
        for i, video in enumerate(videos):
            _write_video(folder / f"{i:02d}.mp4", video, v.fps)
            strip = np.concatenate(list(video), axis=1)  # h (f w) 3
            self.metrics.image(f"validation/{i:02d}", strip.transpose(2, 0, 1), self.step)

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> Path:
        t, d = self.t, self.d
        previous_handler, bar = None, None
        try:
            self.setup()
            if threading.current_thread() is threading.main_thread():
                previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            if d.main and t.progress_bar:
                from tqdm.auto import tqdm

                bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
            if self.step >= t.max_steps:
                log.info("the run is already at trainer.max_steps=%d", t.max_steps)
                return self.ckpt_root / ckpt.LAST
            while self.step < t.max_steps:
                stats = self.train_step()
                window_steps += 1
                window_loss += stats["loss"] if math.isfinite(stats["loss"]) else 0.0
                if bar is not None:
                    bar.update(1)
                step = self.step
                validate = t.validate_every > 0 and step % t.validate_every == 0
                end = step == t.max_steps or self.stop_requested
                row = None
                if step % t.log_every == 0 or validate or end:
                    elapsed = time.perf_counter() - window_start
                    samples = window_steps * t.batch_size * t.grad_accum * d.world_size
                    row = {"step": step, **stats, "loss_avg": window_loss / window_steps,
                           "samples_per_s": samples / elapsed, "steps_per_s": window_steps / elapsed,
                           **{k: v for k, v in self.counters.items()}, "time": time.time()}
                    if self.scaler.is_enabled():
                        row["grad_scale"] = float(self.scaler.get_scale())
                    if d.device.type == "cuda":
                        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                    if bar is not None:
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                if validate:
                    row.update(self.validate())
                if row is not None:
                    self.metrics.write(row)
                if end or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0):
                    self.save()
                if row is not None or end:
                    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
                if self.stop_requested:
                    log.warning("SIGTERM: saved step %d and stopped; continue with resume=true", step)
                    break
            self._check_replicas()
            return self.ckpt_root / ckpt.LAST
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if bar is not None:
                bar.close()
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            if hasattr(getattr(self, "loader", None), "close"):
                self.loader.close()
            if d.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True  # acted on after the current step, by every rank

    def _check_replicas(self) -> None:
        """DDP keeps every rank's weights identical; check it (a cheap checksum) before declaring success."""
        if self.parallel != "ddp":
            return
        s = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        lo, hi = s.clone(), s.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError(f"DDP ranks ended with different weights (checksums {lo.item()} vs {hi.item()})")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("unet", "vae"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_uint8(video: Tensor) -> np.ndarray:
    """c f h w in [-1, 1] -> f h w 3 uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def _generate(pipe: TextToVideoSDPipeline, prompt: str, num_frames: int, height: int, width: int, steps: int,
              guidance_scale: float, generator: torch.Generator) -> np.ndarray:
    """One video, f h w 3 uint8: the pipeline's `__call__` where it exists, else DDIM with CFG here."""
    if any("__call__" in vars(k) for k in type(pipe).__mro__[:-1]):
        from .video_io import frames_to_uint8

        out = pipe(prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=generator, output_type="np").frames
        return frames_to_uint8(out[0])  # f h w 3
    device, vae = pipe.device, pipe.vae
    cond, uncond = pipe.encode_prompt([prompt], device, 1, do_classifier_free_guidance=True)
    context = torch.cat([uncond, cond]).to(pipe.unet.dtype)  # 2 n d
    f = vae.config.downsample_factor
    shape = (1, pipe.unet.config.in_channels, num_frames, height // f, width // f)
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)  # 1 c f h w
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = scheduler.sample(cfg_model_fn(lambda xx, tt: pipe.unet(xx, tt, context), guidance_scale), x)
    video = vae.decode(x / vae.config.scaling_factor)  # 1 3 f H W
    return _to_uint8(video[0])


def train(cfg: TrainConfig) -> Path:
    """Run (or continue, with cfg.resume) a training run; returns `run_dir/checkpoints/last`."""
    return _Run(cfg).run()
