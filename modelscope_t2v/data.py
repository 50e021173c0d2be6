"""Training data: WebVid videos, captioned image folders, webdataset shards, a procedural "shapes" set,
and a deterministic, resumable batch stream over any of them (or a mix of a video and an image source).

Why: the paper trains on WebVid videos and LAION images together (images as 1-frame videos); the
official training code (VGen) mixes the two by GPU rank (one GPU: images only), turns decode failures
into black clips with empty captions, and cannot resume a data stream. Here:

- `make_loader(cfg, batch_size=, seed=, start_batch=)` is an endless stream in which batch k is a pure
  function of (cfg, seed, k, rank, world_size): resuming at k gives bit-identical batches, with or
  without DataLoader workers. Map-style sources (shapes, webvid, images) shuffle per epoch from
  (seed, epoch) and shard by rank; webdataset is a stream (see "webdataset resume" below).
- Mixing happens inside the stream: batch k is an image batch with probability `image_ratio`, drawn
  from (seed, k) -- the same on every rank -- and each source keeps its own position, so no sample is
  skipped or repeated by the mixing. Batches are homogeneous (all video or all image).
- An unreadable sample (missing, corrupt, too short, no caption) is dropped and replaced by another
  one, never by a blank clip, so batches always hold batch_size samples; the drops are counted in the
  batch ("skipped") and logged once per file and loader (by the main process, so workers do not repeat
  each other). Map-style sources replace it with a random sample of the same epoch share, drawn from
  (seed, rank, position, attempt): no drift, so batch k stays a function of k.
- Video is decoded with PyAV; the container is opened and closed inside each read (no decoder state
  shared across a fork), so forked DataLoader workers are safe.

Pixels are `b c f h w` float32 in [-1, 1]; images have f == 1. Frames are resized so that they cover
(height, width) and centre-cropped (antialiased bilinear).

webdataset resume: a stream cannot seek, so batch k of a webdataset source is defined by sample
*positions* in this rank's stream: batch k holds the samples at positions [k*B, (k+1)*B) (after a
deterministic shard order and shuffle buffer), and an unreadable one is replaced by the next decodable
sample after that window (which also appears in batch k+1). A resumed stream therefore reads and
discards the first k*B samples' bytes (tar reading, no decoding): resume cost grows with k. With
DataLoader workers every worker reads the whole stream and decodes only its own batches (worker w
builds batches k = start + w, start + w + W, ...), which multiplies the tar reading by the number of
workers. Samples lacking this source's media type (an image in a video source) are left out of the
stream silently; shards that fail to open or read are logged and skipped (their samples are not
counted in "skipped", whose unit is a sample).

File layout: WebVid is its CSV (videoid, contentUrl, duration, page_dir, name = caption) plus videos
at `video_root/{page_dir}/{videoid}.mp4` (`path_pattern`, any CSV column may appear); an image folder
holds images with same-named `.txt` captions (searched recursively); webdataset shards hold
`key.mp4` (or `key.jpg`/`png`/`webp`) + `key.txt`.
"""

from __future__ import annotations

import array
import csv
import io
import itertools
import logging
import math
import os
import re
import string
from collections import deque
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Optional, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

KINDS = ("shapes", "webvid", "images", "webdataset", "mixed")
SOURCE_KINDS = KINDS[:-1]
MEDIA = ("video", "image")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")  # webdataset keys read as video
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")  # image files / webdataset keys read as images
START_METHODS = ("fork", "spawn", "forkserver")


# ---------------------------------------------------------------------------------------------------
# Config
# One plain dataclass for every kind (Hydra structured-config compatible: defaults everywhere, no
# Unions but Optional). Source fields are flat and prefixed by the kind they belong to where the name
# alone would be ambiguous; `mixed` holds two whole source configs.


@dataclass
class SourceConfig:
    """One source of samples. Clip geometry (frames, size, frame sampling) lives in DataConfig."""

    kind: str = "shapes"  # "shapes" | "webvid" | "images" | "webdataset"
    # shapes: procedural moving shapes, no files
    shapes_image: bool = False  # the image variant: 1 frame, captions "a {color} {shape}"
    # with shapes_image: the image is where a moving clip starts (its first frame), captioned with the
    # direction it is about to move, "a {color} {shape} moving {direction}" (docs/shapes_model.md, stage 6)
    shapes_image_start: bool = False
    shapes_length: int = 100_000  # virtual epoch size; sample i is a pure function of (shapes_seed, i)
    shapes_seed: int = 0  # which virtual data set (independent of the loader's shuffling seed)
    shapes_antialias: bool = True  # 1-pixel antialiased edges (interior pixels stay pure colour)
    # webvid: a CSV plus a folder of videos
    csv: str = "data/webvid/results_2M_val.csv"
    video_root: str = "data/webvid/videos"
    path_pattern: str = "{page_dir}/{videoid}.mp4"  # video path under video_root; any CSV column may appear
    caption_column: str = "name"  # WebVid's caption column
    verify_files: bool = False  # drop CSV rows whose video file is missing at start-up (one stat per row)
    # images: a folder (searched recursively) of images with same-named .txt captions
    image_root: str = "data/images"
    # webdataset: tar shards of (mp4 | jpg/png/webp) + txt
    urls: list[str] = field(default_factory=list)  # shard urls; each may be a brace pattern "{000..099}"
    media: str = "video"  # webdataset only: read the shards' "video" (mp4 ...) or "image" (jpg ...) samples
    shuffle_buffer: int = 1000  # webdataset only: samples held for shuffling (0 or 1: stream order)


@dataclass
class DataConfig(SourceConfig):
    """What `make_loader` streams: one source (kind != "mixed") or a mix of `video` and `image`."""

    kind: str = "shapes"  # "shapes" | "webvid" | "images" | "webdataset" | "mixed"
    num_frames: int = 16  # frames per video clip (image batches always have 1)
    height: int = 64  # output pixels; frames are resized to cover (height, width) and centre-cropped
    width: int = 64
    # video frame sampling (at most one of the two; neither = consecutive frames), random start per clip
    frame_stride: Optional[int] = None  # take every frame_stride-th source frame
    target_fps: Optional[float] = None  # resample to this frame rate (by the stream's average rate)
    # mixed: batch k is an image batch with probability image_ratio (drawn from (seed, k))
    image_ratio: float = 0.25
    video: SourceConfig = field(default_factory=SourceConfig)  # mixed: the video source
    image: SourceConfig = field(default_factory=lambda: SourceConfig(shapes_image=True))  # mixed: images
    # a batch that needs more replacements than this raises (a wrong video_root, not bad luck)
    max_skips_per_batch: int = 256
    # DataLoader worker start method: "fork" | "spawn" | "forkserver"; None = the platform default
    multiprocessing_context: Optional[str] = None

    def __post_init__(self) -> None:
        # DataConfig(video={"kind": "webvid", ...}) from Python: make the sub-configs dataclasses
        self.video = _as_source(self.video, "DataConfig.video")
        self.image = _as_source(self.image, "DataConfig.image")


def _source_fields() -> list[str]:
    return [f.name for f in fields(SourceConfig)]


def _as_source(obj: Any, where: str) -> SourceConfig:
    if isinstance(obj, SourceConfig):
        return obj
    if isinstance(obj, Mapping):
        unknown = sorted(set(obj) - set(_source_fields()))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {_source_fields()}")
        values = {k: (list(v) if k == "urls" and not isinstance(v, str) else v) for k, v in obj.items()}
        return SourceConfig(**values)
    raise TypeError(f"{where} must be a SourceConfig or a mapping, got {type(obj).__name__}")


def as_data_config(cfg: Any) -> DataConfig:
    """A DataConfig from a DataConfig, or from a mapping such as an OmegaConf DictConfig."""
    if isinstance(cfg, DataConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a DataConfig or a mapping (e.g. a DictConfig), got {type(cfg).__name__}")
    names = [f.name for f in fields(DataConfig)]
    unknown = sorted(set(cfg) - set(names))
    if unknown:
        raise ValueError(f"DataConfig: unknown field(s) {unknown}; allowed: {names}")
    values = dict(cfg.items())
    for key in ("video", "image"):
        if key in values:
            values[key] = _as_source(values[key], f"DataConfig.{key}")
    if "urls" in values and not isinstance(values["urls"], str):
        values["urls"] = list(values["urls"])
    return DataConfig(**values)


def source_media(src: SourceConfig) -> str:
    """"video" or "image": what a source yields."""
    if src.kind == "shapes":
        return "image" if src.shapes_image else "video"
    if src.kind == "webvid":
        return "video"
    if src.kind == "images":
        return "image"
    return src.media


def _check_source(src: SourceConfig, where: str) -> None:
    if src.kind not in SOURCE_KINDS:
        raise ValueError(f"{where}.kind must be one of {SOURCE_KINDS}, got {src.kind!r}")
    if src.kind == "shapes" and int(src.shapes_length) < 1:
        raise ValueError(f"{where}.shapes_length must be >= 1, got {src.shapes_length}")
    if src.kind == "shapes" and int(src.shapes_seed) < 0:
        raise ValueError(f"{where}.shapes_seed must be >= 0, got {src.shapes_seed}")
    if src.kind == "shapes" and src.shapes_image_start and not src.shapes_image:
        raise ValueError(f"{where}.shapes_image_start=true needs {where}.shapes_image=true (images of clip starts)")
    if src.kind == "webdataset":
        if src.media not in MEDIA:
            raise ValueError(f"{where}.media must be one of {MEDIA}, got {src.media!r}")
        if not src.urls:
            raise ValueError(f"{where}.urls must name at least one shard (brace patterns allowed)")
        if int(src.shuffle_buffer) < 0:
            raise ValueError(f"{where}.shuffle_buffer must be >= 0, got {src.shuffle_buffer}")


def check_data_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the field for a bad config (cheap checks: no files are opened)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"DataConfig.kind must be one of {KINDS}, got {cfg.kind!r}")
    for name in ("num_frames", "height", "width"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    _check_sampling(cfg.num_frames, cfg.frame_stride, cfg.target_fps, where="DataConfig.")
    if cfg.max_skips_per_batch < 0:
        raise ValueError(f"DataConfig.max_skips_per_batch must be >= 0, got {cfg.max_skips_per_batch}")
    if cfg.multiprocessing_context is not None and cfg.multiprocessing_context not in START_METHODS:
        raise ValueError(
            f"DataConfig.multiprocessing_context must be None or one of {START_METHODS}, "
            f"got {cfg.multiprocessing_context!r}"
        )
    if cfg.kind != "mixed":
        _check_source(cfg, "DataConfig")
        return
    if not 0.0 <= float(cfg.image_ratio) <= 1.0:
        raise ValueError(f"DataConfig.image_ratio must be in [0, 1], got {cfg.image_ratio}")
    for role in MEDIA:
        src = getattr(cfg, role)
        _check_source(src, f"DataConfig.{role}")
        if source_media(src) != role:
            hint = {"shapes": "shapes_image", "webdataset": "media"}.get(src.kind, "kind")
            raise ValueError(
                f"DataConfig.{role} must be a {role} source, but kind={src.kind!r} yields "
                f"{source_media(src)}s (see DataConfig.{role}.{hint})"
            )


def _check_sampling(num_frames: int, frame_stride: int | None, target_fps: float | None, where: str = "") -> None:
    if int(num_frames) < 1:
        raise ValueError(f"{where}num_frames must be >= 1, got {num_frames}")
    if frame_stride is not None and target_fps is not None:
        raise ValueError(f"{where}frame_stride and {where}target_fps are exclusive; set at most one")
    if frame_stride is not None and int(frame_stride) < 1:
        raise ValueError(f"{where}frame_stride must be >= 1 or None, got {frame_stride}")
    if target_fps is not None and not float(target_fps) > 0:
        raise ValueError(f"{where}target_fps must be > 0 or None, got {target_fps}")


# ---------------------------------------------------------------------------------------------------
# Shapes: one pure-colour object on black, moving at constant speed.
# The grammar is public so that an evaluation script can parse captions and check generated videos.

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
# unit displacement (dx, dy) in image coordinates (y grows downwards)
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPE_EXTENT = (0.22, 0.28)  # object width as a fraction of min(height, width): about a quarter
SHAPE_TRAVEL_MIN = 0.36  # the least distance travelled over a clip, as a fraction of the frame (> 1/3)

_CAPTION_RE = re.compile(r"^a (\w+) (\w+)(?: moving (\w+))?$")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def shapes_caption(color: str, shape: str, direction: str | None = None) -> str:
    """"a {color} {shape} moving {direction}", or "a {color} {shape}" for the image variant."""
    _check_choice("color", color, COLORS)
    _check_choice("shape", shape, SHAPES)
    if direction is None:
        return f"a {color} {shape}"
    _check_choice("direction", direction, DIRECTIONS)
    return f"a {color} {shape} moving {direction}"


def parse_shapes_caption(caption: str) -> tuple[str, str, str | None]:
    """(color, shape, direction or None) of a shapes caption; ValueError if it is not one."""
    m = _CAPTION_RE.match(caption.strip())
    if not m or m.group(1) not in COLORS or m.group(2) not in SHAPES or (
        m.group(3) is not None and m.group(3) not in DIRECTIONS
    ):
        raise ValueError(
            f"caption {caption!r} is not a shapes caption ('a {{color}} {{shape}} [moving {{direction}}]')"
        )
    return m.group(1), m.group(2), m.group(3)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, extent: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of each pixel centre to the shape; exact inside, a lower
    bound outside (enough for a 1-pixel antialiased edge). cx, cy are (f,1,1) bounding-box centres."""
    dx, dy = x - cx, y - cy  # f h w
    half = extent / 2
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - half
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - half
    # equilateral triangle pointing up, `extent` wide, centred on its bounding box
    tri_h = extent * math.sqrt(3) / 2
    ty = dy + tri_h / 2  # relative to the top vertex
    left = -math.sqrt(3) / 2 * dx - 0.5 * ty
    right = math.sqrt(3) / 2 * dx - 0.5 * ty
    bottom = dy - tri_h / 2
    return np.maximum(np.maximum(left, right), bottom)


def _render_shape_uint8(
    color: str,
    shape: str,
    direction: str | None,
    *,
    num_frames: int,
    height: int,
    width: int,
    rng: np.random.Generator,
    antialias: bool = True,
) -> Tensor:
    """c f h w uint8: draws extent, start and travel from rng, then renders."""
    lo, hi = SHAPE_EXTENT
    extent = float(rng.uniform(lo, hi)) * min(height, width)
    half = extent / 2
    # the bounding-box centre stays inside [half, size - half] on both axes, over the whole clip
    cx0 = float(rng.uniform(half, width - half))
    cy0 = float(rng.uniform(half, height - half))
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float64) if num_frames > 1 else np.zeros(1)
    cx = np.full(num_frames, cx0)
    cy = np.full(num_frames, cy0)
    if direction is not None:
        ddx, ddy = DIRECTION_VECTORS[direction]
        axis = width if ddx else height
        travel = float(rng.uniform(SHAPE_TRAVEL_MIN * axis, axis - extent))
        start = float(rng.uniform(half, axis - half - travel))
        along = start + travel * t  # constant speed, increasing coordinate
        if ddx < 0 or ddy < 0:
            along = axis - along  # left / up: mirror
        if ddx:
            cx = along
        else:
            cy = along
    x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
    y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
    d = _shape_sdf(shape, x, y, cx.astype(np.float32)[:, None, None], cy.astype(np.float32)[:, None, None], extent)
    alpha = np.clip(0.5 - d, 0.0, 1.0) if antialias else (d <= 0).astype(np.float32)  # f h w
    rgb = np.asarray(COLOR_RGB[color], dtype=np.float32)[:, None, None, None]  # c 1 1 1
    return torch.from_numpy(np.rint(alpha[None] * rgb).astype(np.uint8))  # c f h w


def render_shape_clip(
    color: str,
    shape: str,
    direction: str | None = None,
    *,
    num_frames: int = 16,
    size: int = 64,
    height: int | None = None,
    width: int | None = None,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    antialias: bool = True,
) -> Tensor:
    """One shapes clip, `c f h w` float in [-1, 1].

    The object (about a quarter of min(height, width) across, pure `COLOR_RGB[color]` inside) starts
    at a random place and, if `direction` is given, moves that way at constant speed, travelling at
    least SHAPE_TRAVEL_MIN (> 1/3) of the frame over the clip while staying wholly inside it;
    direction None gives a static object. Geometry comes from `rng` (a numpy Generator) or `seed`.
    """
    _check_choice("color", color, COLORS)
    _check_choice("shape", shape, SHAPES)
    if direction is not None:
        _check_choice("direction", direction, DIRECTIONS)
    height = size if height is None else height
    width = size if width is None else width
    for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if rng is not None and seed is not None:
        raise ValueError("give rng or seed, not both")
    if rng is None:
        rng = np.random.default_rng(seed)
    clip = _render_shape_uint8(
        color, shape, direction, num_frames=num_frames, height=height, width=width, rng=rng, antialias=antialias
    )
    return uint8_to_float(clip)


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes, no files: sample i is a pure function of (seed, i) and the geometry.

    Videos: "a {color} {shape} moving {direction}", `num_frames` frames. Image variant (`image=True`):
    "a {color} {shape}", one frame; with `image_start=True` the first frame of a moving clip instead,
    captioned with its direction (where an object that moves that way starts). Items: {"pixels": c f h w float in [-1, 1], "caption", "color",
    "shape", "index"} plus "direction" for videos.
    """

    media = "video"

    def __init__(
        self,
        length: int = 100_000,
        *,
        num_frames: int = 16,
        height: int = 64,
        width: int = 64,
        image: bool = False,
        image_start: bool = False,
        seed: int = 0,
        antialias: bool = True,
    ):
        if image_start and not image:
            raise ValueError("ShapesDataset image_start=True needs image=True (it makes images of clip starts)")
        for name, v in (("length", length), ("num_frames", num_frames), ("height", height), ("width", width)):
            if int(v) < 1:
                raise ValueError(f"ShapesDataset {name} must be >= 1, got {v}")
        if int(seed) < 0:
            raise ValueError(f"ShapesDataset seed must be >= 0, got {seed}")
        self.length, self.height, self.width = int(length), int(height), int(width)
        self.image, self.seed, self.antialias = bool(image), int(seed), bool(antialias)
        self.image_start = bool(image_start)
        self.num_frames = 1 if self.image else int(num_frames)
        self.media = "image" if self.image else "video"

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> tuple[dict[str, Any], np.random.Generator]:
        """The sample's labels and the generator (positioned after them) that draws its geometry."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, int(self.image), index])
        color = COLORS[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        moving = not self.image or self.image_start
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))] if moving else None
        return {"color": color, "shape": shape, "direction": direction}, rng

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[Tensor, str, str]:
        """(c f h w uint8, caption, name); `rng` is ignored (the sample is fixed by its index)."""
        labels, geometry_rng = self.describe(index)
        clip = _render_shape_uint8(
            labels["color"], labels["shape"], labels["direction"], num_frames=self.num_frames,
            height=self.height, width=self.width, rng=geometry_rng, antialias=self.antialias,
        )
        return clip, shapes_caption(**labels), f"shapes[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:
        labels, _ = self.describe(index)
        clip, caption, _ = self.load(index)
        item = {"pixels": uint8_to_float(clip), "caption": caption, "color": labels["color"],
                "shape": labels["shape"], "index": index}
        if labels["direction"] is not None:
            item["direction"] = labels["direction"]
        return item


# ---------------------------------------------------------------------------------------------------
# Video files (PyAV). Every read opens and closes its own container: nothing survives a fork.


class UnreadableSample(Exception):
    """A sample that cannot be used (missing, corrupt, too short, no caption); the loader skips it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


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
    _check_sampling(num_frames, frame_stride, target_fps)
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
_VIDEO_ERRORS = (av.FFmpegError, OSError, EOFError, VideoReadError)
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode_image(src: str | BinaryIO, height: int, width: int) -> Tensor:
    """An image file -> `c 1 h w` uint8 (JPEGs are decoded at a reduced scale when that still covers)."""
    with Image.open(src) as img:
        scale = max(height / img.height, width / img.width)
        img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        arr = np.asarray(img.convert("RGB"))
    return resize_center_crop(torch.from_numpy(arr.copy())[None], height, width)


def _read_caption(data: bytes | None, name: str) -> str:
    caption = data.decode("utf-8", errors="replace").strip() if data is not None else ""
    if not caption:
        raise UnreadableSample(name, "empty or missing caption")
    return caption


# ---------------------------------------------------------------------------------------------------
# Map-style sources: len() and load(index, rng) -> (c f h w uint8, caption, name) or UnreadableSample.


class _StringTable:
    """Many strings in two numpy arrays (no per-string Python objects: forked workers share pages
    instead of copying them on every refcount touch, the classic DataLoader "leak")."""

    def __init__(self, strings: Iterable[str]):
        data, offsets = bytearray(), array.array("q", [0])
        for s in strings:
            data += s.encode("utf-8")
            offsets.append(len(data))
        self._data = np.frombuffer(bytes(data), dtype=np.uint8)
        self._offsets = np.frombuffer(offsets.tobytes(), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


class WebVidDataset(torch.utils.data.Dataset):
    """WebVid: a CSV (videoid, contentUrl, duration, page_dir, name) and a folder of videos.

    Rows with an empty caption are dropped at start-up (logged); with `verify_files`, so are rows whose
    file is missing. `load(i, rng)` decodes a clip with a random start drawn from rng.
    """

    media = "video"

    def __init__(
        self,
        csv_path: str | os.PathLike,
        video_root: str | os.PathLike,
        *,
        num_frames: int = 16,
        height: int = 256,
        width: int = 256,
        frame_stride: int | None = None,
        target_fps: float | None = None,
        path_pattern: str = "{page_dir}/{videoid}.mp4",
        caption_column: str = "name",
        verify_files: bool = False,
        where: str = "WebVidDataset",
    ):
        _check_sampling(num_frames, frame_stride, target_fps)
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.frame_stride, self.target_fps = frame_stride, target_fps
        self.video_root = Path(video_root)
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"{where}.csv: no such file {str(csv_path)!r}")
        if not self.video_root.is_dir():
            raise FileNotFoundError(f"{where}.video_root: no such directory {str(self.video_root)!r}")
        columns = [name for _, name, _, _ in string.Formatter().parse(path_pattern) if name is not None]
        if not columns or any(not c for c in columns):
            raise ValueError(f"{where}.path_pattern must name CSV columns like '{{page_dir}}', got {path_pattern!r}")
        paths, captions = [], []
        dropped_caption = dropped_missing = 0
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (*columns, caption_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"{where}: columns {missing} (from path_pattern / caption_column) are not in the CSV "
                    f"header {reader.fieldnames} of {str(csv_path)!r}"
                )
            for row in reader:
                caption = (row[caption_column] or "").strip()
                if not caption:
                    dropped_caption += 1
                    continue
                rel = path_pattern.format(**row)
                if verify_files and not (self.video_root / rel).is_file():
                    dropped_missing += 1
                    continue
                paths.append(rel)
                captions.append(caption)
        if dropped_caption or dropped_missing:
            logger.warning(
                "%s: dropped %d rows with an empty caption and %d whose video is missing (of %d)",
                csv_path, dropped_caption, dropped_missing, len(paths) + dropped_caption + dropped_missing,
            )
        if not paths:
            raise ValueError(f"{where}.csv: {str(csv_path)!r} has no usable rows")
        self._paths, self._captions = _StringTable(paths), _StringTable(captions)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        return self.video_root / self._paths[index]

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[Tensor, str, str]:
        path = self.path(index)
        if not path.is_file():
            raise UnreadableSample(str(path), "missing file")
        try:
            frames = read_video_frames(
                path, num_frames=self.num_frames, frame_stride=self.frame_stride, target_fps=self.target_fps, rng=rng
            )
        except _VIDEO_ERRORS as e:
            raise UnreadableSample(str(path), f"{type(e).__name__}: {e}") from None
        return resize_center_crop(frames, self.height, self.width), self._captions[index], str(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"pixels": c f h w float, "caption"}; the start frame is drawn from a generator seeded by index."""
        clip, caption, _ = self.load(index, np.random.default_rng(index))
        return {"pixels": uint8_to_float(clip), "caption": caption, "index": index}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (searched recursively, sorted) with same-named .txt captions; `c 1 h w` samples.
    Images without a caption file are left out at start-up (logged)."""

    media = "image"

    def __init__(
        self, root: str | os.PathLike, *, height: int = 256, width: int = 256, where: str = "ImageFolderDataset"
    ):
        self.root, self.height, self.width = Path(root), int(height), int(width)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{where}.image_root: no such directory {str(self.root)!r}")
        images, uncaptioned = [], 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            names = set(filenames)
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                if ext[1:].lower() not in IMAGE_EXTENSIONS:
                    continue
                if stem + ".txt" not in names:
                    uncaptioned += 1
                    continue
                images.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        if uncaptioned:
            logger.warning("%s: left out %d images without a .txt caption", self.root, uncaptioned)
        if not images:
            raise ValueError(
                f"{where}.image_root: no captioned images ({'/'.join(IMAGE_EXTENSIONS)} + .txt) in {str(self.root)!r}"
            )
        self._images = _StringTable(images)

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[Tensor, str, str]:
        path = self.root / self._images[index]
        try:
            caption_bytes = path.with_suffix(".txt").read_bytes()
        except OSError:
            caption_bytes = None
        caption = _read_caption(caption_bytes, str(path))
        try:
            clip = _decode_image(str(path), self.height, self.width)
        except _IMAGE_ERRORS as e:
            raise UnreadableSample(str(path), f"{type(e).__name__}: {e}") from None
        return clip, caption, str(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip, caption, _ = self.load(index)
        return {"pixels": uint8_to_float(clip), "caption": caption, "index": index}


# ---------------------------------------------------------------------------------------------------
# Batches. Seeds: every random draw comes from np.random.default_rng([seed, TAG, ...]) so that it
# depends on its coordinates only, never on what was drawn before it.

_PERM, _CLIP, _REPLACE, _COIN, _SHARDS, _SHUFFLE = range(1, 7)
_COIN_BLOCK = 4096  # mixed: image/video coins are drawn in blocks, with running counts per block


@dataclass
class _Geometry:
    num_frames: int
    height: int
    width: int
    frame_stride: int | None
    target_fps: float | None


def _stack(clips: list[Tensor], captions: list[str], media: str, skipped: int, failures: list, k: int) -> dict:
    return {
        "pixels": uint8_to_float(torch.from_numpy(np.stack([c.numpy() for c in clips]))),  # b c f h w
        "captions": captions,
        "kind": media,
        "skipped": skipped,
        "batch_index": k,
        "_failures": failures,
    }


def _too_many_skips(where: str, failures: list[tuple[str, str]], limit: int) -> RuntimeError:
    shown = "; ".join(f"{n}: {r}" for n, r in failures[:3])
    return RuntimeError(
        f"{where}: more than max_skips_per_batch={limit} unreadable samples for one batch "
        f"(e.g. {shown}). Check the paths (video_root / path_pattern / image_root / urls); for a "
        f"partial WebVid download set verify_files=true."
    )


class _MapSource:
    """Batches from a map-style data set: this rank's share of a per-epoch permutation, batch j taking
    positions [j*B, (j+1)*B) of the endless concatenation of epochs. An unreadable sample is replaced
    by a random one of the same epoch share, drawn from (seed, rank, position, attempt)."""

    def __init__(self, dataset: Any, *, batch_size: int, seed: int, stream: int, rank: int, world_size: int,
                 max_skips: int, where: str):
        self.dataset, self.batch_size, self.seed, self.stream = dataset, batch_size, seed, stream
        self.rank, self.world_size, self.max_skips, self.where = rank, world_size, max_skips, where
        self.media = dataset.media
        self.per_rank = len(dataset) // world_size  # the tail of each epoch's permutation is dropped
        if self.per_rank < 1:
            raise ValueError(f"{where}: {len(dataset)} samples cannot be shared by world_size={world_size} ranks")
        self._epochs: dict[int, np.ndarray] = {}  # per process
        self._bad: dict[int, tuple[str, str]] = {}  # per process: indices known unreadable

    def _share(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            perm = np.random.default_rng([self.seed, self.stream, _PERM, epoch]).permutation(len(self.dataset))
            self._epochs[epoch] = perm[self.rank : self.per_rank * self.world_size : self.world_size]
        return self._epochs[epoch]

    def _load(self, index: int, rng: np.random.Generator) -> tuple[Tensor, str]:
        if index in self._bad:  # deterministic failures: the same outcome without decoding again
            raise UnreadableSample(*self._bad[index])
        try:
            clip, caption, _ = self.dataset.load(index, rng)
        except UnreadableSample as e:
            self._bad[index] = (e.name, e.reason)
            raise
        return clip, caption

    def batch(self, j: int, k: int) -> dict:
        clips, captions, failures = [], [], []
        for slot in range(self.batch_size):
            p = j * self.batch_size + slot
            epoch, offset = divmod(p, self.per_rank)
            share = self._share(epoch)
            index, attempt = int(share[offset]), 0
            while True:
                rng = np.random.default_rng([self.seed, self.stream, _CLIP, self.rank, p, attempt])
                try:
                    clip, caption = self._load(index, rng)
                    break
                except UnreadableSample as e:
                    failures.append((e.name, e.reason))
                    if len(failures) > self.max_skips:
                        raise _too_many_skips(self.where, failures, self.max_skips) from None
                    attempt += 1
                    pick = np.random.default_rng([self.seed, self.stream, _REPLACE, self.rank, p, attempt])
                    index = int(share[int(pick.integers(self.per_rank))])
            clips.append(clip)
            captions.append(caption)
        return _stack(clips, captions, self.media, len(failures), failures, k)

    def batches(self, jks: Iterator[tuple[int, int]]) -> Iterator[dict]:
        for j, k in jks:
            yield self.batch(j, k)


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard urls from a brace pattern ("shards/{000..099}.tar"), a "::"-separated string, or a list
    of either (webdataset's expansion)."""
    import webdataset as wds

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        out.extend(wds.shardlists.expand_urls(item))
    return out


class _StreamSource:
    """Batches from webdataset shards: see "webdataset resume" in the module docstring."""

    def __init__(self, src: SourceConfig, geometry: _Geometry, *, batch_size: int, seed: int, stream: int,
                 rank: int, world_size: int, max_skips: int, where: str):
        self.geometry, self.batch_size, self.seed, self.stream = geometry, batch_size, seed, stream
        self.rank, self.world_size, self.max_skips, self.where = rank, world_size, max_skips, where
        self.media, self.shuffle_buffer = src.media, int(src.shuffle_buffer)
        self.shards = expand_urls(src.urls)
        if len(self.shards) < world_size:
            raise ValueError(
                f"{where}.urls: {len(self.shards)} shards cannot be shared by world_size={world_size} ranks"
            )
        self._media_keys = VIDEO_EXTENSIONS if self.media == "video" else IMAGE_EXTENSIONS

    def _shard_error(self, exn: Exception) -> bool:
        logger.warning("%s: skipping the rest of a shard: %s", self.where, exn)
        return True  # continue with the next shard

    def _samples(self) -> Iterator[dict]:
        """This rank's endless sample stream: epochs of shuffled shards, then a shuffle buffer."""
        import webdataset as wds

        def epochs() -> Iterator[dict]:
            for epoch in itertools.count():
                order = np.random.default_rng([self.seed, self.stream, _SHARDS, epoch]).permutation(len(self.shards))
                mine = [self.shards[i] for i in order[self.rank :: self.world_size]]
                count = 0
                for sample in wds.tarfile_samples(({"url": u} for u in mine), handler=self._shard_error):
                    if any(key in sample for key in self._media_keys):
                        count += 1
                        yield sample
                if count == 0:
                    raise RuntimeError(
                        f"{self.where}.urls: rank {self.rank}'s shards hold no {self.media} samples "
                        f"({'/'.join(self._media_keys)}): {mine[:3]}"
                    )

        rng = np.random.default_rng([self.seed, self.stream, _SHUFFLE, self.rank])
        buf: list[dict] = []
        for sample in epochs():
            if self.shuffle_buffer <= 1:
                yield sample
                continue
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()

    def _decode(self, sample: dict, rng: np.random.Generator) -> tuple[Tensor, str]:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        caption = _read_caption(sample.get("txt"), name)
        key = next(k for k in self._media_keys if k in sample)
        g = self.geometry
        try:
            if self.media == "video":
                frames = read_video_frames(sample[key], num_frames=g.num_frames, frame_stride=g.frame_stride,
                                           target_fps=g.target_fps, rng=rng)
                return resize_center_crop(frames, g.height, g.width), caption
            return _decode_image(io.BytesIO(sample[key]), g.height, g.width), caption
        except (*_VIDEO_ERRORS, *_IMAGE_ERRORS) as e:
            raise UnreadableSample(name, f"{type(e).__name__}: {e}") from None

    def batches(self, jks: Iterator[tuple[int, int]]) -> Iterator[dict]:
        """Batches for increasing source indices j; windows of other j are read but not decoded."""
        samples = self._samples()
        buf: deque = deque()  # samples at positions [first, first + len(buf))
        first = 0

        def at(p: int) -> dict:
            while first + len(buf) <= p:
                buf.append(next(samples))
            return buf[p - first]

        B = self.batch_size
        for j, k in jks:
            while first < j * B:  # drop what no later batch needs
                if buf:
                    buf.popleft()
                else:
                    next(samples)
                first += 1
            clips, captions, failures = [], [], []
            lookahead = (j + 1) * B  # replacements: the next samples after the window
            slots = list(range(j * B, (j + 1) * B))
            for slot, p in enumerate(slots):
                while True:
                    rng = np.random.default_rng([self.seed, self.stream, _CLIP, self.rank, j, slot, p])
                    try:
                        clip, caption = self._decode(at(p), rng)
                        break
                    except UnreadableSample as e:
                        failures.append((e.name, e.reason))
                        if len(failures) > self.max_skips:
                            raise _too_many_skips(self.where, failures, self.max_skips) from None
                        p, lookahead = lookahead, lookahead + 1
                clips.append(clip)
                captions.append(caption)
            yield _stack(clips, captions, self.media, len(failures), failures, k)


def _make_source(src: SourceConfig, geometry: _Geometry, *, batch_size: int, seed: int, stream: int, rank: int,
                 world_size: int, max_skips: int, where: str) -> _MapSource | _StreamSource:
    common = dict(batch_size=batch_size, seed=seed, stream=stream, rank=rank, world_size=world_size,
                  max_skips=max_skips, where=where)
    g = geometry
    if src.kind == "webdataset":
        if src.media == "image":
            g = _Geometry(1, g.height, g.width, None, None)
        return _StreamSource(src, g, **common)
    if src.kind == "shapes":
        dataset = ShapesDataset(src.shapes_length, num_frames=g.num_frames, height=g.height, width=g.width,
                                image=src.shapes_image, image_start=src.shapes_image_start, seed=src.shapes_seed,
                                antialias=src.shapes_antialias)
    elif src.kind == "webvid":
        dataset = WebVidDataset(src.csv, src.video_root, num_frames=g.num_frames, height=g.height, width=g.width,
                                frame_stride=g.frame_stride, target_fps=g.target_fps, path_pattern=src.path_pattern,
                                caption_column=src.caption_column, verify_files=src.verify_files, where=where)
    else:
        dataset = ImageFolderDataset(src.image_root, height=g.height, width=g.width, where=where)
    return _MapSource(dataset, **common)


class _MixPlan:
    """Which source batch k comes from, and its index j in that source: k is an image batch with
    probability image_ratio (coins from (seed, k), the same on every rank); j counts the earlier
    batches of the same kind, so each source is consumed without gaps."""

    def __init__(self, seed: int, image_ratio: float):
        self.seed, self.image_ratio = seed, float(image_ratio)
        self._blocks: list[np.ndarray] = []  # per process: coins of block b
        self._images_before: list[int] = [0]  # image batches in blocks < b

    def _coins(self, block: int) -> np.ndarray:
        while len(self._blocks) <= block:
            b = len(self._blocks)
            coins = np.random.default_rng([self.seed, _COIN, b]).random(_COIN_BLOCK) < self.image_ratio
            self._blocks.append(coins)
            self._images_before.append(self._images_before[-1] + int(coins.sum()))
        return self._blocks[block]

    def __call__(self, k: int) -> tuple[str, int]:
        block, offset = divmod(k, _COIN_BLOCK)
        coins = self._coins(block)
        images = self._images_before[block] + int(coins[:offset].sum())
        return ("image", images) if coins[offset] else ("video", k - images)


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches start_batch, start_batch + 1, ... ; DataLoader worker w of W builds k = start + w (mod W),
    which the DataLoader hands out round-robin, i.e. in order."""

    def __init__(self, sources: dict[str, Any], plan: _MixPlan | None, start_batch: int):
        self.sources, self.plan, self.start_batch = sources, plan, start_batch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def my_batches() -> Iterator[int]:
            return itertools.count(self.start_batch + worker, workers)

        if self.plan is None:
            (source,) = self.sources.values()
            yield from source.batches((k, k) for k in my_batches())
            return
        plan = self.plan

        def source_indices(media: str) -> Iterator[tuple[int, int]]:  # (j, k) of this worker's batches
            for k in my_batches():
                m, j = plan(k)
                if m == media:
                    yield j, k

        streams = {media: src.batches(source_indices(media)) for media, src in self.sources.items()}
        for k in my_batches():
            yield next(streams[plan(k)[0]])


def _log_failures(batches: Iterator[dict], logged: set[str]) -> Iterator[dict]:
    for batch in batches:
        for name, reason in batch.pop("_failures"):
            if name not in logged:
                logged.add(name)
                logger.warning("skipping unreadable sample %s (%s)", name, reason)
        yield batch


def make_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict]:
    """An endless, deterministic stream of homogeneous batches.

    Batch k (counting from 0 over the whole run) is a function of (cfg, seed, k, rank, world_size)
    only: start_batch=k resumes exactly, with any num_workers. Each batch is {"pixels": float32
    b c f h w in [-1, 1] (f == 1 for images), "captions": list[str], "kind": "video" | "image",
    "skipped": unreadable samples dropped (and replaced) while building it, "batch_index": k}.
    The config is checked and the sources are indexed (CSV read, folder scanned) before this returns.
    `cfg` may also be a mapping such as an OmegaConf DictConfig.
    """
    cfg = as_data_config(cfg)
    for name, v, lo in (("batch_size", batch_size, 1), ("seed", seed, 0), ("start_batch", start_batch, 0),
                        ("num_workers", num_workers, 0), ("world_size", world_size, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    check_data_config(cfg)
    geometry = _Geometry(cfg.num_frames, cfg.height, cfg.width, cfg.frame_stride, cfg.target_fps)
    common = dict(batch_size=int(batch_size), seed=int(seed), rank=int(rank), world_size=int(world_size),
                  max_skips=int(cfg.max_skips_per_batch))
    if cfg.kind == "mixed":
        plan = _MixPlan(int(seed), cfg.image_ratio)
        sources = {
            "video": _make_source(cfg.video, geometry, stream=1, where="DataConfig.video", **common),
            "image": _make_source(cfg.image, _Geometry(1, cfg.height, cfg.width, None, None), stream=2,
                                  where="DataConfig.image", **common),
        }
    else:
        plan = None
        sources = {"only": _make_source(cfg, geometry, stream=0, where="DataConfig", **common)}
    dataset = _BatchStream(sources, plan, int(start_batch))
    if num_workers == 0:
        batches: Iterator[dict] = iter(dataset)
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            multiprocessing_context=cfg.multiprocessing_context,
            # the DataLoader draws its workers' base seed from this generator; without one it would
            # advance the caller's global torch RNG (we use no worker RNG: all draws are keyed)
            generator=torch.Generator().manual_seed(int(seed)),
        )
        batches = iter(loader)
    return _log_failures(batches, set())
