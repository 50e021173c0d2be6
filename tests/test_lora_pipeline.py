"""The pipelines' LoRA API (diffusers' names) and sample.py's lora= / lora_scale=, on a tiny random model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import install_in_hub_cache
from modelscope_t2v import TextToVideoSDPipeline, lora
from modelscope_t2v.formats.files import LayoutError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample  # noqa: E402

KW = dict(num_frames=3, height=32, width=32, num_inference_steps=2, output_type="np")


def _video(pipe, seed=0, **kw):
    return pipe("a red circle moving left", generator=torch.Generator().manual_seed(seed), **KW, **kw).frames[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny pipeline folder and a LoRA folder for it (diffusers' layout, written by save_lora_weights)."""
    root = tmp_path_factory.mktemp("lora")
    pipe = TextToVideoSDPipeline.from_preset("tiny", seed=0)
    pipe.save_pretrained(root / "model")
    lora.add_adapter(pipe.unet, "trained", lora.LoraSpec(rank=4, alpha=8, target="all"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.adapter_parameters(pipe.unet, "trained").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pipe.save_lora_weights(root / "style")
    return root / "model", root / "style"


def _pipe(folder):
    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_weigh_scale_fuse_unload(model, tmp_path):
    folder, style = model
    pipe = _pipe(folder)
    base = _video(pipe)
    assert pipe.load_lora_weights(style) == "default_0"
    assert pipe.get_list_adapters() == {"unet": ["default_0"]} and pipe.get_active_adapters() == ["default_0"]
    adapted = _video(pipe)
    assert np.abs(adapted - base).max() > 1e-2
    assert np.array_equal(_video(pipe, cross_attention_kwargs={"scale": 0.0}), base)  # bit for bit
    half = _video(pipe, cross_attention_kwargs={"scale": 0.5})
    assert np.array_equal(_video(pipe), adapted)  # the per-call scale does not stay
    pipe.set_adapters("default_0", 0.5)
    assert np.array_equal(_video(pipe), half)
    pipe.set_adapters(["default_0"])
    pipe.disable_lora()
    assert np.array_equal(_video(pipe), base)
    pipe.enable_lora()
    assert np.array_equal(_video(pipe), adapted)
    with pytest.raises(ValueError, match="not fused"):
        pipe.save_pretrained(tmp_path / "unsaved")
    assert not (tmp_path / "unsaved" / "unet").exists()
    pipe.fuse_lora()
    fused = _video(pipe)
    assert np.abs(fused - adapted).max() <= 1e-4
    pipe.unfuse_lora()
    assert np.abs(_video(pipe) - adapted).max() <= 1e-4
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    pipe.save_pretrained(tmp_path / "fused")  # the adapted model as a plain checkpoint
    assert np.abs(_video(_pipe(tmp_path / "fused")) - half).max() <= 1e-4


def test_sources_a_hub_id_a_state_dict_and_weight_name(model, tmp_path, monkeypatch):
    folder, style = model
    pipe = _pipe(folder)
    adapted_file = style / "pytorch_lora_weights.safetensors"
    install_in_hub_cache(tmp_path / "hub", "someone/shapes-style", style)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe.load_lora_weights("someone/shapes-style", adapter_name="hub")
    with pytest.raises(LayoutError, match="HF_HUB_OFFLINE"):
        pipe.load_lora_weights("someone/missing")
    from safetensors.torch import load_file

    pipe.load_lora_weights(load_file(adapted_file), adapter_name="dict")
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (several / name).write_bytes(adapted_file.read_bytes())
    with pytest.raises(LayoutError, match="weight_name"):
        pipe.load_lora_weights(several)
    pipe.load_lora_weights(several, weight_name="b.safetensors", adapter_name="b")
    assert pipe.get_list_adapters()["unet"] == ["hub", "dict", "b"]
    assert pipe.get_active_adapters() == ["hub", "dict", "b"]  # each new one joins the active ones
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(style, adapter_name="hub")
    pipe.delete_adapters(["dict", "b"])
    one = _pipe(folder)
    one.load_lora_weights(style)
    assert np.array_equal(_video(pipe), _video(one))


def test_sample_py_lora(model, tmp_path):
    folder, style = model
    common = dict(model=str(folder), prompt="a red circle moving left", steps=2, num_frames=3, height=32, width=32,
                  progress=False)
    base = sample.generate({**common, "out": str(tmp_path / "base.mp4")})
    zero = sample.generate({**common, "out": str(tmp_path / "zero.mp4"), "lora": str(style), "lora_scale": 0.0})
    full = sample.generate({**common, "out": str(tmp_path / "full.mp4"), "lora": [str(style), str(style)],
                            "lora_scale": [0.5, 0.5]})
    import av

    def frames(p):
        with av.open(str(p)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])

    assert np.array_equal(frames(base), frames(zero))
    assert not np.array_equal(frames(base), frames(full))
    import json

    sidecar = json.loads(full.with_suffix(".json").read_text())
    assert sidecar["request"]["lora"] == [str(style), str(style)] and sidecar["request"]["lora_scale"] == [0.5, 0.5]
    for bad, match in (({"lora": str(tmp_path / "nope.safetensors")}, "no such file"),
                       ({"lora": [str(style)], "lora_scale": [1.0, 2.0]}, "2 weights for 1"),
                       ({"lora": str(style), "lora_scale": "high"}, "lora_scale")):
        with pytest.raises(ValueError, match=match):
            sample.generate({**common, "out": str(tmp_path / "x.mp4"), **bad})


def test_convert_weights_writes_any_lora_in_diffusers_layout(model, tmp_path):
    import subprocess

    folder, style = model
    from modelscope_t2v.formats.lora_layout import read_lora
    from modelscope_t2v.models import UNET_PRESETS

    # a cloneofsimo list of the same updates, as a .pt: the converter reads it (the model's config says the order)
    weights, _ = read_lora(style / "pytorch_lora_weights.safetensors", UNET_PRESETS["tiny"])
    from modelscope_t2v.formats.lora_layout import diffusers_module_order, module_table

    table = module_table(UNET_PRESETS["tiny"], "diffusers")
    order = diffusers_module_order(UNET_PRESETS["tiny"])
    tensors = []
    for name in order:  # the file adapts every module: rank-4 updates where the LoRA has them, 0 elsewhere
        e = weights[table[name]]
        tensors += [e.up * (e.alpha / e.rank), e.down]
    torch.save(tensors, tmp_path / "clone.pt")
    out = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(tmp_path / "clone.pt"),
                          str(tmp_path / "converted"), "--lora-for", str(folder), "--dtype", "fp16"],
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    written = tmp_path / "converted" / "pytorch_lora_weights.safetensors"
    assert out.stdout.strip() == str(written)
    a, b = _pipe(folder), _pipe(folder)
    a.load_lora_weights(style)
    b.load_lora_weights(written)
    assert np.abs(_video(a) - _video(b)).max() <= 2e-3  # the fp16 copy
    again = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(tmp_path / "clone.pt"),
                            str(tmp_path / "converted"), "--lora-for", str(folder)], capture_output=True, text=True,
                           env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert again.returncode == 2 and "--overwrite" in again.stderr
