"""Citable metrics (issue 15): the Frechet distance against independent computations, FVD's preprocessing
and detector file, CLIPSIM against torchmetrics' CLIPScore, and evaluate.py's harness on folders of videos
and on a model, resumed and sharded. Every network is a tiny random stand-in built here (metrics_fixtures)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics_fixtures import TINY_OPEN_CLIP, random_videos, tiny_i3d_file, tiny_open_clip, tiny_transformers_clip
from modelscope_t2v.eval import clipsim, frechet, fvd, harness

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# The Frechet distance.


def _eigen_trace_sqrt(a: np.ndarray, b: np.ndarray) -> float:
    """tr((A B)^(1/2)) from the eigenvalues of A^(1/2) B A^(1/2) (symmetric, so eigh): no sqrtm involved."""
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b @ root_a), 0, None)).sum())


@pytest.mark.parametrize("n, d", [(300, 8), (64, 400)])  # well-conditioned, and singular (n < d, as with few videos)
def test_frechet_distance_equals_independent_computations(n, d):
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    y = rng.normal(size=(n + 7, d)) * 1.5 + 0.2
    a, b = frechet.feature_stats(x), frechet.feature_stats(y)
    ours = frechet.frechet_distance(a, b)
    assert np.allclose(a.cov, np.cov(x, rowvar=False)) and a.count == n  # ddof 1 by default (np.cov, as common_metrics)
    eigen = np.square(a.mean - b.mean).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * _eigen_trace_sqrt(a.cov, b.cov)
    tm = float(_compute_fid(*(torch.from_numpy(t) for t in (a.mean, a.cov, b.mean, b.cov))))  # torchmetrics' FID math
    assert abs(ours - eigen) <= 1e-6 * abs(eigen) and abs(ours - tm) <= 1e-6 * abs(tm), (ours, eigen, tm)
    assert abs(frechet.frechet_distance(a, a)) < 1e-6 * ours


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    a = frechet.FeatureStats(np.zeros(3), np.diag(va), 10)
    b = frechet.FeatureStats(np.array([1.0, 0.0, 2.0]), np.diag(vb), 10)
    expected = 1 + 4 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert frechet.frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_statistics_file_round_trip_and_bad_files(tmp_path):
    from safetensors.torch import save_file

    stats = frechet.feature_stats(np.random.default_rng(0).normal(size=(5, 4)), meta={"preprocessing": "common"})
    path = frechet.save_stats(tmp_path / "ref.safetensors", stats)
    back = frechet.load_stats(path)
    assert np.array_equal(back.mean, stats.mean) and np.array_equal(back.cov, stats.cov)
    assert back.count == 5 and back.meta == {"preprocessing": "common", "ddof": 1}
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a statistics file"):
        frechet.load_stats(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a safetensors file"):
        frechet.load_stats(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="too few videos for a covariance: 1"):
        frechet.feature_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="mismatched feature sizes: 4 against 3"):
        frechet.frechet_distance(stats, frechet.feature_stats(np.random.default_rng(1).normal(size=(5, 3))))
    other = frechet.feature_stats(np.ones((3, 4)) + np.eye(3, 4), meta={"preprocessing": "styleganv"})
    with pytest.raises(ValueError, match="preprocessing='common'.*preprocessing='styleganv'"):
        frechet.check_comparable(other.meta, back.meta)


# ---------------------------------------------------------------------------------------------------
# FVD: preprocessing and the detector file.


def test_common_preprocessing_is_resize_shorter_side_centre_crop_and_range():
    """48 x 64 frames: the shorter side to 224 (bilinear), the other ceil(64 * 224 / 48) = 299, a 224 crop from
    column (299 - 224) // 2 = 37, then [0, 1] -> [-1, 1]; checked against torchvision's ops."""
    from torchvision.transforms.v2 import functional as TF

    video = random_videos(1, 0, frames=18)[0]
    x = fvd.preprocess(video, "common", num_frames=16)
    assert x.shape == (3, 16, 224, 224) and x.dtype == torch.float32
    frames = torch.from_numpy(video[:16]).permute(0, 3, 1, 2).float() / 255  # f c h w
    expected = TF.crop(TF.resize(frames, [224, 299], antialias=False), 0, 37, 224, 224) * 2 - 1
    assert torch.allclose(x.permute(1, 0, 2, 3), expected, atol=1e-5)
    raw = fvd.preprocess(video, "styleganv", num_frames=16)  # the detector rescales and resizes itself
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(video[:16]).permute(3, 0, 1, 2))
    with pytest.raises(ValueError, match="num_frames=16 needs videos of at least 16 frames; one has 8"):
        fvd.preprocess(video[:8], "common", 16)
    portrait = random_videos(1, 1, frames=16, size=(72, 40))[0]  # 40 -> 224, 72 -> ceil(72 * 5.6) = 404, crop row 90
    frames = torch.from_numpy(portrait).permute(0, 3, 1, 2).float() / 255
    expected = TF.crop(TF.resize(frames, [404, 224], antialias=False), 90, 0, 224, 224) * 2 - 1
    assert torch.allclose(fvd.preprocess(portrait).permute(1, 0, 2, 3), expected, atol=1e-5)
    square = random_videos(1, 2, frames=16, size=(224, 224))[0]  # already I3D's size: only the value range
    assert torch.allclose(fvd.preprocess(square), torch.from_numpy(square).permute(3, 0, 1, 2).float() / 127.5 - 1, atol=1e-6)


def test_detector_file_both_preprocessings_agree_where_they_coincide(tmp_path):
    """At 224 x 224 the common path ((x / 255 - 0.5) * 2, no resize) and StyleGAN-V's (the detector's own
    x / 127.5 - 1 and a resize to the same size) feed the detector the same input."""
    path = tiny_i3d_file(tmp_path / "i3d_torchscript.pt")
    common, stylegan = fvd.Detector.from_file(path), fvd.Detector.from_file(path, "styleganv")
    assert common.kwargs == {"rescale": False, "resize": False, "return_features": True}
    assert stylegan.kwargs == {"rescale": True, "resize": True, "return_features": True}
    videos = random_videos(3, 1, size=(224, 224))
    a, b = fvd.video_features(common, videos, batch_size=2), fvd.video_features(stylegan, videos)
    assert a.shape == (3, 400) and np.allclose(a, b, atol=1e-5)
    other = random_videos(3, 2, size=(224, 224), brightness=0.5)
    assert not np.allclose(a, fvd.video_features(common, other), atol=1e-3)  # the features see the videos
    assert common.meta["detector_sha256"] == fvd.file_sha256(path)
    mixed = random_videos(1, 3, size=(48, 64)) + random_videos(1, 4, size=(64, 48))  # styleganv keeps each size
    assert fvd.video_features(stylegan, mixed).shape == (2, 400)
    # the covariance divisor of each code: np.cov's n - 1 (common), StyleGAN-V's FeatureStats' n
    x = np.random.default_rng(0).normal(size=(6, 3))
    assert np.allclose(frechet.feature_stats(x, ddof=fvd.covariance_ddof("styleganv")).cov, np.cov(x, rowvar=False) * 5 / 6)
    assert frechet.feature_stats(x, ddof=fvd.covariance_ddof("common")).meta["ddof"] == 1


def test_bad_detector_files_are_named(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="weights.pt is not a TorchScript file"):
        fvd.Detector.from_file(tmp_path / "weights.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "state.pt")  # a pickled state dict is not a detector either
    with pytest.raises(ValueError, match="state.pt is not a TorchScript file"):
        fvd.Detector.from_file(tmp_path / "state.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(ValueError, match="forward takes no rescale, resize, return_features"):
        fvd.Detector.from_file(tmp_path / "linear.pt")
    with pytest.raises(ValueError, match="no such file"):
        fvd.Detector.from_file(tmp_path / "missing.pt")


def test_any_feature_extractor_can_stand_in_for_i3d():
    extractor = fvd.Detector(lambda x: x.mean(dim=(2, 3, 4)), name="channel means")  # (b, 3) features
    feats = fvd.video_features(extractor, random_videos(4, 3))
    assert feats.shape == (4, 3) and np.all(np.abs(feats) <= 1)
    with pytest.raises(ValueError, match="expected features"):
        fvd.video_features(fvd.Detector(lambda x: x), random_videos(1, 3))


# ---------------------------------------------------------------------------------------------------
# CLIPSIM.


def test_clipsim_equals_torchmetrics_clip_score(tmp_path):
    """torchmetrics' CLIPScore of a video's frames against its caption is 100 * max(mean cosine, 0); our CLIPSIM
    is the mean cosine itself. transformers 5 returns output objects from get_*_features, which torchmetrics
    1.9 does not unwrap: the wrapper below hands it the projected features (pooler_output) it expects."""
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    class Projected(CLIPModel):
        def get_image_features(self, *a, **k):
            return super().get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return super().get_text_features(*a, **k).pooler_output

    folder = tiny_transformers_clip(tmp_path / "clip")
    flipped = tiny_transformers_clip(tmp_path / "flipped")  # the same model, text projection negated: cosines > 0
    m = CLIPModel.from_pretrained(flipped)
    m.text_projection.weight.data.neg_()
    m.save_pretrained(flipped)
    videos = random_videos(3, 4, frames=5)
    signs = set()
    for where in (folder, flipped):
        model, processor = Projected.from_pretrained(where).eval(), CLIPProcessor.from_pretrained(where)
        scorer = clipsim.ClipScorer.from_spec(str(where))
        for video in videos:
            for caption in ("a red circle moving left", "a blue square standing still", "an astronaut riding a horse"):
                sims = scorer.frame_similarities(video, caption)
                assert sims.shape == (5,) and np.all(np.abs(sims) <= 1)
                with torch.no_grad():
                    ref = float(clip_score([torch.from_numpy(f).permute(2, 0, 1) for f in video], [caption] * 5,
                                           lambda: (model, processor)))
                assert ref == pytest.approx(100 * max(sims.mean(), 0), abs=1e-4)
                signs.add(bool(sims.mean() > 0))
    assert signs == {True, False}  # compared where torchmetrics clips at 0 and where it does not
    assert scorer.clipsim(videos, ["a red circle"] * 3) == pytest.approx(
        np.mean([scorer.frame_similarities(v, "a red circle").mean() for v in videos]))


def test_clipsim_with_an_open_clip_model_from_a_file(tmp_path):
    import open_clip
    from PIL import Image

    weights = tiny_open_clip(tmp_path / "oc", seed=5)
    torch.manual_seed(123)  # a failed load would initialise other weights
    scorer = clipsim.ClipScorer.from_spec(f"open_clip:{TINY_OPEN_CLIP}:{weights}")
    model, _, transform = open_clip.create_model_and_transforms(TINY_OPEN_CLIP)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    video = random_videos(1, 6, frames=4)[0]
    with torch.no_grad():
        image = model.encode_image(torch.stack([transform(Image.fromarray(f)) for f in video]), normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(TINY_OPEN_CLIP)(["a green triangle"]), normalize=True)
    assert np.allclose(scorer.frame_similarities(video, "a green triangle"), (image @ text.T)[:, 0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="open_clip:ARCH:PRETRAINED"):
        clipsim.ClipScorer.from_spec("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="not a folder, not a hub id"):
        clipsim.ClipScorer.from_spec(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------
# The harness: folders of videos, a model, resume, torchrun, bad input.


def _write_set(folder: Path, videos, ids) -> None:
    from modelscope_t2v.video_io import export_to_video

    folder.mkdir(parents=True)
    for name, video in zip(ids, videos):
        export_to_video(list(video), str(folder / f"{name}.mp4"), fps=8)


@pytest.fixture(scope="module")
def metric_world(tmp_path_factory):
    """A generated set with an MSR-VTT-style captions CSV, a real set, a tiny CLIP and a tiny I3D file."""
    root = tmp_path_factory.mktemp("metrics")
    ids = [f"video{7000 + i}" for i in range(5)]
    _write_set(root / "gen", random_videos(5, 10), ids)
    _write_set(root / "real", random_videos(6, 20, brightness=0.7), [f"real{i}" for i in range(6)])
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for i, vid in enumerate(ids):
            w.writerow([f"ret{i}", f"msr{i}", vid, f"a person is cooking number {i}"])
    return {"root": root, "clip": tiny_transformers_clip(root / "clip"), "i3d": tiny_i3d_file(root / "i3d_torchscript.pt")}


def _args(w, work: Path, *extra) -> list[str]:
    r = w["root"]
    return ["--videos-in", str(r / "gen"), "--captions", str(r / "MSRVTT_JSFUSION_test.csv"), "--metrics", "clipsim", "fvd",
            "--clip-model", str(w["clip"]), "--fvd-detector", str(w["i3d"]), "--fvd-reference", str(work / "real.safetensors"),
            "--fvd-real", str(r / "real"), "--work", str(work), "--no-progress", *extra]


def test_folder_of_videos_scored_with_clipsim_and_fvd_then_resumed(metric_world, tmp_path, capsys):
    from modelscope_t2v.data.decode import read_all_frames

    w, work = metric_world, tmp_path / "work"
    assert evaluate.main(_args(w, work, "--out", str(tmp_path / "summary.json"))) == 0
    printed = capsys.readouterr().out
    results = json.loads((work / "results.json").read_text())
    s = results["summaries"]["gen"]
    assert s["videos"] == 5 and s["fvd"]["videos"] == 5 and s["fvd"]["reference_videos"] == 6
    # the same figures, computed directly from the decoded files
    gen = sorted((w["root"] / "gen").glob("*.mp4"))
    real = sorted((w["root"] / "real").glob("*.mp4"))
    det = fvd.Detector.from_file(w["i3d"])
    expected_fvd = frechet.frechet_distance(frechet.feature_stats(fvd.video_features(det, [read_all_frames(p) for p in gen])),
                                            frechet.feature_stats(fvd.video_features(det, [read_all_frames(p) for p in real])))
    assert s["fvd"]["value"] == pytest.approx(expected_fvd, rel=1e-6) and expected_fvd > 0
    scorer = clipsim.ClipScorer.from_spec(str(w["clip"]))
    captions = [f"a person is cooking number {i}" for i in range(5)]
    assert s["clipsim"]["mean"] == pytest.approx(scorer.clipsim([read_all_frames(p) for p in gen], captions), abs=1e-6)
    assert "| gen | 5 |" in printed and f"{s['fvd']['value']:.2f}" in printed
    rows = list(csv.DictReader((work / "per_video.csv").open()))
    assert [r["video"] for r in rows] == [p.name for p in gen] and rows[2]["prompt"] == captions[2]
    assert frechet.load_stats(work / "real.safetensors").meta["preprocessing"] == "common"
    assert json.loads((tmp_path / "summary.json").read_text())["gen"]["fvd"]["value"] == s["fvd"]["value"]

    # a rerun computes nothing again; another CLIP model recomputes CLIPSIM only
    records = sorted((work / "gen" / "per_video").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    assert evaluate.main(_args(w, work)) == 0
    assert [p.stat().st_mtime_ns for p in records] == stamps
    before = [json.loads(p.read_text())["metrics"]["fvd"] for p in records]
    other_clip = tiny_transformers_clip(tmp_path / "clip2", seed=1)
    args = _args(w, work)
    args[args.index("--clip-model") + 1] = str(other_clip)
    assert evaluate.main(args) == 0
    after = [json.loads(p.read_text())["metrics"] for p in records]
    assert [a["fvd"] for a in after] == before and all(a["clipsim"]["settings"]["clip_model"] == str(other_clip) for a in after)
    # a corrected caption file recomputes that video's CLIPSIM (the prompt is part of what a result depends on)
    fixed = tmp_path / "fixed.csv"
    fixed.write_text((w["root"] / "MSRVTT_JSFUSION_test.csv").read_text().replace("cooking number 2", "dancing"))
    args[args.index("--captions") + 1] = str(fixed)
    assert evaluate.main(args) == 0
    again = [json.loads(p.read_text()) for p in records]
    assert again[2]["prompt"] == "a person is dancing" and again[2]["metrics"]["clipsim"]["settings"]["prompt"] == "a person is dancing"
    assert again[2]["metrics"]["clipsim"]["value"] != after[2]["clipsim"]["value"] and again[1]["metrics"] == after[1]


def test_reference_made_another_way_is_refused(metric_world, tmp_path, capsys):
    w, work = metric_world, tmp_path / "work"
    assert evaluate.main(_args(w, work)) == 0
    args = _args(w, work, "--fvd-preprocessing", "styleganv")
    assert evaluate.main(args) == 2
    assert "made with preprocessing='common'" in capsys.readouterr().err
    assert not list((work / "gen" / "per_video").glob("*.json"))[0].read_text().count("styleganv")  # refused before scoring
    # statistics of 16-wide features (another detector's), made by hand without the settings they came from
    frechet.save_stats(tmp_path / "ref16.safetensors", frechet.feature_stats(np.random.default_rng(0).normal(size=(4, 16))))
    args = _args(w, tmp_path / "work2")
    args[args.index("--fvd-reference") + 1] = str(tmp_path / "ref16.safetensors")
    assert evaluate.main(args) == 2
    assert "mismatched feature sizes: the detector gives 400, the reference statistics hold 16" in capsys.readouterr().err
    assert len(list((tmp_path / "work2" / "gen" / "per_video").glob("*.json"))) == 0  # stopped at the first batch


@pytest.mark.parametrize("change, message", [
    (("--clip-model", None), "clipsim needs --clip-model"),
    (("--fvd-detector", "missing.pt"), "--fvd-detector: no such file"),
    (("--fvd-real", None), "give --fvd-real FOLDER to make it"),
    (("--captions", "empty.csv"), "has no caption for 5 video(s)"),
])
def test_bad_metric_arguments_are_refused_before_work(metric_world, tmp_path, capsys, change, message):
    w, work = metric_world, tmp_path / "work"
    args = _args(w, work)
    flag, value = change
    i = args.index(flag)
    if value is None:
        del args[i:i + 2]
    else:
        if value == "empty.csv":
            (tmp_path / value).write_text("video_id,sentence\nvideo1,a dog\n")
        args[i + 1] = str(tmp_path / value)
    assert evaluate.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (work / "gen").exists()  # nothing was scored


def test_fvd_of_a_single_video_is_refused(metric_world, tmp_path, capsys):
    one = tmp_path / "one"
    _write_set(one, random_videos(1, 30), ["video7000"])
    args = _args(metric_world, tmp_path / "work")
    args[args.index("--videos-in") + 1] = str(one)
    assert evaluate.main(args) == 2
    assert "FVD needs at least 2 videos a set (a covariance); 'one' has 1" in capsys.readouterr().err


def test_a_model_scored_through_sample_py_with_every_metric(metric_world, tmp_path):
    """The bundled shapes model, two shapes pairs, DDIM 2 steps: generated through sample.py's machinery (the
    sidecars give the prompts), then shapes, CLIPSIM and FVD against the real set."""
    w, work = metric_world, tmp_path / "work"
    args = ["--pairs", "2", "--settings", "ddim:2", "--reference", "none", "--metrics", "shapes", "clipsim", "fvd",
            "--clip-model", str(w["clip"]), "--fvd-detector", str(w["i3d"]), "--fvd-reference", str(work / "r.safetensors"),
            "--fvd-real", str(w["root"] / "real"), "--work", str(work), "--no-progress", "--batch-size", "2"]
    assert evaluate.main(args) == 0
    s = json.loads((work / "results.json").read_text())["summaries"]["ddim-2"]
    assert s["videos"] == 2 and set(s["shapes"]) >= {"color", "shape", "direction", "all"}
    assert -1 <= s["clipsim"]["mean"] <= 1 and s["fvd"]["value"] > 0 and s["fvd"]["reference_videos"] == 6
    manifest = [json.loads(line) for line in (work / "videos" / "ddim-2" / "manifest.jsonl").read_text().splitlines()]
    from modelscope_t2v.eval.shapes import prompt_seed_pairs

    assert [(m["prompt"], m["seed"]) for m in manifest] == prompt_seed_pairs(2)
    # a rerun with fewer pairs in the same --work scores this run's videos only (the manifest's), not the earlier ones
    args[args.index("--pairs") + 1] = "1"
    args[args.index("--metrics") + 1:args.index("--clip-model")] = ["shapes", "clipsim"]
    assert evaluate.main(args) == 0
    assert json.loads((work / "results.json").read_text())["summaries"]["ddim-2"]["videos"] == 1


def test_prompt_files_as_caption_sets_are_distributed(tmp_path):
    from modelscope_t2v import jobs

    (tmp_path / "msrvtt.csv").write_text("key,vid_key,video_id,sentence\nret0,msr7020,video7020,a man is singing\n")
    assert jobs.read_prompts(tmp_path / "msrvtt.csv") == [("a man is singing", None, None)]
    (tmp_path / "info.json").write_text(json.dumps({"videos": [], "sentences": [
        {"caption": "a cat plays", "video_id": "video1", "sen_id": 0}, {"caption": "a dog runs", "video_id": "video2"}]}))
    assert [p for p, _, _ in jobs.read_prompts(tmp_path / "info.json")] == ["a cat plays", "a dog runs"]
    (tmp_path / "list.json").write_text(json.dumps(["a", {"prompt": "b", "seed": 4}]))
    assert jobs.read_prompts(tmp_path / "list.json") == [("a", None, None), ("b", 4, None)]
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ValueError, match="bad.json, entry 0: expected a string or an object with one of prompt"):
        jobs.read_prompts(tmp_path / "bad.json")


def test_torchrun_shards_the_scoring_and_rank_0_writes_the_same_results(metric_world, tmp_path):
    w = metric_world
    single = tmp_path / "single"
    assert evaluate.main(_args(w, single)) == 0
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), *_args(w, sharded)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a = json.loads((single / "results.json").read_text())["summaries"]["gen"]
    b = json.loads((sharded / "results.json").read_text())["summaries"]["gen"]
    assert b["fvd"]["value"] == pytest.approx(a["fvd"]["value"], rel=1e-6)
    assert b["clipsim"]["mean"] == pytest.approx(a["clipsim"]["mean"], abs=1e-6)
    assert r.stdout.count("| gen | 5 |") == 1  # rank 0 alone reports


def test_a_video_that_does_not_decode_is_named(metric_world, tmp_path, capsys):
    folder = tmp_path / "broken"
    _write_set(folder, random_videos(2, 31), ["video7000", "video7001"])
    (folder / "video7001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    args = _args(metric_world, tmp_path / "work")
    args[args.index("--videos-in") + 1] = str(folder)
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "videos: cannot read" in err and "video7001.mp4" in err
