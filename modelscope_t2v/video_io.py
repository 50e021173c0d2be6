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


def _is_frame(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3


def _video_list(video) -> list:
    """The videos of a `video=` argument, each a list of PIL images, a list of frames or a 4-D array/tensor
    (diffusers' VideoProcessor.preprocess_video forms)."""
    if isinstance(video, (list, tuple)) and len(video) == 0:
        raise ValueError("video is empty")
    if isinstance(video, (list, tuple)) and isinstance(video[0], (np.ndarray, torch.Tensor)) and video[0].ndim == 5:
        video = np.concatenate(video) if isinstance(video[0], np.ndarray) else torch.cat(list(video))  # deprecated there
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 5:
        return list(video)
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:
        return [video]
    if isinstance(video, (list, tuple)) and all(_is_frame(x) for x in video):
        return [list(video)]
    if isinstance(video, (list, tuple)) and all(
            isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 4 or isinstance(v, (list, tuple)) and v
            and all(_is_frame(x) for x in v) for v in video):
        return list(video)
    raise ValueError(
        "video must be a list of PIL images or of frames (numpy h w c / torch c h w), a 4-D numpy array (f h w c) "
        f"or torch tensor (f c h w), a 5-D batch of those, or a list of videos; got {type(video).__name__}"
        + (f" of shape {tuple(video.shape)}" if hasattr(video, "shape") else ""))


def _frames(clip, factor: int, height: int | None, width: int | None) -> torch.Tensor:
    """One video -> f c h w: PIL frames as float [0, 1] (resized to multiples of `factor`, or to height x
    width), numpy frames f h w c and torch frames f c h w as given (uint8 as /255)."""
    from PIL import Image

    if isinstance(clip, (list, tuple)) and isinstance(clip[0], Image.Image):
        w0, h0 = clip[0].size
        h = height if height is not None else h0 // factor * factor
        w = width if width is not None else w0 // factor * factor
        arr = np.stack([np.asarray(im.convert("RGB").resize((w, h), Image.LANCZOS)) for im in clip])
        return torch.from_numpy(arr.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    if isinstance(clip, (list, tuple)):
        clip = np.stack(clip) if isinstance(clip[0], np.ndarray) else torch.stack(list(clip))
    x = torch.from_numpy(np.ascontiguousarray(clip).transpose(0, 3, 1, 2)) if isinstance(clip, np.ndarray) else clip
    if x.shape[0] == 0:
        raise ValueError("video has no frames")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


def video_to_tensor(video, factor: int, height: int | None = None, width: int | None = None,
                    latent_channels: int = 4) -> torch.Tensor:
    """A video -> b c f h w in [-1, 1], in every form diffusers 0.42's VideoProcessor takes: a list of PIL
    images, a list of numpy (h, w, c) or torch (c, h, w) frames, a numpy array (f, h, w, c) or torch tensor
    (f, c, h, w), 5-D batches of those (b, f, ...), or a list of videos. Its value rules: float frames in
    [0, 1] are mapped to [-1, 1], frames with negative values are taken as already in [-1, 1], and a tensor
    with `latent_channels` channels is latents, used as they are. Beyond diffusers: uint8 frames are read as
    0..255, PIL frames are converted to RGB and resized to multiples of `factor` (or to height x width), and
    float frames above 1 (0..255 passed as floats), NaN or inf are errors."""
    clips = [_frames(clip, factor, height, width) for clip in _video_list(video)]
    if len({tuple(c.shape) for c in clips}) > 1:
        raise ValueError(f"video: the videos differ in shape {sorted({tuple(c.shape) for c in clips})}")
    x = torch.stack(clips)  # b f c h w
    if not x.is_floating_point():
        raise ValueError(f"video: frames must be uint8 or floating point, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("video holds NaN or inf values")
    x = rearrange(x, "b f c h w -> b c f h w")
    if x.shape[1] == latent_channels:
        return x  # latents
    if x.shape[1] != 3:
        raise ValueError(f"video frames must have 3 channels (RGB) or {latent_channels} (latents), got {x.shape[1]}")
    if float(x.max()) > 1.0 + 1e-3:
        raise ValueError(f"video: float frames must lie in [0, 1] (or [-1, 1]), got values up to {float(x.max()):g}; "
                         "0..255 frames go in as uint8 (or divided by 255)")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"video frames are {h}x{w}; height and width must be multiples of {factor}")
    return x if float(x.min()) < 0 else x * 2 - 1


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
