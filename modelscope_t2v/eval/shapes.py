"""Reading generated shapes videos back: the object's colour, shape and direction, and accuracy over
prompt/seed pairs, and the caption probe. Used by evaluate.py, the notebooks and the tests.

The measurements are deliberately simple and calibrated on the renderer itself (tests/test_shapes_eval.py
checks that every rendered clip of the grammar reads back correctly):

- foreground: pixels whose brightest channel is above half intensity (the object is pure colour on black);
- colour: the nearest `COLOR_RGB` entry to the mean foreground colour, over all frames;
- shape: the fill of the object's bounding box (foreground pixels / box area), the median over frames:
  square ~1, circle pi/4 ~0.79, triangle (equilateral, pointing up) 1/2, split at the midpoints;
- direction: the drift of the foreground centroid from first to last frame (a least-squares line through
  the per-frame centroids, so one bad frame does not decide it); the larger axis and its sign give
  left/right/up/down, and a drift under `MIN_DRIFT` of the frame size reads as "static".
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..data.shapes import (
    COLOR_RGB,
    COLORS,
    DIRECTIONS,
    SHAPES,
    STILL,
    ShapesDataset,
    parse_shapes_caption,
    shapes_caption,
)
from ..diffusion.losses import diffusion_loss, diffusion_target
from ..diffusion.schedule import add_noise
from ..schedulers import DDIMScheduler, make_sampler

FOREGROUND_THRESHOLD = 0.5  # of full intensity, on the brightest channel
# bounding-box fill -> shape: triangle 0.5 | circle 0.785 | square 1.0, split at the midpoints
SHAPE_FILL_BOUNDS = ((0.5 + np.pi / 4) / 2, (np.pi / 4 + 1.0) / 2)
MIN_DRIFT = 0.1  # of the frame size along the axis; the training clips travel at least 0.36
MIN_PIXELS = 4  # foreground pixels for a frame to count


@dataclass
class Reading:
    """What one video shows. `found` is False when no frame has an object (then nothing is read)."""

    found: bool
    color: str | None = None
    shape: str | None = None
    direction: str | None = None  # left | right | up | down | static
    fill: float = float("nan")  # median bounding-box fill
    drift: tuple[float, float] = (float("nan"), float("nan"))  # (dx, dy) in frame fractions, y down
    mean_rgb: tuple[float, float, float] = (float("nan"),) * 3  # of the foreground, in [0, 1]


def _as_float_frames(video) -> np.ndarray:
    """f h w 3 float in [0, 1] from uint8 or float frames (a torch tensor or an array)."""
    x = np.asarray(video.detach().cpu().numpy() if hasattr(video, "detach") else video)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (f, h, w, 3), got {x.shape}")
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def read_video(video) -> Reading:
    """Colour, shape and direction of the object in `video` (f h w 3, uint8 or float in [0, 1])."""
    x = _as_float_frames(video)
    f, h, w, _ = x.shape
    mask = x.max(axis=-1) > FOREGROUND_THRESHOLD  # f h w
    counts = mask.sum(axis=(1, 2))
    frames = np.flatnonzero(counts >= MIN_PIXELS)
    if len(frames) == 0:
        return Reading(found=False)
    fg = x[mask]  # n 3
    rgb = fg.mean(axis=0)
    palette = np.asarray([COLOR_RGB[c] for c in COLORS], dtype=np.float32) / 255.0
    color = COLORS[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]

    fills, cx, cy = [], [], []
    for i in frames:
        ys, xs = np.nonzero(mask[i])
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
        cx.append(xs.mean())
        cy.append(ys.mean())
    fill = float(np.median(fills))
    shape = "triangle" if fill < SHAPE_FILL_BOUNDS[0] else "circle" if fill < SHAPE_FILL_BOUNDS[1] else "square"

    if len(frames) >= 2:
        t = frames.astype(np.float64)
        span = (f - 1) if f > 1 else 1
        dx = float(np.polyfit(t, np.asarray(cx), 1)[0]) * span / w
        dy = float(np.polyfit(t, np.asarray(cy), 1)[0]) * span / h
    else:
        dx = dy = 0.0
    if max(abs(dx), abs(dy)) < MIN_DRIFT:
        direction = "static"
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Reading(True, color, shape, direction, fill, (dx, dy), tuple(float(v) for v in rgb))


def score(prompt: str, reading: Reading) -> dict[str, bool]:
    """Per attribute: does the video show what `prompt` ("a {color} {shape} moving {direction}") asks?"""
    color, shape, direction = parse_shapes_caption(prompt)
    out = {"color": reading.color == color, "shape": reading.shape == shape}
    if direction is not None:  # "standing still": the reading "static" (a drift under MIN_DRIFT)
        out["direction"] = reading.direction == ("static" if direction == STILL else direction)
    out["all"] = all(out.values())
    return out


def grammar_prompts(directions: Sequence[str] = DIRECTIONS) -> list[str]:
    """Every video caption of the grammar (colour x shape x direction): 84 prompts; `directions=(STILL,)`:
    the 21 "standing still" ones (the LoRA's concept, docs/lora.md)."""
    return [shapes_caption(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, directions)]


def prompt_seed_pairs(n: int, seed0: int = 0, directions: Sequence[str] = DIRECTIONS) -> list[tuple[str, int]]:
    """`n` (prompt, seed) pairs: the grammar's prompts in a fixed shuffled order (so any prefix covers
    colours, shapes and directions evenly), cycled, with seeds seed0, seed0 + 1, ..."""
    if n < 1:
        raise ValueError(f"the number of prompt/seed pairs must be >= 1, got {n}")
    prompts = grammar_prompts(directions)
    order = np.random.default_rng(1234).permutation(len(prompts))
    return [(prompts[order[i % len(prompts)]], seed0 + i) for i in range(n)]


def accuracy(prompts: Sequence[str], readings: Iterable[Reading]) -> dict[str, float]:
    """Fraction correct per attribute (and all three at once) over the videos."""
    scores = [score(p, r) for p, r in zip(prompts, readings, strict=True)]
    if not scores:
        raise ValueError("no videos to score")
    keys = scores[0].keys()
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}


def generate(pipe, pairs: Sequence[tuple[str, int]], *, steps: int, guidance: float | None = None, batch_size: int = 8,
             num_frames: int = 16, height: int | None = None, width: int | None = None,
             progress: bool = False) -> np.ndarray:
    """Videos for (prompt, seed) pairs with `pipe` as it is (its scheduler = the sampler): n f h w 3 in
    [0, 1]; `guidance` None is the model's default. Pair i's noise comes from its own CPU generator
    seeded with its seed, so a video does not depend on the batch it ran in, every sampler starts from
    the same noise for the same pair, and it is the video `python sample.py prompt=<prompt> seed=<seed>`
    writes."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
        frames = pipe([p for p, _ in chunk], num_frames=num_frames, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np",
                      ).frames  # b f h w 3
        out.append(np.asarray(frames, dtype=np.float32))
        if progress:
            print(f"  {min(start + batch_size, len(pairs))}/{len(pairs)} videos", flush=True)
    return np.concatenate(out)


def run_setting(pipe, pairs: Sequence[tuple[str, int]], sampler: str, steps: int, *, config,
                guidance: float | None = None, spacing: str | None = None,
                batch_size: int = 12) -> tuple[np.ndarray, float]:
    """One sampler setting over (prompt, seed) pairs: `pipe.scheduler` becomes sampler `sampler` built from
    the checkpoint's scheduler `config` (`spacing` overrides its timestep spacing), then `generate`.
    Returns the videos (n f h w 3 in [0, 1]) and the seconds they took."""
    pipe.scheduler = make_sampler(sampler, config, spacing)
    t0 = time.perf_counter()
    videos = generate(pipe, pairs, steps=steps, guidance=guidance, batch_size=batch_size)
    return videos, time.perf_counter() - t0


def score_videos(pairs: Sequence[tuple[str, int]], videos) -> dict[str, float]:
    """`accuracy` of videos generated for (prompt, seed) pairs."""
    return accuracy([p for p, _ in pairs], [read_video(v) for v in videos])


def contact_sheet(videos, frames: int = 4, pad: int = 2) -> np.ndarray:
    """One row per video, `frames` evenly spaced frames of it side by side, on a grey grid:
    (rows * (h + pad) + pad, frames * (w + pad) + pad, 3) uint8, for plt.imshow or PIL."""
    vids = [_as_float_frames(v) for v in videos]
    if not vids:
        raise ValueError("no videos for the contact sheet")
    f, h, w, _ = vids[0].shape
    idx = np.linspace(0, f - 1, min(frames, f)).round().astype(int)
    sheet = np.full((len(vids) * (h + pad) + pad, len(idx) * (w + pad) + pad, 3), 0.5, dtype=np.float32)
    for r, v in enumerate(vids):
        for c, i in enumerate(idx):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y:y + h, x:x + w] = v[i]
    return (sheet.clip(0, 1) * 255).round().astype(np.uint8)


def show_contact_sheet(videos, labels: Sequence[str], title: str, frames: int = 6) -> None:
    """Plot `contact_sheet(videos)` with matplotlib, one labelled row per video (for the notebooks)."""
    import matplotlib.pyplot as plt

    sheet = contact_sheet(videos, frames=frames)
    plt.figure(figsize=(1.1 * frames, 1.0 * len(videos) + 0.6))
    plt.imshow(sheet)
    h = (sheet.shape[0] - 2) / len(videos)
    plt.yticks([2 + h * (i + 0.5) for i in range(len(videos))], labels, fontsize=8)
    plt.xticks([])
    plt.title(title, fontsize=10)
    plt.show()


HELDOUT_SEED = 10_000  # a shapes_seed no training config uses


def heldout_videos(n: int, num_frames: int = 16, size: int = 64, *, start_images: bool = False
                   ) -> list[tuple[str, torch.Tensor]]:
    """`n` (caption, clip c f h w in [-1, 1]) shapes videos from a data seed no training run uses; or,
    with `start_images`, 1-frame clip starts captioned with their direction (data.ShapesDataset image_start)."""
    ds = ShapesDataset(n, num_frames=num_frames, height=size, width=size, seed=HELDOUT_SEED,
                       image=start_images, image_start=start_images)
    return [(item["caption"], item["pixels"]) for item in (ds[i] for i in range(n))]


# ---------------------------------------------------------------------------------------------------
# Which words of the caption does a model use? Its denoising loss on held-out clips with the true caption
# and with one word swapped: a word the model reads costs loss when it is wrong; a word it ignores costs
# nothing. At high noise (where only the caption can tell the layout) this shows what generation can
# follow; sampling accuracy alone cannot tell "ignored" from "read but not enough".

_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_PERPENDICULAR = {"left": "up", "right": "down", "up": "left", "down": "right"}
PROBE_VARIANTS = ("right", "opposite", "perpendicular", "other_color", "other_shape", "empty")


def probe_caption(caption: str, variant: str) -> str:
    """`caption` with one word swapped as `variant` says ("right": unchanged; "opposite" /
    "perpendicular": the direction; "other_color" / "other_shape": the next one in COLORS / SHAPES;
    "empty": "")."""
    color, shape, direction = parse_shapes_caption(caption)
    if variant not in PROBE_VARIANTS:
        raise ValueError(f"variant must be one of {PROBE_VARIANTS}, got {variant!r}")
    if variant == "empty":
        return ""
    if variant in ("opposite", "perpendicular"):
        if direction is None:
            raise ValueError(f"caption {caption!r} has no direction to swap")
        direction = (_OPPOSITE if variant == "opposite" else _PERPENDICULAR)[direction]
    elif variant == "other_color":
        color = COLORS[(COLORS.index(color) + 1) % len(COLORS)]
    elif variant == "other_shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    return shapes_caption(color, shape, direction)


def caption_probe(pipe, n: int = 16, timesteps: Sequence[int] = (999, 950, 900, 800), *, seed: int = 0,
                  variants: Sequence[str] = PROBE_VARIANTS, start_images: bool = False) -> dict:
    """The training objective (MSE to eps or v, as the checkpoint's scheduler predicts) on `n` held-out
    clips at each timestep, with the noise fixed, for the true caption and each swapped variant. With
    `start_images` the clips are 1-frame starts of moving clips, where the direction word alone says
    where the object is (no frame order needed).

    Returns {"loss": {variant: {t: mse}}, "frame_variation": float, "data_frame_variation": float}: the last
    two (NaN for start images) are the variance over frames of the model's x0 estimate at the highest timestep (per clip, averaged)
    and of the clean latents; a model that draws every clip static at the start of sampling has the first
    near 0 whatever the second."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for v in variants:
        if v not in PROBE_VARIANTS:
            raise ValueError(f"variants must be among {PROBE_VARIANTS}, got {v!r}")
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    ac = sched.alphas_cumprod
    if not all(0 <= int(t) < len(ac) for t in timesteps) or not len(timesteps):
        raise ValueError(f"timesteps must be in [0, {len(ac)}), got {list(timesteps)}")
    prediction = sched.config.prediction_type
    device = pipe._execution_device
    clips = heldout_videos(n, start_images=start_images)
    captions = [c for c, _ in clips]
    with torch.no_grad(), pipe.call_precision():  # half weights on a CPU: computed in float32
        dtype = pipe.dtype
        pixels = torch.stack([x for _, x in clips]).to(device, dtype)  # b c f h w
        latents = pipe.vae.encode(pixels).mean.float() * pipe.vae.config.scaling_factor  # b c f h w
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)  # b c f h w
        text = {v: pipe.encode_prompt([probe_caption(c, v) for c in captions], device, 1,
                                      do_classifier_free_guidance=False)[0] for v in variants}  # b n d each
        loss: dict[str, dict[int, float]] = {v: {} for v in variants}
        frame_variation = float("nan")
        order = sorted({int(t) for t in timesteps}, reverse=True)
        for t in order:
            ts = torch.full((n,), t, device=device)
            noisy = add_noise(latents, noise, ac.to(device), ts)  # b c f h w
            target = diffusion_target(latents, noise, ac.to(device), ts, prediction)  # b c f h w
            for v in variants:
                pred = pipe.unet(noisy.to(dtype), ts, text[v].to(dtype)).float()  # b c f h w
                loss[v][t] = float(diffusion_loss(pred, target))
                if v == variants[0] and t == order[0]:  # the x0 estimate at the noisiest timestep
                    a, s = ac[t].sqrt().to(device), (1 - ac[t]).sqrt().to(device)
                    if prediction == "epsilon":  # (x_t - s eps) / a; undefined at zero SNR
                        x0 = (noisy - s * pred) / a if a > 0 else torch.full_like(pred, float("nan"))
                    else:
                        x0 = a * noisy - s * pred  # b c f h w
                    frame_variation = float(x0.var(dim=2).mean()) if x0.shape[2] > 1 else float("nan")
    data_variation = float(latents.var(dim=2).mean()) if latents.shape[2] > 1 else float("nan")
    return {"loss": loss, "frame_variation": frame_variation, "data_frame_variation": data_variation}
