"""Files in and out: tensors (safetensors, or pickles read without running code), JSON, and atomic writes.

Why one place: every read names the file it failed on, and every write goes through a temporary name and
`os.replace`, so a crash leaves the old file or the new one, never half of one (model folders, converted
checkpoints and training checkpoints alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .safe_pickle import CheckpointReadError, safe_torch_load


class LayoutError(ValueError):
    """A folder is not a checkpoint layout we know, or lacks (or holds a broken) file that its layout needs."""


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a (safely unpickled) .bin / .pth; CheckpointReadError names the file."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{path}: unreadable or truncated safetensors file ({e})") from e
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def read_json(path: Path, kind: type | None = dict) -> Any:
    """A JSON file holding a `kind` (None: anything); LayoutError naming it if it is missing, not UTF-8,
    not valid JSON (e.g. truncated), nested too deeply to parse, or not a `kind`."""
    if not path.is_file():
        raise LayoutError(f"missing file {path}")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LayoutError(f"{path}: JSON nested too deeply to read") from None
    if kind is not None and not isinstance(value, kind):
        raise LayoutError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                          f"got {type(value).__name__}")
    return value


def check_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Every tensor a floating-point weight holding only finite values (integer buffers named
    `position_ids` aside); CheckpointReadError naming the file and the tensor otherwise. NaN or inf in a
    weight gives NaN (black) videos with no word: it is refused here, where it is cheap."""
    for key, t in state.items():
        if not t.is_floating_point():
            if key.endswith("position_ids"):
                continue
            raise CheckpointReadError(f"{path}: tensor {key!r} has dtype {t.dtype}; a weight needs a floating-point dtype")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointReadError(f"{path}: tensor {key!r} holds NaN or inf values")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; moved onto `path` when the block ends without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})


def write_pickle(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
