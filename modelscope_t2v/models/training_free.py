"""Training-free changes to the UNet's computation, named as diffusers names them: FreeU (arXiv 2309.11497),
FreeNoise's windowed temporal attention (arXiv 2310.15169) and DeepCache's feature reuse (arXiv 2312.00858).
Pure functions and small state objects; the UNet holds the switches, the pipeline owns a DeepCache's state.

FreeU, in the first two up-levels before each skip concatenation: the first half of the backbone channels
times b_i, and the skip features' lowest spatial frequencies (the central 2 x 2 of the shifted spectrum)
times s_i. Windowed attention: the temporal transformer's two attentions run on windows of
`context_length` frames, `context_stride` apart (plus one window ending at the last frame), and the outputs
are fused by per-frame weights (flat, pyramid or delayed_reverse_sawtooth); the feed-forward then runs on
the fused frames. Closed-loop windows (loops) start at every multiple of the stride and wrap around from the
last frame to the first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

WEIGHTING_SCHEMES = ("flat", "pyramid", "delayed_reverse_sawtooth")


@dataclass
class DeepCache:
    """DeepCache (Ma et al. 2023): the UNet cut at skip connection `branch` (0: conv_in's, the shallowest; DeepCache's
    `cache_branch_id`). A full forward stores `feature`, the up path's input where it takes that skip; while a
    feature is stored, a forward runs only conv_in, the down layers up to the branch and the up layers from it
    (the shallow branch), starting the up path from the stored feature. `feature = None` asks for a full step."""

    branch: int = 0
    feature: Tensor | None = None


def deepcache_full_steps(steps: int, interval: int, uniform: bool = True, pow: float = 1.4, center: int = 15) -> list[int]:
    """The steps that run the whole UNet. Uniform: 0, interval, 2 interval, ... Non-uniform (DeepCache's paper,
    sec. 4.3): ceil(steps / interval) steps, denser around `center`: unique ints of l^pow + center for l evenly
    spaced over [(-center)^(1/pow), (steps - center)^(1/pow)] (the real part of the odd root, as numpy takes it);
    pow is lowered by 0.02 until that gives enough distinct steps."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache_interval must be a positive int, got {interval!r}")
    if uniform or interval == 1:
        return list(range(0, steps, interval))
    import numpy as np

    n = -(-steps // interval)
    p = float(pow)
    while p > 1:
        lo = complex(-center) ** (1 / p)
        hi = complex(steps - center) ** (1 / p)
        values = (np.linspace(lo, hi, n + 1) ** p).real  # complex for l < 0: DeepCache keeps the real part
        picked = [0] + [int(v) + center for v in np.unique(values.astype(np.int32))[1:-1]]
        if len(picked) == n:
            return sorted(set(min(max(v, 0), steps - 1) for v in picked))
        p -= 0.02
    raise ValueError(f"non-uniform DeepCache: no schedule of {n} full steps for {steps} steps around center={center}; "
                     "use uniform=True or another center / pow")


@dataclass(frozen=True)
class FreeU:
    s1: float
    s2: float
    b1: float
    b2: float

    def backbone_and_skip(self, level: int, x: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        """Up-level `level` (0: the deepest): the scaled backbone `x` and filtered `skip`, (b f) c h w each."""
        if level > 1:
            return x, skip
        b, s = (self.b1, self.s1) if level == 0 else (self.b2, self.s2)
        half = x.shape[1] // 2
        x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)  # (b f) c h w
        return x, low_frequency_scaled(skip, s)


def low_frequency_scaled(x: Tensor, scale: float, radius: int = 1) -> Tensor:
    """`x` (n c h w) with the central (2 radius)^2 frequencies of its centred 2-D spectrum times `scale`,
    computed in float32 (FFTs of half precision are unstable) and returned in x's dtype."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))  # n c h w, complex
    mask = torch.ones(h, w, device=x.device)
    mask[h // 2 - radius:h // 2 + radius, w // 2 - radius:w // 2 + radius] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


@dataclass(frozen=True)
class FrameWindows:
    """FreeNoise's temporal windows: `context_length` frames every `context_stride` frames. `closed_loop`: one
    window at every multiple of the stride, those that run past the last frame wrapping around to the first
    (a loop, where the last frame is the first one's neighbour)."""

    context_length: int = 16
    context_stride: int = 4
    weighting_scheme: str = "pyramid"
    closed_loop: bool = False

    def __post_init__(self):
        for name in ("context_length", "context_stride"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.context_stride > self.context_length:
            raise ValueError(f"context_stride ({self.context_stride}) must be <= context_length ({self.context_length}): "
                             "windows further apart leave frames in no window")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")

    def looped(self) -> FrameWindows:
        """These windows, closed into a loop."""
        return replace(self, closed_loop=True)

    def windows(self, num_frames: int) -> list[tuple[int, int]]:
        """(start, end) of each window; the last one ends at `num_frames`. Closed into a loop (and longer than one
        window): one at every multiple of the stride, an end past `num_frames` wrapping around to frame 0."""
        if self.closed_loop and num_frames > self.context_length:
            return [(s, s + self.context_length) for s in range(0, num_frames, self.context_stride)]
        starts = list(range(0, num_frames - self.context_length + 1, self.context_stride))
        out = [(s, s + self.context_length) for s in starts]
        if not out or out[-1][1] != num_frames:
            out.append((max(0, num_frames - self.context_length), num_frames))
        return out

    def weights(self) -> list[float]:
        """Each frame's weight in a window of context_length frames."""
        n = self.context_length
        if self.weighting_scheme == "flat":
            return [1.0] * n
        mid = (n + 1) // 2
        if self.weighting_scheme == "pyramid":  # 4: 1 2 2 1; 5: 1 2 3 2 1
            rise = list(range(1, mid + 1))
            return [float(v) for v in rise + rise[::-1][n % 2:]]
        # delayed_reverse_sawtooth: 4: 0.01 2 2 1; 5: 0.01 0.01 3 2 1
        low = [0.01] * (mid - 1) + ([float(mid)] if n % 2 == 0 else [])
        return low + [float(v) for v in range(mid, 0, -1)]

    def fuse(self, fn: Callable[[Tensor, slice | Tensor], Tensor], h: Tensor, dim: int = 1) -> Tensor:
        """fn(window, its frames) for each window of `h` along `dim` (the frames), fused by the weights; fn keeps
        the window's shape. The frames are a slice, or the frame indices of a window that wraps around (closed
        loop). One window (num_frames <= context_length) is fn(h) itself."""
        num_frames = h.shape[dim]
        if num_frames <= self.context_length:
            return fn(h, slice(0, num_frames))
        view = [1] * h.ndim
        view[dim] = self.context_length
        weights = torch.tensor(self.weights(), device=h.device, dtype=torch.float32).view(view)  # 1 .. l .. 1
        total = torch.zeros(h.shape, device=h.device, dtype=torch.float32)
        count = torch.zeros([num_frames if d == dim else 1 for d in range(h.ndim)], device=h.device, dtype=torch.float32)
        for start, end in self.windows(num_frames):
            if end <= num_frames:
                total.narrow(dim, start, end - start).add_(fn(h.narrow(dim, start, end - start), slice(start, end)).float() * weights)
                count.narrow(dim, start, end - start).add_(weights)
            else:  # wraps around to frame 0
                frames = torch.arange(start, end, device=h.device) % num_frames
                total.index_add_(dim, frames, fn(h.index_select(dim, frames), frames).float() * weights)
                count.index_add_(dim, frames, weights.expand([len(frames) if d == dim else 1 for d in range(h.ndim)]))
        return (total / count).to(h.dtype)


def shuffled_context_noise(latents: Tensor, windows: FrameWindows, generator: torch.Generator | None = None) -> Tensor:
    """FreeNoise's noise rescheduling ("shuffle_context"): from frame context_length on, every block of
    context_stride frames is a shuffle of the block context_length frames earlier (as it is at that point),
    so the noise of any window repeats the first window's frames. `latents` b c f h w; a new tensor."""
    out = latents.clone()
    num_frames, length, stride = out.shape[2], windows.context_length, windows.context_stride
    for i in range(length, num_frames, stride):
        start = i - length
        end = min(num_frames, start + stride)
        order = torch.arange(start, end)[torch.randperm(end - start, generator=generator)]
        n = min(num_frames, i + (end - start)) - i
        out[:, :, i:i + n] = out[:, :, order[:n]]
    return out
