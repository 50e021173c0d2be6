"""Training data: the shapes grammar and renderer, PyAV decoding, the WebVid / image-folder /
webdataset sources, mixing, skip accounting and exact resume (also in forked workers).

All assets (tiny mp4s written with PyAV, images, tar shards) are made inside the tests."""

from __future__ import annotations

import csv
import io
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from modelscope_t2v.data import (
    COLOR_RGB,
    COLORS,
    DIRECTIONS,
    SHAPES,
    DataConfig,
    as_data_config,
    ImageFolderDataset,
    ShapesDataset,
    SourceConfig,
    VideoTooShortError,
    check_data_config,
    make_loader,
    parse_shapes_caption,
    read_video_frames,
    render_shape_clip,
    save_video_frames,
    shapes_caption,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["batch_index"] == y["batch_index"]
        assert x["kind"] == y["kind"] and x["captions"] == y["captions"] and x["skipped"] == y["skipped"]
        assert x["pixels"].dtype == y["pixels"].dtype and torch.equal(x["pixels"], y["pixels"])


def ramp_video(num_frames, height, width, red, step=10):
    """Frame t: red = `red`, green = step * t, blue = 128 (flat colours survive h264 well)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = red
    frames[..., 1] = (np.arange(num_frames) * step)[:, None, None]
    frames[..., 2] = 128
    return frames


# ---------------------------------------------------------------------------------------------------
# Shapes


def alpha_of(pixels, color):
    """Coverage f h w in [0, 1] from c f h w pixels in [-1, 1], using the colour's lit channels."""
    lit = [i for i, v in enumerate(COLOR_RGB[color]) if v == 255]
    return ((pixels[lit] + 1) / 2).mean(0)


def centroids(alpha):
    f, h, w = alpha.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    mass = alpha.sum((1, 2))
    return torch.stack([(alpha * xs).sum((1, 2)) / mass, (alpha * ys).sum((1, 2)) / mass], 1)  # f 2 (x, y)


def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and torch.equal(x["pixels"], y["pixels"])
        assert torch.equal(a[i]["pixels"], x["pixels"])  # the same instance again, after other draws
    other = ShapesDataset(50, seed=4)
    assert any(not torch.equal(a[i]["pixels"], other[i]["pixels"]) for i in range(10))
    with pytest.raises(IndexError):
        a[50]


def test_shapes_grammar_colour_motion_size():
    size = 64
    ds = ShapesDataset(300, num_frames=16, height=size, width=size, seed=0)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        px = item["pixels"]
        assert px.shape == (3, 16, size, size) and px.dtype == torch.float32
        color, shape, direction = parse_shapes_caption(item["caption"])
        assert (color, shape, direction) == (item["color"], item["shape"], item["direction"])
        assert item["caption"] == shapes_caption(color, shape, direction)
        seen.add((color, shape, direction))
        rgb = COLOR_RGB[color]
        for ch, v in enumerate(rgb):
            if v == 0:  # pure colour: unlit channels are black everywhere, edges included
                assert torch.all(px[ch] == -1), (i, item["caption"])
        alpha = alpha_of(px, color)
        lit = [ch for ch, v in enumerate(rgb) if v]
        for ch in lit:  # edges are alpha * colour: all lit channels equal
            assert torch.equal(px[ch], px[lit[0]])
        assert (alpha == 1).flatten(1).any(1).all()  # every frame has fully covered (pure) pixels
        # about a quarter across (the triangle's width is its extent)
        cols = (alpha[0] > 0.5).any(0).nonzero()
        width_px = int(cols.max() - cols.min() + 1)
        assert 0.19 * size <= width_px <= 0.31 * size, (i, item["caption"], width_px)
        # moves the captioned way by >= 1/3 of the frame, at constant speed, straight
        c = centroids(alpha)
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        along = c[:, 0] * dx + c[:, 1] * dy if dx else c[:, 1] * dy
        across = c[:, 1] if dx else c[:, 0]
        assert along[-1] - along[0] >= size / 3, (i, item["caption"], float(along[-1] - along[0]))
        steps = along.diff()
        assert float(steps.max() - steps.min()) < 0.5
        assert float(across.max() - across.min()) < 0.25
    assert {c for c, _, _ in seen} == set(COLORS)
    assert {s for _, s, _ in seen} == set(SHAPES)
    assert {d for _, _, d in seen} == set(DIRECTIONS)


def test_shapes_image_variant_and_non_square():
    ds = ShapesDataset(20, image=True, height=40, width=72, seed=1)
    for i in range(20):
        item = ds[i]
        assert item["pixels"].shape == (3, 1, 40, 72)
        color, shape, direction = parse_shapes_caption(item["caption"])
        assert direction is None and item["caption"] == f"a {color} {shape}"
        assert (alpha_of(item["pixels"], color) == 1).any()
    clip = render_shape_clip("cyan", "square", "right", num_frames=8, height=40, width=72, seed=5)
    assert clip.shape == (3, 8, 40, 72)
    c = centroids(alpha_of(clip, "cyan"))
    assert c[-1, 0] - c[0, 0] >= 72 / 3
    with pytest.raises(ValueError, match="color"):
        shapes_caption("purple", "circle")
    with pytest.raises(ValueError, match="direction"):
        render_shape_clip("red", "circle", "sideways")
    for bad in ("a red circle moving sideways", "a purple circle", "red circle", "a red hexagon moving up"):
        with pytest.raises(ValueError):
            parse_shapes_caption(bad)


def test_shapes_start_images_are_first_frames_captioned_with_their_direction():
    from modelscope_t2v.data.shapes import _render_shape_uint8

    ds = ShapesDataset(400, image=True, image_start=True, seed=2)
    starts = {d: [] for d in DIRECTIONS}
    for i in range(400):
        item = ds[i]
        color, shape, direction = parse_shapes_caption(item["caption"])
        assert item["pixels"].shape == (3, 1, 64, 64) and direction is not None
        labels, rng = ds.describe(i)
        clip = _render_shape_uint8(color, shape, direction, num_frames=16, height=64, width=64, rng=rng)
        assert torch.equal(ds.load(i)[0][:, 0], clip[:, 0])  # the image is the clip's first frame
        starts[direction].append(centroids(alpha_of(item["pixels"], color))[0] / 64)  # (x, y)
    mean = {d: np.mean(v, axis=0) for d, v in starts.items()}
    # a "moving right" object starts left of centre (and so on): the direction word alone says where
    assert mean["right"][0] < 0.35 and mean["left"][0] > 0.65 and mean["down"][1] < 0.35 and mean["up"][1] > 0.65, mean
    with pytest.raises(ValueError, match="image_start=True needs image=True"):
        ShapesDataset(4, image_start=True)
    with pytest.raises(ValueError, match=r"shapes_image_start=true needs DataConfig.image.shapes_image=true"):
        check_data_config(DataConfig(kind="mixed", image=SourceConfig(shapes_image=False, shapes_image_start=True)))
    check_data_config(as_data_config(OmegaConf.load(CONFIGS / "shapes_start_mixed.yaml")))


def test_shapes_render_is_fast():
    render_shape_clip("red", "triangle", "up", seed=0)
    times = []
    for i in range(30):
        t = time.perf_counter()
        render_shape_clip(COLORS[i % 7], SHAPES[i % 3], DIRECTIONS[i % 4], num_frames=16, size=64, seed=i)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.010, np.median(times)


# ---------------------------------------------------------------------------------------------------
# Video decoding


@pytest.fixture(scope="module")
def ramp_mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    save_video_frames(path, ramp_video(24, 32, 48, red=200), fps=24)
    return path


def frame_numbers(frames):
    """The source frame index of each decoded ramp frame (green = 10 * index)."""
    return (frames[..., 1].float().mean((1, 2)) / 10).round().long().tolist()


def test_read_video_frames_stride_fps_start(ramp_mp4):
    x = read_video_frames(ramp_mp4, num_frames=8, frame_stride=3)
    assert x.shape == (8, 32, 48, 3) and x.dtype == torch.uint8
    assert frame_numbers(x) == [3 * i for i in range(8)]  # no rng: start 0
    starts = set()
    for s in range(30):
        idx = frame_numbers(read_video_frames(ramp_mp4, num_frames=8, frame_stride=3, rng=np.random.default_rng(s)))
        assert idx == [idx[0] + 3 * i for i in range(8)]
        starts.add(idx[0])
    assert starts == {0, 1, 2}  # every start that fits (span 22 of 24 frames)
    assert frame_numbers(read_video_frames(ramp_mp4, num_frames=8, target_fps=8)) == [3 * i for i in range(8)]
    assert frame_numbers(read_video_frames(ramp_mp4, num_frames=6, target_fps=48)) == [0, 0, 1, 1, 2, 2]
    assert frame_numbers(read_video_frames(ramp_mp4, num_frames=24)) == list(range(24))
    # from bytes, late start (exercises the seek)
    data = Path(ramp_mp4).read_bytes()
    idx = frame_numbers(read_video_frames(data, num_frames=4, frame_stride=1, rng=np.random.default_rng(123)))
    assert idx == [idx[0] + i for i in range(4)]
    with pytest.raises(VideoTooShortError):
        read_video_frames(ramp_mp4, num_frames=8, frame_stride=4)  # span 29 > 24
    with pytest.raises(ValueError, match="frame_stride"):
        read_video_frames(ramp_mp4, num_frames=8, frame_stride=2, target_fps=8)


# ---------------------------------------------------------------------------------------------------
# WebVid folder

GOOD = {"1001": ("first clip of a dog", 40), "1002": ("second clip, a cat", 120), "1003": ("third clip: rain", 200)}
BAD = ("2001", "2002", "2003", "2004")  # random bytes, truncated mp4, too short, missing


@pytest.fixture(scope="module")
def webvid(tmp_path_factory):
    root = tmp_path_factory.mktemp("webvid")
    videos = root / "videos"
    rows = []
    for vid, (caption, red) in GOOD.items():
        (videos / "p0").mkdir(parents=True, exist_ok=True)
        save_video_frames(videos / "p0" / f"{vid}.mp4", ramp_video(24, 32, 48, red=red), fps=24)
        rows.append((vid, caption))
    (videos / "p1").mkdir()
    (videos / "p1" / "2001.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    full = videos / "p0" / "1001.mp4"
    (videos / "p1" / "2002.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    save_video_frames(videos / "p1" / "2003.mp4", ramp_video(5, 32, 48, red=90), fps=24)
    for vid in BAD:
        rows.append((vid, f"broken clip {vid}"))
    csv_path = root / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for vid, caption in rows:
            w.writerow([vid, f"https://example.com/{vid}.mp4", "PT00H00M01S", "p0" if vid in GOOD else "p1", caption])
        w.writerow(["3001", "x", "PT00H00M01S", "p0", "  "])  # empty caption: dropped at start-up
    return csv_path, videos


def webvid_cfg(webvid, **kw):
    csv_path, videos = webvid
    base = dict(kind="webvid", csv=str(csv_path), video_root=str(videos), num_frames=8, frame_stride=2,
                height=24, width=32)
    return DataConfig(**{**base, **kw})


def test_webvid_batches_skip_and_count(webvid, caplog):
    caplog.set_level(logging.WARNING, logger="modelscope_t2v.data")
    batches = take(make_loader(webvid_cfg(webvid), batch_size=4, seed=0), 4)
    captions = {c: red for c, red in GOOD.values()}
    for k, b in enumerate(batches):
        assert b["batch_index"] == k and b["kind"] == "video"
        px = b["pixels"]
        assert px.shape == (4, 3, 8, 24, 32) and px.dtype == torch.float32
        assert px.min() >= -1 and px.max() <= 1
        for clip, caption in zip(px, b["captions"]):
            assert caption in captions  # never a broken row, never an empty caption
            u8 = (clip + 1) * 127.5  # c f h w
            assert (u8[0].mean() - captions[caption]).abs() < 6  # the caption's own video
            green = u8[1].mean((1, 2))
            assert ((green.diff() - 20).abs() < 6).all()  # frame_stride 2 on a 10-per-frame ramp
            assert clip.std() > 0.1  # not blank
    # positions 0..7 cover epoch 0 (7 rows): every broken row was met at least once there
    assert batches[0]["skipped"] + batches[1]["skipped"] >= len(BAD)
    # each broken file is logged exactly once, however often it was drawn
    messages = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    for vid in BAD:
        assert sum(f"{vid}.mp4" in m for m in messages) == 1, (vid, messages)
    assert not any(f"{vid}.mp4" in m for m in messages for vid in GOOD)
    assert any("missing file" in m for m in messages) and any("VideoTooShortError" in m for m in messages)
    assert any("empty caption" in r.getMessage() for r in caplog.records)  # the dropped CSV row


def test_webvid_target_fps_and_verify_files(webvid, caplog):
    caplog.set_level(logging.WARNING, logger="modelscope_t2v.data")
    b = next(make_loader(webvid_cfg(webvid, frame_stride=None, target_fps=8.0, num_frames=6,
                                    verify_files=True), batch_size=6, seed=1))
    green = ((b["pixels"][:, 1] + 1) * 127.5).mean((2, 3))  # b f
    assert ((green.diff(dim=1) - 30).abs() < 6).all()  # 24 -> 8 fps: every 3rd frame
    assert b["skipped"] >= 3  # positions 0..5 cover the 6 rows left, 3 of them broken
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 whose video is missing" in m for m in messages)  # dropped up front ...
    assert not any("2004.mp4" in m for m in messages)  # ... so never drawn


def test_webvid_forked_workers_resume_exact(webvid):
    cfg = webvid_cfg(webvid, multiprocessing_context="fork")
    read_video_frames(Path(cfg.video_root) / "p0" / "1001.mp4", num_frames=2)  # PyAV used before the fork
    fresh = take(make_loader(cfg, batch_size=3, seed=7), 5)
    forked = take(make_loader(cfg, batch_size=3, seed=7, num_workers=2), 5)
    assert_same_batches(fresh, forked)
    resumed = take(make_loader(cfg, batch_size=3, seed=7, start_batch=2, num_workers=2), 3)
    assert_same_batches(fresh[2:], resumed)
    other = next(make_loader(cfg, batch_size=3, seed=8))
    assert not torch.equal(other["pixels"], fresh[0]["pixels"])


def test_too_many_skips_raises(webvid, tmp_path):
    csv_path, _ = webvid
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = webvid_cfg(webvid, video_root=str(empty), max_skips_per_batch=5)
    with pytest.raises(RuntimeError, match="max_skips_per_batch"):
        next(make_loader(cfg, batch_size=2, seed=0))


# ---------------------------------------------------------------------------------------------------
# Image folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    halves = np.zeros((50, 100, 3), np.uint8)
    halves[:, :50, 0] = 255  # left half red, right half blue
    halves[:, 50:, 2] = 255
    Image.fromarray(halves).save(root / "halves.png")
    (root / "halves.txt").write_text("red left, blue right\n")
    Image.fromarray(np.full((60, 40, 3), 90, np.uint8)).save(root / "sub" / "grey.jpg", quality=95)
    (root / "sub" / "grey.txt").write_text("a grey picture")
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(root / "light.webp")
    (root / "light.txt").write_text("a light picture")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "nocaption.png")  # left out
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "corrupt.txt").write_text("never seen")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "blank_caption.png")
    (root / "blank_caption.txt").write_text("   \n")
    return root


def test_image_folder(image_folder, caplog):
    caplog.set_level(logging.WARNING, logger="modelscope_t2v.data")
    assert len(ImageFolderDataset(image_folder, height=32, width=32)) == 5  # nocaption left out
    cfg = DataConfig(kind="images", image_root=str(image_folder), height=32, width=32)
    batches = take(make_loader(cfg, batch_size=3, seed=0), 4)
    valid = {"red left, blue right", "a grey picture", "a light picture"}
    for b in batches:
        assert b["kind"] == "image" and b["pixels"].shape == (3, 3, 1, 32, 32)
        assert set(b["captions"]) <= valid
        for px, caption in zip(b["pixels"], b["captions"]):
            u8 = ((px[:, 0] + 1) * 127.5).round()  # c h w
            if caption == "red left, blue right":  # the centre 50x50 crop keeps both halves
                assert u8[:, 16, 2].tolist() == [255, 0, 0] and u8[:, 16, 29].tolist() == [0, 0, 255]
            elif caption == "a grey picture":
                assert (u8 - 90).abs().max() <= 3
    assert batches[0]["skipped"] + batches[1]["skipped"] >= 2  # epoch 0 (5 items) met both bad ones
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "corrupt.jpg" in messages and "blank_caption.png" in messages and "without a .txt caption" in messages


# ---------------------------------------------------------------------------------------------------
# webdataset


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    tmp = root / "tmp.mp4"
    captions = {}
    for s in range(2):
        with tarfile.open(root / f"videos-{s}.tar", "w") as tar:
            for i in range(4):
                key = f"s{s}_{i:03d}"
                save_video_frames(tmp, ramp_video(12, 16, 16, red=20 + 30 * (4 * s + i), step=20), fps=12)
                add_member(tar, f"{key}.mp4", tmp.read_bytes())
                captions[key] = f"video {key}"
                add_member(tar, f"{key}.txt", captions[key].encode())
            if s == 0:
                add_member(tar, "bad.mp4", b"not a video at all")
                add_member(tar, "bad.txt", b"a broken sample")
            else:
                buf = io.BytesIO()
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
                add_member(tar, "img.jpg", buf.getvalue())  # not a video: left out of a video stream
                add_member(tar, "img.txt", b"an image")
    with tarfile.open(root / "images-0.tar", "w") as tar:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 20, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            add_member(tar, f"im{i}.png", buf.getvalue())
            add_member(tar, f"im{i}.txt", f"picture {i}".encode())
    return root, captions


def test_webdataset_stream_resume_workers(shards, caplog):
    caplog.set_level(logging.WARNING, logger="modelscope_t2v.data")
    root, captions = shards
    cfg = DataConfig(kind="webdataset", urls=[str(root / "videos-{0..1}.tar")], shuffle_buffer=3, num_frames=4,
                     frame_stride=2, height=16, width=16, multiprocessing_context="fork")
    fresh = take(make_loader(cfg, batch_size=2, seed=0), 8)
    keys = []
    for b in fresh:
        assert b["kind"] == "video" and b["pixels"].shape == (2, 3, 4, 16, 16)
        assert all(c in captions.values() for c in b["captions"])
        keys += b["captions"]
        green = ((b["pixels"][:, 1] + 1) * 127.5).mean((2, 3))
        assert ((green.diff(dim=1) - 40).abs() < 8).all()
    # one epoch = 9 stream samples (8 videos + the broken one; the jpg is left out)
    assert sum(b["skipped"] for b in fresh[:5]) >= 1
    assert set(keys) == set(captions.values())  # two epochs: every video shows up
    assert sum("bad" in r.getMessage() for r in caplog.records) == 1
    assert_same_batches(fresh[5:], take(make_loader(cfg, batch_size=2, seed=0, start_batch=5), 3))
    assert_same_batches(fresh, take(make_loader(cfg, batch_size=2, seed=0, num_workers=2), 8))
    # two ranks read disjoint shards (within an epoch; the shard assignment is reshuffled per epoch)
    flat = DataConfig(**{**cfg.__dict__, "shuffle_buffer": 0})
    r0 = {c for b in take(make_loader(flat, batch_size=2, seed=0, rank=0, world_size=2), 2) for c in b["captions"]}
    r1 = {c for b in take(make_loader(flat, batch_size=2, seed=0, rank=1, world_size=2), 2) for c in b["captions"]}
    assert r0.isdisjoint(r1) and len({c.split()[1][:2] for c in r0}) == 1


def test_webdataset_replacement_rule(shards):
    """Stream order (one shard, no shuffle buffer): an unreadable sample is replaced by the next
    samples after its batch's window, which batch k+1 still holds too (no drift from skips)."""
    root, _ = shards
    cfg = DataConfig(kind="webdataset", urls=[str(root / "videos-0.tar")], shuffle_buffer=0, num_frames=2,
                     height=8, width=8)  # stream: s0_000 .. s0_003, bad, s0_000 (next epoch) ...
    batches = take(make_loader(cfg, batch_size=2, seed=0), 5)
    got = [([c.split()[1] for c in b["captions"]], b["skipped"]) for b in batches]
    assert got == [
        (["s0_000", "s0_001"], 0),
        (["s0_002", "s0_003"], 0),
        (["s0_001", "s0_000"], 1),  # positions 4 (bad -> 6) and 5
        (["s0_001", "s0_002"], 0),  # positions 6 and 7
        (["s0_003", "s0_000"], 1),  # positions 8 and 9 (bad -> 10)
    ]


def test_webdataset_images(shards):
    root, _ = shards
    cfg = DataConfig(kind="webdataset", media="image", urls=[str(root / "images-0.tar")], shuffle_buffer=0,
                     height=8, width=8)
    b = next(make_loader(cfg, batch_size=5, seed=0))
    assert b["kind"] == "image" and b["pixels"].shape == (5, 3, 1, 8, 8)
    assert b["captions"] == [f"picture {i}" for i in range(5)]  # no shuffle buffer: stream order
    assert b["skipped"] == 0


# ---------------------------------------------------------------------------------------------------
# Mixed, resume, sharding


def pixel_key(px):
    return px.numpy().tobytes()


def test_mixed_ratio_positions_and_resume():
    cfg = DataConfig(kind="mixed", image_ratio=0.3, num_frames=4, height=16, width=16,
                     video=SourceConfig(kind="shapes", shapes_length=12),
                     image=SourceConfig(kind="shapes", shapes_image=True, shapes_length=9))
    batches = take(make_loader(cfg, batch_size=3, seed=11), 300)
    kinds = [b["kind"] for b in batches]
    assert 0.22 < kinds.count("image") / len(kinds) < 0.38
    for b in batches:
        f = 1 if b["kind"] == "image" else 4
        assert b["pixels"].shape == (3, 3, f, 16, 16)
        assert all((parse_shapes_caption(c)[2] is None) == (b["kind"] == "image") for c in b["captions"])
    # each source keeps its own position: its first epoch is exactly its data set, once each
    videos = [b for b in batches if b["kind"] == "video"][:4]  # 4 batches x 3 = 12 = one epoch
    images = [b for b in batches if b["kind"] == "image"][:3]  # 3 x 3 = 9
    vds = ShapesDataset(12, num_frames=4, height=16, width=16)
    ids = ShapesDataset(9, image=True, height=16, width=16)
    for got, ds in ((videos, vds), (images, ids)):
        assert sorted(pixel_key(p) for b in got for p in b["pixels"]) == sorted(
            pixel_key(ds[i]["pixels"]) for i in range(len(ds))
        )
    assert_same_batches(batches[137:142], take(make_loader(cfg, batch_size=3, seed=11, start_batch=137), 5))
    # the same coins on every rank (image steps together)
    r1 = take(make_loader(cfg, batch_size=3, seed=11, rank=1, world_size=3), 40)
    assert [b["kind"] for b in r1] == kinds[:40]
    only = DataConfig(**{**cfg.__dict__, "image_ratio": 1.0})
    assert {b["kind"] for b in take(make_loader(only, batch_size=1, seed=0), 20)} == {"image"}


def test_mixed_webvid_and_images(webvid, image_folder):
    csv_path, videos = webvid
    cfg = DataConfig(kind="mixed", image_ratio=0.5, num_frames=4, frame_stride=1, height=16, width=16,
                     video=SourceConfig(kind="webvid", csv=str(csv_path), video_root=str(videos)),
                     image=SourceConfig(kind="images", image_root=str(image_folder)))
    batches = take(make_loader(cfg, batch_size=2, seed=3), 12)
    assert {b["kind"] for b in batches} == {"video", "image"}
    for b in batches:
        assert b["pixels"].shape[2] == (4 if b["kind"] == "video" else 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shapes_resume_exact(num_workers):
    cfg = DataConfig(kind="shapes", num_frames=4, height=16, width=16, shapes_length=10,
                     multiprocessing_context="fork")
    fresh = take(make_loader(cfg, batch_size=3, seed=5), 9)  # crosses epoch boundaries (10 per epoch)
    resumed = take(make_loader(cfg, batch_size=3, seed=5, start_batch=4, num_workers=num_workers), 5)
    assert_same_batches(fresh[4:], resumed)
    if num_workers:
        assert_same_batches(fresh, take(make_loader(cfg, batch_size=3, seed=5, num_workers=num_workers), 9))
    # epoch 1 is a different order of the same samples
    epoch0 = [pixel_key(p) for b in fresh[:3] for p in b["pixels"]][:9]
    assert len(set(epoch0)) == 9


def test_rank_sharding_covers_epoch_once():
    cfg = DataConfig(kind="shapes", num_frames=2, height=8, width=8, shapes_length=9)
    # world_size 2: 4 samples per rank per epoch (the 9th is dropped); ranks disjoint
    per_rank = [[pixel_key(p) for b in take(make_loader(cfg, batch_size=2, seed=0, rank=r, world_size=2), 2)
                 for p in b["pixels"]] for r in range(2)]
    assert len(set(per_rank[0]) | set(per_rank[1])) == 8
    everything = {pixel_key(ShapesDataset(9, num_frames=2, height=8, width=8)[i]["pixels"]) for i in range(9)}
    assert set(per_rank[0]) | set(per_rank[1]) <= everything


def test_loader_leaves_global_rng_alone():
    cfg = DataConfig(kind="shapes", num_frames=2, height=8, width=8, multiprocessing_context="fork")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(make_loader(cfg, batch_size=2, seed=0, num_workers=1))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------
# Configs and errors


@pytest.mark.parametrize("name", ["shapes", "shapes_images", "webvid", "images", "webdataset", "mixed"])
def test_config_files(name):
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIGS / f"{name}.yaml"))
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, DataConfig)
    check_data_config(cfg)
    assert cfg.kind == {"shapes_images": "shapes"}.get(name, name)
    if name in ("shapes", "shapes_images", "mixed"):  # the offline ones run, from the DictConfig too
        b = next(make_loader(node, batch_size=2, seed=0))
        assert b["pixels"].shape[-2:] == (64, 64)
        assert b["kind"] == ("image" if name == "shapes_images" else b["kind"])


def test_bad_arguments_are_named(tmp_path):
    ok = DataConfig(num_frames=2, height=8, width=8)
    cases = [
        (dict(cfg=DataConfig(kind="bogus")), "kind"),
        (dict(cfg=DataConfig(frame_stride=2, target_fps=8.0)), "target_fps"),
        (dict(cfg=DataConfig(num_frames=0)), "num_frames"),
        (dict(cfg=DataConfig(kind="mixed", image_ratio=1.5)), "image_ratio"),
        (dict(cfg=DataConfig(kind="mixed", image=SourceConfig(kind="shapes"))), "image"),
        (dict(cfg=DataConfig(kind="webdataset")), "urls"),
        (dict(cfg=DataConfig(multiprocessing_context="threads")), "multiprocessing_context"),
        (dict(cfg=ok, batch_size=0), "batch_size"),
        (dict(cfg=ok, seed=-1), "seed"),
        (dict(cfg=ok, rank=2, world_size=2), "rank"),
        (dict(cfg=DataConfig(kind="shapes", shapes_length=1), world_size=2), "world_size"),
    ]
    for kw, word in cases:
        kw = {"batch_size": 2, "seed": 0, **kw}
        with pytest.raises(ValueError, match=word):
            make_loader(kw.pop("cfg"), **kw)
    with pytest.raises(FileNotFoundError, match="csv"):
        make_loader(DataConfig(kind="webvid", csv=str(tmp_path / "none.csv")), batch_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match="image_root"):
        make_loader(DataConfig(kind="images", image_root=str(tmp_path / "none")), batch_size=1, seed=0)
    with pytest.raises(ValueError, match="unknown field"):
        make_loader({"kind": "shapes", "frames": 3}, batch_size=1, seed=0)
