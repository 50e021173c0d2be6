"""Scoring a set of videos with the metrics researchers cite: the shapes attributes, CLIPSIM and FVD.

A set is a folder: sample.py's (its manifest.jsonl, or the sidecars, give each video's prompt and seed) or
any model's videos with a captions file (a CSV with a video column: `video`, `video_id`, `videoid`, `file` or
`path`, and a caption column: `prompt`, `caption`, `sentence` or `name`, the first present; or a JSON object {video: caption}). A
video's results go to `<work>/per_video/<file name>.json` as soon as they are computed, each metric with
the settings that made it, so a rerun skips what is done and a changed setting recomputes only its
metric. Under torchrun each rank scores every WORLD_SIZE-th video; rank 0 then reads every record and
writes the summary. FVD's reference statistics are computed once from a folder of real videos and saved
as a file (eval.frechet), or read from one.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..formats.files import LayoutError, atomic_path, read_json, write_json
from ..jobs import PROMPT_COLUMNS as CAPTION_COLUMNS  # one order: a prompt file and its captions read alike
from . import frechet

METRICS = ("shapes", "clipsim", "fvd")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
VIDEO_COLUMNS = ("video", "video_id", "videoid", "file", "path")


@dataclass(frozen=True)
class Item:
    path: Path
    prompt: str | None = None
    seed: int | None = None


@dataclass
class MetricSettings:
    """What to measure and with which weights (the user's: nothing is downloaded for them)."""

    metrics: tuple[str, ...] = ("clipsim",)
    clip_model: str | None = None  # eval.clipsim spec: transformers folder / hub id, or open_clip:ARCH:PRETRAINED
    fvd_detector: str | None = None  # the I3D TorchScript file (i3d_torchscript.pt)
    fvd_preprocessing: str = "common"  # eval.fvd.PREPROCESSINGS
    fvd_frames: int = 16  # the first frames of each video that FVD sees
    fvd_reference: str | None = None  # statistics file: read if it exists, else written from fvd_real
    fvd_real: str | None = None  # folder of real videos for the reference statistics
    batch_size: int = 8
    device: str = "cpu"  # of the metric models (under torchrun, evaluate.py passes this rank's)

    def check(self) -> None:
        """ValueError naming the setting, before any model or video is loaded."""
        from .fvd import PREPROCESSINGS

        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"metrics: {bad or 'none'} not among {', '.join(METRICS)}")
        if "clipsim" in self.metrics and not self.clip_model:
            raise ValueError("metrics clipsim needs --clip-model (a transformers CLIP folder or hub id, or open_clip:ARCH:PRETRAINED)")
        if "fvd" in self.metrics:
            if not self.fvd_detector:
                raise ValueError("metrics fvd needs --fvd-detector FILE (the I3D TorchScript detector, i3d_torchscript.pt)")
            if not Path(self.fvd_detector).is_file():
                raise ValueError(f"--fvd-detector: no such file {self.fvd_detector!r}")
            if self.fvd_preprocessing not in PREPROCESSINGS:
                raise ValueError(f"--fvd-preprocessing must be one of {', '.join(PREPROCESSINGS)}, got {self.fvd_preprocessing!r}")
            if not self.fvd_reference:
                raise ValueError("metrics fvd needs --fvd-reference FILE (statistics of real videos; with --fvd-real "
                                 "FOLDER it is made from those videos if it does not exist)")
            if not Path(self.fvd_reference).is_file():
                if not self.fvd_real:
                    raise ValueError(f"--fvd-reference {self.fvd_reference!r} does not exist: give --fvd-real FOLDER to make it")
                if not Path(self.fvd_real).is_dir():
                    raise ValueError(f"--fvd-real: {self.fvd_real!r} is not a folder")
        if self.fvd_frames < 1 or self.batch_size < 1:
            raise ValueError("--fvd-frames and --batch-size must be >= 1")


# ---------------------------------------------------------------------------------------------------
# Which videos, with which captions.


def read_captions(path: str | Path) -> dict[str, str]:
    """{video name or stem: caption} from a CSV or JSON captions file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions: no such file {str(path)!r}")
    if path.suffix.lower() == ".json":
        data = read_json(path, kind=None)
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return dict(data)
        rows = data if isinstance(data, list) else (data.get("sentences") if isinstance(data, dict) else None)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"captions: {path} must be an object {{video: caption}} or a list of objects with a video and a caption")
    else:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    captions: dict[str, str] = {}
    for i, row in enumerate(rows):
        video = next((c for c in VIDEO_COLUMNS if row.get(c)), None)
        caption = next((c for c in CAPTION_COLUMNS if row.get(c)), None)
        if video is None or caption is None:
            raise ValueError(f"captions: {path}, row {i}: needs a video ({', '.join(VIDEO_COLUMNS)}) and a caption "
                             f"({', '.join(CAPTION_COLUMNS)}); it has {sorted(row)}")
        captions.setdefault(Path(str(row[video])).name, str(row[caption]).strip())  # the first caption of a video
    return captions


def list_videos(folder: str | Path, captions: str | Path | None = None) -> list[Item]:
    """The videos in `folder` in a stable order, with their prompts: from a captions file if given, else
    sample.py's manifest or sidecars, else none (FVD needs none)."""
    from ..jobs import MANIFEST

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"videos: {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"videos: no video files ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    if captions is not None:
        table = read_captions(captions)
        items = [Item(p, table.get(p.name, table.get(p.stem))) for p in files]
        missing = [i.path.name for i in items if i.prompt is None]
        if missing:
            raise ValueError(f"captions: {captions} has no caption for {len(missing)} video(s), e.g. {missing[0]!r}")
        return items
    records: dict[str, dict] = {}
    if (folder / MANIFEST).is_file():  # sample.py's run: exactly its videos, in its order
        for line in (folder / MANIFEST).read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["video"]] = record
        listed = [folder / name for name in records]
        missing = [p.name for p in listed if not p.is_file()]
        if missing:
            raise ValueError(f"videos: {folder / MANIFEST} lists {missing[0]!r}, which is not there")
        return [Item(p, records[p.name].get("prompt"), records[p.name].get("seed")) for p in listed]
    items = []
    for p in files:
        record = records.get(p.name)
        if record is None and p.with_suffix(".json").is_file():
            try:
                record = read_json(p.with_suffix(".json"))
            except LayoutError:
                record = None
        items.append(Item(p, record.get("prompt"), record.get("seed")) if record else Item(p))
    return items


# ---------------------------------------------------------------------------------------------------
# Scoring, video by video, resumably.


class Scorers:
    """The models the metrics need, loaded on first use."""

    def __init__(self, settings: MetricSettings):
        self.settings = settings
        self._clip = self._detector = None
        self._sha256 = None

    def load(self) -> None:
        """Load every model the metrics need now (bad files are named before any video is made or read)."""
        if "clipsim" in self.settings.metrics:
            self.clip  # noqa: B018
        if "fvd" in self.settings.metrics:
            self.detector  # noqa: B018

    @property
    def clip(self):
        from .clipsim import ClipScorer

        if self._clip is None:
            self._clip = ClipScorer.from_spec(self.settings.clip_model, self.settings.device)
        return self._clip

    @property
    def detector(self):
        from .fvd import Detector

        if self._detector is None:
            self._detector = Detector.from_file(self.settings.fvd_detector, self.settings.fvd_preprocessing)
            self._detector.fn.to(self.settings.device)
        return self._detector

    def fvd_settings(self) -> dict:
        from .fvd import RESOLUTION, covariance_ddof, file_sha256

        s = self.settings
        if self._sha256 is None:
            self._sha256 = file_sha256(Path(s.fvd_detector))
        return {"detector_sha256": self._sha256, "preprocessing": s.fvd_preprocessing, "num_frames": s.fvd_frames,
                "resolution": RESOLUTION, "ddof": covariance_ddof(s.fvd_preprocessing)}

    def metric_settings(self, metric: str, item: Item) -> dict:
        """What a stored result of `metric` for `item` depends on (a change recomputes it)."""
        if metric == "clipsim":
            return {"clip_model": self.settings.clip_model, "prompt": item.prompt}
        if metric == "fvd":
            return self.fvd_settings()
        return {"prompt": item.prompt}

    def compute(self, metric: str, items: Sequence[Item], videos: Sequence[np.ndarray]) -> list[dict]:
        """`metric`'s results for a batch of videos (FVD's detector runs on the batch at once)."""
        if metric == "fvd":
            from .fvd import video_features

            try:
                feats = video_features(self.detector, videos, self.settings.fvd_frames, batch_size=len(videos),
                                       device=self.settings.device)
            except ValueError as e:
                names = ", ".join(i.path.name for i in items[:3])
                raise ValueError(f"{e} (in the batch {names}{', ...' if len(items) > 3 else ''})") from None
            return [{"features": f.tolist()} for f in feats]
        if metric == "clipsim":
            sims = [self.clip.frame_similarities(v, i.prompt) for i, v in zip(items, videos)]
            return [{"value": float(x.mean()), "frames": [float(v) for v in x]} for x in sims]
        from . import shapes as se

        readings = [se.read_video(v) for v in videos]
        return [{"reading": asdict(r), "correct": {k: bool(v) for k, v in se.score(i.prompt, r).items()}}
                for i, r in zip(items, readings)]


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"video": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_prompts(items: Sequence[Item], metrics: Sequence[str]) -> None:
    need = [m for m in metrics if m in ("shapes", "clipsim")]
    missing = [i.path.name for i in items if not i.prompt]
    if need and missing:
        raise ValueError(f"metric {need[0]} needs each video's caption: {len(missing)} video(s) have none (e.g. "
                         f"{missing[0]!r}); give --captions FILE, or score sample.py's folders (their sidecars hold it)")
    if "shapes" in metrics:
        from ..data.shapes import parse_shapes_caption

        for i in items:
            parse_shapes_caption(i.prompt)  # ValueError naming the caption


def score_items(items: Sequence[Item], settings: MetricSettings, work: str | Path, *, rank: int = 0, world: int = 1,
                progress: bool = True, scorers: Scorers | None = None, folder_name: str = "per_video",
                feature_dim: int | None = None) -> Path:
    """Score this rank's share of `items` into `<work>/<folder_name>/`, `settings.batch_size` videos at a
    time; returns that folder."""
    _check_prompts(items, settings.metrics)
    scorers = scorers or Scorers(settings)
    out = Path(work) / folder_name
    out.mkdir(parents=True, exist_ok=True)
    mine = [item for i, item in enumerate(items) if i % world == rank]
    from tqdm.auto import tqdm

    pending = []  # (item, its record's path, file key, stored results, metrics to compute)
    for item in mine:
        path, key = out / f"{item.path.name}.json", _file_key(item.path)
        record = {}
        if path.is_file():
            try:
                record = read_json(path)
            except LayoutError:
                record = {}
        results = record.get("metrics", {}) if record.get("key") == key else {}  # another file of that name: afresh
        wanted = {m: scorers.metric_settings(m, item) for m in settings.metrics}
        todo = [m for m in settings.metrics if results.get(m, {}).get("settings") != wanted[m]]
        if todo:
            pending.append((item, path, key, results, todo, wanted))
    bar = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"scoring {folder_name}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(pending), settings.batch_size):
        batch = pending[start:start + settings.batch_size]
        only_fvd = tuple(settings.metrics) == ("fvd",)  # then only the frames FVD sees are decoded
        videos = [_read(item.path, settings.fvd_frames if only_fvd else None) for item, *_ in batch]
        for m in settings.metrics:
            rows = [i for i, (*_, todo, _) in enumerate(batch) if m in todo]
            if rows:
                for i, result in zip(rows, scorers.compute(m, [batch[i][0] for i in rows], [videos[i] for i in rows])):
                    batch[i][3][m] = {"settings": batch[i][5][m], **result}
                    if m == "fvd" and feature_dim is not None and len(result["features"]) != feature_dim:
                        raise ValueError(f"mismatched feature sizes: the detector gives {len(result['features'])}, "
                                         f"the reference statistics hold {feature_dim} (made by another detector?)")
        for (item, path, key, results, *_), frames in zip(batch, videos):  # each record as soon as its batch is done
            write_json(path, {"key": key, "prompt": item.prompt, "seed": item.seed, "num_frames": int(frames.shape[0]),
                              "size": [int(frames.shape[1]), int(frames.shape[2])], "metrics": results})
        bar.update(len(batch))
    bar.close()
    return out


def _read(path: Path, max_frames: int | None = None) -> np.ndarray:
    from ..data.decode import read_all_frames

    try:
        return read_all_frames(path, max_frames)
    except Exception as e:  # av.FFmpegError, OSError, VideoReadError: name the file
        raise ValueError(f"videos: cannot read {path} ({type(e).__name__}: {e})") from None


def read_records(items: Sequence[Item], folder: Path) -> list[dict]:
    records = []
    for item in items:
        path = folder / f"{item.path.name}.json"
        if not path.is_file():
            raise ValueError(f"results: {path} is missing (a rank did not finish)")
        records.append(read_json(path))
    return records


def reference_stats(settings: MetricSettings, scorers: Scorers, work: Path, *, rank: int = 0, world: int = 1,
                    progress: bool = True, barrier=None) -> frechet.FeatureStats:
    """The real videos' statistics: read from settings.fvd_reference, or made from settings.fvd_real and
    written there (features cached under <work>/real_features/). Refused if made another way."""
    fvd = scorers.fvd_settings()
    path = Path(settings.fvd_reference)
    if not path.is_file():
        real = list_videos(settings.fvd_real)
        if len(real) < 2:
            raise ValueError(f"--fvd-real: {len(real)} video(s) in {settings.fvd_real}; a covariance needs at least 2")
        only_fvd = MetricSettings(**{**asdict(settings), "metrics": ("fvd",)})
        folder = score_items(real, only_fvd, work, rank=rank, world=world, progress=progress, scorers=scorers,
                             folder_name="real_features")
        if barrier is not None:
            barrier()
        if rank == 0 and not path.is_file():
            features = [r["metrics"]["fvd"]["features"] for r in read_records(real, folder)]
            stats = frechet.feature_stats(np.asarray(features), meta={**fvd, "source": str(settings.fvd_real)},
                                          ddof=fvd["ddof"])
            frechet.save_stats(path, stats)
        if barrier is not None:
            barrier()
    stats = frechet.load_stats(path)
    frechet.check_comparable(fvd, stats.meta)  # before any generated video is scored
    return stats


def summarize(records: Sequence[dict], settings: MetricSettings, reference: frechet.FeatureStats | None,
              scorers: Scorers | None = None) -> dict:
    """The set's figures: mean (and standard deviation) CLIPSIM, shapes accuracy per attribute, FVD."""
    summary: dict = {"videos": len(records), "metrics": list(settings.metrics)}
    if "clipsim" in settings.metrics:
        values = np.asarray([r["metrics"]["clipsim"]["value"] for r in records])
        summary["clipsim"] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                              "clip_model": settings.clip_model}
    if "shapes" in settings.metrics:
        keys = records[0]["metrics"]["shapes"]["correct"].keys()
        summary["shapes"] = {k: float(np.mean([r["metrics"]["shapes"]["correct"][k] for r in records])) for k in keys}
    if "fvd" in settings.metrics:
        features = np.asarray([r["metrics"]["fvd"]["features"] for r in records])
        meta = (scorers or Scorers(settings)).fvd_settings()
        stats = frechet.feature_stats(features, meta=meta, ddof=meta["ddof"])
        frechet.check_comparable(stats.meta, reference.meta)
        summary["fvd"] = {"value": frechet.frechet_distance(stats, reference), "videos": stats.count,
                          "reference_videos": reference.count, "reference": str(settings.fvd_reference),
                          **{k: v for k, v in meta.items() if k != "detector_sha256"},
                          "detector": Path(settings.fvd_detector).name, "detector_sha256": meta["detector_sha256"]}
    return summary


def markdown(summaries: dict[str, dict]) -> str:
    """One row a set (e.g. a sampler setting): videos, CLIPSIM, shapes accuracy, FVD."""
    first = next(iter(summaries.values()))
    head, rule = ["set", "videos"], ["---", "---:"]
    if "clipsim" in first:
        head.append("CLIPSIM (mean ± sd)")
    if "shapes" in first:
        head += ["colour", "shape", "direction", "all three"]
    if "fvd" in first:
        head.append(f"FVD ({first['fvd']['num_frames']} frames, {first['fvd']['preprocessing']})")
    rule += ["---:"] * (len(head) - 2)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for name, s in summaries.items():
        row = [name, str(s["videos"])]
        if "clipsim" in s:
            row.append(f"{s['clipsim']['mean']:.4f} ± {s['clipsim']['std']:.4f}")
        if "shapes" in s:
            row += [f"{s['shapes'][k]:.1%}" for k in ("color", "shape", "direction", "all")]
        if "fvd" in s:
            row.append(f"{s['fvd']['value']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, summaries: dict[str, dict], records: dict[str, list[dict]]) -> list[Path]:
    """results.json (summaries and per-video records, FVD features left out), per_video.csv, results.md."""
    out_dir = Path(out_dir)
    slim = {name: [{**{k: v for k, v in r.items() if k != "metrics"},
                    "metrics": {m: {k: v for k, v in res.items() if k != "features"} for m, res in r["metrics"].items()}}
                   for r in rs] for name, rs in records.items()}
    write_json(out_dir / "results.json", {"summaries": summaries, "videos": slim})
    with atomic_path(out_dir / "per_video.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["set", "video", "prompt", "seed", "num_frames", "clipsim", "color", "shape", "direction"])
            for name, rs in slim.items():
                for r in rs:
                    clip = r["metrics"].get("clipsim", {}).get("value", "")
                    correct = r["metrics"].get("shapes", {}).get("correct", {})
                    w.writerow([name, r["key"]["video"], r["prompt"] or "", "" if r["seed"] is None else r["seed"],
                                r["num_frames"], clip, *(correct.get(k, "") for k in ("color", "shape", "direction"))])
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(markdown(summaries) + "\n")
    return [out_dir / "results.json", out_dir / "per_video.csv", out_dir / "results.md"]


def processes() -> tuple[int, int, object]:
    """(rank, world size, barrier or None): one process, or a torchrun job (jobs.processes' gloo group)."""
    from ..jobs import processes as ranks

    rank, world, _ = ranks("cpu")
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist

    return rank, world, dist.barrier


def check_reference(settings: MetricSettings, scorers: Scorers) -> None:
    """An existing reference statistics file that was made another way is refused now, before any work."""
    if "fvd" in settings.metrics and Path(settings.fvd_reference).is_file():
        frechet.check_comparable(scorers.fvd_settings(), frechet.load_stats(settings.fvd_reference).meta)


def evaluate(sets: dict[str, Sequence[Item]], settings: MetricSettings, work: str | Path, out_dir: str | Path | None = None,
             *, progress: bool = True, scorers: Scorers | None = None) -> dict[str, dict] | None:
    """Score each named set of videos; rank 0 returns {set: summary} and writes the results under `out_dir`
    (default `work`); other ranks return None."""
    settings.check()
    for items in sets.values():
        _check_prompts(items, settings.metrics)
    if "fvd" in settings.metrics:
        small = [name for name, items in sets.items() if len(items) < 2]
        if small:
            raise ValueError(f"FVD needs at least 2 videos a set (a covariance); {small[0]!r} has {len(sets[small[0]])}")
    work = Path(work)
    rank, world, barrier = processes()
    scorers = scorers or Scorers(settings)
    scorers.load()
    reference = reference_stats(settings, scorers, work, rank=rank, world=world, progress=progress, barrier=barrier) \
        if "fvd" in settings.metrics else None
    folders = {name: score_items(items, settings, work / name, rank=rank, world=world, progress=progress, scorers=scorers,
                                 feature_dim=reference.dim if reference is not None else None)
               for name, items in sets.items()}
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    records = {name: read_records(items, folders[name]) for name, items in sets.items()}
    summaries = {name: summarize(records[name], settings, reference, scorers) for name in sets}
    write_results(out_dir if out_dir is not None else work, summaries, records)
    return summaries
