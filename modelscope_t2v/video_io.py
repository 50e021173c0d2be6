"""Videos in and out of the pipelines: the `np` output type, video inputs as tensors, and the exporters
`export_to_video` (mp4) and `export_to_gif`.

Why: diffusers' exporter broke when `.frames` became batched and defaults to 10 fps for an 8 fps model.
Here a single video is (f, h, w, 3) frames as float arrays in [0, 1], uint8 arrays, or PIL images;
the default is the model's 8 fps.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

DEFAULT_FPS = 8  # ModelScope T2V and zeroscope were trained on 8 fps clips


def frames_to_uint8(frames) -> np.ndarray:
    """One video -> uint8 (f, h, w, 3). Accepts float [0, 1] / uint8 arrays (f, h, w, 3), a list of them,
    or a list of PIL images. A batched (1, f, h, w, 3) array is unwrapped; a larger batch is an error."""
    from PIL import Image

    if isinstance(frames, (list, tuple)):
        if len(frames) == 0:
            raise ValueError("frames is empty")
        if isinstance(frames[0], Image.Image):
            frames = np.stack([np.asarray(im.convert("RGB")) for im in frames])
        else:
            frames = np.stack([np.asarray(f) for f in frames])
    elif hasattr(frames, "detach"):  # a torch tensor (f, h, w, 3)
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"frames holds a batch of {frames.shape[0]} videos; pass one, e.g. frames[0]")
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] == 0:
        raise ValueError(f"frames must be (f, h, w, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


# ---------------------------------------------------------------------------------------------------
# Into the pipelines and out of them.


class VideoFrames(np.ndarray):
    """The `np` output: float frames in [0, 1], (b, f, h, w, 3), exactly as diffusers returns them.

    One addition: a single (h, w, 3) frame also converts with `PIL.Image.fromarray(frame)` (to uint8,
    rounded), which the seed's zeroscope upscaling example does and which a plain float array refuses.
    Only PIL sees the uint8 view; to numpy and everyone else this is an ordinary float array.
    """

    def _pil_view(self) -> np.ndarray | None:
        if self.ndim == 3 and self.shape[-1] == 3 and self.dtype.kind == "f":
            caller = sys._getframe(2).f_globals.get("__name__", "")
            if caller.startswith("PIL"):
                return np.ascontiguousarray((np.asarray(self).clip(0, 1) * 255).round().astype(np.uint8))
        return None

    @property
    def __array_interface__(self):
        view = self._pil_view()
        if view is None:
            return np.asarray(self).__array_interface__
        iface = dict(view.__array_interface__)
        iface["strides"] = view.strides  # PIL then reads the pixels through tobytes()
        return iface

    def tobytes(self, order="C"):
        view = self._pil_view()
        return np.asarray(self).tobytes(order) if view is None else view.tobytes()


def video_to_tensor(video, factor: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """A video -> b c f h w in [-1, 1]. Accepts a list of PIL images (one video), a list of such lists,
    numpy arrays (f, h, w, 3) or (b, f, h, w, 3) in [0, 1] (float) or [0, 255] (uint8), or a torch
    tensor b c f h w already in [-1, 1] (4 channels: latents, used as they are). Frames are resized to
    multiples of `factor` (the autoencoder's) or to height x width."""
    from PIL import Image

    if isinstance(video, torch.Tensor):
        if video.dim() == 4:
            video = video[None]
        if video.dim() != 5:
            raise ValueError(f"video tensor must be b c f h w, got shape {tuple(video.shape)}")
        if video.numel() == 0:
            raise ValueError("video is empty")
        return video
    if isinstance(video, (list, tuple)) and len(video) == 0:
        raise ValueError("video is empty")
    if isinstance(video, (list, tuple)) and isinstance(video[0], Image.Image):
        video = [video]
    if isinstance(video, np.ndarray):
        video = [video] if video.ndim == 4 else list(video)
    out = []
    for clip in video:
        if isinstance(clip, (list, tuple)) and len(clip) and isinstance(clip[0], Image.Image):
            w0, h0 = clip[0].size
            h, w = height or h0 // factor * factor, width or w0 // factor * factor
            arr = np.stack([np.asarray(im.convert("RGB").resize((w, h), Image.LANCZOS)) for im in clip])
        else:
            arr = np.asarray(clip)
            if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
                raise ValueError(f"video frames must be (f, h, w, 3), got shape {arr.shape}")
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
        out.append(torch.from_numpy(arr))
    frames = torch.stack(out)  # b f h w c in [0, 1]
    h, w = frames.shape[2:4]
    if h % factor or w % factor:
        raise ValueError(f"video frames are {h}x{w}; height and width must be multiples of {factor}")
    return rearrange(frames, "b f h w c -> b c f h w") * 2 - 1


# ---------------------------------------------------------------------------------------------------
# Writing files.


def _target(path: str | os.PathLike | None, suffix: str) -> Path:
    if path is None:
        fd, name = tempfile.mkstemp(suffix=suffix)
        os.close(fd)
        return Path(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_to_video(frames, output_video_path: str | os.PathLike | None = None, fps: int = DEFAULT_FPS) -> str:
    """Write an H.264 mp4 (yuv420p, so every player opens it) and return its path. Odd frame sizes are
    padded by one pixel, as H.264 needs even sizes."""
    import imageio.v2 as imageio

    video = frames_to_uint8(frames)
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    h, w = video.shape[1:3]
    if h % 2 or w % 2:
        video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = _target(output_video_path, ".mp4")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                            macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in video:
            writer.append_data(frame)
    os.replace(tmp, path)
    return str(path)


def export_to_gif(frames, output_gif_path: str | os.PathLike | None = None, fps: int = DEFAULT_FPS) -> str:
    """Write a looping GIF and return its path."""
    from PIL import Image

    video = frames_to_uint8(frames)
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    path = _target(output_gif_path, ".gif")
    images = [Image.fromarray(f) for f in video]
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    os.replace(tmp, path)
    return str(path)
