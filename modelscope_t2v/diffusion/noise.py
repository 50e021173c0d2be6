"""Gaussian noise drawn exactly as diffusers draws it, so that a user's seed gives the same video here.

One rule for every draw (initial latents, a sampler's step noise, the autoencoder's posterior sample):
- a CPU generator draws on the CPU and the result is moved to the target device (diffusers'
  `randn_tensor`); a generator on another accelerator than the target is an error;
- a list of generators draws one batch entry each (a one-element list is the generator itself);
- a video `b c f h w` is drawn as `b f c h w`, the frames-folded layout in which diffusers' video
  pipelines hand tensors to the schedulers and the autoencoder, then permuted back.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape: Sequence[int], generator: Generator = None, device=None,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Standard normal noise of `shape` on `device` (default CPU), drawn as diffusers' `randn_tensor`."""
    device = torch.device(device if device is not None else "cpu")
    shape = tuple(shape)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if len(gens) > 1 and len(gens) != shape[0]:
        raise ValueError(f"generator: a list of {len(gens)} generators for a batch of {shape[0]}")

    def draw(g: torch.Generator | None, size: tuple[int, ...]) -> torch.Tensor:
        on = device
        if g is not None and g.device.type != device.type:
            if g.device.type != "cpu":
                raise ValueError(f"generator on {g.device} cannot draw noise for a tensor on {device}")
            on = torch.device("cpu")
        return torch.randn(size, generator=g, device=on, dtype=dtype)

    if len(gens) == 1:
        return draw(gens[0], shape).to(device)
    return torch.cat([draw(g, (1, *shape[1:])) for g in gens]).to(device)


def randn_like(like: torch.Tensor, generator: Generator = None, dtype: Optional[torch.dtype] = None, *,
               frames_first: bool = True) -> torch.Tensor:
    """Noise shaped like `like`, on its device, in `dtype` (default like's). frames_first: a 5-D video
    `b c f h w` is drawn as `b f c h w` (see the module doc); False draws in like's own layout, as a
    diffusers scheduler's `step` does with whatever it is given."""
    dtype = dtype or like.dtype
    if frames_first and like.ndim == 5:
        b, c, f, h, w = like.shape
        return randn((b, f, c, h, w), generator, like.device, dtype).permute(0, 2, 1, 3, 4)  # b c f h w
    return randn(like.shape, generator, like.device, dtype)


# ---------------------------------------------------------------------------------------------------
# FreeInit (arXiv 2312.07537): the low frequencies of the diffused result, the high ones of fresh noise.

FREE_INIT_METHODS = ("butterworth", "gaussian", "ideal")


def free_init_lowpass(shape: Sequence[int], method: str = "butterworth", order: int = 4,
                      spatial_stop_frequency: float = 0.25, temporal_stop_frequency: float = 0.25) -> torch.Tensor:
    """The low-pass filter (f, h, w) over a centred 3-D spectrum of `shape` (..., f, h, w): with the
    normalised squared distance d2 = ((d_s / d_t) (2t/f - 1))^2 + (2y/h - 1)^2 + (2x/w - 1)^2, butterworth
    1 / (1 + (d2 / d_s^2)^order), gaussian exp(-d2 / (2 d_s^2)), ideal [d2 <= 2 d_s] (diffusers' FreeInit)."""
    if method not in FREE_INIT_METHODS:
        raise ValueError(f"method must be one of {FREE_INIT_METHODS}, got {method!r}")
    f, h, w = shape[-3:]
    ds, dt = float(spatial_stop_frequency), float(temporal_stop_frequency)
    if ds == 0 or dt == 0:
        return torch.zeros(f, h, w)
    axis = lambda n: 2 * torch.arange(n, dtype=torch.float64) / n - 1  # noqa: E731
    d2 = ((ds / dt) * axis(f))[:, None, None] ** 2 + axis(h)[None, :, None] ** 2 + axis(w)[None, None, :] ** 2
    if method == "butterworth":
        mask = 1 / (1 + (d2 / ds ** 2) ** order)
    elif method == "gaussian":
        mask = torch.exp(-d2 / (2 * ds ** 2))
    else:
        mask = (d2 <= ds * 2).double()
    return mask.float()


def mix_frequencies(low_from: torch.Tensor, high_from: torch.Tensor, lowpass: torch.Tensor) -> torch.Tensor:
    """`low_from`'s low frequencies and `high_from`'s high ones over the last three axes (f, h, w), float32."""
    dims = (-3, -2, -1)
    spec = lambda x: torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)  # noqa: E731
    lowpass = lowpass.to(low_from.device)
    mixed = spec(low_from) * lowpass + spec(high_from) * (1 - lowpass)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real
