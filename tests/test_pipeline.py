"""Pipelines: seed-for-seed parity with diffusers, the seed document's examples offline, memory options,
additions beyond diffusers, bad input."""

from __future__ import annotations

import contextlib
import io
import textwrap
import time

import numpy as np
import pytest
import torch

from checkpoints import install_in_hub_cache, make_diffusers_checkpoint
from modelscope_t2v import (
    DPMSolverMultistepScheduler,
    TextToVideoSDPipeline,
    VideoToVideoSDPipeline,
    export_to_video,
)
from modelscope_t2v.models import UNetConfig, VAEConfig

TOL = 2e-3  # the bound for frames in [0, 1]; measured figures are ~1e-5 (docs/parity.md)
KW = dict(num_frames=4, height=32, width=32, num_inference_steps=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_checkpoint(tmp_path_factory.mktemp("p") / "tiny")


@pytest.fixture(scope="module")
def pipes(folder):
    import diffusers

    ours = TextToVideoSDPipeline.from_pretrained(folder)
    ref = diffusers.TextToVideoSDPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _gen(seed):
    return torch.Generator().manual_seed(seed)


SWAPS = {  # sampler -> (scheduler class name, from_config overrides)
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("dpm++", 0.0), ("dpm++2m-karras", 0.0),
                                         ("euler", 0.0), ("euler-a", 0.0), ("unipc", 0.0)])
def test_text_to_video_matches_diffusers_seed_for_seed(pipes, sampler, eta, record_property):
    import diffusers

    import modelscope_t2v.schedulers as ours_schedulers

    ours, ref = pipes
    if sampler in SWAPS:  # swapped as in the seed example, on copies of the pipelines
        name, extra = SWAPS[sampler]
        ours = TextToVideoSDPipeline(**{**ours.components,
                                        "scheduler": getattr(ours_schedulers, name).from_config(ours.scheduler.config, **extra)})
        ref = diffusers.TextToVideoSDPipeline(
            **{**ref.components, "scheduler": getattr(diffusers, name).from_config(ref.scheduler.config, **extra)})
        for p in (ours, ref):
            p.set_progress_bar_config(disable=True)
    a = ours("a red circle moving left", negative_prompt="blurry", eta=eta, generator=_gen(3), **KW).frames
    b = ref("a red circle moving left", negative_prompt="blurry", eta=eta, generator=_gen(3), **KW).frames
    assert a.shape == b.shape == (1, 4, 32, 32, 3)
    diff = float(np.abs(a - b).max())
    record_property(f"t2v_{sampler}_eta{eta}", diff)
    assert diff <= TOL
    assert a.std() > 0.01  # a real video, not a constant


@pytest.fixture()
def fresh(folder):
    """Our pipeline with the stored scheduler (tests that swap schedulers use their own copy)."""
    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_video_to_video_matches_diffusers(folder, record_property):
    import diffusers
    from PIL import Image

    ours = VideoToVideoSDPipeline.from_pretrained(folder)
    ref = diffusers.VideoToVideoSDPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    video = [Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).resize((48, 40)) for _ in range(3)]
    a = ours("a cat", video=video, strength=0.6, num_inference_steps=5, generator=_gen(2)).frames
    b = ref("a cat", video=video, strength=0.6, num_inference_steps=5, generator=_gen(2)).frames
    diff = float(np.abs(a - b).max())
    record_property("v2v", diff)
    assert a.shape == (1, 3, 40, 48, 3) and diff <= TOL
    # The same through a text-to-video pipeline: passing video= is video-to-video whatever the folder names.
    t2v = TextToVideoSDPipeline.from_pretrained(folder)
    t2v.set_progress_bar_config(disable=True)
    c = t2v("a cat", video=video, strength=0.6, num_inference_steps=5, generator=_gen(2)).frames
    assert float(np.abs(a - c).max()) == 0.0


def test_video_to_video_honours_latents(fresh):
    v2v = VideoToVideoSDPipeline(**fresh.components)
    v2v.set_progress_bar_config(disable=True)
    video = np.random.default_rng(1).random((3, 32, 32, 3)).astype(np.float32)
    lat = torch.randn(1, 4, 3, 16, 16, generator=_gen(5))
    a = v2v("a cat", video=video, latents=lat, num_inference_steps=4, output_type="latent").frames
    b = v2v("a cat", video=video, latents=lat * 2, num_inference_steps=4, output_type="latent").frames
    c = v2v("a cat", video=video, latents=lat, num_inference_steps=4, output_type="latent").frames
    assert torch.equal(a, c) and not torch.allclose(a, b)


# --- the seed document's five examples, offline, with only the import line changed -----------------

SEED_EXAMPLES = [
    '''
    import torch
    from modelscope_t2v import DiffusionPipeline
    from modelscope_t2v import export_to_video

    pipe = DiffusionPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b", torch_dtype=torch.float16, variant="fp16")
    pipe = pipe.to("cpu")

    prompt = "Spiderman is surfing"
    video_frames = pipe(prompt).frames[0]
    video_path = export_to_video(video_frames)
    video_path
    ''',
    '''
    import torch
    from modelscope_t2v import DiffusionPipeline
    from modelscope_t2v import export_to_video

    pipe = DiffusionPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b", torch_dtype=torch.float16, variant="fp16")
    pipe.enable_model_cpu_offload()

    # memory optimization
    pipe.enable_vae_slicing()

    prompt = "Darth Vader surfing a wave"
    video_frames = pipe(prompt, num_frames=64).frames[0]
    video_path = export_to_video(video_frames)
    video_path
    ''',
    '''
    import torch
    from modelscope_t2v import DiffusionPipeline, DPMSolverMultistepScheduler
    from modelscope_t2v import export_to_video

    pipe = DiffusionPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b", torch_dtype=torch.float16, variant="fp16")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.enable_model_cpu_offload()

    prompt = "Spiderman is surfing"
    video_frames = pipe(prompt, num_inference_steps=25).frames[0]
    video_path = export_to_video(video_frames)
    video_path
    ''',
    '''
    import torch
    from modelscope_t2v import DiffusionPipeline, DPMSolverMultistepScheduler
    from modelscope_t2v import export_to_video
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained("cerspense/zeroscope_v2_576w", torch_dtype=torch.float16)
    pipe.enable_model_cpu_offload()

    # memory optimization
    pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)
    pipe.enable_vae_slicing()

    prompt = "Darth Vader surfing a wave"
    video_frames = pipe(prompt, num_frames=24).frames[0]
    video_path = export_to_video(video_frames)
    video_path
    ''',
    '''
    pipe = DiffusionPipeline.from_pretrained("cerspense/zeroscope_v2_XL", torch_dtype=torch.float16)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.enable_model_cpu_offload()

    # memory optimization
    pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)
    pipe.enable_vae_slicing()

    video = [Image.fromarray(frame).resize((1024, 576)) for frame in video_frames]

    video_frames = pipe(prompt, video=video, strength=0.6).frames[0]
    video_path = export_to_video(video_frames)
    video_path
    ''',
]

# Zeroscope XL works at 1024x576: its tiny stand-in has a x32 autoencoder without mid-block attention
# and spatial attention only at the lowest UNet level, so the example's full-size frames stay quick on a CPU.
XL_UNET = UNetConfig(block_channels=(4, 8), layers_per_block=1, attention_levels=(False, True),
                     cross_attention_dim=32, head_dim=4, norm_groups=4, sample_size=8)
XL_VAE = VAEConfig(block_channels=(4, 4, 4, 4, 4, 4), layers_per_block=1, norm_groups=4, mid_attention=False)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    staging = tmp_path_factory.mktemp("staging")
    ms = make_diffusers_checkpoint(staging / "ms")  # the released repo holds fp32 and fp16 files
    make_diffusers_checkpoint(ms, variant="fp16")
    install_in_hub_cache(root / "hub", "damo-vilab/text-to-video-ms-1.7b", ms)
    zs = make_diffusers_checkpoint(staging / "zs", seed=1, safe_serialization=False)  # zeroscope ships .bin
    install_in_hub_cache(root / "hub", "cerspense/zeroscope_v2_576w", zs)
    xl = make_diffusers_checkpoint(staging / "xl", seed=2, safe_serialization=False,
                                   pipeline="VideoToVideoSDPipeline", unet=XL_UNET, vae=XL_VAE)
    install_in_hub_cache(root / "hub", "cerspense/zeroscope_v2_XL", xl)
    return root


def test_seed_examples_run_offline_on_cpu(hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hub_cache))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace: dict = {}
    for i, code in enumerate(SEED_EXAMPLES):
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err):
            exec(compile(textwrap.dedent(code), f"<seed example {i + 1}>", "exec"), namespace)
        print(f"seed example {i + 1}: {time.perf_counter() - start:.1f}s")
        path = namespace["video_path"]
        assert path.endswith(".mp4") and (tmp_path / path.rsplit("/", 1)[-1]).stat().st_size > 0
        if "enable_model_cpu_offload" in code:  # no accelerator here: a notice, and the models stay put
            assert "no accelerator" in err.getvalue()
        frames = namespace["video_frames"]
        expected = {0: (16, 16, 16), 1: (64, 16, 16), 2: (16, 16, 16), 3: (24, 16, 16), 4: (24, 576, 1024)}[i]
        assert frames.shape == (*expected, 3), (i, frames.shape)
        assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert type(namespace["pipe"]).__name__ == "VideoToVideoSDPipeline"
    import av

    with av.open(namespace["video_path"]) as c:
        assert c.streams.video[0].average_rate == 8  # the model's fps, not diffusers' 10


# --- memory options leave outputs unchanged --------------------------------------------------------


def test_memory_options_leave_output_unchanged(fresh, capsys):
    base = fresh("a cat", generator=_gen(0), **KW).frames
    fresh.enable_vae_slicing()
    sliced = fresh("a cat", generator=_gen(0), **KW).frames
    fresh.disable_vae_slicing()
    chunked = fresh("a cat", generator=_gen(0), decode_chunk_size=1, **KW).frames
    fresh.unet.enable_forward_chunking(chunk_size=1, dim=1)
    ff = fresh("a cat", generator=_gen(0), **KW).frames
    fresh.unet.disable_forward_chunking()
    fresh.enable_model_cpu_offload()
    assert "no accelerator" in capsys.readouterr().err
    offloaded = fresh("a cat", generator=_gen(0), **KW).frames
    fresh.enable_vae_tiling()  # below the tile size (the VAE's sample_size) tiling does not kick in
    tiled = fresh("a cat", generator=_gen(0), **KW).frames
    # oneDNN picks batch-size dependent kernels: slicing differs at float round-off, not more
    for name, out in dict(sliced=sliced, chunked=chunked, forward_chunking=ff, offload=offloaded, tiled=tiled).items():
        assert float(np.abs(out - base).max()) <= 1e-5, name


# --- beyond diffusers ------------------------------------------------------------------------------


def test_outputs_batches_and_callbacks(fresh):
    pt = fresh(["a cat", "a dog"], num_videos_per_prompt=2, generator=_gen(0), output_type="pt", **KW).frames
    assert pt.shape == (4, 4, 3, 32, 32)
    assert not torch.allclose(pt[0], pt[1])  # two videos of one prompt differ
    pil = fresh("a cat", generator=_gen(0), output_type="pil", **KW).frames
    assert len(pil) == 1 and len(pil[0]) == 4 and pil[0][0].size == (32, 32)
    lat = fresh("a cat", generator=_gen(0), output_type="latent", **KW).frames
    assert lat.shape == (1, 4, 4, 16, 16)
    (frames,) = fresh("a cat", generator=_gen(0), return_dict=False, **KW)
    assert frames.shape == (1, 4, 32, 32, 3)

    legacy, seen = [], []
    out = fresh("a cat", generator=_gen(0), callback=lambda i, t, x: legacy.append(i), callback_steps=2, **KW).frames
    assert legacy == [0, 2, 4]

    def zero_at_end(pipe, i, t, kwargs):
        seen.append(int(t))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == KW["num_inference_steps"] - 1 else {}

    zeroed = fresh("a cat", generator=_gen(0), callback_on_step_end=zero_at_end, output_type="latent", **KW).frames
    assert torch.count_nonzero(zeroed) == 0 and len(seen) == KW["num_inference_steps"]
    assert float(np.abs(out - frames).max()) == 0.0  # callbacks that return nothing change nothing


def test_np_frames_convert_with_pil_and_export(fresh, tmp_path):
    from PIL import Image

    frames = fresh("a cat", generator=_gen(0), **KW).frames[0]
    assert frames.dtype == np.float32 and np.asarray(frames).dtype == np.float32
    img = Image.fromarray(frames[0])
    assert np.array_equal(np.asarray(img), (frames[0].clip(0, 1) * 255).round().astype(np.uint8))
    assert frames[0].tobytes() == np.asarray(frames[0]).tobytes()  # outside PIL: plain float bytes
    path = export_to_video(frames, tmp_path / "v.mp4")
    import av

    with av.open(path) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 8 and sum(1 for _ in c.decode(stream)) == 4


# --- bad input: a clear error naming the argument, before any heavy work ---------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompt="x", height=31), ValueError, "height"),
        (dict(prompt="x", width=10.0), ValueError, "width"),
        (dict(prompt="x", num_frames=0), ValueError, "num_frames"),
        (dict(prompt="x", num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(prompt=None), ValueError, "prompt"),
        (dict(prompt=123), TypeError, "prompt"),
        (dict(prompt=["a", "b"], negative_prompt=["n"]), ValueError, "negative_prompt"),
        (dict(prompt="x", output_type="gif"), ValueError, "output_type"),
        (dict(prompt="x", video=[], strength=0.5), ValueError, "video"),
        (dict(prompt="x", video=np.zeros((2, 32, 32, 3), np.float32), strength=1.5), ValueError, "strength"),
        (dict(prompt="x", latents=torch.zeros(1, 4, 2, 8, 8)), ValueError, "latents"),
        (dict(prompt="x", num_videos_per_prompt=0), ValueError, "num_videos_per_prompt"),
    ],
)
def test_bad_input_is_named_before_heavy_work(fresh, monkeypatch, kwargs, error, match):
    def boom(*a, **k):
        raise AssertionError("heavy work started before the argument was checked")

    monkeypatch.setattr(fresh.unet, "forward", boom)
    monkeypatch.setattr(fresh.text_encoder, "forward", boom)
    monkeypatch.setattr(fresh.vae, "encode", boom)
    with pytest.raises(error, match=match):
        fresh(**kwargs)


def test_prompts_are_tokenized_as_the_model_was_trained(pipes):
    import open_clip

    ours, ref = pipes
    prompt = "Cats djing. Laser Lights!"
    from modelscope_t2v.models.text import tokenize

    assert torch.equal(tokenize(ours.tokenizer, [prompt]), open_clip.tokenize([prompt]))
    a = ours.encode_prompt([prompt], do_classifier_free_guidance=False)[0]
    b = ref.encode_prompt([prompt], "cpu", 1, False)[0]
    assert not torch.allclose(a, b)  # diffusers pads the "!" away
    ours.tokenization = "diffusers"
    try:
        c = ours.encode_prompt([prompt], do_classifier_free_guidance=False)[0]
    finally:
        ours.tokenization = "open_clip"
    assert float((c - b).abs().max()) <= 1e-5


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_machinery_runs_and_leaves_output_unchanged(folder, mode):
    """No accelerator here, so the offload target is the CPU itself: this exercises the placement
    context and the per-leaf hooks (they must be removed afterwards), not the memory saving."""
    pipe = TextToVideoSDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    base = pipe("a cat", generator=_gen(0), **KW).frames
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cpu")
    out = pipe("a cat", generator=_gen(0), **KW).frames
    assert float(np.abs(out - base).max()) <= 1e-6
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pipe.unet.modules())
    assert hooks == 0 and pipe.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# A model's own default guidance scale (model_index.json's default_guidance_scale)


def _with_default_guidance(src, dst, value):
    import json
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["default_guidance_scale"] = value
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def _index(folder):
    import json

    return json.loads((folder / "model_index.json").read_text())


def test_default_guidance_scale_is_the_models_own(folder, tmp_path):
    """A call without guidance_scale uses the folder's default_guidance_scale (text-to-video and
    video-to-video); a folder without one keeps diffusers' 9 and 15; diffusers loads either folder."""
    import diffusers

    g_folder = _with_default_guidance(folder, tmp_path / "g", 2.5)
    pipe, plain = TextToVideoSDPipeline.from_pretrained(g_folder), TextToVideoSDPipeline.from_pretrained(folder)
    assert (pipe.default_guidance_scale, plain.default_guidance_scale) == (2.5, None)
    assert [pipe.resolve_guidance_scale(), pipe.resolve_guidance_scale(video_to_video=True), pipe.resolve_guidance_scale(7)
            ] == [2.5, 2.5, 7]
    assert [plain.resolve_guidance_scale(), plain.resolve_guidance_scale(video_to_video=True)] == [9.0, 15.0]
    for p in (pipe, plain):
        p.set_progress_bar_config(disable=True)

    def frames(p, **kw):
        return p("a cat", generator=_gen(0), **KW, **kw).frames

    assert np.array_equal(frames(pipe), frames(pipe, guidance_scale=2.5))
    assert not np.allclose(frames(pipe), frames(pipe, guidance_scale=9.0), atol=1e-3)
    assert np.array_equal(frames(plain), frames(plain, guidance_scale=9.0))
    video = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    v2v = VideoToVideoSDPipeline.from_pretrained(g_folder)
    v2v.set_progress_bar_config(disable=True)
    kw = dict(video=video, strength=0.8, num_inference_steps=5)
    assert np.array_equal(v2v("a cat", generator=_gen(1), **kw).frames,
                          v2v("a cat", guidance_scale=2.5, generator=_gen(1), **kw).frames)
    v2v.default_guidance_scale = None  # diffusers' video-to-video default
    assert np.array_equal(v2v("a cat", generator=_gen(1), **kw).frames,
                          v2v("a cat", guidance_scale=15.0, generator=_gen(1), **kw).frames)
    assert isinstance(diffusers.TextToVideoSDPipeline.from_pretrained(g_folder), diffusers.TextToVideoSDPipeline)


def test_default_guidance_scale_is_saved_and_converted(folder, tmp_path):
    from modelscope_t2v.formats import convert_checkpoint

    g_folder = _with_default_guidance(folder, tmp_path / "g", 2.5)
    TextToVideoSDPipeline.from_pretrained(g_folder).save_pretrained(tmp_path / "saved")
    assert _index(tmp_path / "saved")["default_guidance_scale"] == 2.5
    assert "default_guidance_scale" not in _index(TextToVideoSDPipeline.from_pretrained(folder).save_pretrained(
        tmp_path / "plain"))
    convert_checkpoint(g_folder, tmp_path / "carried", "diffusers", progress=False)
    assert _index(tmp_path / "carried")["default_guidance_scale"] == 2.5
    convert_checkpoint(g_folder, tmp_path / "set", "diffusers", progress=False, default_guidance_scale=4)
    assert _index(tmp_path / "set")["default_guidance_scale"] == 4.0
    assert TextToVideoSDPipeline.from_pretrained(tmp_path / "set").default_guidance_scale == 4.0
    with pytest.warns(UserWarning, match="default_guidance_scale=2.5 .* not carried"):
        convert_checkpoint(g_folder, tmp_path / "ms", "modelscope", progress=False)
    with pytest.raises(ValueError, match="no place for it"):
        convert_checkpoint(folder, tmp_path / "ms2", "modelscope", progress=False, default_guidance_scale=4)
    assert not (tmp_path / "ms2").exists()


@pytest.mark.parametrize("bad", ["9", -1.0, float("nan"), True, [9]])
def test_bad_default_guidance_scale_is_named_before_loading(folder, tmp_path, bad, monkeypatch):
    from modelscope_t2v.formats import folders as loading

    g_folder = _with_default_guidance(folder, tmp_path / "g", bad)
    monkeypatch.setattr(loading, "read_unet", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(ValueError, match=r"model_index.json: default_guidance_scale: a guidance scale is a finite"):
        TextToVideoSDPipeline.from_pretrained(g_folder)
