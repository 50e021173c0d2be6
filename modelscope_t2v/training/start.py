"""Where a run starts: a size preset's random init or a checkpoint (either layout, or a hub id), and the
noise schedule it trains on."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..formats.folders import instantiate, read_vae
from ..formats.locate import detect_layout, resolve
from ..models import UNET_PRESETS, VAE_PRESETS, AutoencoderKL, UNet3D, UNetConfig, VAEConfig
from ..pipelines import TextToVideoSDPipeline
from ..schedulers import DDIMScheduler
from .config import ModelConfig, TrainerConfig


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
    folder = resolve(path)
    config, state = read_vae(folder, detect_layout(folder))
    wanted = dataclasses.asdict(VAEConfig(**{**dataclasses.asdict(config), **expected}))
    diff = {k: (getattr(config, k), wanted[k]) for k in expected if getattr(config, k) != wanted[k]}
    if diff:
        raise ValueError(f"model.vae_from={path!r}: its autoencoder differs from model.vae in "
                         + ", ".join(f"{k} (checkpoint {a!r}, model.vae {b!r})" for k, (a, b) in diff.items()))
    return instantiate(AutoencoderKL, config, state, torch.float32).eval()


def training_scheduler(pipe: TextToVideoSDPipeline, tc: TrainerConfig) -> DDIMScheduler:
    """The noise schedule trained on, as the DDIM scheduler a checkpoint ships for sampling."""
    overrides: dict[str, Any] = {"prediction_type": tc.prediction_type}
    if tc.zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
