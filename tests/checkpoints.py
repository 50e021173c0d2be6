"""Tiny random checkpoints in the exact released layouts, written by the reference implementations.

- diffusers layout: diffusers' own `TextToVideoSDPipeline(...).save_pretrained`, i.e. the files that
  damo-vilab/text-to-video-ms-1.7b and cerspense/zeroscope_v2_* hold (safetensors or .bin, fp16 variant).
- original ModelScope layout: configuration.json, the original `UNetSD` state dict pickled as
  text2video_pytorch_model.pth, a whole Lightning-style checkpoint of the original `AutoencoderKL`
  (with a pickled callback object, like the released VQGAN_autoencoder.pth) and a full open_clip
  CLIP state dict (vision tower included) as open_clip_pytorch_model.bin.
Every parameter is perturbed so that zero-initialised branches are exercised.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import torch

from modelscope_t2v.formats.unet_layout import unet_config_to_diffusers, unet_config_to_original
from modelscope_t2v.formats.vae_layout import vae_config_to_diffusers, vae_config_to_original
from modelscope_t2v.models import TEXT_PRESETS, UNET_PRESETS, VAE_PRESETS, UNetConfig, VAEConfig, build_tokenizer
from refs import modelscope_reference, perturb_

# damo-vilab/text-to-video-ms-1.7b scheduler/scheduler_config.json
RELEASED_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# The original UNetSD hard-codes GroupNorm(32) and a 1024-wide context in its decoder, so the tiny
# original-layout model is 1024 wide in its context and text tower.
TINY_ORIGINAL_UNET = UNetConfig(
    block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False), cross_attention_dim=1024,
    head_dim=16, temporal_in_heads=8, norm_groups=32, sample_size=8,  # diffusers hard-codes 8 heads in transformer_in
)
TINY_VAE: VAEConfig = VAE_PRESETS["tiny"]


def diffusers_components(seed: int = 0, unet: UNetConfig | None = None, vae: VAEConfig | None = None):
    """The reference modules (diffusers, transformers) of a tiny model, perturbed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet_ref = perturb_(UNet3DConditionModel.from_config(unet_config_to_diffusers(unet or UNET_PRESETS["tiny"])), seed)
    vae_ref = perturb_(AutoencoderKL.from_config(vae_config_to_diffusers(vae or TINY_VAE)), seed + 1)
    text_ref = perturb_(CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS["tiny"])), seed + 2)
    scheduler = DDIMScheduler.from_config(RELEASED_SCHEDULER)
    return dict(
        unet=unet_ref.eval(), vae=vae_ref.eval(), text_encoder=text_ref.eval(),
        tokenizer=build_tokenizer(None), scheduler=scheduler,
    )


def make_diffusers_checkpoint(
    folder: Path, *, seed: int = 0, variant: str | None = None, safe_serialization: bool = True,
    pipeline: str = "TextToVideoSDPipeline", unet: UNetConfig | None = None, vae: VAEConfig | None = None,
) -> Path:
    """Write a tiny checkpoint with diffusers' own writer. variant="fp16" stores fp16 tensors under
    `*.fp16.*` names, as the released repos do."""
    import diffusers

    parts = diffusers_components(seed, unet, vae)
    pipe = getattr(diffusers, pipeline)(**parts)
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
    _released_text_keys(Path(folder) / "text_encoder")
    return Path(folder)


def _released_text_keys(folder: Path) -> None:
    """transformers 5 saves CLIPTextModel without the `text_model.` level; the released files (written
    by transformers 4) have it. Rewrite the file as released."""
    from safetensors.torch import load_file, save_file

    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            state = load_file(path)
            save_file({("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()},
                      path, metadata={"format": "pt"})
        elif path.suffix == ".bin":
            state = torch.load(path, weights_only=True)
            torch.save({("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}, path)


# ---------------------------------------------------------------------------------------------------
# The original ModelScope layout


def original_unet(config: UNetConfig = TINY_ORIGINAL_UNET):
    m = unet_config_to_original(config)
    return modelscope_reference("unet_sd").UNetSD(
        in_dim=m["unet_in_dim"], dim=m["unet_dim"], y_dim=m["unet_y_dim"], context_dim=m["unet_context_dim"],
        out_dim=m["unet_out_dim"], dim_mult=m["unet_dim_mult"], num_heads=m["unet_num_heads"],
        head_dim=m["unet_head_dim"], num_res_blocks=m["unet_res_blocks"], attn_scales=m["unet_attn_scales"],
        dropout=m["unet_dropout"], temporal_attention=m["temporal_attention"] == "True",
    )


def original_autoencoder(config: VAEConfig = TINY_VAE):
    o = vae_config_to_original(config)
    return modelscope_reference("autoencoder").AutoencoderKL(o["ddconfig"], o["embed_dim"])


def open_clip_tiny(width: int = 1024, layers: int = 2, mlp_ratio: float = 0.25):
    """An open_clip CLIP (vision tower included) whose text tower is `width` wide, heads of 64."""
    import open_clip

    text_cfg = open_clip.model.CLIPTextCfg(
        context_length=77, vocab_size=49408, width=width, heads=max(1, width // 64), layers=layers, mlp_ratio=mlp_ratio
    )
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=32)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg)


def original_text_features(clip_model, prompts: list[str]) -> torch.Tensor:
    """What the original FrozenOpenCLIPEmbedder(layer='penultimate') computes (batch-first, open_clip 3.x)."""
    import open_clip

    tokens = open_clip.tokenize(prompts)
    x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
    blocks = clip_model.transformer.resblocks
    for r in blocks[: len(blocks) - 1]:
        x = r(x, attn_mask=clip_model.attn_mask)
    return clip_model.ln_final(x)


def _save_with_lightning_callback(obj: dict, path: Path) -> None:
    """Save `obj` plus a pickled `pytorch_lightning...ModelCheckpoint` object inside, as the released
    VQGAN_autoencoder.pth has, from a module that does not exist at load time."""
    module = "pytorch_lightning.callbacks.model_checkpoint"
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    mods = [types.ModuleType(n) for n in names]
    for parent, child, n in zip(mods, mods[1:], parts[1:]):
        setattr(parent, n, child)

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "logs/checkpoints/last.ckpt"
            self.best_model_score = torch.tensor(0.31)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module, "ModelCheckpoint"
    mods[-1].ModelCheckpoint = ModelCheckpoint
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(zip(names, mods))
    try:
        torch.save(dict(obj, callbacks={ModelCheckpoint: {"best": 0.31}, "checkpoint": ModelCheckpoint()}), path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def make_modelscope_checkpoint(folder: Path, *, seed: int = 0) -> tuple[Path, dict]:
    """Write a tiny original-layout checkpoint; returns (folder, the reference modules)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = perturb_(original_unet(), seed).eval()
    vae = perturb_(original_autoencoder(), seed + 1).eval()
    clip = perturb_(open_clip_tiny(), seed + 2).eval()

    model_cfg = dict(unet_config_to_original(TINY_ORIGINAL_UNET))
    model_cfg.update(num_timesteps=1000, mean_type="eps", var_type="fixed_small", loss_type="mse")
    config = {
        "framework": "pytorch",
        "task": "text-to-video-synthesis",
        "model": {
            "type": "latent-text-to-video-synthesis",
            "model_args": {
                "ckpt_clip": "open_clip_pytorch_model.bin",
                "ckpt_unet": "text2video_pytorch_model.pth",
                "ckpt_autoencoder": "VQGAN_autoencoder.pth",
                "max_frames": 16,
                "tiny_gpu": 1,
            },
            "model_cfg": model_cfg,
        },
        "pipeline": {"type": "latent-text-to-video-synthesis"},
    }
    (folder / "configuration.json").write_text(json.dumps(config, indent=2))
    torch.save(unet.state_dict(), folder / "text2video_pytorch_model.pth")
    # The released file is a whole latent-diffusion training checkpoint: other models' keys ride along.
    lightning = {
        "state_dict": {
            **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
            "model.diffusion_model.out.0.weight": torch.randn(4),
            "cond_stage_model.model.ln_final.weight": torch.randn(4),
        },
        "epoch": 7,
        "global_step": 12345,
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    _save_with_lightning_callback(lightning, folder / "VQGAN_autoencoder.pth")
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, dict(unet=unet, vae=vae, clip=clip)


# ---------------------------------------------------------------------------------------------------
# A Hugging Face cache laid out as huggingface_hub writes it (what HF_HUB_OFFLINE=1 reads).


def install_in_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0" * 40) -> Path:
    """Copy `folder` into `cache` as the snapshot of `repo_id` at `revision`, with refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
