"""Writing videos: `export_to_video` (mp4) and `export_to_gif`.

Why: diffusers' exporter broke when `.frames` became batched and defaults to 10 fps for an 8 fps model.
Here a single video is (f, h, w, 3) frames as float arrays in [0, 1], uint8 arrays, or PIL images;
the default is the model's 8 fps.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

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
