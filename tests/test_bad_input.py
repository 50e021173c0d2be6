"""Bad input gets a one-line error naming the argument or the file, before heavy work; values that stop
being finite are named where they appear; video inputs in every form diffusers takes (issue 12)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_diffusers_checkpoint
from modelscope_t2v import TextToVideoSDPipeline, VideoToVideoSDPipeline
from modelscope_t2v.formats import CheckpointReadError, LayoutError
from modelscope_t2v.pipelines import NonFiniteError

KW = dict(num_frames=3, height=32, width=32, num_inference_steps=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_checkpoint(tmp_path_factory.mktemp("bad") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder):
    p = TextToVideoSDPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- arguments: checked before any model runs ---------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=0), "height"),
    (dict(width=0), "width"),
    (dict(num_frames=True), "num_frames"),
    (dict(num_frames=2.0), "num_frames"),
    (dict(eta=float("nan")), "eta"),
    (dict(eta=-0.5), "eta"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(latents=torch.full((1, 4, 3, 8, 8), float("nan"))), "latents"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 7)), "prompt_embeds must be \\(batch, tokens, 32\\)"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 77, 32), float("inf"))), "prompt_embeds holds NaN"),
    (dict(generator=[_gen(), _gen()]), "generator: a list of 2 generators for 1 videos"),
    (dict(num_frames=10**6, height=4096, width=4096), "alone take .* GiB"),
])
def test_bad_arguments_are_named_before_any_model_runs(pipe, monkeypatch, kwargs, match):
    def boom(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(pipe.unet, "forward", boom)
    monkeypatch.setattr(pipe.text_encoder, "forward", boom)
    args = {"prompt": "a cat", **KW, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**args)


@pytest.mark.parametrize("video,match", [
    (np.full((3, 32, 32, 3), 200.0, np.float32), "values up to 200"),  # 0..255 given as floats
    (np.full((3, 32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((3, 32, 32, 2), np.float32), "3 channels"),
    (np.zeros((3, 31, 32, 3), np.float32), "multiples of 2"),
    ("a.mp4", "video must be"),
    (np.zeros((3, 32, 32, 3), np.int64), "uint8 or floating point"),
])
def test_bad_videos_are_named(pipe, video, match):
    v2v = VideoToVideoSDPipeline(**pipe.components)
    with pytest.raises(ValueError, match=match):
        v2v("a cat", video=video, num_inference_steps=2)
    with pytest.raises(ValueError, match="video-to-video takes the size"):
        v2v("a cat", video=np.zeros((3, 32, 32, 3), np.float32), num_frames=3)


# --- values that stop being finite: named with the step and the component ------------------------------


def _poisoned(module, calls: int):
    """forward that returns NaN from call number `calls` on."""
    real, count = module.forward, [0]

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if count[0] > calls:
            out = out * float("nan") if isinstance(out, torch.Tensor) else out
        return out

    return forward


def test_non_finite_values_are_named_where_they_appear(pipe, monkeypatch):
    monkeypatch.setattr(pipe.unet, "forward", _poisoned(pipe.unet, 1))
    with pytest.raises(NonFiniteError, match=r"the UNet's output at step 1 \(t=\d+\) is not finite"):
        pipe("a cat", generator=_gen(), **KW)
    monkeypatch.undo()

    # a finite UNet output that the sampler's step takes past float32's range: named at the step that did it
    real_unet = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: torch.full_like(real_unet(*a, **k), 3e38))
    with pytest.raises(NonFiniteError, match=r"the latents after step 0 \(t=\d+\), from the DDIMScheduler"):
        pipe("a cat", generator=_gen(), **KW)
    monkeypatch.undo()

    real = pipe.text_encoder.forward

    def text(*args, **kwargs):
        out = real(*args, **kwargs)
        out.last_hidden_state.fill_(float("nan"))
        return out

    monkeypatch.setattr(pipe.text_encoder, "forward", text)
    with pytest.raises(NonFiniteError, match="text encoder's output"):
        pipe("a cat", generator=_gen(), **KW)
    monkeypatch.undo()

    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((z.shape[0], 3, 32, 32), float("nan")))
    with pytest.raises(NonFiniteError, match="autoencoder's decode"):
        pipe("a cat", generator=_gen(), **KW)
    monkeypatch.undo()
    pipe.check_finite = False  # the switch: no check, NaN frames come back
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((z.shape[0], 3, 32, 32), float("nan")))
    assert np.isnan(pipe("a cat", generator=_gen(), **KW).frames).all()
    pipe.check_finite = True


def test_half_precision_failures_say_what_to_change(pipe, monkeypatch):
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((z.shape[0], 3, 32, 32), float("inf"),
                                                                   dtype=torch.float16))
    with pytest.raises(NonFiniteError, match="torch_dtype=torch.float32"):
        pipe("a cat", generator=_gen(), output_type="latent", **KW).frames  # latents are fine
        pipe.decode_latents(torch.zeros(1, 4, 3, 8, 8))


# --- files: the weights, the configs -------------------------------------------------------------------


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _edit_tensor(path, key, fn):
    state = load_file(path)
    state[key] = fn(state[key])
    save_file(state, path)


@pytest.mark.parametrize("fn,match", [
    (lambda t: torch.full_like(t, float("nan")), "holds NaN or inf"),
    (lambda t: t.to(torch.int32), "dtype torch.int32; a weight needs a floating-point dtype"),
])
def test_weights_that_are_not_finite_floats_are_named(folder, tmp_path, fn, match):
    ckpt = _copy(folder, tmp_path)
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    key = sorted(load_file(weights))[3]
    _edit_tensor(weights, key, fn)
    with pytest.raises(CheckpointReadError, match=f"diffusion_pytorch_model.safetensors: tensor .*{match}"):
        TextToVideoSDPipeline.from_pretrained(ckpt)


@pytest.mark.parametrize("component,edit,match", [
    ("unet", lambda c: {**c, "norm_num_groups": 0}, "unet/config.json: UNetConfig.norm_groups must be an integer >= 1"),
    ("unet", lambda c: {**c, "layers_per_block": "2"}, "unet/config.json: UNetConfig.layers_per_block"),
    ("unet", lambda c: {**c, "block_out_channels": 64}, "unet/config.json: unet config: block_out_channels must be a list"),
    ("unet", lambda c: {**c, "block_out_channels": ["a", "b"]}, "unet/config.json: UNetConfig.block_channels"),
    ("vae", lambda c: {**c, "scaling_factor": 0}, "vae/config.json: VAEConfig.scaling_factor must be a finite number > 0"),
    ("text_encoder", lambda c: {**c, "hidden_sizes": 3}, "text_encoder/config.json: config: unknown CLIPTextConfig"),
])
def test_malformed_configs_are_named_with_file_and_key(folder, tmp_path, component, edit, match):
    ckpt = _copy(folder, tmp_path)
    path = ckpt / component / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(LayoutError, match=match):
        TextToVideoSDPipeline.from_pretrained(ckpt)


@pytest.mark.parametrize("content,match", [
    (b'{"_class_name": "TextToVideoSDPipeline", "x": "\xff\xfe"}', "model_index.json: not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "model_index.json: JSON nested too deeply"),
    (b'["a list"]', "model_index.json: expected a JSON object"),
    (b'{"_class_name": ', "model_index.json: not valid JSON"),
])
def test_unreadable_json_is_named(folder, tmp_path, content, match):
    ckpt = _copy(folder, tmp_path)
    (ckpt / "model_index.json").write_bytes(content)
    with pytest.raises(LayoutError, match=match):
        TextToVideoSDPipeline.from_pretrained(ckpt)


def test_a_hub_id_without_network_says_how_to_run_offline(monkeypatch, tmp_path):
    import huggingface_hub

    from modelscope_t2v.formats.locate import resolve

    def unreachable(*a, **k):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    with pytest.raises(LayoutError, match="hub cannot be reached .*HF_HUB_OFFLINE=1") as e:
        resolve("damo-vilab/text-to-video-ms-1.7b")
    assert "\n" not in str(e.value)


# --- video inputs in every form diffusers 0.42's VideoProcessor takes, with its value rules -------------

F, H, W = 3, 32, 32


def _forms():
    from PIL import Image

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 255, (F, H, W, 3), dtype=np.uint8)
    f01 = u8.astype(np.float32) / 255.0  # f h w c in [0, 1]
    t01 = torch.from_numpy(f01).permute(0, 3, 1, 2)  # f c h w
    pil = [Image.fromarray(x) for x in u8]
    return {
        "list of PIL images": pil,
        "list of numpy frames": list(f01),
        "list of torch frames": list(t01),
        "4-D numpy": f01,
        "4-D torch": t01,
        "5-D numpy": f01[None],
        "5-D torch": t01[None],
        "list of 4-D numpy": [f01],
        "list of 4-D torch": [t01],
        "list of PIL videos": [pil],
        "torch in [-1, 1]": t01 * 2 - 1,
    }


@pytest.mark.parametrize("form", list(_forms()))
def test_video_inputs_match_diffusers_in_every_form(folder, form, record_property):
    import diffusers

    video = _forms()[form]
    ours = VideoToVideoSDPipeline.from_pretrained(folder)
    ref = diffusers.VideoToVideoSDPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    a = ours("a cat", video=video, strength=0.6, num_inference_steps=4, generator=_gen(2)).frames
    b = ref("a cat", video=video, strength=0.6, num_inference_steps=4, generator=_gen(2)).frames
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    record_property(f"v2v {form}", diff)
    assert np.asarray(a).shape == (1, F, H, W, 3) and diff <= 2e-3


def test_uint8_frames_are_read_as_0_to_255(pipe):
    u8 = np.random.default_rng(0).integers(0, 255, (F, H, W, 3), dtype=np.uint8)
    a = pipe.preprocess_video(u8)
    b = pipe.preprocess_video(u8.astype(np.float32) / 255.0)
    assert a.shape == (1, 3, F, H, W) and torch.allclose(a, b) and float(a.min()) >= -1 and float(a.max()) <= 1


def test_per_video_generators_in_video_to_video(pipe):
    """A list of one generator per video: each video drawn from its own, the same as that video alone."""
    v2v = VideoToVideoSDPipeline(**pipe.components)
    video = np.random.default_rng(3).random((F, H, W, 3)).astype(np.float32)
    both = v2v(["a cat", "a dog"], video=[video, video], strength=0.6, num_inference_steps=3,
               generator=[_gen(1), _gen(2)], output_type="latent").frames
    alone = v2v("a dog", video=video, strength=0.6, num_inference_steps=3, generator=[_gen(2)],
                output_type="latent").frames
    assert torch.allclose(both[1:], alone, atol=1e-5) and not torch.allclose(both[0], both[1])
    # one video, two outputs: each output its own draw
    two = v2v("a cat", video=video, strength=0.6, num_inference_steps=3, num_videos_per_prompt=2,
              generator=_gen(1), output_type="latent").frames
    assert not torch.allclose(two[0], two[1])
