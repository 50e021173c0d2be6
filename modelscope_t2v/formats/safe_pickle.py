"""Reading pickled checkpoints (`.pth`, `.bin`) without ever running code they carry.

Why: the released ModelScope `VQGAN_autoencoder.pth` is a whole PyTorch-Lightning checkpoint with a
pickled `ModelCheckpoint` callback inside, which `torch.load(weights_only=True)` refuses, and a plain
`torch.load` would import and call whatever the file names. We first try `weights_only=True`; if the
file names globals outside PyTorch's allow-list, we read it again with a restricted unpickler:

- tensors, containers and a short list of harmless value types are rebuilt as usual;
- any other class the file names becomes an inert placeholder: it may be *instantiated without being
  called* (pickle's NEWOBJ/BUILD, which is how plain objects such as a Lightning callback are stored),
  keeping its state as data;
- anything that would be *called* while loading (pickle's REDUCE on an unknown global, the way a
  malicious file runs `os.system` or `eval`) raises `UnsafeCheckpointError` instead of running.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks to call code while loading; it was refused and nothing ran."""


class Placeholder:
    """Stands for a class named in a checkpoint that we do not import. It holds the pickled state as
    plain data and refuses to be called."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ: allocation only, no user code
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):  # reached only when the pickle *calls* the global (REDUCE)
        raise UnsafeCheckpointError(f"the file calls {self.qualname} while loading; refused")

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


def _placeholder(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": "placeholder"})


def _safe_reconstructor(cls, base, state):
    """Protocol 0/1 object reconstruction (`copyreg._reconstructor`) restricted to placeholders."""
    if base is object and isinstance(cls, type) and issubclass(cls, Placeholder):
        return object.__new__(cls)
    raise UnsafeCheckpointError(f"the file reconstructs {cls!r} from {base!r}; refused")


def _allowed() -> dict[tuple[str, str], object]:
    import pathlib

    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # a path as data: never touches the disk
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    }
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_sparse_tensor",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_wrapper_subclass",
    ):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    allowed[("torch", "Tensor")] = torch.Tensor
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    try:  # numpy scalars/arrays sometimes ride along in training checkpoints
        import numpy as np

        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = np.core.multiarray._reconstruct
            allowed[(mod, "scalar")] = np.core.multiarray.scalar
        allowed[("numpy", "ndarray")] = np.ndarray
        allowed[("numpy", "dtype")] = np.dtype
        for name in ("dtype", "Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(np.dtypes, name):
                allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    except Exception:  # pragma: no cover - numpy is a dependency, but stay loadable without it
        pass
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module: str, name: str):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed()
        hit = _RestrictedUnpickler._allowed.get((module, name))
        if hit is not None:
            return hit
        return _placeholder(module, name)


class _RestrictedPickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler class and `load`."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def safe_torch_load(path: str | Path) -> object:
    """`torch.load` a pickled checkpoint onto the CPU without running code from it.

    Raises UnsafeCheckpointError if the file calls code, and CheckpointReadError (a ValueError naming
    the file) if it is truncated or not a checkpoint.
    """
    path = Path(path)
    errors = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, IndexError, KeyError)
    mmap = _is_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Unsupported" not in str(e) and "global" not in str(e):
            raise CheckpointReadError(f"{path}: unreadable checkpoint ({_first_line(e)})") from e
    except errors as e:
        raise CheckpointReadError(f"{path}: unreadable or truncated checkpoint ({_first_line(e)})") from e
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule, mmap=mmap
        )
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except errors as e:
        raise CheckpointReadError(f"{path}: unreadable or truncated checkpoint ({_first_line(e)})") from e


class CheckpointReadError(ValueError):
    """A weights file could not be read (truncated, corrupt or not a checkpoint)."""


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
