"""sample.py: end to end through Hydra (subprocess) on tiny checkpoints written by diffusers, the
plain `generate(cfg)` path, the upscaling pass, and bad overrides / values refused before any load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from checkpoints import RELEASED_SCHEDULER, make_diffusers_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sample.py is a script at the repository root

import sample  # noqa: E402

TINY = dict(steps=2, num_frames=3, height=32, width=32, progress=False)


def run_sample(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")  # two pytest workers share 2 cores
    return subprocess.run(
        [sys.executable, str(REPO / "sample.py"), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def read_mp4(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(decoded frame count, fps, (width, height)) read back with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return len(frames), float(stream.average_rate), (frames[0].width, frames[0].height)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_diffusers_checkpoint(tmp_path_factory.mktemp("ckpt") / "text-to-video-tiny")


@pytest.fixture(scope="module")
def upscaler_ckpt(tmp_path_factory) -> Path:
    # as cerspense/zeroscope_v2_XL: other weights, model_index naming VideoToVideoSDPipeline
    return make_diffusers_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "upscaler-tiny", seed=1, pipeline="VideoToVideoSDPipeline"
    )


# ---------------------------------------------------------------------------------------------------
# Through Hydra, as a user runs it


def test_cli_writes_readable_mp4(ckpt, tmp_path):
    out = tmp_path / "videos" / "clip.mp4"
    r = run_sample(
        "prompt=a red circle, moving left!", f"model={ckpt}", "steps=2", "num_frames=3", "height=32", "width=32",
        "fps=6", "seed=1", "sampler=dpm++ 2M", f"out={out}", cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert read_mp4(out) == (3, 6.0, (32, 32))
    assert "denoising" in r.stderr  # the progress bar, on stderr
    # Hydra neither changed directory nor left anything behind (.hydra/, outputs/, *.log)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]


def test_cli_preset_default_output_path(tmp_path):
    r = run_sample("prompt=A cat, playing piano!", "model=tiny", "steps=1", "num_frames=2", "height=16", "width=16",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    path = Path(last)
    assert path.parent == Path("outputs") and path.name.endswith("-a-cat-playing-piano.mp4"), last
    assert read_mp4(tmp_path / path)[0] == 2
    assert "RANDOMLY INITIALISED" in r.stderr  # a preset says its weights are random
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("promt=x", "Key 'promt' not in 'SampleConfig'"),
        ("upscale.strenght=0.5", "Key 'strenght' not in 'UpscaleConfig'"),
    ],
)
def test_cli_rejects_typos_and_types(override, message, tmp_path):
    r = run_sample("prompt=x", override, cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert r.stdout.strip() == ""


def test_cli_rejects_bad_value_with_one_line(tmp_path):
    r = run_sample("prompt=x", "height=30", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: height must be a positive multiple of 8")
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text",
    ["an astronaut riding a horse, 4k", "it's a dog's life!", "a=b: [1,2] {k} ${x}", "back\\slash\\", "\\'"],
)
def test_free_text_prompts_need_no_hydra_quoting(text):
    """`prompt=a, b` is what users type; commas, quotes, `!` and `${` reach the config unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for key in ("prompt", "negative_prompt"):
        arg, = sample.quote_free_text([f"{key}={text}"])
        value = OverridesParser.create().parse_override(arg).value()
        assert OmegaConf.create({key: value})[key] == text
    assert sample.quote_free_text(["model=a,b", 'prompt="x","y"']) == ["model=a,b", 'prompt="x","y"']


def test_cli_requires_prompt(tmp_path):
    r = run_sample("steps=1", cwd=tmp_path)
    assert r.returncode != 0 and "prompt" in r.stderr


# ---------------------------------------------------------------------------------------------------
# generate(cfg) without Hydra


def test_generate_gif_and_upscale(ckpt, upscaler_ckpt, tmp_path):
    from PIL import Image

    out = tmp_path / "up.gif"
    path = sample.generate(dict(
        prompt="a red circle", model=str(ckpt), out=str(out), fps=4, **TINY,
        upscale=dict(model=str(upscaler_ckpt), width=48, height=40, strength=0.5, steps=4),
    ))
    assert path == out
    with Image.open(path) as im:
        assert (im.n_frames, im.size, im.info["duration"]) == (3, (48, 40), 250)


def test_upscale_pass_runs_video_to_video_on_resized_frames(ckpt, upscaler_ckpt, tmp_path, monkeypatch):
    """The second pass gets the first pass's frames resized to upscale.width x height, with its
    strength, steps and guidance; with the same model it reuses the loaded weights."""
    from modelscope_t2v import pipelines

    calls = []
    real = pipelines.VideoToVideoSDPipeline.__call__

    def spy(self, prompt, **kw):
        calls.append((self, kw))
        return real(self, prompt, **kw)

    monkeypatch.setattr(pipelines.VideoToVideoSDPipeline, "__call__", spy)
    sample.generate(sample.SampleConfig(
        prompt="a red circle", model=str(ckpt), out=str(tmp_path / "v.mp4"), **TINY,
        upscale=sample.UpscaleConfig(model=str(ckpt), width=40, height=24, strength=0.75, guidance=12.0),
    ))
    (pipe, kw), = calls
    assert kw["video"].shape == (3, 24, 40, 3) and 0 <= kw["video"].min() and kw["video"].max() <= 1
    assert (kw["strength"], kw["num_inference_steps"], kw["guidance_scale"]) == (0.75, 2, 12.0)
    assert read_mp4(tmp_path / "v.mp4") == (3, 8.0, (40, 24))


def test_generate_is_reproducible_and_seeded(ckpt, tmp_path, monkeypatch):
    """The seed drives a CPU generator handed to the pipeline: the frames the exporter receives are
    identical for the same seed and differ for another."""
    got = []
    monkeypatch.setattr("modelscope_t2v.video_io.export_to_video", lambda f, p, fps: got.append(f.copy()) or str(p))
    for seed in (3, 3, 4):
        sample.generate(dict(prompt="x", model=str(ckpt), seed=seed, out=str(tmp_path / "v.mp4"), **TINY))
    assert (got[0] == got[1]).all() and not (got[0] == got[2]).all()


@pytest.mark.parametrize("dtype,computes", [("bf16", torch.bfloat16), ("fp16", torch.float32), ("fp32", torch.float32)])
def test_generate_dtype_is_what_the_unet_computes_in_on_a_cpu(ckpt, tmp_path, monkeypatch, dtype, computes):
    """dtype=bf16 computes in bf16 on a CPU (bf16 units make it faster there); fp16 weights compute in fp32."""
    seen = []
    load = sample.load_pipeline

    def spy(*args):
        pipe = load(*args)
        pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).dtype))
        return pipe

    monkeypatch.setattr(sample, "load_pipeline", spy)
    sample.generate(dict(prompt="x", model=str(ckpt), dtype=dtype, device="cpu", out=str(tmp_path / "v.mp4"), **TINY))
    assert seen and set(seen) == {computes}
    assert read_mp4(tmp_path / "v.mp4")[0] == TINY["num_frames"]


# ---------------------------------------------------------------------------------------------------
# Samplers: names -> the same schedulers diffusers builds with from_config


@pytest.mark.parametrize(
    "name,spacing,overrides",
    [
        ("ddim", None, {}),
        ("DDIM", "trailing", {"timestep_spacing": "trailing"}),
        ("dpm++ 2M", None, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("dpm++ sde", "leading", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "timestep_spacing": "leading"}),
        ("dpm++3m", "linspace", {"algorithm_type": "dpmsolver++", "solver_order": 3, "timestep_spacing": "linspace"}),
    ],
)
def test_sampler_mapping_matches_diffusers(name, spacing, overrides):
    import diffusers

    from modelscope_t2v.schedulers import scheduler_from_config

    class Pipe:
        scheduler = scheduler_from_config(RELEASED_SCHEDULER)

    pipe = Pipe()
    sample.set_sampler(pipe, name, spacing)
    class_name = sample.SAMPLERS[sample.sampler_name(name)][0]
    ref = getattr(diffusers, class_name).from_config(diffusers.DDIMScheduler.from_config(RELEASED_SCHEDULER).config,
                                                     **overrides)
    assert type(pipe.scheduler).__name__ == class_name
    for key in ("timestep_spacing", "algorithm_type", "solver_order", "steps_offset", "beta_schedule"):
        assert pipe.scheduler.config.get(key) == ref.config.get(key), key
    pipe.scheduler.set_timesteps(25)
    ref.set_timesteps(25)
    assert torch.equal(pipe.scheduler.timesteps.long(), ref.timesteps.long())


# ---------------------------------------------------------------------------------------------------
# Values are checked before any model is loaded, and each error names its field


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(height=30), "height"),
        (dict(width=0), "width"),
        (dict(num_frames=0), "num_frames"),
        (dict(steps=0), "steps"),
        (dict(steps=1001), "steps"),
        (dict(sampler="heun"), "sampler"),
        (dict(spacing="uniform"), "spacing"),
        (dict(dtype="fp8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(out="clip.avi"), "out"),
        (dict(fps=0), "fps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(model="./no/such/folder"), "model"),
        (dict(prompt="  "), "prompt"),
        (dict(upscale=dict(model="tiny", strength=1.5)), "upscale.strength"),
        (dict(upscale=dict(model="tiny", width=1020)), "upscale.width"),
        (dict(upscale=dict(model="./nowhere")), "upscale.model"),
    ],
)
def test_bad_values_fail_before_loading(change, field, monkeypatch):
    from modelscope_t2v import pipelines

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    for cls in (pipelines.TextToVideoSDPipeline, pipelines.VideoToVideoSDPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_load))
        monkeypatch.setattr(cls, "from_preset", classmethod(no_load))
    cfg = {"prompt": "x", **change}
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        sample.generate(cfg)


def test_plain_config_rejects_unknown_keys_and_types():
    from omegaconf.errors import ConfigKeyError, ValidationError

    with pytest.raises(ConfigKeyError, match="promt"):
        sample.as_config(dict(promt="x"))
    with pytest.raises(ValidationError, match="steps"):
        sample.as_config(dict(prompt="x", steps="abc"))




def test_default_out_is_unique_and_slugged(tmp_path):
    first = sample.default_out("An astronaut, riding a horse!!", now=0, folder=tmp_path)
    first.write_bytes(b"")
    second = sample.default_out("An astronaut, riding a horse!!", now=0, folder=tmp_path)
    assert first.name.endswith("-an-astronaut-riding-a-horse.mp4")
    assert second != first and second.name.endswith("-an-astronaut-riding-a-horse-1.mp4")


def test_guidance_null_is_the_models_default(ckpt, tmp_path, monkeypatch):
    """guidance=null (the default): the model's default_guidance_scale where its model_index.json has
    one (the bundled model's), else 9; the upscale pass likewise, else 15."""
    import json
    import shutil

    from modelscope_t2v import pipelines

    own = tmp_path / "own"
    shutil.copytree(ckpt, own)
    index = json.loads((own / "model_index.json").read_text())
    (own / "model_index.json").write_text(json.dumps({**index, "default_guidance_scale": 3.0}))
    seen = []
    for cls in (pipelines.TextToVideoSDPipeline, pipelines.VideoToVideoSDPipeline):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, prompt, _real=real, _cls=cls, **kw: (
            seen.append((_cls.__name__, kw["guidance_scale"])) or _real(self, prompt, **kw)))
    up = dict(width=40, height=24, strength=0.5)
    for model in (own, ckpt):
        sample.generate(sample.SampleConfig(prompt="x", model=str(model), out=str(tmp_path / f"{model.name}.mp4"),
                                            **TINY, upscale=sample.UpscaleConfig(model=str(model), **up)))
    assert seen == [("TextToVideoSDPipeline", 3.0), ("VideoToVideoSDPipeline", 3.0),
                    ("TextToVideoSDPipeline", 9.0), ("VideoToVideoSDPipeline", 15.0)]


# ---------------------------------------------------------------------------------------------------
# Many videos: prompt files, seeds in the names, sidecars, a manifest, resume, no silent overwrite,
# torchrun shares, sweeps (issue 12)


def _capture(monkeypatch):
    """export_to_video writes a stub file and keeps the frames it was given, by path."""
    got = {}

    def export(frames, path, fps):
        got[Path(path).name] = frames.copy()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"stub")
        return str(path)

    monkeypatch.setattr("modelscope_t2v.video_io.export_to_video", export)
    return got


def test_prompt_file_gives_seeded_names_sidecars_and_a_manifest(ckpt, tmp_path, monkeypatch):
    import json

    from modelscope_t2v import pipelines

    got = _capture(monkeypatch)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na red circle,7\n\"a cat, playing\",\n")
    out = tmp_path / "videos"
    manifest = sample.generate(dict(prompts=str(prompts), model=str(ckpt), num_videos_per_prompt=2, seed=40,
                                    out_dir=str(out), batch_size=3, **TINY))
    names = ["0000-s7-a-red-circle.mp4", "0001-s8-a-red-circle.mp4", "0002-s40-a-cat-playing.mp4",
             "0003-s41-a-cat-playing.mp4"]
    assert manifest == out / "manifest.jsonl" and sorted(got) == names
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["video"] for r in rows] == names and [r["seed"] for r in rows] == [7, 8, 40, 41]
    side = json.loads((out / "0002-s40-a-cat-playing.json").read_text())
    assert side["prompt"] == "a cat, playing" and side["request"]["steps"] == 2
    assert side["resolved"]["height"] == 32 and "seed=40" in side["command"]
    # each video is the one its own command writes: the batch it ran in changes nothing
    one = sample.generate(dict(prompt="a cat, playing", seed=41, model=str(ckpt), out=str(tmp_path / "one.mp4"), **TINY))
    np.testing.assert_allclose(got[one.name], got["0003-s41-a-cat-playing.mp4"], atol=2e-6)

    # a rerun skips what is there (no model loads); another request into the same folder is refused
    def no_load(*a, **k):
        raise AssertionError("loaded a model for videos that are already there")

    monkeypatch.setattr(pipelines.TextToVideoSDPipeline, "from_pretrained", classmethod(no_load))
    sample.generate(dict(prompts=str(prompts), model=str(ckpt), num_videos_per_prompt=2, seed=40, out_dir=str(out),
                         batch_size=3, **TINY))
    with pytest.raises(ValueError, match="0000-s7-a-red-circle.mp4 exists .*overwrite=true"):
        sample.generate(dict(prompts=str(prompts), model=str(ckpt), num_videos_per_prompt=2, seed=40,
                             out_dir=str(out), **{**TINY, "steps": 3}))
    with pytest.raises(ValueError, match="clip.mp4 exists"):
        (tmp_path / "clip.mp4").write_bytes(b"mine")
        sample.generate(dict(prompt="x", model=str(ckpt), out=str(tmp_path / "clip.mp4"), **TINY))
    assert (tmp_path / "clip.mp4").read_bytes() == b"mine"


def test_a_crash_between_sidecar_and_video_leaves_what_a_rerun_makes(ckpt, tmp_path, monkeypatch):
    from modelscope_t2v import jobs

    got = _capture(monkeypatch)
    out = tmp_path / "v.mp4"

    def killed(frames, path, fps):
        assert jobs.sidecar_path(path).is_file()  # the sidecar is written first
        raise RuntimeError("killed while writing the video")

    real = sample._write
    monkeypatch.setattr(sample, "_write", killed)
    with pytest.raises(RuntimeError, match="killed"):
        sample.generate(dict(prompt="a cat", model=str(ckpt), out=str(out), **TINY))
    assert not out.exists()
    monkeypatch.setattr(sample, "_write", real)
    assert sample.generate(dict(prompt="a cat", model=str(ckpt), out=str(out), **TINY)) == out  # not refused
    assert out.read_bytes() == b"stub" and "v.mp4" in got


@pytest.mark.parametrize("change,match", [
    (dict(out="a-file/v.mp4"), "cannot be written"),  # a file where a folder must be
    (dict(out_dir="a-file/videos", num_videos_per_prompt=2), "cannot be written"),
    (dict(prompts="missing.txt", prompt=None), "prompts: no such file"),
    (dict(out="a.mp4", num_videos_per_prompt=2), "several .* go to out_dir"),
    (dict(prompt=None), "prompt= is required"),
])
def test_outputs_and_prompt_sources_are_checked_before_loading(change, match, monkeypatch, tmp_path):
    from modelscope_t2v import pipelines

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(pipelines.TextToVideoSDPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("loaded before checking")))
    with pytest.raises(ValueError, match=match):
        sample.generate({"prompt": "x", **change})


def test_cli_refuses_unknown_plus_keys_and_asks_for_a_prompt(tmp_path):
    r = run_sample("prompt=x", "+foo=1", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key(s) ['foo']" in r.stderr.strip().splitlines()[-1]
    r = run_sample(cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: prompt= is required")
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_cli_sweep_runs_one_video_per_prompt(ckpt, tmp_path):
    r = run_sample("-m", "prompt=a red circle,a blue square", f"model={ckpt}", "steps=1", "num_frames=2",
                   "height=32", "width=32", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    videos = sorted(p.name.split("-", 2)[2] for p in (tmp_path / "outputs").glob("*.mp4"))  # less the time stamp
    assert videos == ["s0-a-blue-square.mp4", "s0-a-red-circle.mp4"]


def test_torchrun_ranks_share_the_videos_and_write_one_manifest(ckpt, tmp_path):
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "sample.py"), f"prompts={prompts}", f"model={ckpt}", f"out_dir={out}", "steps=1",
           "num_frames=2", "height=32", "width=32", "progress=false", "device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2] and all((out / row["video"]).is_file() for row in rows)
    assert read_mp4(out / rows[2]["video"])[0] == 2
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "already there" in r.stderr  # a rerun resumes: nothing to do


def test_the_bundled_model_warns_outside_its_grammar_and_size(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="sample")
    sample.generate(dict(prompt="a cat playing piano", steps=1, num_frames=2, height=32, width=32, progress=False,
                         out=str(tmp_path / "v.mp4")))
    text = caplog.text
    assert "knows only prompts" in text and "'a cat playing piano'" in text
    assert "trained on 16 frames at 64x64; 2 frames at 32x32" in text
    caplog.clear()
    sample.generate(dict(prompt="a red circle moving left", steps=1, progress=False, out=str(tmp_path / "w.mp4")))
    assert "knows only" not in caplog.text and "trained on" not in caplog.text
