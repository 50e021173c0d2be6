"""The bundled shapes model: found offline by name, the default of sample.py, and held at its measured
level. The accuracy figures of docs/shapes_model.md come from evaluate.py; these checks are a regression
guard on the shipped weights at a fraction of that cost.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from modelscope_t2v import TextToVideoSDPipeline, schedulers
from modelscope_t2v.eval import shapes as se
from modelscope_t2v.formats import locate as bundled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # f h w 3 uint8


def test_the_bundled_model_is_small_safetensors_and_loads_offline_by_name():
    folder = bundled.bundled_path("shapes")
    assert folder is not None and bundled.bundled_models() == ["shapes", "shapes-turbo"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20_000_000  # "at most 20 MB in all"
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pth", ".pt", ".ckpt")]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    pipe = TextToVideoSDPipeline.from_pretrained("shapes")
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded as diffusers does: float32
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert sample.SampleConfig(prompt="x").model == sample.DEFAULT_MODEL == "shapes"
    # its own default guidance scale (chosen on other seeds than evaluate.py's; docs/shapes_model.md)
    assert pipe.default_guidance_scale == 2.0 and sample.SampleConfig(prompt="x").guidance is None


@pytest.fixture(scope="module")
def issue_command(tmp_path_factory):
    """The issue's command, as a user types it (default sampler settings: DDIM, 50 steps, the model's
    guidance 2)."""
    tmp_path = tmp_path_factory.mktemp("sample")
    out = tmp_path / "x.mp4"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "prompt=a red circle moving left", "seed=0",
                        f"out={out}", "progress=false"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return r, out


def test_sample_py_writes_the_default_models_video(issue_command):
    r, out = issue_command
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out)
    frames = read_frames(out)
    assert frames.shape == (16, 64, 64, 3)
    reading = se.read_video(frames)
    assert reading.found and reading.color == "red", reading


def test_sample_py_draws_a_red_circle_moving_left(issue_command):
    """The issue's command reads back as asked with the shipped weights: the centroid drifts (-0.65, +0.03)
    of the frame (left), the bounding box is 0.85 full (a circle's is 0.79). At these settings colour and
    direction read right in 56 of 56 pairs, shape in 53 (docs/shapes_model.md)."""
    r, out = issue_command
    reading = se.read_video(read_frames(out))
    assert (reading.color, reading.shape, reading.direction) == ("red", "circle", "left"), reading
    assert "guidance 2 (the model's default)" in r.stderr


def test_accuracy_on_a_sample_of_the_grammar():
    """A regression guard on the shipped weights, a little below their measured level. 14 pairs (seeds
    500-513, none of evaluate.py's), DPM++ 2M 15 steps, the model's guidance 2: measured colour 14/14, shape
    13/14 (a cyan circle read as a square, fill 0.91), direction 14/14, an object in every video; a
    random-weight model draws noise."""
    pipe = TextToVideoSDPipeline.from_pretrained("shapes")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = schedulers.make_sampler("dpm++2m", pipe.scheduler.config)
    pairs = se.prompt_seed_pairs(14, seed0=500)
    readings = [se.read_video(v) for v in se.generate(pipe, pairs, steps=15, batch_size=7)]
    assert all(r.found for r in readings)
    acc = se.accuracy([p for p, _ in pairs], readings)
    assert acc["direction"] >= 13 / 14 and acc["color"] >= 13 / 14 and acc["shape"] >= 11 / 14, acc


def test_the_bundled_lora_teaches_standing_still():
    """The shipped LoRA `shapes-still` (docs/lora.md), found offline by name: the same 7 still prompts (seeds
    500-506, none of evaluate.py's), DPM++ 2M 10 steps, read back as still with it and not without it.
    Measured: base 0/7, with the LoRA 7/7."""
    pipe = TextToVideoSDPipeline.from_pretrained("shapes")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = schedulers.make_sampler("dpm++2m", pipe.scheduler.config)
    pairs = se.prompt_seed_pairs(7, seed0=500, directions=(se.STILL,))

    def still() -> int:
        return sum(se.read_video(v).direction == "static" for v in se.generate(pipe, pairs, steps=10, batch_size=7))

    base = still()
    pipe.load_lora_weights("shapes-still")
    with_lora = still()
    print(f"standing still, 7 pairs: base {base}/7, with shapes-still {with_lora}/7")
    assert base <= 1 and with_lora >= 5, (base, with_lora)


def test_the_bundled_student_is_a_small_lora_that_loads_by_name_as_a_four_step_pipeline():
    """shapes-turbo (trainer=shapes_lcd; docs/lora.md): the LoRA and lora_run.json, found offline by name by
    every entry point, sampling with its LCM scheduler in 4 steps and one branch."""
    from modelscope_t2v import DiffusionPipeline, T2VTurboMSPipeline

    folder = bundled.bundled_path("shapes-turbo")
    assert sorted(p.name for p in folder.iterdir()) == ["lora_run.json", "pytorch_lora_weights.safetensors"]
    assert (folder / "pytorch_lora_weights.safetensors").stat().st_size <= 2_000_000
    for pipe in (TextToVideoSDPipeline.from_pretrained("shapes-turbo"), DiffusionPipeline.from_pretrained("shapes-turbo"),
                 T2VTurboMSPipeline.from_pretrained("shapes-turbo")):
        assert type(pipe) is T2VTurboMSPipeline and type(pipe.scheduler).__name__ == "LCMScheduler"
        assert pipe.default_num_inference_steps == 4 and pipe.default_guidance_scale == 2.0 and pipe.embedded_guidance
        assert pipe.unet.dtype == torch.float32


# measured on these 14 pairs: colour 14/14, shape 13/14, direction 14/14; the guard is a little below
STUDENT_GUARD = {"color": 13 / 14, "shape": 11 / 14, "direction": 13 / 14}


def test_the_bundled_student_obeys_its_prompts_in_four_steps():
    """A regression guard on the shipped student, a little below its measured level (docs/lora.md has the
    56-pair figures): 14 pairs (seeds 500-513, none of evaluate.py's), its defaults (4 LCM steps, one branch,
    guidance 2 embedded)."""
    pipe = TextToVideoSDPipeline.from_pretrained("shapes-turbo")
    pipe.set_progress_bar_config(disable=True)
    pairs = se.prompt_seed_pairs(14, seed0=500)
    readings = [se.read_video(v) for v in se.generate(pipe, pairs, steps=4, batch_size=7)]
    acc = se.accuracy([p for p, _ in pairs], readings)
    print(f"shapes-turbo, 4 steps, 14 pairs: {acc}")
    assert all(r.found for r in readings)
    assert acc["color"] >= STUDENT_GUARD["color"] and acc["shape"] >= STUDENT_GUARD["shape"] and \
        acc["direction"] >= STUDENT_GUARD["direction"], acc
