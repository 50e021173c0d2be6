"""Map-style sources of captioned media: WebVid (a CSV plus a folder of videos) and captioned image folders.

A source has `len()` and `load(index, rng) -> (c f h w uint8, caption, name)`, or raises `UnreadableSample`
for a sample that cannot be used (missing, corrupt, too short, no caption): the stream drops it and draws
another, never a blank clip.

File layout: WebVid is its CSV (videoid, contentUrl, duration, page_dir, name = caption) plus videos at
`video_root/{page_dir}/{videoid}.mp4` (`path_pattern`, any CSV column may appear); an image folder holds
images with same-named `.txt` captions (searched recursively); webdataset shards (read by the stream)
hold `key.mp4` (or `key.jpg`/`png`/`webp`) + `key.txt`.
"""

from __future__ import annotations

import array
import csv
import logging
import os
import string
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .config import IMAGE_EXTENSIONS, check_sampling
from .decode import IMAGE_ERRORS, VIDEO_ERRORS, decode_image, read_video_frames, resize_center_crop, uint8_to_float

logger = logging.getLogger(__name__)


class UnreadableSample(Exception):
    """A sample that cannot be used (missing, corrupt, too short, no caption); the loader skips it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason



def read_caption(data: bytes | None, name: str) -> str:
    caption = data.decode("utf-8", errors="replace").strip() if data is not None else ""
    if not caption:
        raise UnreadableSample(name, "empty or missing caption")
    return caption


# ---------------------------------------------------------------------------------------------------
# Map-style sources: len() and load(index, rng) -> (c f h w uint8, caption, name) or UnreadableSample.


def _first_non_utf8(path: Path) -> tuple[int, int]:
    """(line, byte) of the first byte that is not UTF-8, both counted from 1 (read only on that error)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return number, e.start + 1
    return 0, 0


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
        check_sampling(num_frames, frame_stride, target_fps)
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
            try:
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
            except UnicodeDecodeError:
                line, column = _first_non_utf8(csv_path)
                raise ValueError(f"{where}.csv: {str(csv_path)!r} is not UTF-8 text: line {line} (the header is "
                                 f"line 1), byte {column} of it") from None
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
        except VIDEO_ERRORS as e:
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
        caption = read_caption(caption_bytes, str(path))
        try:
            clip = decode_image(str(path), self.height, self.width)
        except IMAGE_ERRORS as e:
            raise UnreadableSample(str(path), f"{type(e).__name__}: {e}") from None
        return clip, caption, str(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip, caption, _ = self.load(index)
        return {"pixels": uint8_to_float(clip), "caption": caption, "index": index}
