"""Many videos from one setting: prompt files, the list of videos to make, their names, sidecars, a rank's
share, what is already done, and the manifest. Used by sample.py (and by whatever else makes video sets).

Each video is one (prompt, negative prompt, seed): its noise comes from its own generator seeded with its
seed, so `python sample.py prompt=<prompt> seed=<seed>` (with the same settings) writes the same video. A
video's file name carries its index and seed (`0007-s12-a-red-circle.mp4`); beside it `<name>.json` holds
every setting that made it (the sidecar). A video whose sidecar holds the same request is done and skipped,
so a rerun resumes; a file that is there with another request is an error, never overwritten silently.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .formats.files import LayoutError, atomic_path, read_json, write_json

MANIFEST = "manifest.jsonl"
PROMPT_COLUMNS = ("prompt", "caption", "sentence", "name")  # the first one a prompt file has is read


@dataclass(frozen=True)
class Video:
    index: int  # position in the whole list (names, the manifest's order, a rank's share)
    prompt: str
    negative_prompt: str | None
    seed: int


def slug(text: str, limit: int = 48) -> str:
    """"An astronaut, riding!" -> "an-astronaut-riding" (file-name safe, at most `limit` characters)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "video"


def read_prompts(path: str | os.PathLike) -> list[tuple[str, int | None, str | None]]:
    """(prompt, seed or None, negative prompt or None) per row of a prompt file: a text file with one prompt a
    line (blank lines and lines starting with # skipped); a .csv with a `prompt` column (or, as caption sets
    are distributed, `caption`, `sentence` as in MSR-VTT's MSRVTT_JSFUSION_test.csv, or `name` as in WebVid's
    CSVs) and optional `seed` and `negative_prompt` columns; or a .json list of prompts, of such rows as
    objects, or an object with a `sentences` list (MSR-VTT's videodatainfo.json, `caption` each). Errors
    name the file and the line (or the entry)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: no such file {str(path)!r}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"prompts: {path} is not UTF-8 text (line {line})") from None
    rows: list[tuple[str, int | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"prompts: {path} has no prompt column ({', '.join(PROMPT_COLUMNS)}; header: {reader.fieldnames})")
        for row in reader:
            rows.append(_prompt_row(row, column, f"{path}, line {reader.line_num}"))
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {path} is not valid JSON ({e})") from None
        entries = data.get("sentences") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ValueError(f"prompts: {path} must hold a JSON list of prompts (or an object with a `sentences` list)")
        for i, entry in enumerate(entries):
            where = f"{path}, entry {i}"
            if isinstance(entry, str):
                entry = {"prompt": entry}
            column = next((c for c in PROMPT_COLUMNS if isinstance(entry, dict) and c in entry), None)
            if column is None:
                raise ValueError(f"prompts: {where}: expected a string or an object with one of {', '.join(PROMPT_COLUMNS)}")
            rows.append(_prompt_row({k: "" if v is None else str(v) for k, v in entry.items()}, column, where))
    else:
        rows = [(line.strip(), None, None) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"prompts: {path} holds no prompt")
    return rows


def _prompt_row(row: dict[str, str], column: str, where: str) -> tuple[str, int | None, str | None]:
    prompt = (row.get(column) or "").strip()
    if not prompt:
        raise ValueError(f"prompts: {where}: empty prompt")
    seed = (row.get("seed") or "").strip()
    if seed and not re.fullmatch(r"\d+", seed):
        raise ValueError(f"prompts: {where}: seed must be an integer >= 0, got {seed!r}")
    return prompt, int(seed) if seed else None, (row.get("negative_prompt") or "").strip() or None


def video_list(rows: Iterable[tuple[str, int | None, str | None]], seed: int, per_prompt: int,
               negative_prompt: str | None = None) -> list[Video]:
    """`per_prompt` videos per row, with seeds row_seed, row_seed + 1, ... (row_seed: the row's, else `seed`)."""
    videos: list[Video] = []
    for prompt, row_seed, negative in rows:
        base = seed if row_seed is None else row_seed
        for j in range(per_prompt):
            videos.append(Video(len(videos), prompt, negative if negative is not None else negative_prompt, base + j))
    return videos


def file_name(video: Video, suffix: str = ".mp4") -> str:
    return f"{video.index:04d}-s{video.seed}-{slug(video.prompt)}{suffix}"


def share(videos: Sequence[Video], rank: int, world_size: int) -> list[Video]:
    """This rank's videos: every world_size-th from `rank` on (balanced, and stable across reruns)."""
    return [v for v in videos if v.index % world_size == rank]


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def reproduce_command(settings: dict[str, Any]) -> str:
    """The sample.py command line that writes the same video (free text quoted for the shell)."""
    parts = ["python", "sample.py"]
    for key, value in settings.items():
        if isinstance(value, dict):
            parts += [f"{key}.{k}={_cli(v)}" for k, v in value.items() if v is not None]
        elif value is not None:
            parts.append(f"{key}={_cli(value)}")
    return " ".join(shlex.quote(p) for p in parts)


def _cli(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def write_sidecar(path: Path, video: Video, request: dict[str, Any], resolved: dict[str, Any]) -> dict:
    """`<video>.json`: the request (what was asked, the key to resume by), what it resolved to on the model
    (its default size and guidance, the sampler's spacing), and the command that makes the same video."""
    record = {"video": path.name, **asdict(video), "request": request, "resolved": resolved,
              "command": reproduce_command({**request, "prompt": video.prompt, "negative_prompt": video.negative_prompt,
                                            "seed": video.seed, "out": str(path)})}
    write_json(sidecar_path(path), record)
    return record


def is_done(path: Path, video: Video, request: dict[str, Any], *, overwrite: bool) -> bool:
    """Whether `path` already holds this video (its sidecar records the same video and request). A file that
    is there for something else is an error unless `overwrite`: nothing is replaced silently."""
    if not path.exists():
        return False
    if path.is_dir():
        raise ValueError(f"out: {path} is a folder")
    side = sidecar_path(path)
    if side.is_file():
        try:
            record = read_json(side)
        except LayoutError:
            record = {}
        same = record.get("request") == request and all(record.get(k) == v for k, v in asdict(video).items())
        if same and not overwrite:
            return True
    if overwrite:
        return False
    raise ValueError(f"out: {path} exists (from another request; pass overwrite=true to replace it)")


def resolve_device(device: str) -> torch.device:
    """auto (cuda if there is CUDA, else cpu) | cpu | cuda | cuda:N, checked against this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available on this machine (use device=cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def processes(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process, or a torchrun job (a gloo group, for the barriers); under
    torchrun device=auto takes cuda:LOCAL_RANK where there is CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on = torch.device("cuda", local) if device == "auto" and torch.cuda.is_available() else resolve_device(device)
    return dist.get_rank(), dist.get_world_size(), on


def check_writable(path: Path) -> None:
    """ValueError unless `path` (a file or folder to be made) could be written: its nearest existing folder
    must be a writable folder. Checked before any model loads; nothing is created."""
    probe = path.parent if path.suffix else path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"out: {path} cannot be written ({probe} is not a writable folder)")


def write_manifest(folder: Path, videos: Sequence[Video], suffix: str) -> Path:
    """folder/manifest.jsonl: every video's sidecar, in list order (what each rank wrote)."""
    lines = []
    for video in videos:
        side = sidecar_path(folder / file_name(video, suffix))
        if not side.is_file():
            raise ValueError(f"manifest: {side} is missing (a rank did not finish)")
        lines.append(json.dumps(read_json(side), sort_keys=True))
    path = folder / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return path
