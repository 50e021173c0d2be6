"""The space-time UNet of ModelScope Text-to-Video (arXiv 2308.06571, Sec. 3).

A Stable-Diffusion 2D UNet made into a video model by folding frames into the batch, `(b f) c h w`,
and adding temporal layers that unfold them again:

    conv_in -> temporal_attention_in -> down levels -> mid -> up levels -> norm_out/conv_out

Every level is a list of `SpaceTimeBlock`s (resnet -> temporal_conv -> [spatial_attention ->
temporal_attention]) plus a down/upsampler. The temporal conv is 4 x [GroupNorm, SiLU, (Dropout),
Conv3d (3,1,1)] with a residual and a zero-initialised last conv; the temporal attention is a
transformer whose two attentions are both self-attention over the frames of one pixel (no positional
embedding, GroupNorm eps 1e-6 over all frames; `temporal_position_embedding=True`, ours and off by
default, adds a sinusoidal frame-index embedding there). Spatial attention is the SD 2 transformer: linear
proj_in/proj_out, self-attention, cross-attention to the text, GEGLU feed-forward.

Behaviour worth knowing:
- One-frame inputs (image batches in mixed image-video training) run through the temporal layers
  like any clip: the temporal conv sees one frame with zero padding (only its centre taps act) and
  the temporal attention attends to its single frame. This is what both references do (diffusers'
  UNet3DConditionModel and the original UNetSD), and it is pinned by a parity test at f=1. To treat
  images as frame-independent instead, call `set_temporal(attention=False, conv=False)`.
- Latent sizes that are not multiples of 2**(levels-1) work: every upsampler resizes to the size of
  the skip connection it is concatenated with (diffusers' behaviour; the original fails there).
- `dropout` is used by the temporal convs (both references hard-code 0.1 there) and by the resnets
  (the original passes unet_dropout = 0.1; diffusers' port drops it). It only matters in training.

The names here are ours; how the two released checkpoint layouts name these tensors is
`modelscope_t2v.formats.unet_layout`'s business.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import Model, require_bool_list, require_bools, require_float, require_int_list, require_ints
from .training_free import DeepCache, FrameWindows, FreeU


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    # channels of each resolution level, from full resolution down; the mid block uses the last
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # resnets per down level (every up level has one more, for the extra skip connection)
    layers_per_block: int = 2
    # which levels (from full resolution down) have spatial + temporal attention; the mid block
    # always has both. Up levels mirror the down levels.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    cross_attention_dim: int = 1024  # width of the text embeddings
    # width of one attention head; heads = channels / head_dim (diffusers calls it
    # attention_head_dim, the original unet_head_dim)
    head_dim: int = 64
    # heads of the temporal transformer right after conv_in; its inner width is
    # temporal_in_heads * head_dim (512), not the channel count (diffusers hard-codes 8)
    temporal_in_heads: int = 8
    norm_groups: int = 32
    norm_eps: float = 1e-5  # resnets, temporal convs and norm_out; the transformers use 1e-6
    sample_size: int = 32  # nominal latent size (informational: any size runs)
    dropout: float = 0.1  # temporal convs and resnets, in training
    # optional guidance-scale embedding (T2V-Turbo-MS style, diffusers' time_cond_proj_dim): a
    # bias-free Linear(timestep_cond_dim -> block_channels[0]) added to the sinusoidal embedding
    timestep_cond_dim: int | None = None
    # ours, not in either reference (default off: the released checkpoints have none): add a fixed
    # sinusoidal embedding of the frame index inside every temporal transformer, after proj_in, as
    # AnimateDiff's motion modules do. Without it the temporal attention is blind to frame order and
    # only the temporal convs' zero padding tells frames apart (docs/shapes_model.md measures what
    # that costs a small model). Parameter-free: the weights of a checkpoint are the same either way.
    temporal_position_embedding: bool = False
    # ours as well (default off): add fixed Fourier features of the pixel's place in the frame (centred
    # x and y, sin and cos at 4 octaves from one cycle per two frames) inside every spatial transformer,
    # after proj_in. Convolutions see absolute position only through zero padding, weakly; a caption
    # that says where an object goes ("moving left" starts right of centre) needs features that tell
    # left from right (docs/shapes_model.md). Parameter-free, like temporal_position_embedding.
    spatial_position_embedding: bool = False

    def __post_init__(self) -> None:
        self.block_channels = require_int_list(self, "block_channels")
        self.attention_levels = require_bool_list(self, "attention_levels")
        require_ints(self, "in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "head_dim",
                     "temporal_in_heads", "norm_groups", "sample_size")
        require_float(self, "norm_eps", 0.0, open_low=True)
        require_float(self, "dropout", 0.0, 1.0)
        require_bools(self, "temporal_position_embedding", "spatial_position_embedding")
        if self.timestep_cond_dim is not None:
            require_ints(self, "timestep_cond_dim")
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries but "
                f"block_channels has {len(self.block_channels)}; give one per level"
            )
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"UNetConfig.block_channels entry {c} is not divisible by norm_groups={self.norm_groups}"
                )
        attended = [c for c, a in zip(self.block_channels, self.attention_levels) if a]
        for c in attended + [self.block_channels[-1]]:
            if c % self.head_dim:
                raise ValueError(
                    f"UNetConfig.block_channels entry {c} (a level with attention, or the mid block) "
                    f"is not divisible by head_dim={self.head_dim}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Inverse of `dataclasses.asdict` (also after a JSON round trip); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UNetConfig.from_dict: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (b,) timesteps -> (b, dim) float32, cos half first, no frequency shift."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)  # half
    args = timesteps.float()[:, None] * freqs[None, :]  # b half
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # b (2 half)
    return F.pad(emb, (0, dim % 2))  # b dim


def frame_position_features(height: int, width: int, dim: int, device=None) -> Tensor:
    """(height * width, dim) float32: sin and cos of the centred coordinates u = (i + 0.5) / size - 0.5
    (x, then y) at frequencies pi * 2^(3k / (q - 1)), k < q = dim // 4 (one cycle per two frames to four
    per frame), zero-padded to dim. The same place in the frame gets the same features at every level."""
    q = dim // 4
    if q == 0:
        return torch.zeros(height * width, dim, device=device)
    freqs = math.pi * 2.0 ** (3.0 * torch.arange(q, dtype=torch.float32, device=device) / max(q - 1, 1))  # q
    uy = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height - 0.5  # h
    ux = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width - 0.5  # w
    ax = (ux[:, None] * freqs).expand(height, width, q)  # h w q
    ay = (uy[:, None] * freqs)[:, None].expand(height, width, q)  # h w q
    emb = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=-1).reshape(height * width, 4 * q)  # (h w) 4q
    return F.pad(emb, (0, dim - 4 * q))  # (h w) dim


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class TimestepMLP(nn.Module):
    """Sinusoidal embedding -> Linear -> SiLU -> Linear (to 4x the first level's width)."""

    def __init__(self, dim: int, embed_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)
        self.cond_proj = nn.Linear(cond_dim, dim, bias=False) if cond_dim is not None else None

    def forward(self, t_emb: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            t_emb = t_emb + self.cond_proj(cond)  # b dim
        return self.fc2(F.silu(self.fc1(t_emb)))  # b embed_dim


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, add the time embedding, GroupNorm-SiLU-Dropout-Conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, in_ch, eps=eps)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(embed_dim, out_ch)
        self.out_norm = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))  # (b f) o h w
        h = h + self.time_proj(F.silu(emb))[:, :, None, None]  # (b f) o h w
        h = self.out_conv(self.dropout(F.silu(self.out_norm(h))))  # (b f) o h w
        return self.shortcut(x) + h  # (b f) o h w


class FrameConv(nn.Conv3d):
    """The (3, 1, 1) Conv3d over frames, run as the Conv2d (3, 1) over b c f (h w) with the same weights: the same
    sums to fp32 round-off, about 3x faster on CPUs, where such a Conv3d has no oneDNN kernel (docs/benchmarks.md).
    Still an nn.Conv3d: its weights, hooks and peft's LoRA wrapping are a Conv3d's.

    `circular` (UNet3D.circular_frames): pad the frames by wrapping around, not with zeros, so the last frame is
    the first one's neighbour (loops)."""

    circular = False

    def forward(self, x: Tensor) -> Tensor:
        b, _, f, h, w = x.shape  # b c f h w
        x = x.reshape(b, -1, f, h * w)  # b c f (h w)
        pad = self.padding[0]
        if self.circular and pad:
            x = x.index_select(2, torch.arange(-pad, f + pad, device=x.device) % f)  # b c (f + 2 pad) (h w)
            pad = 0
        out = F.conv2d(x, self.weight.squeeze(-1), self.bias, padding=(pad, 0))  # b o f (h w)
        return out.view(b, -1, f, h, w)  # b o f h w


class TemporalConvBlock(nn.Module):
    """4 x [GroupNorm -> SiLU -> Dropout (not before the first conv) -> Conv3d (3,1,1)], residual.

    The last conv starts at zero, so a fresh block is the identity (the 2D model, frame by frame)."""

    def __init__(self, ch: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norms = nn.ModuleList([nn.GroupNorm(groups, ch, eps=eps) for _ in range(4)])
        self.convs = nn.ModuleList([FrameConv(ch, ch, (3, 1, 1), padding=(1, 0, 0)) for _ in range(4)])
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)
        self.enabled = True  # set_temporal(conv=False) skips the block

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if not self.enabled:
            return x  # (b f) c h w
        h = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)  # b c f h w
        residual = h  # b c f h w
        for i, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            h = F.silu(norm(h))  # b c f h w, statistics over all frames
            h = conv(self.dropout(h) if i > 0 else h)  # b c f h w
        return rearrange(residual + h, "b c f h w -> (b f) c h w")  # (b f) c h w


class Attention(nn.Module):
    """Multi-head attention; keys and values come from `context` (cross) or from `x` (self).

    A context may be shared by r consecutive sequences of x (the frames of one video attend to one text): given
    as (n / r, m, c') it is projected once, not once per frame, and the r sequences' queries attend to it as one
    longer sequence. Each query row's attention is the same either way; the keys and values cost 1/r."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(context_dim or dim, inner, bias=False)
        self.v_proj = nn.Linear(context_dim or dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context  # n m c', or (n/r) m c' shared by r sequences
        n, r = x.shape[0], x.shape[0] // context.shape[0]
        if r * context.shape[0] != n:
            raise ValueError(f"Attention: a context batch of {context.shape[0]} does not divide x's batch of {n}")
        q = rearrange(self.q_proj(x), "(n r) l (h d) -> n h (r l) d", r=r, h=self.heads)  # n/r h (r l) d
        k = rearrange(self.k_proj(context), "n m (h d) -> n h m d", h=self.heads)  # n/r h m d
        v = rearrange(self.v_proj(context), "n m (h d) -> n h m d", h=self.heads)  # n/r h m d
        out = F.scaled_dot_product_attention(q, k, v)  # n/r h (r l) d
        return self.out_proj(rearrange(out, "n h (r l) d -> (n r) l (h d)", r=r))  # n l c


class GEGLUFeedForward(nn.Module):
    """Linear to 2 x 4 x dim, value * GELU(gate), Linear back (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj_in(x)  # n l 8c
        value, gate = h.chunk(2, dim=-1)  # n l 4c, n l 4c
        if h.requires_grad:  # (a frozen weight can still carry a gradient: a LoRA on proj_in)
            return self.proj_out(value * F.gelu(gate))  # n l c
        # no gradient: the product in place in GELU's buffer, one buffer fewer. Contiguous, like the product above, so
        # proj_out's GEMM sees the same layout and rounds the same (on some CPUs a strided input rounds differently)
        return self.proj_out(F.gelu(gate).mul_(value))


FF_CHUNK_ELEMENTS = 1 << 22  # feed-forward chunking: at most ~4M intermediate values (16 MB fp32) per chunk
# Without a gradient, a feed-forward whose 8c-wide intermediate would exceed this many values (1 GB in fp32:
# transformer_in at 64 frames of 256 x 256) is chunked by itself, as enable_forward_chunking(1, dim=0) would:
# long videos stay within memory, and smaller calls (all of the parity tests) are untouched.
AUTO_CHUNK_ELEMENTS = 1 << 28


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, a second attention, GEGLU feed-forward, each residual.

    The second attention attends to `context` (cross-attention to the text) when the block is built
    with a context_dim, and is a second self-attention otherwise (the temporal transformers)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, head_dim)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, head_dim, context_dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)
        self.chunk_size: int | None = None  # feed-forward chunking (memory only), see UNet3D
        self.chunk_dim = 0

    def forward(self, x: Tensor, context: Tensor | None = None, windows: FrameWindows | None = None,
                window_position: Tensor | None = None) -> Tensor:
        if windows is None:
            x = self._attend(x, context)  # n l c
            return x + self._feed_forward(self.ff_norm(x))  # n l c
        # FreeNoise: the attentions over windows of the l frames, fused; the feed-forward on the whole, a window's
        # worth of frames at a time (more while under FF_CHUNK_ELEMENTS; row-wise, so the same numbers): its
        # intermediate, the largest activation of a long video, is then bounded by the window, not the length.
        # window_position (context_length c): a frame-position embedding added to every window's frames, so that
        # each window sees the positions 0 .. context_length - 1 it was trained on, not positions past them.
        def attend(w: Tensor, _) -> Tensor:
            if window_position is not None:
                w = w + window_position[: w.shape[1]]  # n w c
            return self._attend(w, context)  # n w c

        x = windows.fuse(attend, x)  # n l c
        return x + self._feed_forward(self.ff_norm(x), frames_per_chunk=windows.context_length)  # n l c

    def _attend(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_norm(x))  # n l c
        return x + self.cross_attn(self.cross_attn_norm(x), context)  # n l c

    def _feed_forward(self, x: Tensor, frames_per_chunk: int | None = None) -> Tensor:
        inner = self.ff.proj_in.out_features
        if self.chunk_size is not None:
            chunk_size, chunk_dim = self.chunk_size, self.chunk_dim  # enable_forward_chunking
        elif torch.is_grad_enabled():
            return self.ff(x)  # n l c
        elif frames_per_chunk is not None and x.shape[1] > frames_per_chunk:
            chunk_size, chunk_dim = frames_per_chunk, 1  # FreeNoise: bounded by the window
        elif x.numel() // x.shape[-1] * inner > AUTO_CHUNK_ELEMENTS and x.shape[0] >= 2:
            chunk_size, chunk_dim = 1, 0  # large: bounded automatically
        else:
            return self.ff(x)  # n l c
        # Chunks of `chunk_size` along `chunk_dim`, merged while the 8c-wide intermediate of a chunk stays
        # under FF_CHUNK_ELEMENTS: the memory bound of chunking without a Python loop per token (diffusers'
        # chunk_size=1, dim=1 runs ~10^5 tiny matmuls per step). Row-wise, so the output is unchanged.
        rows_per_slice = x.numel() // x.shape[chunk_dim] // x.shape[-1]  # rows in one index of chunk_dim
        step = max(chunk_size, FF_CHUNK_ELEMENTS // max(1, rows_per_slice * inner))
        chunks = x.split(step, dim=chunk_dim)  # pieces of n l c
        return torch.cat([self.ff(c) for c in chunks], dim=chunk_dim)  # n l c


class SpatialTransformer(nn.Module):
    """Attention over the h*w pixels of each frame, cross-attending to the text; with
    `position_embedding`, `frame_position_features` are added after proj_in."""

    def __init__(self, ch: int, head_dim: int, context_dim: int, groups: int, position_embedding: bool = False):
        super().__init__()
        self.position_embedding = position_embedding
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.block = TransformerBlock(ch, ch // head_dim, head_dim, context_dim)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.proj_in(rearrange(self.norm(x), "n c h w -> n (h w) c"))  # (b f) (h w) c
        if self.position_embedding:
            h = h + frame_position_features(height, width, h.shape[-1], h.device).to(h.dtype)  # + (h w) c
        h = self.proj_out(self.block(h, context))  # (b f) (h w) c
        return x + rearrange(h, "n (h w) c -> n c h w", h=height, w=width)  # (b f) c h w


class TemporalTransformer(nn.Module):
    """Attention over the frames of each pixel: two self-attentions; no positional embedding (as both
    references) unless `position_embedding`: then a sinusoidal embedding of the frame index is added
    after proj_in (under FreeNoise windows, the index within each window)."""

    def __init__(self, ch: int, heads: int, head_dim: int, groups: int, position_embedding: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.position_embedding = position_embedding
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner)
        self.block = TransformerBlock(inner, heads, head_dim, context_dim=None)
        self.proj_out = nn.Linear(inner, ch)
        self.enabled = True  # set_temporal(attention=False) skips the layer
        self.windows: FrameWindows | None = None  # FreeNoise: attention over frame windows (set_frame_windows)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if not self.enabled:
            return x  # (b f) c h w
        b = x.shape[0] // num_frames
        height, width = x.shape[-2:]
        h = self.norm(rearrange(x, "(b f) c h w -> b c f h w", f=num_frames))  # b c f h w
        h = self.proj_in(rearrange(h, "b c f h w -> (b h w) f c"))  # (b h w) f inner
        windowed = self.windows is not None and num_frames > self.windows.context_length
        window_position = None
        if self.position_embedding:  # under FreeNoise, positions within each window (diffusers' block too)
            frames = torch.arange(self.windows.context_length if windowed else num_frames, device=h.device)
            position = timestep_embedding(frames, h.shape[-1]).to(h.dtype)  # frames inner
            if windowed:
                window_position = position  # added to each window by the block
            else:
                h = h + position  # + f inner
        if windowed and not torch.is_grad_enabled():
            # FreeNoise, inference: the pixels' sequences in groups of about FF_CHUNK_ELEMENTS values (the block
            # treats each sequence on its own, so the same numbers): its activations are bounded by the group, not
            # by the length (diffusers' AnimateDiff calls this split inference)
            group = max(1, FF_CHUNK_ELEMENTS // (num_frames * h.shape[-1]))
            h = torch.cat([self.block(g, windows=self.windows, window_position=window_position)
                           for g in h.split(group)])  # (b h w) f inner
        else:
            h = self.block(h, windows=self.windows, window_position=window_position)  # (b h w) f inner
        h = rearrange(self.proj_out(h), "(b h w) f c -> (b f) c h w", b=b, h=height, w=width)  # (b f) c h w
        return x + h  # (b f) c h w


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (b f) c h/2 w/2


class Upsample(nn.Module):
    """Nearest-neighbour resize to `size` (the next skip's size), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (b f) c H W


class SpaceTimeBlock(nn.Module):
    """resnet -> temporal conv -> [spatial attention -> temporal attention]."""

    def __init__(self, in_ch: int, out_ch: int, attention: bool, embed_dim: int, c: UNetConfig):
        super().__init__()
        self.resnet = ResBlock(in_ch, out_ch, embed_dim, c.norm_groups, c.norm_eps, c.dropout)
        self.temporal_conv = TemporalConvBlock(out_ch, c.norm_groups, c.norm_eps, c.dropout)
        if attention:
            heads = out_ch // c.head_dim
            self.spatial_attention = SpatialTransformer(out_ch, c.head_dim, c.cross_attention_dim, c.norm_groups,
                                                        c.spatial_position_embedding)
            self.temporal_attention = TemporalTransformer(out_ch, heads, c.head_dim, c.norm_groups,
                                                          c.temporal_position_embedding)
        else:
            self.spatial_attention = None
            self.temporal_attention = None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        x = self.resnet(x, emb)  # (b f) o h w
        x = self.temporal_conv(x, num_frames)  # (b f) o h w
        if self.spatial_attention is not None:
            x = self.spatial_attention(x, context)  # (b f) o h w
            x = self.temporal_attention(x, num_frames)  # (b f) o h w
        return x


class DownLevel(nn.Module):
    def __init__(self, blocks: list[SpaceTimeBlock], downsample: Downsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class UpLevel(nn.Module):
    def __init__(self, blocks: list[SpaceTimeBlock], upsample: Upsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class UNet3D(Model):
    """Noise prediction eps(x_t, t, text) for video latents `b c f h w`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet3D(config=...) needs a UNetConfig, got {type(config).__name__}")
        self.config = c = config
        ch0, levels = c.block_channels[0], len(c.block_channels)
        embed_dim = 4 * ch0
        self.time_mlp = TimestepMLP(ch0, embed_dim, c.timestep_cond_dim)
        self.conv_in = nn.Conv2d(c.in_channels, ch0, 3, padding=1)
        self.temporal_attention_in = TemporalTransformer(ch0, c.temporal_in_heads, c.head_dim, c.norm_groups,
                                                         c.temporal_position_embedding)

        # down: remember the width of every skip connection, in the order they are produced
        skip_channels, ch = [ch0], ch0
        self.down_levels = nn.ModuleList()
        for i, (out, attn) in enumerate(zip(c.block_channels, c.attention_levels)):
            blocks = []
            for _ in range(c.layers_per_block):
                blocks.append(SpaceTimeBlock(ch, out, attn, embed_dim, c))
                ch = out
                skip_channels.append(ch)
            downsample = Downsample(ch) if i < levels - 1 else None
            if downsample is not None:
                skip_channels.append(ch)
            self.down_levels.append(DownLevel(blocks, downsample))

        # mid: one block with attention, one without
        self.mid_blocks = nn.ModuleList(
            [SpaceTimeBlock(ch, ch, True, embed_dim, c), SpaceTimeBlock(ch, ch, False, embed_dim, c)]
        )

        # up: mirror of the down path, each block consumes one skip connection
        self.up_levels = nn.ModuleList()
        for i in range(levels):
            out, attn = c.block_channels[levels - 1 - i], c.attention_levels[levels - 1 - i]
            blocks = []
            for _ in range(c.layers_per_block + 1):
                blocks.append(SpaceTimeBlock(ch + skip_channels.pop(), out, attn, embed_dim, c))
                ch = out
            self.up_levels.append(UpLevel(blocks, Upsample(ch) if i < levels - 1 else None))

        self.norm_out = nn.GroupNorm(c.norm_groups, ch0, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch0, c.out_channels, 3, padding=1)
        self.gradient_checkpointing = False
        self.freeu: FreeU | None = None  # enable_freeu

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        timestep_cond: Tensor | None = None,
        deep_cache: DeepCache | None = None,
    ) -> Tensor:
        """sample (b, c, f, h, w); timestep a number, a 0-d or (b,) tensor; encoder_hidden_states
        (b, n, cross_attention_dim); timestep_cond (b, timestep_cond_dim) or None; deep_cache: a DeepCache
        whose feature this call stores (a full forward) or reuses (the shallow branch only).
        Returns the noise prediction (b, out_channels, f, h, w)."""
        b, f = self._check_inputs(sample, encoder_hidden_states, timestep_cond)  # batch, frames
        if deep_cache is not None and not 0 <= deep_cache.branch < self.num_skips:
            raise ValueError(f"UNet3D: deep_cache.branch must be in [0, {self.num_skips - 1}], got {deep_cache.branch}")
        # DeepCache: the up layer that takes the branch's skip (up layer u takes skip num_skips - 1 - u); with a
        # stored feature only the skips up to the branch are made and the up path starts at that layer
        cut = self.num_skips - 1 - deep_cache.branch if deep_cache is not None else -1
        shallow = deep_cache is not None and deep_cache.feature is not None
        down_skips = deep_cache.branch + 1 if shallow else self.num_skips
        up_start = cut if shallow else 0
        t = self._timesteps(timestep, b, sample.device)  # b
        emb = timestep_embedding(t, self.config.block_channels[0]).to(self.dtype)  # b c0
        emb = self.time_mlp(emb, timestep_cond)  # b 4c0
        emb = repeat(emb, "b d -> (b f) d", f=f)  # (b f) 4c0
        if encoder_hidden_states.ndim == 4:  # a context per frame (prompt travel): b f n d
            context = rearrange(encoder_hidden_states, "b f n d -> (b f) n d")  # (b f) n ctx
        else:  # one text per video: the cross-attentions project it once, not once per frame (Attention)
            context = encoder_hidden_states  # b n ctx

        x = self.conv_in(rearrange(sample, "b c f h w -> (b f) c h w"))  # (b f) c0 h w
        x = self._run(self.temporal_attention_in, x, f)  # (b f) c0 h w
        skips = [x]  # every skip connection, (b f) ci hi wi, consumed last-in first-out
        for level in self.down_levels:
            for block in level.blocks:
                if len(skips) < down_skips:
                    x = self._run(block, x, emb, context, f)  # (b f) ci hi wi
                    skips.append(x)
            if level.downsample is not None and len(skips) < down_skips:
                x = level.downsample(x)  # (b f) ci hi/2 wi/2
                skips.append(x)

        if not shallow:
            for block in self.mid_blocks:
                x = self._run(block, x, emb, context, f)  # (b f) cL hL wL

        first = 0  # the index of the level's first up layer
        for i, level in enumerate(self.up_levels):
            for u, block in enumerate(level.blocks, start=first):
                if u < up_start:
                    continue  # DeepCache: deeper than the branch, replaced by the stored feature
                if u == cut:
                    x = self._deep_cache_feature(deep_cache, x, skips[-1])  # (b f) ci hi wi
                skip = skips.pop()  # (b f) cskip hi wi
                if self.freeu is not None:
                    x, skip = self.freeu.backbone_and_skip(i, x, skip)
                x = torch.cat([x, skip], dim=1)  # (b f) (ci + cskip) hi wi
                x = self._run(block, x, emb, context, f)  # (b f) ci hi wi
            first += len(level.blocks)
            if level.upsample is not None and first > up_start:  # (the level ran)
                x = level.upsample(x, skips[-1].shape[-2:])  # (b f) ci h(i-1) w(i-1)

        x = self.conv_out(F.silu(self.norm_out(x)))  # (b f) c_out h w
        return rearrange(x, "(b f) c h w -> b c f h w", b=b)  # b c_out f h w

    @staticmethod
    def _deep_cache_feature(deep_cache: DeepCache, x: Tensor, skip: Tensor) -> Tensor:
        """At the cut: store x (a full forward), or return the stored feature in its place (the shallow branch)."""
        if deep_cache.feature is None:
            deep_cache.feature = x  # (b f) ci hi wi, before FreeU and the skip
            return x
        if deep_cache.feature.shape[0] != skip.shape[0]:
            raise ValueError(f"UNet3D: the DeepCache feature is for a batch of {deep_cache.feature.shape[0]} frames, "
                             f"this call has {skip.shape[0]}; start with a full step")
        return deep_cache.feature

    @property
    def num_skips(self) -> int:
        """The skip connections (DeepCache's branches): conv_in's, one per down block, one per downsampler."""
        return 1 + sum(len(level.blocks) + (level.downsample is not None) for level in self.down_levels)

    def _run(self, module: nn.Module, *args: Any) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _check_inputs(self, sample: Tensor, context: Tensor, timestep_cond: Tensor | None) -> tuple[int, int]:
        c = self.config
        if sample.ndim != 5 or sample.shape[1] != c.in_channels:
            raise ValueError(
                f"UNet3D: sample must be (b, {c.in_channels}, f, h, w), got {tuple(sample.shape)}"
            )
        b, f = sample.shape[0], sample.shape[2]
        per_frame = context.ndim == 4 and context.shape[1] == f
        if context.ndim not in (3, 4) or context.shape[0] != b or context.shape[-1] != c.cross_attention_dim or (
                context.ndim == 4 and not per_frame):
            raise ValueError(
                f"UNet3D: encoder_hidden_states must be ({b}, n, {c.cross_attention_dim}) or, one per frame, "
                f"({b}, {f}, n, {c.cross_attention_dim}), got {tuple(context.shape)}"
            )
        if timestep_cond is not None:
            if c.timestep_cond_dim is None:
                raise ValueError("UNet3D: timestep_cond was given but config.timestep_cond_dim is None")
            if tuple(timestep_cond.shape) != (b, c.timestep_cond_dim):
                raise ValueError(
                    f"UNet3D: timestep_cond must be ({b}, {c.timestep_cond_dim}), "
                    f"got {tuple(timestep_cond.shape)}"
                )
        return b, f

    @staticmethod
    def _timesteps(timestep: Tensor | float | int, b: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            return t.expand(b)
        if t.shape == (1,):
            return t.expand(b)
        if t.shape != (b,):
            raise ValueError(
                f"UNet3D: timestep must be a number, a 0-d tensor or ({b},), got {tuple(t.shape)}"
            )
        return t

    # --- memory and ablation switches ----------------------------------------------------------

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run every transformer feed-forward in chunks of at least `chunk_size` (default 1) along `dim`
        (0: batch, 1: tokens), each chunk's intermediate bounded by FF_CHUNK_ELEMENTS. Saves activation
        memory; the output is unchanged."""
        chunk_size = 1 if chunk_size is None else chunk_size
        if dim not in (0, 1):
            raise ValueError(f"enable_forward_chunking: dim must be 0 (batch) or 1 (tokens), got {dim}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"enable_forward_chunking: chunk_size must be a positive int, got {chunk_size!r}"
            )
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.chunk_size, m.chunk_dim = chunk_size, dim

    def disable_forward_chunking(self) -> None:
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.chunk_size, m.chunk_dim = None, 0

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant);
        active only in training mode with grad enabled."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (models/training_free.py), as diffusers' UNet3DConditionModel.enable_freeu: skip features of
        the first two up-levels low-pass scaled by s1, s2; half their backbone channels scaled by b1, b2."""
        for name, v in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"enable_freeu: {name} must be a finite number, got {v!r}")
        self.freeu = FreeU(float(s1), float(s2), float(b1), float(b2))

    def disable_freeu(self) -> None:
        self.freeu = None

    def set_frame_windows(self, windows: FrameWindows | None) -> None:
        """FreeNoise's windowed temporal attention in every temporal transformer (None: over all frames)."""
        for m in self.modules():
            if isinstance(m, TemporalTransformer):
                m.windows = windows

    @contextmanager
    def windowed(self, windows: FrameWindows | None):
        """set_frame_windows(windows) for the duration of a block, then each layer's setting back."""
        with _set_during(self, TemporalTransformer, "windows", windows):
            yield self

    @contextmanager
    def circular_frames(self, on: bool = True):
        """For the duration of a block, the temporal convs pad the frames by wrapping around (FrameConv.circular):
        the last frame is the first one's neighbour. Temporal attention has no order and GroupNorm's statistics
        none either, so without a frame-position embedding (the released checkpoints) the UNet is then
        equivariant to rolling the frames: a video sampled so is a loop, with no first or last frame."""
        # a LoRA's down-projection on a temporal conv is a FrameConv too (peft builds it as the base layer's type)
        with _set_during(self, FrameConv, "circular", bool(on)):
            yield self

    def set_temporal(self, attention: bool = True, conv: bool = True) -> None:
        """Switch the temporal attention layers (incl. the one after conv_in) and/or the temporal
        convs on or off. With both off, every frame is processed independently (the 2D UNet)."""
        for m in self.modules():
            if isinstance(m, TemporalTransformer):
                m.enabled = bool(attention)
            elif isinstance(m, TemporalConvBlock):
                m.enabled = bool(conv)


@contextmanager
def _set_during(model: nn.Module, kind: type, name: str, value):
    """Every `kind` module of `model` has attribute `name` = `value` for the duration of a block; each one's own
    value is put back after it, on an error too."""
    layers = [m for m in model.modules() if isinstance(m, kind)]
    before = [getattr(m, name) for m in layers]
    for m in layers:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, v in zip(layers, before):
            setattr(m, name, v)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

UNET_PRESETS: dict[str, UNetConfig] = {
    # for tests: two levels, one with attention; builds in diffusers' UNet3DConditionModel too
    "tiny": UNetConfig(
        block_channels=(32, 64),
        layers_per_block=1,
        attention_levels=(True, False),
        cross_attention_dim=32,
        head_dim=8,
        norm_groups=8,
        sample_size=8,
    ),
    # damo-vilab/text-to-video-ms-1.7b (and the original modelscope-damo-text-to-video-synthesis)
    "ms-1.7b": UNetConfig(),
    # cerspense/zeroscope_v2_576w and _XL: fine-tunes of the same architecture
    "zeroscope-576w": UNetConfig(),
    "zeroscope-xl": UNetConfig(),
}
