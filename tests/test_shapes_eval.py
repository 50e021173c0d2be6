"""The evaluation's readers (colour, shape, direction) on rendered clips, where the truth is known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelscope_t2v.eval import shapes as se
from modelscope_t2v.data import DIRECTIONS, parse_shapes_caption, render_shape_clip

ROOT = Path(__file__).resolve().parents[1]


def frames_of(clip) -> np.ndarray:
    return ((clip.permute(1, 2, 3, 0).numpy() + 1) / 2).astype(np.float32)  # f h w 3 in [0, 1]


def test_every_rendered_clip_of_the_grammar_reads_back_correctly():
    prompts = se.grammar_prompts()
    assert len(prompts) == 84 and len(set(prompts)) == 84
    for i, prompt in enumerate(prompts):
        color, shape, direction = parse_shapes_caption(prompt)
        for seed in (i, 1000 + i):
            reading = se.read_video(frames_of(render_shape_clip(color, shape, direction, seed=seed)))
            assert se.score(prompt, reading)["all"], (prompt, seed, reading)
            as_uint8 = se.read_video((frames_of(render_shape_clip(color, shape, direction, seed=seed)) * 255).round().astype(np.uint8))
            assert (as_uint8.color, as_uint8.shape, as_uint8.direction) == (reading.color, reading.shape, reading.direction)


def test_standing_still_renders_reads_back_and_is_drawn_only_when_asked():
    """The LoRA's concept (docs/lora.md): "a {color} {shape} standing still", an object that does not move."""
    from modelscope_t2v.data import ShapesDataset, shapes_caption

    prompts = se.grammar_prompts((se.STILL,))
    assert len(prompts) == 21 and prompts[0] == "a red circle standing still"
    for i, prompt in enumerate(prompts):
        assert parse_shapes_caption(prompt)[2] == se.STILL and shapes_caption(*parse_shapes_caption(prompt)) == prompt
        reading = se.read_video(frames_of(render_shape_clip(*parse_shapes_caption(prompt), seed=i)))
        assert reading.direction == "static" and se.score(prompt, reading)["all"], (prompt, reading)
    moving = se.read_video(frames_of(render_shape_clip("red", "circle", "left", seed=0)))
    assert not se.score("a red circle standing still", moving)["direction"]
    assert all(parse_shapes_caption(ShapesDataset(200)[i]["caption"])[2] in DIRECTIONS for i in range(200))
    mixed = [ShapesDataset(200, directions=("still", "left"))[i]["caption"] for i in range(200)]
    assert 60 < sum(c.endswith("standing still") for c in mixed) < 140
    assert [ShapesDataset(20, seed=3)[i]["caption"] for i in range(20)] == \
        [ShapesDataset(20, seed=3, directions=DIRECTIONS)[i]["caption"] for i in range(20)]  # the default is unchanged
    with pytest.raises(ValueError, match="direction"):
        ShapesDataset(10, directions=("sideways",))
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_shapes_caption("a red circle moving still")


def test_fills_are_far_from_the_decision_bounds():
    fills = {"circle": [], "square": [], "triangle": []}
    for seed in range(40):
        for shape in fills:
            fills[shape].append(se.read_video(frames_of(render_shape_clip("white", shape, "up", seed=seed))).fill)
    lo, hi = se.SHAPE_FILL_BOUNDS
    assert max(fills["triangle"]) < lo - 0.05 and lo + 0.05 < min(fills["circle"])
    assert max(fills["circle"]) < hi - 0.03 and hi + 0.05 < min(fills["square"])


def test_static_blank_and_wrong_videos():
    still = se.read_video(frames_of(render_shape_clip("red", "square", None, seed=0)))
    assert still.found and still.direction == "static"
    assert not se.score("a red square moving up", still)["direction"]
    blank = se.read_video(np.zeros((16, 64, 64, 3), np.float32))
    assert not blank.found
    assert se.score("a red square moving up", blank) == {"color": False, "shape": False, "direction": False, "all": False}
    moving = se.read_video(frames_of(render_shape_clip("blue", "triangle", "down", seed=1)))
    assert se.score("a green triangle moving up", moving) == {"color": False, "shape": True, "direction": False, "all": False}
    with pytest.raises(ValueError, match=r"\(f, h, w, 3\)"):
        se.read_video(np.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="not a shapes caption"):
        se.score("an astronaut riding a horse", moving)


def test_pairs_cover_the_grammar_evenly_and_accuracy_averages():
    pairs = se.prompt_seed_pairs(84)
    assert sorted(p for p, _ in pairs) == sorted(se.grammar_prompts())
    assert [s for _, s in pairs] == list(range(84))
    first = [parse_shapes_caption(p)[2] for p, _ in se.prompt_seed_pairs(20)]
    assert all(first.count(d) >= 2 for d in DIRECTIONS)
    with pytest.raises(ValueError, match=">= 1"):
        se.prompt_seed_pairs(0)
    readings = [se.read_video(frames_of(render_shape_clip("red", "circle", "left", seed=s))) for s in range(2)]
    acc = se.accuracy(["a red circle moving left", "a red square moving left"], readings)
    assert acc == {"color": 1.0, "shape": 0.5, "direction": 1.0, "all": 0.5}


def test_contact_sheet_layout():
    videos = [frames_of(render_shape_clip("cyan", "circle", "right", seed=s)) for s in range(3)]
    sheet = se.contact_sheet(videos, frames=4, pad=2)
    assert sheet.shape == (3 * 66 + 2, 4 * 66 + 2, 3) and sheet.dtype == np.uint8
    assert np.array_equal(sheet[2:66, 2:66], (videos[0][0] * 255).round().astype(np.uint8))


def test_evaluate_script_rejects_bad_arguments_before_loading_anything():
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=ROOT, capture_output=True,
                              text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})

    bad = run("--settings", "ddim:0")
    assert bad.returncode == 2 and "SAMPLER:STEPS[:SPACING] with 1 <= STEPS <= 1000" in bad.stderr
    bad = run("--settings", "heun:10")
    assert bad.returncode == 2 and "sampler='heun' is not known" in bad.stderr
    bad = run("--settings", "ddim:10+deepcache=x")
    assert bad.returncode == 2 and "must be deepcache=INTERVAL[/BRANCH]" in bad.stderr
    bad = run("--pairs", "4", "--reference-pairs", "8")
    assert bad.returncode == 2 and "--reference-pairs (8) must be <= --pairs (4)" in bad.stderr
    bad = run("--probe", "-1")
    assert bad.returncode == 2 and "--probe >= 0" in bad.stderr
    # an output that cannot be written is said before the run, not after it (a file where a folder must be)
    bad = run("--out", "README.md/results.json")
    assert bad.returncode == 2 and "README.md/results.json cannot be written" in bad.stderr
    bad = run("--videos", "README.md/videos")
    assert bad.returncode == 2 and "cannot be written" in bad.stderr
    bad = run("--lora", "no/such/lora.safetensors")
    assert bad.returncode == 2 and "no such file" in bad.stderr
    bad = run("--lora", "README.md", "--lora-scale", "1", "2")
    assert bad.returncode == 2 and "2 weights for 1 LoRA" in bad.stderr


def test_the_reference_cache_is_written_then_read_instead_of_rerun_and_refused_for_another_reference(tmp_path, capsys):
    """--reference-cache keeps the reference videos (a DDIM 1000 reference is 22 min on this CPU): the second run
    reads them and gives the same errors; a file made by another setting or model is refused, naming the field."""
    import json

    sys.path.insert(0, str(ROOT))
    import evaluate

    cache = tmp_path / "ref.safetensors"
    base = ["--pairs", "2", "--settings", "ddim:2", "--reference", "ddim:3", "--reference-pairs", "2",
            "--batch-size", "2", "--reference-cache", str(cache)]
    assert evaluate.main(base + ["--out", str(tmp_path / "a.json")]) == 0
    assert cache.exists() and "reference ddim:3 on 2 pairs ..." in capsys.readouterr().err
    assert evaluate.main(base + ["--out", str(tmp_path / "b.json")]) == 0
    assert "read from" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert "seconds" in a["reference_result"] and b["reference_result"]["cache"] == str(cache)
    assert a["reference_result"]["accuracy"] == b["reference_result"]["accuracy"]
    # the setting's own videos are generated again: equal up to run-to-run round-off (oneDNN may pick another
    # kernel for a fresh model), 4e-9 in a 0.026 mean was seen; the reference itself is the file's, bit for bit
    assert a["settings"][0]["error_vs_reference"] == pytest.approx(b["settings"][0]["error_vs_reference"], rel=1e-5)
    assert a["settings"][0]["error_vs_reference"]["mean_abs"] > 0
    assert evaluate.main([a if a != "ddim:3" else "ddim:4" for a in base]) == 2
    err = capsys.readouterr().err
    assert "holds another reference" in err and "setting: file 'ddim:3', this run 'ddim:4'" in err
    assert evaluate.main(base + ["--guidance", "3"]) == 2
    assert "guidance: file 2.0, this run 3.0" in capsys.readouterr().err


def test_probe_captions_swap_exactly_one_word():
    c = "a red circle moving left"
    assert [se.probe_caption(c, v) for v in se.PROBE_VARIANTS] == [
        c, "a red circle moving right", "a red circle moving up", "a green circle moving left",
        "a red square moving left", ""]
    assert se.probe_caption("a white triangle moving down", "other_color") == "a red triangle moving down"
    with pytest.raises(ValueError, match="has no direction to swap"):
        se.probe_caption("a red circle", "opposite")
    with pytest.raises(ValueError, match="variant must be one of"):
        se.probe_caption(c, "louder")


def test_caption_probe_measures_what_the_caption_changes(monkeypatch):
    """On the shipped model: a wrong direction, a wrong colour and an empty caption cost loss at the noisiest
    step (measured on 16 clips, t = 999: 0.4928, 0.4814 and 0.4881 vs 0.3968 with the true caption); a
    caption-blind model (every prompt embedded as the empty one) gets the same loss for every variant."""
    from modelscope_t2v import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained("shapes")
    r = se.caption_probe(pipe, n=4, timesteps=(999,))
    loss = {v: d[999] for v, d in r["loss"].items()}
    assert set(loss) == set(se.PROBE_VARIANTS) and all(np.isfinite(x) for x in loss.values())
    assert loss["other_color"] > loss["right"] + 0.02 and loss["empty"] > loss["right"] + 0.02, loss
    assert loss["opposite"] > loss["right"] + 0.02, loss
    assert 0 <= r["frame_variation"] and r["data_frame_variation"] > 0.1, r
    blind = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompts, *a, **k: blind([""] * len(prompts), *a, **k))
    flat = {v: d[999] for v, d in se.caption_probe(pipe, n=4, timesteps=(999,))["loss"].items()}
    assert max(flat.values()) - min(flat.values()) < 1e-6, flat
    images = se.caption_probe(pipe, n=2, timesteps=(999,), start_images=True, variants=("right", "empty"))
    assert set(images["loss"]) == {"right", "empty"} and np.isnan(images["frame_variation"])
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 1000\)"):
        se.caption_probe(pipe, n=1, timesteps=(1000,))


def test_dtype_runs_the_settings_in_it_and_the_reference_in_float32(tmp_path):
    """--dtype bfloat16 computes the settings in bf16 (on a CPU too), while the reference stays float32: its videos
    equal a float32 run's bit for bit, and the setting's do not."""
    import json

    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    import evaluate

    def run(dtype):
        base = ["--pairs", "1", "--settings", "ddim:2", "--reference", "ddim:3", "--reference-pairs", "1",
                "--batch-size", "1", "--dtype", dtype, "--reference-cache", str(tmp_path / f"{dtype}.safetensors"),
                "--out", str(tmp_path / f"{dtype}.json")]
        assert evaluate.main(base) == 0
        return json.loads((tmp_path / f"{dtype}.json").read_text()), load_file(tmp_path / f"{dtype}.safetensors")

    (a, ref_a), (b, ref_b) = run("float32"), run("bfloat16")
    assert a["dtype"] == "float32" and b["dtype"] == "bfloat16"
    assert torch.equal(ref_a["videos"], ref_b["videos"])
    assert a["settings"][0]["error_vs_reference"]["mean_abs"] != b["settings"][0]["error_vs_reference"]["mean_abs"]
