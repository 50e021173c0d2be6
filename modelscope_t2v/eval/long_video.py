"""Measuring long videos, image-to-video, continuation and loops on the shapes world (evaluate.py --long).

- windows: each non-overlapping 16-frame window read back (eval.shapes.read_video): colour and shape as
  the prompt says;
- jumps: the object's centroid step from frame to frame; the largest step over the median step (a smooth
  motion is near 1; a jump or a vanished object is large), and the same at given joins (continuation);
- image-to-video: the PSNR of the first frame against the image, beside the autoencoder's own
  reconstruction of that image (the first frame is pinned, so it is that reconstruction by construction);
  what is not by construction: the step into the first generated frame over the median step (does the
  object stay where the image put it), the PSNR of that frame against the image, and the direction;
- loops: the mean absolute difference between the last and first frames over the median difference of
  consecutive frames (a closed loop is about 1); measured for every mode but continuation, so plain sampling gives
  the baseline;
- the world's own answer (mode "world"): the renderer's clip for the pair, continued at its own speed past
  its 16 frames (`render_shape_clip(clip_frames=16)`), measured as the videos are. Every training clip moves
  its object one way at no less than WORLD_STEP_MIN of the frame per frame, so it stays wholly inside the
  frame for at most WORLD_FRAMES_INSIDE frames: a long video that follows the world loses its object.
  Beside each mode: the fraction of frames with the object wholly inside the frame, the object's speed over
  WORLD_STEP_MIN (the median over the videos; below 1: slower than any training clip), and the videos that
  are smooth (<= 2x) at a speed the world has (>= WORLD_SPEED_TOLERANCE of WORLD_STEP_MIN).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..data.shapes import SHAPE_EXTENT, SHAPE_TRAVEL_MIN, parse_shapes_caption, render_shape_clip
from . import shapes as se

WINDOW = 16
# The slowest motion of the world (frame fraction per frame): a clip crosses at least SHAPE_TRAVEL_MIN of the
# frame over its WINDOW frames. An object at least SHAPE_EXTENT[0] wide (a triangle, sqrt(3)/2 of that tall,
# is the shortest along its motion) moving that fast is wholly inside the frame for at most WORLD_FRAMES_INSIDE
# frames (34 at 16-frame clips).
WORLD_STEP_MIN = SHAPE_TRAVEL_MIN / (WINDOW - 1)
WORLD_FRAMES_INSIDE = 1 + int((1 - SHAPE_EXTENT[0] * math.sqrt(3) / 2) / WORLD_STEP_MIN)
WORLD_SPEED_TOLERANCE = 0.95  # a fitted speed this close to WORLD_STEP_MIN counts as a world speed (pixel rounding)


def foreground(video) -> np.ndarray:
    """(f, h, w) bool: the object's pixels (brightest channel over the reader's threshold)."""
    return se._as_float_frames(video).max(axis=-1) > se.FOREGROUND_THRESHOLD


def centroids(video) -> np.ndarray:
    """(f, 2) foreground centroids (x, y) in frame fractions; NaN for a frame without an object."""
    mask = foreground(video)
    f, h, w = mask.shape
    out = np.full((f, 2), np.nan)
    for i in range(f):
        ys, xs = np.nonzero(mask[i])
        if len(ys) >= se.MIN_PIXELS:
            out[i] = xs.mean() / w, ys.mean() / h
    return out


def inside(video, margin: int = 1) -> np.ndarray:
    """(f,) bool: the object is there and no pixel of it lies within `margin` (>= 1) pixels of the border."""
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(f"margin must be an int >= 1, got {margin!r}")
    mask = foreground(video)
    present = mask.sum(axis=(1, 2)) >= se.MIN_PIXELS
    edge = np.zeros(mask.shape[1:], bool)
    edge[:margin], edge[-margin:], edge[:, :margin], edge[:, -margin:] = True, True, True, True
    return present & ~(mask & edge).any(axis=(1, 2))


def speed(video) -> float:
    """The object's speed (frame fractions per frame): the least-squares velocity of its centroid over the frames
    where it is wholly inside the frame (over every frame it is in, if fewer than 3 are inside); NaN if it is in
    fewer than 3. A fit, not a median step: 1-pixel rounding of single steps averages out."""
    c, keep = centroids(video), inside(video)
    if keep.sum() < 3:
        keep = ~np.isnan(c[:, 0])
    if keep.sum() < 3:
        return float("nan")
    t = np.flatnonzero(keep).astype(np.float64)
    slopes = np.polyfit(t, c[keep], 1)[0]  # (2,): dx/df, dy/df
    return float(np.linalg.norm(slopes))


def steps(video) -> np.ndarray:
    """(f - 1,) centroid steps; inf where a frame has no object (a vanished object is a jump)."""
    c = centroids(video)
    d = np.linalg.norm(np.diff(c, axis=0), axis=1)
    return np.where(np.isnan(d), np.inf, d)


def jump_ratio(video, at: Sequence[int] | None = None) -> float:
    """max step (over all, or over the steps into frames `at`) / median step."""
    d = steps(video)
    median = float(np.median(d[np.isfinite(d)])) if np.isfinite(d).any() else float("nan")
    picked = d if at is None else d[[i - 1 for i in at]]
    return float(np.max(picked)) / max(median, 1e-6)


def window_scores(video, prompt: str, length: int = WINDOW) -> list[dict[str, bool]]:
    """Colour and shape (and all both) of each non-overlapping `length`-frame window."""
    out = []
    for start in range(0, len(video) - length + 1, length):
        s = se.score(prompt, se.read_video(video[start:start + length]))
        out.append({"color": s["color"], "shape": s["shape"], "both": s["color"] and s["shape"]})
    return out


def psnr(a, b) -> float:
    """PSNR in dB of two frames (h, w, 3) in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def loop_gap(video) -> float:
    """MAE(last, first) / median MAE of consecutive frames."""
    x = se._as_float_frames(video)
    consecutive = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))
    return float(np.abs(x[-1] - x[0]).mean() / max(np.median(consecutive), 1e-6))


def world_video(prompt: str, seed: int, num_frames: int, size: int = 64) -> np.ndarray:
    """(f, h, w, 3) in [0, 1]: the renderer's 16-frame clip for `prompt` and `seed`, continued at its own
    speed to `num_frames` frames (the world's own long video; its object leaves the frame)."""
    color, shape, direction = parse_shapes_caption(prompt)
    clip = render_shape_clip(color, shape, direction, seed=seed, size=size, num_frames=num_frames, clip_frames=WINDOW)
    return ((clip.permute(1, 2, 3, 0).numpy() + 1) / 2).clip(0, 1)


def rendered_first_frame(prompt: str, seed: int, size: int = 64) -> np.ndarray:
    """The first frame (h, w, 3 uint8) of the shapes renderer's clip for `prompt`: the start image."""
    color, shape, direction = parse_shapes_caption(prompt)
    clip = render_shape_clip(color, shape, direction, seed=seed, size=size)  # c f h w in [-1, 1]
    return ((clip[:, 0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@dataclass
class LongResult:
    mode: str
    num_frames: int
    videos: int
    seconds: float
    window_color: float = float("nan")
    window_shape: float = float("nan")
    window_both: float = float("nan")
    windows: int = 0
    jump_max: float = float("nan")  # the largest max/median step ratio over the videos
    jump_within_2x: float = float("nan")  # fraction of videos whose ratio is <= 2
    extra: dict = field(default_factory=dict)


def measure(pipe, pairs: Sequence[tuple[str, int]], mode: str, num_frames: int, *, steps_: int, guidance: float,
            overlap: int = 4, pin_noise: float = 0.3) -> tuple[LongResult, list[np.ndarray]]:
    """Generate one video per (prompt, seed) pair in `mode` and read them back (module docstring). Modes:
    plain | free-noise | sliding (num_frames long); i2v (16 frames from the renderer's first frame);
    continue (clips of 16 continuing `overlap` frames, num_frames long in all); loop (num_frames, loop=True);
    world (no model: the renderer's clip continued at its own speed, num_frames long; `pipe` is not used)."""
    videos, extra = [], {}
    t0 = time.perf_counter()
    kw = dict(num_inference_steps=steps_, guidance_scale=guidance, output_type="np")
    pinned = dict(pin_noise=pin_noise)
    psnrs, recon, next_psnrs = [], [], []
    for prompt, seed in pairs:
        g = torch.Generator().manual_seed(seed)
        if mode == "world":
            v = world_video(prompt, seed, num_frames)
        elif mode in ("plain", "free-noise", "sliding"):
            v = pipe(prompt, num_frames=num_frames, generator=g, **kw).frames[0]
        elif mode == "i2v":
            image = rendered_first_frame(prompt, seed)
            v = pipe(prompt, image=image, generator=g, **pinned, **kw).frames[0]
            psnrs.append(psnr(v[0], image / 255.0))
            next_psnrs.append(psnr(v[1], image / 255.0))
            recon.append(psnr(_reconstruct(pipe, image), image / 255.0))
        elif mode == "continue":
            clips = max(1, -(-(num_frames - WINDOW) // (WINDOW - overlap)) + 1)
            v = pipe.generate_continued(prompt, clips, num_init_frames=overlap, generator=g, num_frames=WINDOW,
                                        num_inference_steps=steps_, guidance_scale=guidance, **pinned)
        elif mode == "loop":
            v = pipe(prompt, num_frames=num_frames, loop=True, generator=g, **pinned, **kw).frames[0]
        else:
            raise ValueError(f"mode {mode!r}: plain, free-noise, sliding, i2v, continue, loop or world")
        videos.append(np.asarray(v))
    seconds = time.perf_counter() - t0
    r = LongResult(mode, len(videos[0]), len(videos), seconds)
    scores = [s for (p, _), v in zip(pairs, videos) for s in window_scores(v, p)]
    if scores:
        r.windows = len(scores)
        r.window_color, r.window_shape, r.window_both = (float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "both"))
    joins = None
    if mode == "continue":
        joins = list(range(WINDOW, len(videos[0]), WINDOW - overlap))
        extra["join_ratio_max"] = max(jump_ratio(v, joins) for v in videos)
        extra["joins_within_2x"] = float(np.mean([jump_ratio(v, joins) <= 2 for v in videos]))
    ratios = [jump_ratio(v) for v in videos]
    r.jump_max, r.jump_within_2x = float(np.max(ratios)), float(np.mean([x <= 2 for x in ratios]))
    speeds = np.array([speed(v) / WORLD_STEP_MIN for v in videos])
    extra["frames_inside"] = float(np.mean([inside(v).mean() for v in videos]))
    extra["speed_over_world_min"] = float(np.nanmedian(speeds)) if np.isfinite(speeds).any() else float("nan")
    extra["smooth_at_world_speed"] = float(np.mean([x <= 2 and s >= WORLD_SPEED_TOLERANCE for x, s in zip(ratios, speeds)]))
    if mode in ("i2v", "loop", "continue", "world") or num_frames <= WINDOW:
        readings = [se.score(p, se.read_video(v[:WINDOW] if mode != "continue" else v)) for (p, _), v in zip(pairs, videos)]
        extra["direction"] = float(np.mean([s.get("direction", False) for s in readings]))
    if mode == "i2v":
        extra["first_frame_psnr_min"], extra["first_frame_psnr_mean"] = float(np.min(psnrs)), float(np.mean(psnrs))
        extra["autoencoder_psnr_mean"] = float(np.mean(recon))
        extra["first_frame_within_1db_of_autoencoder"] = float(np.mean([a >= b - 1 for a, b in zip(psnrs, recon)]))
        extra["first_step_within_2x"] = float(np.mean([jump_ratio(v, [1]) <= 2 for v in videos]))
        extra["frame1_psnr_to_image_mean"] = float(np.mean(next_psnrs))
    if mode != "continue":  # every clip's, so that plain sampling gives the baseline
        gaps = [loop_gap(v) for v in videos]
        extra["loop_gap_median"], extra["loop_gap_max"] = float(np.median(gaps)), float(np.max(gaps))
        extra["loop_gap_within_2x"] = float(np.mean([g <= 2 for g in gaps]))
    r.extra = extra
    return r, videos


@torch.no_grad()
def _reconstruct(pipe, image: np.ndarray) -> np.ndarray:
    """The autoencoder's own reconstruction of `image` (its posterior mean decoded), h w 3 in [0, 1]."""
    x = pipe.preprocess_video([image])[:, :, 0]  # 1 3 h w
    z = pipe.vae.encode(x.to(pipe.vae.dtype)).mode()
    return ((pipe.vae.decode(z)[0].permute(1, 2, 0).float().numpy() + 1) / 2).clip(0, 1)
