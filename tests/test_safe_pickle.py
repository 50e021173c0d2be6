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
