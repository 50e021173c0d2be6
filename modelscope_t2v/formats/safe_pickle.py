"""Reading pickled checkpoints (`.pth`, `.bin`) without ever running code they carry or letting them change
the process.

Why: the released ModelScope `VQGAN_autoencoder.pth` is a whole PyTorch-Lightning checkpoint with a
pickled `ModelCheckpoint` callback inside, which `torch.load(weights_only=True)` refuses, and a plain
`torch.load` would import and call whatever the file names. Every pickle is read by a restricted
unpickler, pickle's own Python implementation with its dangerous operations replaced (torch's
`weights_only=True` reader is not used: it performs any allocation an allowed constructor is asked for):

- tensors, containers and a short list of harmless value types are rebuilt as usual;
- any other class the file names becomes an inert placeholder: it may be *instantiated without being
  called* (pickle's NEWOBJ/BUILD, which is how plain objects such as a Lightning callback are stored),
  keeping its state as data;
- anything that would be *called* while loading (pickle's REDUCE on an unknown global, the way a
  malicious file runs `os.system` or `eval`) is refused;
- state is only ever set (BUILD) on instances the unpickler itself allocated (placeholders, arrays,
  tensors): a BUILD aimed at a class or a function it resolved as a global (which would rewrite a torch
  function's defaults or a class's attributes for the rest of the process) is refused;
- sizes are bounded by the file: an allowed constructor asked to allocate more than the file holds
  (`bytearray(10**12)`, a huge numpy shape, an uninitialised tensor) and a length field reaching past the
  end of the file are refused before anything is allocated.

Every refusal is an `UnsafeCheckpointError` naming the file; nothing of it ran.
"""

from __future__ import annotations

import collections
import io
import math
import pathlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

_np_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks to call code, to change objects it did not create, or to allocate more than it
    holds while loading; it was refused and nothing ran."""


class CheckpointReadError(ValueError):
    """A weights file could not be read (truncated, corrupt or not a checkpoint)."""


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


def _is_placeholder_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder)


def _safe_reconstructor(cls, base, state):
    """Protocol 0/1 object reconstruction (`copyreg._reconstructor`) restricted to placeholders."""
    if base is object and _is_placeholder_class(cls):
        return object.__new__(cls)
    raise UnsafeCheckpointError(f"the file reconstructs {cls!r} from {base!r}; refused")


# torch's tensor rebuild functions (what torch.save writes for tensors and parameters)
_REBUILD_NAMES = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
    "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass",
)
_REBUILDERS = {getattr(torch._utils, n) for n in _REBUILD_NAMES if hasattr(torch._utils, n)}


def _allowed() -> dict[tuple[str, str], object]:
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
    for name in _REBUILD_NAMES:
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    allowed[("torch", "Tensor")] = torch.Tensor
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    # numpy scalars and arrays sometimes ride along in training checkpoints
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _np_multiarray._reconstruct
        allowed[(mod, "scalar")] = _np_multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for name in ("dtype", "Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np.dtypes, name):
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return allowed


_ALLOWED: dict[tuple[str, str], object] | None = None
# instances whose state a pickle may set (BUILD): what the unpickler itself allocates
_BUILDABLE = (Placeholder, np.ndarray, np.dtype, torch.Tensor, collections.OrderedDict)


def _elements(shape) -> int:
    """The element count a shape argument asks for (a non-shape is refused by the callee itself)."""
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(n, int) for n in shape):
        return math.prod(shape)
    return 0


class _BoundedFile:
    """The pickle stream, refusing reads past its end (an oversize length field) before they allocate."""

    def __init__(self, file):
        self._file = file
        here = file.tell()
        self.size = file.seek(0, io.SEEK_END)
        file.seek(here)

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > 0 and n > self.size - self._file.tell():
            raise UnsafeCheckpointError(
                f"a length field asks for {n} bytes where {self.size - self._file.tell()} are left; refused")
        return self._file.read(n)

    def readline(self) -> bytes:
        return self._file.readline()

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's Python unpickler with find_class, REDUCE, NEWOBJ, BUILD and the protocol-0 INST/OBJ
    constructors restricted (see the module doc)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs):
        self._bounded = _BoundedFile(file)
        super().__init__(self._bounded, **kwargs)
        self._globals: set[int] = set()  # ids of the globals handed out: never given state

    def find_class(self, module: str, name: str):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        hit = _ALLOWED.get((module, name))
        obj = hit if hit is not None else _placeholder(module, name)
        self._globals.add(id(obj))
        return obj

    # -- calls ------------------------------------------------------------------------------------------

    def _call(self, func, args: tuple):
        """func(*args) for REDUCE / INST / OBJ, with the allocation and hook checks."""
        if _is_placeholder_class(func):
            raise UnsafeCheckpointError(f"the file calls {func.qualname} while loading; refused")
        limit = self._bounded.size
        if func is bytearray and args and isinstance(args[0], int) and args[0] > limit:
            raise UnsafeCheckpointError(f"the file asks bytearray for {args[0]} bytes, more than it holds; refused")
        if func is _np_multiarray._reconstruct and len(args) >= 3:
            itemsize = args[2].itemsize if isinstance(args[2], np.dtype) else 1
            if _elements(args[1]) * itemsize > limit:
                raise UnsafeCheckpointError(f"the file asks numpy for an array of shape {args[1]}; refused")
        if func in (torch.Tensor, torch.nn.Parameter) and not all(isinstance(a, (torch.Tensor, bool)) for a in args):
            raise UnsafeCheckpointError(f"the file allocates a tensor from {args!r:.80}; refused")
        if func is torch._tensor._rebuild_from_type_v2 and args and args[0] not in _REBUILDERS:
            raise UnsafeCheckpointError(f"the file rebuilds a tensor through {args[0]!r}; refused")
        if func in _REBUILDERS and any(isinstance(a, collections.OrderedDict) and a for a in args):
            # torch writes an empty OrderedDict of backward hooks; a full one would attach callables
            raise UnsafeCheckpointError("the file attaches backward hooks to a tensor; refused")
        return func(*args)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _instantiate(self, klass, args):  # INST / OBJ (protocol 0/1)
        if isinstance(klass, type) and not args and not hasattr(klass, "__getinitargs__"):
            self.append(self._new(klass, ()))
        else:
            self.append(self._call(klass, tuple(args)))

    # -- allocations without a call ---------------------------------------------------------------------

    @staticmethod
    def _new(cls, args: tuple, kwargs: dict | None = None):
        if _is_placeholder_class(cls):
            return cls.__new__(cls, *args, **(kwargs or {}))
        if cls is torch.nn.Parameter and all(isinstance(a, (torch.Tensor, bool)) for a in args) and not kwargs:
            return torch.nn.Parameter(*args)
        if cls in (collections.OrderedDict, set, frozenset) and not args and not kwargs:
            return cls.__new__(cls)
        raise UnsafeCheckpointError(f"the file allocates {cls!r} directly (NEWOBJ); refused")

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    # -- state ------------------------------------------------------------------------------------------

    def load_build(self):
        inst = self.stack[-2]  # below the state
        if id(inst) in self._globals or isinstance(inst, type) or not isinstance(inst, _BUILDABLE):
            raise UnsafeCheckpointError(
                f"the file sets the state of {inst!r:.80} ({type(inst).__name__}), which it did not create; refused")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


class _RestrictedPickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler class and `load`."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def safe_torch_load(path: str | Path) -> Any:
    """`torch.load` a pickled checkpoint onto the CPU without running code from it.

    Every pickle goes through the restricted unpickler (torch's own `weights_only=True` unpickler would
    allocate whatever an allowed constructor is asked for, e.g. `torch.Tensor(10**10)`). Raises
    UnsafeCheckpointError if the file calls code, sets state on objects it did not create or asks for more
    memory than it holds, and CheckpointReadError (a ValueError naming the file) if it is truncated or not
    a checkpoint.
    """
    path = Path(path)
    errors = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, IndexError, KeyError,
              TypeError, AttributeError, MemoryError, OverflowError)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule,
                          mmap=_is_zip(path))
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except errors as e:
        raise CheckpointReadError(f"{path}: unreadable or truncated checkpoint ({_first_line(e)})") from e


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
