"""What a run reports: metrics.jsonl and tensorboard (rank 0), the fixed batches the eval loss and the
validation videos use, and the videos themselves (mp4, a GIF where the mp4 writer fails).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..data import DataConfig, make_loader
from ..video_io import export_to_gif, export_to_video

log = logging.getLogger("modelscope_t2v.train")


class Metrics:
    """metrics.jsonl (one object per logged step) and tensorboard, written by rank 0 (`enabled`)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past the checkpoint we resume from
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a dependency, but the loop does not need it
            log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def _truncate(self, start_step: int) -> None:
        """Keep the lines of steps <= start_step (a killed run may have logged past its checkpoint and
        may have died mid-line)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= start_step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])

    def image(self, tag: str, chw: np.ndarray, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, chw, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fixed_batches(data: DataConfig, batch_size: int, seed: int, n: int) -> list[dict]:
    """The first `n` batches of the data stream with `seed` (the run's seed + 1: not the training batches
    unless the source repeats them), read once: the eval loss tracks fitting on them, it is not a held-out
    metric unless the data source has a separate split."""
    loader = make_loader(data, batch_size=batch_size, seed=seed, start_batch=0, num_workers=0, rank=0, world_size=1)
    batches = [next(loader) for _ in range(n)]
    if hasattr(loader, "close"):
        loader.close()
    return batches


def write_videos(folder: Path, videos: list[np.ndarray], fps: int, metrics: Metrics, step: int) -> None:
    """Each video (f h w 3 uint8) as folder/NN.mp4 and as a strip of frames in tensorboard."""
    for i, video in enumerate(videos):
        path = folder / f"{i:02d}.mp4"
        try:
            export_to_video(video, path, fps=fps)
        except Exception as e:  # noqa: BLE001 - any writer failure falls back to a GIF
            log.warning("could not write %s (%s); writing a GIF", path, e)
            export_to_gif(video, path.with_suffix(".gif"), fps=fps)
        strip = np.concatenate(list(video), axis=1)  # h (f w) 3
        metrics.image(f"validation/{i:02d}", strip.transpose(2, 0, 1), step)
