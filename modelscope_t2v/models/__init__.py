"""The three networks of ModelScope T2V, in PyTorch and einops only: the space-time UNet, the KL
autoencoder and the OpenCLIP text tower (with its tokenizer). Each file: config dataclass, blocks, the
model, size presets. How checkpoints name their tensors is `modelscope_t2v.formats`' business."""

from .text import TEXT_PRESETS, build_text_encoder, build_tokenizer, text_config, tokenize
from .unet import UNET_PRESETS, UNet3D, UNetConfig
from .vae import VAE_PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "TEXT_PRESETS", "UNET_PRESETS", "VAE_PRESETS", "AutoencoderKL", "DiagonalGaussian", "UNet3D", "UNetConfig",
    "VAEConfig", "build_text_encoder", "build_tokenizer", "text_config", "tokenize",
]
