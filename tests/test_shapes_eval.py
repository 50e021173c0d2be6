"""The evaluation's readers (colour, shape, direction) on rendered clips, where the truth is known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelscope_t2v import shapes_eval as se
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
    bad = run("--settings", "euler:10")
    assert bad.returncode == 2 and "sampler='euler' is not known" in bad.stderr
    bad = run("--pairs", "4", "--reference-pairs", "8")
    assert bad.returncode == 2 and "--reference-pairs (8) must be <= --pairs (4)" in bad.stderr
