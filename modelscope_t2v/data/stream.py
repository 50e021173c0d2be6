"""The batch stream: a deterministic, resumable, endless stream of batches over any source or a mix of a
video and an image source (the paper trains on WebVid videos and LAION images together, images as 1-frame
videos).

Why: the official training code (VGen) mixes the two by GPU rank (one GPU: images only), turns decode
failures into black clips with empty captions, and cannot resume a data stream. Here:

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
"""

from __future__ import annotations

import io
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DataConfig, DataError, SourceConfig, as_data_config, check_data_config
from .decode import IMAGE_ERRORS, VIDEO_ERRORS, decode_image, read_video_frames, resize_center_crop, uint8_to_float
from .shapes import ShapesDataset
from .sources import ImageFolderDataset, UnreadableSample, WebVidDataset, read_caption

logger = logging.getLogger(__name__)


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


def _too_many_skips(where: str, failures: list[tuple[str, str]], limit: int) -> DataError:
    shown = "; ".join(f"{n}: {r}" for n, r in failures[:3])
    return DataError(
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
                    raise DataError(
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
        caption = read_caption(sample.get("txt"), name)
        key = next(k for k in self._media_keys if k in sample)
        g = self.geometry
        try:
            if self.media == "video":
                frames = read_video_frames(sample[key], num_frames=g.num_frames, frame_stride=g.frame_stride,
                                           target_fps=g.target_fps, rng=rng)
                return resize_center_crop(frames, g.height, g.width), caption
            return decode_image(io.BytesIO(sample[key]), g.height, g.width), caption
        except (*VIDEO_ERRORS, *IMAGE_ERRORS) as e:
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
                                antialias=src.shapes_antialias,
                                directions=None if src.shapes_directions is None else tuple(src.shapes_directions))
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
