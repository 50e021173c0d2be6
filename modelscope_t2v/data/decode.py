"""Files to pixels: video clips decoded with PyAV, images with PIL, resized to cover and centre-cropped.

Every read opens and closes its own container, so nothing survives a fork (forked DataLoader workers are
safe; decord, the usual alternative, leaks and deadlocks there). Pixels leave as `c f h w` uint8 and
become float32 in [-1, 1] with `uint8_to_float`.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import Any, BinaryIO

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

from .config import check_sampling

class VideoReadError(Exception):
    """A video that decodes but cannot give the requested clip (no stream, no frame rate, no frames)."""


class VideoTooShortError(VideoReadError):
    """The video has fewer frames than the requested clip spans."""


def _clip_indices(
    n: int, rate: Fraction, num_frames: int, frame_stride: int | None, target_fps: float | None,
    rng: np.random.Generator | None,
) -> list[int]:
    """Source frame indices of one clip with a random (or zero) start."""
    if target_fps is not None:
        step = rate / Fraction(target_fps).limit_denominator(1_000_000)  # source frames per output frame
        offsets = [int(i * step) for i in range(num_frames)]  # floor
    else:
        stride = 1 if frame_stride is None else int(frame_stride)
        offsets = [i * stride for i in range(num_frames)]
    span = offsets[-1] + 1
    if n < span:
        how = f"target_fps={target_fps}" if target_fps is not None else f"frame_stride={frame_stride or 1}"
        raise VideoTooShortError(
            f"{n} frames at {float(rate):.3g} fps, the clip needs {span} (num_frames={num_frames}, {how})"
        )
    start = int(rng.integers(0, n - span + 1)) if rng is not None else 0
    return [start + o for o in offsets]


def _decode_indices(
    container: Any, stream: Any, rate: Fraction, wanted: list[int]
) -> tuple[list[np.ndarray] | None, int]:
    """rgb24 arrays of the wanted frames (sorted indices, repeats allowed), or None and the last
    index seen if the stream ends first. A frame's index is its presentation time times the rate."""
    time_base = stream.time_base
    t0 = stream.start_time or 0
    target = math.floor((Fraction(wanted[0]) - Fraction(1, 2)) / rate / time_base) + t0
    container.seek(max(target, t0), stream=stream, backward=True, any_frame=False)
    out: list[np.ndarray] = []
    ptr, last = 0, -1
    for frame in container.decode(stream):
        idx = last + 1 if frame.pts is None else round((frame.pts - t0) * time_base * rate)
        last = idx
        arr = None
        while ptr < len(wanted) and wanted[ptr] <= idx:  # a missing index takes the next frame
            arr = frame.to_ndarray(format="rgb24") if arr is None else arr
            out.append(arr)
            ptr += 1
        if ptr == len(wanted):
            return out, last
    return None, last


def read_video_frames(
    path: str | os.PathLike | bytes | BinaryIO,
    *,
    num_frames: int,
    frame_stride: int | None = None,
    target_fps: float | None = None,
    rng: np.random.Generator | None = None,
) -> Tensor:
    """Decode one clip, `f h w c` uint8 RGB, with PyAV.

    Frames: `num_frames` source frames `frame_stride` apart, or resampled to `target_fps` (source
    index floor(i * fps / target_fps)), or consecutive if neither is given; the start is drawn
    uniformly from `rng` (a numpy Generator) over the starts that fit, or 0 without one. Seeks to the
    keyframe before the start and decodes from there (only the kept frames are converted to RGB), so
    the cost is set by the keyframe interval, not the video's length. `path` may also be its bytes or a
    binary file object. Raises VideoTooShortError if the clip does not fit, VideoReadError for a
    stream without frames or frame rate, and PyAV's errors (av.FFmpegError) or OSError for files
    that cannot be opened or decoded.
    """
    check_sampling(num_frames, frame_stride, target_fps)
    if isinstance(path, (bytes, bytearray, memoryview)):
        path = io.BytesIO(bytes(path))
    elif isinstance(path, os.PathLike):
        path = os.fspath(path)
    with av.open(path, mode="r", metadata_errors="ignore") as container:
        if not container.streams.video:
            raise VideoReadError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise VideoReadError("unknown frame rate")
        rate = Fraction(rate)
        n = int(stream.frames or 0)
        if n <= 0 and stream.duration:
            n = int(stream.duration * stream.time_base * rate)
        if n <= 0 and container.duration:
            n = int(Fraction(container.duration, av.time_base) * rate)
        if n <= 0:  # no length in the metadata: count the frames once
            n = sum(1 for _ in container.decode(stream))
            container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
        if n <= 0:
            raise VideoReadError("no frames")
        for _ in range(2):  # the second pass corrects a frame count that the metadata overstated
            wanted = _clip_indices(n, rate, num_frames, frame_stride, target_fps, rng)
            frames, last = _decode_indices(container, stream, rate, wanted)
            if frames is not None:
                return torch.from_numpy(np.stack(frames))
            if last + 1 >= n or last < 0:
                break
            n = last + 1
        raise VideoTooShortError(f"the stream ended at frame {last + 1} of {n} announced")


def read_all_frames(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Every frame of a video file (or the first `max_frames`), `f h w c` uint8 RGB, decoded in order with
    PyAV; a GIF too. VideoReadError for a file without a video stream or frames."""
    frames: list[np.ndarray] = []
    with av.open(os.fspath(path), mode="r", metadata_errors="ignore") as container:
        if not container.streams.video:
            raise VideoReadError("no video stream")
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise VideoReadError("no frames")
    return np.stack(frames)


def save_video_frames(
    path: str | os.PathLike, frames_uint8_fhwc: Tensor | np.ndarray, fps: float, *, codec: str = "libx264"
) -> None:
    """Write `f h w c` uint8 RGB frames to a video file with PyAV (yuv420p: even sizes only)."""
    frames = frames_uint8_fhwc.numpy() if isinstance(frames_uint8_fhwc, Tensor) else np.asarray(frames_uint8_fhwc)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames_uint8_fhwc must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    f, h, w, _ = frames.shape
    if f < 1 or h % 2 or w % 2:
        raise ValueError(f"frames_uint8_fhwc must have >= 1 frame and even height and width, got {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------
# Pixels


def resize_center_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """`f h w c` uint8 -> `c f height width` uint8: scale to cover, centre crop (antialiased bilinear)."""
    f, h, w, c = frames.shape
    scale = max(height / h, width / w)
    crop_h, crop_w = min(h, max(1, round(height / scale))), min(w, max(1, round(width / scale)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    x = rearrange(frames[:, top : top + crop_h, left : left + crop_w], "f h w c -> f c h w")
    if (crop_h, crop_w) != (height, width):
        chunks = []
        for i in range(0, f, 4):  # a few frames at a time: float copies of large frames are big
            y = F.interpolate(x[i : i + 4].float(), size=(height, width), mode="bilinear", antialias=True)
            chunks.append(y.round_().clamp_(0, 255).to(torch.uint8))
        x = torch.cat(chunks)
    return rearrange(x, "f c h w -> c f h w").contiguous()


def uint8_to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (0 -> -1 and 255 -> 1 exactly). Done in numpy on the CPU:
    single-threaded and predictable (torch's OpenMP kernels stall on a loaded 2-core machine)."""
    if x.device.type != "cpu":
        return x.float().div_(127.5).sub_(1.0)
    a = x.numpy().astype(np.float32)
    a /= np.float32(127.5)
    a -= np.float32(1.0)
    return torch.from_numpy(a)


# Errors that mean "this file is unusable", as opposed to a bug in the loader.
VIDEO_ERRORS = (av.FFmpegError, OSError, EOFError, VideoReadError)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(src: str | BinaryIO, height: int, width: int) -> Tensor:
    """An image file -> `c 1 h w` uint8 (JPEGs are decoded at a reduced scale when that still covers)."""
    with Image.open(src) as img:
        scale = max(height / img.height, width / img.width)
        img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        arr = np.asarray(img.convert("RGB"))
    return resize_center_crop(torch.from_numpy(arr.copy())[None], height, width)
