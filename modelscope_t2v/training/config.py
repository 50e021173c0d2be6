"""The trainer's configs: typed dataclasses (train.py registers them in Hydra's ConfigStore, so a misspelt
key or a wrong type in an override is rejected before anything runs), and the checks that need no model.

    TrainConfig(model=ModelConfig(...), data=DataConfig(...), trainer=TrainerConfig(...), seed, run_dir, resume)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..data import DataConfig, as_data_config, check_data_config
from ..diffusion.losses import TIMESTEP_BIAS_STRATEGIES, timestep_weights
from ..diffusion.samplers import check_guidance_scale
from ..formats.unet_layout import unet_config_to_diffusers
from ..models import UNET_PRESETS, UNetConfig, VAEConfig
from .lora import LoraTrainConfig, check_preservation, lora_spec
from .objectives import OBJECTIVES

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
class DistillConfig:
    """trainer.target=lcd: latent consistency distillation (LCM, Luo et al. 2023; T2V-Turbo's recipe) of the
    model into a few-step student: the model itself plus the LoRA of trainer.lora and a guidance-scale
    embedding. The teacher is the same model with the adapter off, guided by classifier-free guidance."""

    # the teacher's grid: timesteps k - 1, 2k - 1, ..., T - 1 with k = T // num_ddim_timesteps, one DDIM step
    # apart; the student samples on it (its LCMScheduler's original_inference_steps). Fewer points: each
    # teacher step is longer, and the consistency reaches from x_0 to pure noise in fewer links
    num_ddim_timesteps: int = 50
    # the guidance scale g (diffusers' form u + g (c - u)) the teacher runs at, drawn from U[min, max] per
    # sample; the student is told g through its guidance embedding and runs one branch (pipe(guidance_scale=g))
    guidance_min: float = 2.0
    guidance_max: float = 2.0
    guidance_embedding_dim: int = 256  # T2V-Turbo-MS's: a bias-free Linear(256 -> block_channels[0]), zero-initialised
    timestep_scaling: float = 10.0  # s = 10 t in the boundary scalings c_skip, c_out (LCM's, T2V-Turbo's)
    huber_c: float = 0.001  # the pseudo-Huber loss's c (LCM's and T2V-Turbo's scripts); 0: mean absolute error


@dataclass
class TrainerConfig:
    # "unet": the diffusion model; "vae": the autoencoder (reconstruction + KL); "lcd": a few-step student of
    # the UNet by latent consistency distillation (a LoRA: trainer.lora, trainer.lcd)
    target: str = "unet"
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
    # target unet: train a LoRA of the UNet instead of its weights (trainer.lora.rank=16; training/lora.py);
    # only the adapter is trained, averaged, checkpointed and resumed
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    lcd: DistillConfig = field(default_factory=DistillConfig)  # target lcd only
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
    "trainer.target": tuple(OBJECTIVES),
    "trainer.lr_schedule": ("constant", "cosine", "linear"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.prediction_type": ("epsilon", "v_prediction"),
    "trainer.timestep_bias_strategy": TIMESTEP_BIAS_STRATEGIES,
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
        raise ConfigError(f"unknown config key(s) {extra}; see the dataclasses in modelscope_t2v/training/config.py")
    tc = cfg.trainer
    for key, allowed in _CHOICES.items():
        value = getattr(tc, key.split(".")[1])
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    at_least = {
        "trainer.max_steps": (tc.max_steps, 1), "trainer.batch_size": (tc.batch_size, 1),
        "trainer.grad_accum": (tc.grad_accum, 1), "trainer.warmup_steps": (tc.warmup_steps, 0),
        "trainer.checkpoint_every": (tc.checkpoint_every, 0), "trainer.keep_checkpoints": (tc.keep_checkpoints, 0),
        "trainer.log_every": (tc.log_every, 1), "trainer.validate_every": (tc.validate_every, 0),
        "trainer.text_cache_size": (tc.text_cache_size, 0), "trainer.latent_cache_size": (tc.latent_cache_size, 0),
        "trainer.max_nonfinite_skips": (tc.max_nonfinite_skips, 0), "trainer.num_workers": (tc.num_workers, 0),
        "trainer.validation.num_inference_steps": (tc.validation.num_inference_steps, 1),
        "trainer.validation.loss_batches": (tc.validation.loss_batches, 0),
        "trainer.validation.loss_timesteps": (tc.validation.loss_timesteps, 1),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if not tc.lr > 0:
        raise ConfigError(f"trainer.lr must be > 0, got {tc.lr}")
    for key, value in {"trainer.caption_dropout": tc.caption_dropout, "trainer.min_lr_ratio": tc.min_lr_ratio}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay must be in [0, 1) (0 disables EMA), got {tc.ema_decay}")
    for key, value in {"trainer.grad_clip": tc.grad_clip, "trainer.offset_noise": tc.offset_noise,
                       "trainer.vae_kl_weight": tc.vae_kl_weight, "trainer.weight_decay": tc.weight_decay}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if tc.validation.guidance_scale is not None:
        try:
            check_guidance_scale(tc.validation.guidance_scale, "trainer.validation.guidance_scale")
        except ValueError as e:
            raise ConfigError(f"{e} (or null: the model's default)") from None
    try:
        spec = lora_spec(tc.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    refused = check_preservation(tc.lora)
    if refused:
        raise ConfigError(refused)
    if spec is not None:
        if tc.target not in ("unet", "lcd"):
            raise ConfigError(f"trainer.lora.rank is set, but a LoRA adapts the UNet: needs trainer.target=unet "
                              f"or lcd, got {tc.target!r}")
        if tc.train_text_encoder:
            raise ConfigError("trainer.lora.rank with trainer.train_text_encoder=true: a LoRA trains the UNet's "
                              "adapter only; set one of them")
        if tc.parallel == "fsdp":
            raise ConfigError("trainer.lora.rank with trainer.parallel=fsdp: a LoRA's few parameters train under "
                              "DDP (trainer.parallel=ddp or auto)")
    refused = OBJECTIVES[tc.target].refuses(cfg)  # what this target's objective cannot run with
    if refused:
        raise ConfigError(refused)
    if tc.timestep_bias_strategy != "none":
        try:
            timestep_weights(1000, tc.timestep_bias_strategy, tc.timestep_bias_multiplier, tc.timestep_bias_portion,
                             tc.timestep_bias_begin, tc.timestep_bias_end)
        except ValueError as e:
            raise ConfigError(f"trainer.{e}") from e
    if tc.zero_terminal_snr and tc.prediction_type != "v_prediction":
        raise ConfigError(
            "trainer.zero_terminal_snr=true needs trainer.prediction_type=v_prediction: at zero SNR the "
            "epsilon objective cannot give x_0 (Lin et al. 2023)"
        )
    is_preset = cfg.model.name_or_path in UNET_PRESETS
    if not is_preset and (cfg.model.vae or set(cfg.model.unet) - set(CHECKPOINT_UNET_FIELDS)):
        fixed = sorted(set(cfg.model.unet) - set(CHECKPOINT_UNET_FIELDS)) + sorted(f"vae.{k}" for k in cfg.model.vae)
        raise ConfigError(
            f"model.unet / model.vae overrides {fixed} apply to presets {sorted(UNET_PRESETS)} only, not to the "
            f"checkpoint {cfg.model.name_or_path!r} (its sizes are its tensors'); on a checkpoint only "
            f"model.unet.{{{', '.join(CHECKPOINT_UNET_FIELDS)}}} may change"
        )
    try:
        check_data_config(as_data_config(cfg.data))
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
# The learning rate: a function of the step (never a scheduler object that a resume would restart).


def lr_at(step: int, tc: TrainerConfig) -> float:
    """Learning rate of the update that takes the model from step `step` to `step + 1`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    if tc.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return tc.lr * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * factor)


def flatten_config(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"trainer.lr": ..., ...}; model.unet / model.vae stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("unet", "vae"):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
