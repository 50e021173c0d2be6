"""The KL autoencoder of ModelScope T2V (the LDM / Stable Diffusion KL-f8 VAE; the paper calls it "VQGAN").

Frames are encoded and decoded one by one: a video `b c f h w` is folded into a batch of images, so the
model has no temporal layers. Numerics follow the two reference layouts it loads from: the diffusers
`AutoencoderKL` (damo-vilab/text-to-video-ms-1.7b, zeroscope) and the LDM autoencoder of the original
ModelScope release (`VQGAN_autoencoder.pth`). The file reads top to bottom: config, posterior, blocks,
the model, presets. How the released layouts name its tensors: `modelscope_t2v.formats.vae_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..diffusion.noise import randn_like
from .base import Model, require_bools, require_float, require_int_list, require_ints


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per resolution level, highest first;
    # every level but the last halves the resolution, so the latent is 2**(levels - 1) times smaller
    layers_per_block: int = 2  # resnets per encoder level (the decoder has one more per level)
    latent_channels: int = 4
    norm_groups: int = 32  # GroupNorm groups everywhere (eps 1e-6); the original layout hard-codes 32
    scaling_factor: float = 0.18215  # diffusion latents = scaling_factor * z; not used by the model itself
    sample_size: int = 512  # default tile size in pixels; tiling only matters for frames above it
    mid_attention: bool = True  # the single-head self-attention in the middle of encoder and decoder

    def __post_init__(self):
        self.block_channels = require_int_list(self, "block_channels")  # JSON gives a list back
        require_ints(self, "in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_groups",
                     "sample_size")
        # 0 would divide the latents by zero (NaN videos); diffusers takes any value
        require_float(self, "scaling_factor", 0.0, open_low=True)
        require_bools(self, "mid_attention")
        bad = [c for c in self.block_channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"VAEConfig.block_channels {self.block_channels} must all be divisible by "
                f"norm_groups={self.norm_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each spatial axis (8 for the released model)."""
        return 2 ** (len(self.block_channels) - 1)


# ---------------------------------------------------------------------------------------------------
# Posterior. Why a class of our own: the noise of `sample` must be drawn exactly as diffusers draws it
# so that a seeded video-to-video run gives the same latents, also for `b c f h w` video posteriors.


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's moments `n (2 c) h w` or `b (2 c) f h w`."""

    def __init__(self, moments: Tensor):
        if moments.ndim not in (4, 5) or moments.shape[1] % 2:
            raise ValueError(f"moments must be n (2c) h w or b (2c) f h w, got shape {tuple(moments.shape)}")
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # n c h w | b c f h w
        self.logvar = logvar.clamp(-30.0, 20.0)  # the references' clamp
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * eps. eps is drawn like diffusers' `randn_tensor`: with the mean's dtype, on the
        generator's device (then moved), one draw for the whole batch or one per batch element when a
        list of generators is given. A video's noise is drawn in the frames-folded layout `(b f) c h w`
        that diffusers' pipelines encode in, then unfolded, so seeds give the same latents."""
        eps = randn_like(self.mean, generator)  # like the mean: b c f h w drawn as b f c h w
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over every non-batch dim (LDM eq. for a diagonal Gaussian)."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


# ---------------------------------------------------------------------------------------------------
# Blocks. All norms are GroupNorm with eps 1e-6, all activations SiLU, as in both references.


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 conv shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # n c' h w
        h = self.conv2(F.silu(self.norm2(h)))  # n c' h w
        return self.shortcut(x) + h  # n c' h w


class Attention(nn.Module):
    """Single-head self-attention over all pixels, residual (only used at the lowest resolution)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        h = rearrange(self.norm(x), "n c h w -> n 1 (h w) c")  # one head
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # n 1 (h w) c
        h = self.to_out(h)  # n 1 (h w) c
        return x + rearrange(h, "n 1 (h w) c -> n c h w", h=height)  # n c h w


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (the LDM asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # n c h/2 w/2


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # n c 2h 2w


class MidBlock(nn.Module):
    """resnet - attention - resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups)
        self.attention = Attention(channels, groups) if attention else None
        self.res2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        h = self.res1(x)  # n c h w
        if self.attention is not None:
            h = self.attention(h)  # n c h w
        return self.res2(h)  # n c h w


class Level(nn.Module):
    """One resolution level: resnets, then an optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, groups: int, resample: nn.Module | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * depth
        self.resnets = nn.ModuleList(ResBlock(widths[i], widths[i + 1], groups) for i in range(depth))
        self.resample = resample  # Downsample, Upsample or None (the last level)

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # n c' h w
        if self.resample is not None:
            x = self.resample(x)  # n c' h/2 w/2 (encoder) | n c' 2h 2w (decoder)
        return x


class Encoder(nn.Module):
    """image n c h w -> moments n (2 latent) h/f w/f (before the moments projection)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans, n = c.block_channels, len(c.block_channels)
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(chans[max(i - 1, 0)], chans[i], c.layers_per_block, c.norm_groups,
                  Downsample(chans[i]) if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = MidBlock(chans[-1], c.norm_groups, c.mid_attention)
        self.norm_out = _norm(chans[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # n c0 h w
        for level in self.levels:
            h = level(h)  # n ci h/2^i w/2^i
        h = self.mid(h)  # n cL h/f w/f
        return self.conv_out(F.silu(self.norm_out(h)))  # n (2 z) h/f w/f


class Decoder(nn.Module):
    """latent n z h w -> image n c hf wf; levels are stored lowest resolution first (the order they run)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans, n = c.block_channels[::-1], len(c.block_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, chans[0], 3, padding=1)
        self.mid = MidBlock(chans[0], c.norm_groups, c.mid_attention)
        self.levels = nn.ModuleList(
            Level(chans[max(i - 1, 0)], chans[i], c.layers_per_block + 1, c.norm_groups,
                  Upsample(chans[i]) if i < n - 1 else None)
            for i in range(n)
        )
        self.norm_out = _norm(chans[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # n cL h w
        h = self.mid(h)  # n cL h w
        for level in self.levels:
            h = level(h)  # n ci h*2^i w*2^i
        return self.conv_out(F.silu(self.norm_out(h)))  # n c hf wf


# ---------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(Model):
    """KL-regularised autoencoder. Images `n c h w` or videos `b c f h w` in [-1, 1]; latents unscaled
    (multiply by `config.scaling_factor` for the diffusion model, divide before `decode`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.moments_proj = nn.Conv2d(2 * z, 2 * z, 1)  # "quant_conv" in both references
        self.latent_proj = nn.Conv2d(z, z, 1)  # "post_quant_conv"
        self.chunk_size: int | None = None  # images (frames) per encoder/decoder call; None: all at once
        self.tile_size: int | None = None  # tile edge in pixels; None: no tiling
        self.tile_overlap = 0.25

    # -- public API ---------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: n c h w or b c f h w (frames are encoded independently) -> posterior of the same layout."""
        frames = self._check(x, "x", self.config.in_channels)
        images = rearrange(x, "b c f h w -> (b f) c h w") if frames else x  # n c h w
        moments = torch.cat([self._moments(c) for c in self._chunks(images)])  # n (2 z) h/f w/f
        if frames:
            moments = rearrange(moments, "(b f) c h w -> b c f h w", f=frames)  # b (2 z) f h/f w/f
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        """z: unscaled latents n z h w or b z f h w -> images (videos) in about [-1, 1]."""
        frames = self._check(z, "z", self.config.latent_channels)
        latents = rearrange(z, "b c f h w -> (b f) c h w") if frames else z  # n z h w
        images = torch.cat([self._images(c) for c in self._chunks(latents)])  # n c hf wf
        if frames:
            images = rearrange(images, "(b f) c h w -> b c f h w", f=frames)  # b c f hf wf
        return images

    def forward(self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
                ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, for the reconstruction + KL objective."""
        posterior = self.encode(x)  # n (2 z) h/f w/f | b (2 z) f h/f w/f
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # n z .. | b z f ..
        return self.decode(z), posterior  # like x

    def enable_slicing(self, chunk_size: int = 1) -> None:
        """Run encoder and decoder on `chunk_size` images (frames) at a time: bounded memory for long
        videos, and the same output (the networks are per-image)."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def disable_slicing(self) -> None:
        self.chunk_size = None

    def enable_tiling(self, tile_size: int | None = None, overlap: float = 0.25) -> None:
        """Encode/decode frames larger than `tile_size` pixels (default `config.sample_size`) in
        overlapping tiles blended linearly over the overlap, as diffusers' tiled encode/decode do (same
        tiles, same blending: bit-identical to them in tests/test_vae.py). Frames no larger than a tile
        are untouched. Tiling is an approximation: each tile has its own GroupNorm statistics and a
        truncated receptive field. With pixel-local stand-in networks tiled == untiled to 1e-6; on the
        random tiny test models the difference is 0.4-0.6 (moments) and 0.6-0.75 (images) of the
        output's max, which says nothing about trained weights, where seams are what diffusers shows."""
        tile = self.config.sample_size if tile_size is None else tile_size
        f = self.config.downsample_factor
        if not isinstance(tile, int) or tile < f or tile % f:
            raise ValueError(f"tile_size must be a positive multiple of the downsample factor {f}, got {tile!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
        if int(tile // f * (1 - overlap)) < 1:
            raise ValueError(f"overlap={overlap} leaves no stride for tile_size={tile}")
        self.tile_size, self.tile_overlap = tile, float(overlap)

    def disable_tiling(self) -> None:
        self.tile_size = None

    # -- internals ----------------------------------------------------------------------------------

    def _check(self, x: Tensor, name: str, channels: int) -> int | None:
        """Validate an input; return its frame count for b c f h w, None for n c h w."""
        if not isinstance(x, Tensor) or x.ndim not in (4, 5) or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be n {channels} h w or b {channels} f h w, got {shape}")
        return x.shape[2] if x.ndim == 5 else None

    def _chunks(self, x: Tensor) -> Sequence[Tensor]:
        return x.split(self.chunk_size) if self.chunk_size else (x,)

    def _moments(self, x: Tensor) -> Tensor:
        if self.tile_size is not None and max(x.shape[-2:]) > self.tile_size:
            step = int(self.tile_size // self.config.downsample_factor * (1 - self.tile_overlap))  # latent px
            return _tiled(self._moments_untiled, x, self.tile_size, step * self.config.downsample_factor,
                          self.tile_size // self.config.downsample_factor, step)
        return self._moments_untiled(x)

    # Channels-last: oneDNN's CPU convolutions run NHWC without reordering each input and output
    # (measured: decode 0.86x of diffusers' time with it, 1.29x without; docs/benchmarks.md).
    def _moments_untiled(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # n c h w, NHWC strides
        return self.moments_proj(self.encoder(x)).contiguous()  # n (2 z) h/f w/f

    def _images(self, z: Tensor) -> Tensor:
        if self.tile_size is not None and max(z.shape[-2:]) > self.tile_size // self.config.downsample_factor:
            tile = self.tile_size // self.config.downsample_factor  # latent px
            step = int(tile * (1 - self.tile_overlap))
            return _tiled(self._images_untiled, z, tile, step, self.tile_size, step * self.config.downsample_factor)
        return self._images_untiled(z)

    def _images_untiled(self, z: Tensor) -> Tensor:
        z = z.contiguous(memory_format=torch.channels_last)  # n z h w, NHWC strides
        return self.decoder(self.latent_proj(z)).contiguous()  # n c hf wf


def _tiled(fn, x: Tensor, tile_in: int, step_in: int, tile_out: int, keep: int) -> Tensor:
    """Apply `fn` to tiles of `x` (edge `tile_in`, starting every `step_in`); each output tile (edge
    `tile_out`) is blended into its upper and left neighbours over `tile_out - keep` rows/columns, then
    cropped to `keep`. Blending is done in place, row by row, so a tile blends with its already-blended
    neighbours: this is diffusers' scheme and gives its numbers."""
    rows = [
        [fn(x[..., i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[-1], step_in)]
        for i in range(0, x.shape[-2], step_in)
    ]
    blend = tile_out - keep
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend_(rows[i - 1][j], tile, blend, dim=-2)
            if j > 0:
                _blend_(row[j - 1], tile, blend, dim=-1)
        out_rows.append(torch.cat([t[..., :keep, :keep] for t in row], dim=-1))
    return torch.cat(out_rows, dim=-2)


def _blend_(before: Tensor, tile: Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows (dim=-2) or columns (dim=-1) of `tile` from `before`'s last ones."""
    n = min(before.shape[dim], tile.shape[dim], extent)
    if n == 0:
        return
    ramp = torch.arange(n, dtype=torch.float64) / n  # weight of `tile`
    shape = (n, 1) if dim == -2 else (n,)
    w_new = ramp.to(tile.dtype).to(tile.device).reshape(shape)
    w_old = (1 - ramp).to(tile.dtype).to(tile.device).reshape(shape)
    head, tail = tile.narrow(dim, 0, n), before.narrow(dim, before.shape[dim] - n, n)
    head.copy_(tail * w_old + head * w_new)


# ---------------------------------------------------------------------------------------------------
# Presets


VAE_PRESETS: dict[str, VAEConfig] = {
    # Two levels (latent factor 2), 32 groups so the original layout can hold it too; for tests.
    "tiny": VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=32, sample_size=32),
    # SD KL-f8 as released with ModelScope T2V 1.7B and zeroscope: 83.7M parameters.
    "ms-1.7b": VAEConfig(),
}
