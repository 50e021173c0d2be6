"""Loading every released layout: parity of the loaded modules with the reference implementations that
wrote (or read) the same files, hub ids through the Hugging Face cache, strict errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import (
    install_in_hub_cache,
    make_diffusers_checkpoint,
    make_modelscope_checkpoint,
    original_text_features,
)
from modelscope_t2v.formats import CheckpointReadError, ConversionError, LayoutError
from modelscope_t2v.pipelines import DiffusionPipeline, TextToVideoSDPipeline
from refs import max_diff

TOL = 1e-4
PROMPTS = ["a red circle moving left", "an astronaut riding a horse, 4k"]


def _unet_inputs(pipe, frames=3, size=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(2, cfg.in_channels, frames, *size, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([3, 811]), ctx


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return make_diffusers_checkpoint(tmp_path_factory.mktemp("ms17b") / "text-to-video-ms-1.7b")


@pytest.fixture(scope="module")
def diffusers_ref(diffusers_folder):
    from diffusers import TextToVideoSDPipeline as Ref

    return Ref.from_pretrained(diffusers_folder)


@pytest.fixture(scope="module")
def modelscope_folder(tmp_path_factory):
    return make_modelscope_checkpoint(tmp_path_factory.mktemp("ms") / "modelscope-damo-text-to-video-synthesis")


def _compare_with_diffusers(pipe, ref, report=None):
    x, t, ctx = _unet_inputs(pipe)
    with torch.no_grad():
        d_unet = max_diff(pipe.unet(x, t, encoder_hidden_states=ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample)
        img = torch.rand(2, 3, 16, 16) * 2 - 1
        ours_post, ref_post = pipe.vae.encode(img), ref.vae.encode(img).latent_dist
        d_mean = max_diff(ours_post.mean, ref_post.mean)
        z = torch.randn(2, pipe.vae.config.latent_channels, 8, 8)
        d_dec = max_diff(pipe.vae.decode(z), ref.vae.decode(z).sample)
        ours_text = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[0]
        ref_text = ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        d_text = max_diff(ours_text, ref_text)
    figures = dict(unet=d_unet, vae_encode=d_mean, vae_decode=d_dec, text=d_text)
    if report is not None:
        report.update(figures)
    assert max(figures.values()) <= TOL, figures
    return figures


def test_diffusers_layout_matches_diffusers(diffusers_folder, diffusers_ref, record_property):
    pipe = TextToVideoSDPipeline.from_pretrained(diffusers_folder)
    figures = _compare_with_diffusers(pipe, diffusers_ref)
    record_property("parity_diffusers_layout", figures)
    assert pipe.unet.dtype == torch.float32 and pipe.scheduler.config.steps_offset == 1


@pytest.mark.parametrize("variant,safe", [("fp16", True), (None, False)], ids=["fp16-safetensors", "bin"])
def test_variants_and_formats(tmp_path, variant, safe):
    folder = make_diffusers_checkpoint(tmp_path / "ckpt", variant=variant, safe_serialization=safe)
    if variant:  # the released repos hold both; the variant must be the one read
        files = {p.name for p in (folder / "unet").iterdir()}
        assert "diffusion_pytorch_model.fp16.safetensors" in files
    pipe = TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=torch.float16 if variant else None, variant=variant)
    want = torch.float16 if variant else torch.float32
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {want}
    from diffusers import TextToVideoSDPipeline as Ref

    ref = Ref.from_pretrained(folder, variant=variant, torch_dtype=torch.float32)
    pipe.to(torch.float32)
    _compare_with_diffusers(pipe, ref)


def test_modelscope_layout_matches_original_modules(modelscope_folder, record_property):
    folder, refs = modelscope_folder
    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    x, t, ctx = _unet_inputs(pipe)
    with torch.no_grad():
        d_unet = max_diff(pipe.unet(x, t, encoder_hidden_states=ctx), refs["unet"](x, t, ctx))
        img = torch.rand(2, 3, 16, 16) * 2 - 1
        d_mean = max_diff(pipe.vae.encode(img).mean, refs["vae"].encode(img).mean)
        z = torch.randn(2, 4, 8, 8)
        d_dec = max_diff(pipe.vae.decode(z), refs["vae"].decode(z))
        d_text = max_diff(
            pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[0],
            original_text_features(refs["clip"], PROMPTS),
        )
    figures = dict(unet=d_unet, vae_encode=d_mean, vae_decode=d_dec, text=d_text)
    record_property("parity_modelscope_layout", figures)
    assert max(figures.values()) <= TOL, figures
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one


def test_hub_id_from_offline_cache(tmp_path, monkeypatch, diffusers_folder, diffusers_ref):
    cache = tmp_path / "hf" / "hub"
    install_in_hub_cache(cache, "damo-vilab/text-to-video-ms-1.7b", diffusers_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    pipe = DiffusionPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b")
    assert isinstance(pipe, TextToVideoSDPipeline)
    _compare_with_diffusers(pipe, diffusers_ref)
    with pytest.raises(LayoutError, match="not in the Hugging Face cache"):
        TextToVideoSDPipeline.from_pretrained("damo-vilab/not-there")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tmp_path, diffusers_folder):
    folder = _copy(diffusers_folder, tmp_path / "c")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    victim = sorted(k for k in state if "temp_convs" in k)[0]
    del state[victim]
    save_file(state, path)
    with pytest.raises(ConversionError, match=victim.replace(".", r"\.")):
        TextToVideoSDPipeline.from_pretrained(folder)


def test_unexpected_and_misshapen_tensors_are_named(tmp_path, diffusers_folder):
    folder = _copy(diffusers_folder, tmp_path / "c")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["encoder.extra.weight"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(ConversionError, match=r"encoder\.extra\.weight"):
        TextToVideoSDPipeline.from_pretrained(folder)
    del state["encoder.extra.weight"]
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:-1]
    save_file(state, path)
    with pytest.raises(ConversionError, match=r"encoder\.conv_in\.weight.*shape"):
        TextToVideoSDPipeline.from_pretrained(folder)


def test_truncated_files_are_named(tmp_path, diffusers_folder, modelscope_folder):
    folder = _copy(diffusers_folder, tmp_path / "d")
    path = folder / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointReadError, match="model.safetensors"):
        TextToVideoSDPipeline.from_pretrained(folder)
    folder = _copy(modelscope_folder[0], tmp_path / "m")
    path = folder / "VQGAN_autoencoder.pth"
    path.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(CheckpointReadError, match="VQGAN_autoencoder.pth"):
        TextToVideoSDPipeline.from_pretrained(folder)


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(LayoutError, match="model_index.json"):
        TextToVideoSDPipeline.from_pretrained(tmp_path)
    with pytest.raises(LayoutError, match="neither a folder nor a hub id"):
        TextToVideoSDPipeline.from_pretrained(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(TypeError, match="torch_dtype"):
        TextToVideoSDPipeline.from_pretrained(tmp_path, torch_dtype="float16")


def test_model_index_names_the_pipeline(tmp_path, diffusers_folder):
    folder = _copy(diffusers_folder, tmp_path / "c")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "SomethingElsePipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="SomethingElsePipeline"):
        DiffusionPipeline.from_pretrained(folder)
