"""The data configs: one dataclass for every source kind, and the checks that need no file.

One plain dataclass for every kind (Hydra structured-config compatible: defaults everywhere, no Unions but
Optional). Source fields are flat and prefixed by the kind they belong to where the name alone would be
ambiguous; `mixed` holds two whole source configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping, Optional

KINDS = ("shapes", "webvid", "images", "webdataset", "mixed")
SOURCE_KINDS = KINDS[:-1]
MEDIA = ("video", "image")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")  # webdataset keys read as video
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")  # image files / webdataset keys read as images
START_METHODS = ("fork", "spawn", "forkserver")


class DataError(RuntimeError):
    """The data cannot give batches (every sample of a batch unreadable, shards without samples); the message
    says what was found and where to look."""


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
    # the directions drawn, uniformly (a word listed twice comes twice as often): left, right, up, down, and
    # still ("a {color} {shape} standing still", the LoRA's concept: docs/lora.md); null: the four motions
    shapes_directions: Optional[List[str]] = None
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
    if src.kind == "shapes" and src.shapes_directions is not None:
        from .shapes import MOTIONS

        bad = [d for d in src.shapes_directions if d not in MOTIONS]
        if not src.shapes_directions or bad:
            raise ValueError(f"{where}.shapes_directions must be a non-empty list of {list(MOTIONS)}, got "
                             f"{list(src.shapes_directions)}")
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
    check_sampling(cfg.num_frames, cfg.frame_stride, cfg.target_fps, where="DataConfig.")
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


def check_sampling(num_frames: int, frame_stride: int | None, target_fps: float | None, where: str = "") -> None:
    if int(num_frames) < 1:
        raise ValueError(f"{where}num_frames must be >= 1, got {num_frames}")
    if frame_stride is not None and target_fps is not None:
        raise ValueError(f"{where}frame_stride and {where}target_fps are exclusive; set at most one")
    if frame_stride is not None and int(frame_stride) < 1:
        raise ValueError(f"{where}frame_stride must be >= 1 or None, got {frame_stride}")
    if target_fps is not None and not float(target_fps) > 0:
        raise ValueError(f"{where}target_fps must be > 0 or None, got {target_fps}")
