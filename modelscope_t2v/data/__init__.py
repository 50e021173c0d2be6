"""Training data: WebVid videos, captioned image folders, webdataset shards, the procedural shapes world,
and a deterministic, resumable batch stream over any of them (or a mix of a video and an image source).

    config.py   DataConfig / SourceConfig and the checks that open no file
    shapes.py   the shapes world: caption grammar, renderer, ShapesDataset
    decode.py   files to pixels (PyAV video clips, PIL images, resize and crop)
    sources.py  map-style sources: WebVid, captioned image folders
    stream.py   make_loader: the batch stream (shuffling, sharding, mixing, skips, webdataset)
"""

from .config import KINDS, MEDIA, DataConfig, DataError, SourceConfig, as_data_config, check_data_config, source_media
from .decode import (
    VideoReadError,
    VideoTooShortError,
    read_video_frames,
    resize_center_crop,
    save_video_frames,
    uint8_to_float,
)
from .shapes import (
    COLOR_RGB,
    COLORS,
    DIRECTIONS,
    SHAPES,
    ShapesDataset,
    parse_shapes_caption,
    render_shape_clip,
    shapes_caption,
)
from .sources import ImageFolderDataset, UnreadableSample, WebVidDataset
from .stream import expand_urls, make_loader

__all__ = [
    "COLORS", "COLOR_RGB", "DIRECTIONS", "DataError", "KINDS", "MEDIA", "SHAPES", "DataConfig", "ImageFolderDataset",
    "ShapesDataset", "SourceConfig", "UnreadableSample", "VideoReadError", "VideoTooShortError", "WebVidDataset",
    "as_data_config", "check_data_config", "expand_urls", "make_loader", "parse_shapes_caption",
    "read_video_frames", "render_shape_clip", "resize_center_crop", "save_video_frames", "shapes_caption",
    "source_media", "uint8_to_float",
]
