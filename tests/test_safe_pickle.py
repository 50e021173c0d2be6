"""Pickled checkpoints: the benign Lightning file loads, a file that carries code is refused unrun."""

import os
import sys
import types

import pytest
import torch

from modelscope_t2v.formats.safe_pickle import CheckpointReadError, UnsafeCheckpointError, safe_torch_load


def _save_with_fake_module(obj_factory, path, module="pytorch_lightning.callbacks.model_checkpoint"):
    """Pickle objects of a class that lives in a module which is then removed again, as a Lightning
    callback is for a reader without pytorch_lightning installed."""
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    mods = [types.ModuleType(n) for n in names]
    for parent, child, n in zip(mods, mods[1:], parts[1:]):
        setattr(parent, n, child)
    for n, m in zip(names, mods):
        sys.modules[n] = m
    try:
        obj = obj_factory(mods[-1])
        torch.save(obj, path)
    finally:
        for n in names:
            del sys.modules[n]


def _lightning_checkpoint(mod):
    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/ckpt/epoch=3.ckpt"
            self.best_model_score = torch.tensor(0.25)

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    return {
        "state_dict": {"first_stage_model.encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "model.x": torch.ones(2)},
        "epoch": 3,
        "global_step": 1200,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25)}, "instance": ModelCheckpoint()},
    }


def test_weights_only_file_loads(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save(sd, tmp_path / "w.bin")
    out = safe_torch_load(tmp_path / "w.bin")
    assert out.keys() == sd.keys() and torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"])


def test_lightning_checkpoint_with_callback_object_loads(tmp_path):
    path = tmp_path / "VQGAN_autoencoder.pth"
    _save_with_fake_module(_lightning_checkpoint, path)
    with pytest.raises(Exception):  # what plain weights_only loading does with this file
        torch.load(path, weights_only=True)
    out = safe_torch_load(path)
    assert out["state_dict"]["first_stage_model.encoder.conv_in.weight"].shape == (4, 3, 3, 3)
    assert out["global_step"] == 1200
    assert "ModelCheckpoint" in repr(out["callbacks"]["instance"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil_cls", [_Evil, _EvalEvil])
def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, evil_cls):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": evil_cls(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        safe_torch_load(path)
    assert not marker.exists()


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "text2video_pytorch_model.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="text2video_pytorch_model.pth"):
        safe_torch_load(path)


def test_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(CheckpointReadError, match="junk.bin"):
        safe_torch_load(path)


# ---------------------------------------------------------------------------------------------------
# Pickles that change the process without calling anything, or allocate without bound (issue 12).
# Written opcode by opcode; torch.load reads a non-zip file as a legacy pickle stream.

import pickle  # noqa: E402
import struct  # noqa: E402


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    return pickle.LONG1 + bytes([len(pickle.encode_long(n))]) + pickle.encode_long(n)


def _write(path, body: bytes):
    path.write_bytes(pickle.PROTO + b"\x02" + body + pickle.STOP)
    return path


def _slotstate(key: str, value: bytes) -> bytes:
    """(None, {key: value}): BUILD's slot state, which pickle applies with setattr."""
    return pickle.NONE + pickle.EMPTY_DICT + _str(key) + value + pickle.SETITEM + pickle.TUPLE2


def _clean_file_still_loads(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(sd, tmp_path / "clean.bin")
    out = safe_torch_load(tmp_path / "clean.bin")
    assert torch.equal(out["w"], sd["w"])


def test_state_on_a_global_function_is_refused_and_nothing_changes(tmp_path):
    before = torch._utils._rebuild_tensor_v2.__defaults__
    path = _write(tmp_path / "defaults.pth", _global("torch._utils", "_rebuild_tensor_v2")
                  + _slotstate("__defaults__", pickle.NONE + pickle.TUPLE1) + pickle.BUILD)
    with pytest.raises(UnsafeCheckpointError, match="defaults.pth.*did not create"):
        safe_torch_load(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before
    _clean_file_still_loads(tmp_path)


def test_state_on_a_global_class_is_refused_and_nothing_changes(tmp_path):
    path = _write(tmp_path / "cls.pth", _global("torch.nn.parameter", "Parameter")
                  + _slotstate("pwned", pickle.NEWTRUE) + pickle.BUILD)
    with pytest.raises(UnsafeCheckpointError, match="cls.pth.*did not create"):
        safe_torch_load(path)
    assert not hasattr(torch.nn.Parameter, "pwned")
    # the same on an unknown class (a placeholder type, not an instance of it)
    path = _write(tmp_path / "type.pth", _global("some.module", "Thing") + _slotstate("x", pickle.NEWTRUE) + pickle.BUILD)
    with pytest.raises(UnsafeCheckpointError, match="type.pth"):
        safe_torch_load(path)
    _clean_file_still_loads(tmp_path)


@pytest.mark.parametrize("what,body", [
    ("bytearray", _global("builtins", "bytearray") + _int(10**12) + pickle.TUPLE1 + pickle.REDUCE),
    ("numpy", _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
     + _int(10**12) + pickle.TUPLE1 + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE3 + pickle.REDUCE),
    ("tensor", _global("torch", "Tensor") + _int(10**11) + pickle.TUPLE1 + pickle.REDUCE),
    ("newobj", _global("torch", "Tensor") + _int(10**11) + pickle.TUPLE1 + pickle.NEWOBJ),
    ("hooks", _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pickle.NONE + _int(0)
     + _int(1) + pickle.TUPLE1 + _int(1) + pickle.TUPLE1 + pickle.NEWFALSE
     + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
     + _int(0) + _global("builtins", "bytearray") + pickle.SETITEM + pickle.TUPLE + pickle.REDUCE),
    ("length", pickle.BINUNICODE + struct.pack("<I", 2**31 - 1) + b"abc"),
])
def test_allocations_beyond_the_file_are_refused_before_they_happen(tmp_path, what, body):
    path = _write(tmp_path / f"{what}.pth", body)
    with pytest.raises(UnsafeCheckpointError, match=f"{what}.pth"):
        safe_torch_load(path)
