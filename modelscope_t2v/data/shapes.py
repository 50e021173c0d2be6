"""The shapes world: one pure-colour object on black, moving at constant speed, with its caption grammar.

The grammar is public so that an evaluation (modelscope_t2v.eval.shapes) can parse captions and check
generated videos; `ShapesDataset` needs no files (sample i is a pure function of its seed and i).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .decode import uint8_to_float

# The grammar is public so that an evaluation script can parse captions and check generated videos.

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# A motion the bundled model never saw, and its LoRA teaches (docs/lora.md): "a {color} {shape} standing
# still", the object where it is in every frame. Not drawn unless a data config asks for it (shapes_directions).
STILL = "still"
MOTIONS: tuple[str, ...] = DIRECTIONS + (STILL,)  # every direction word of the grammar
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
# unit displacement (dx, dy) in image coordinates (y grows downwards)
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPE_EXTENT = (0.22, 0.28)  # object width as a fraction of min(height, width): about a quarter
SHAPE_TRAVEL_MIN = 0.36  # the least distance travelled over a clip, as a fraction of the frame (> 1/3)

_CAPTION_RE = re.compile(r"^a (\w+) (\w+)(?: moving (\w+)| standing (still))?$")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def shapes_caption(color: str, shape: str, direction: str | None = None) -> str:
    """"a {color} {shape} moving {direction}" ("... standing still" for STILL), or "a {color} {shape}" for
    the image variant."""
    _check_choice("color", color, COLORS)
    _check_choice("shape", shape, SHAPES)
    if direction is None:
        return f"a {color} {shape}"
    _check_choice("direction", direction, MOTIONS)
    return f"a {color} {shape} standing still" if direction == STILL else f"a {color} {shape} moving {direction}"


def parse_shapes_caption(caption: str) -> tuple[str, str, str | None]:
    """(color, shape, direction or None) of a shapes caption (direction STILL for "standing still");
    ValueError if it is not one."""
    m = _CAPTION_RE.match(caption.strip())
    if not m or m.group(1) not in COLORS or m.group(2) not in SHAPES or (
        m.group(3) is not None and m.group(3) not in DIRECTIONS
    ):
        raise ValueError(
            f"caption {caption!r} is not a shapes caption ('a {{color}} {{shape}} [moving {{direction}} | "
            "standing still]')"
        )
    return m.group(1), m.group(2), m.group(3) or m.group(4)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, extent: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of each pixel centre to the shape; exact inside, a lower
    bound outside (enough for a 1-pixel antialiased edge). cx, cy are (f,1,1) bounding-box centres."""
    dx, dy = x - cx, y - cy  # f h w
    half = extent / 2
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - half
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - half
    # equilateral triangle pointing up, `extent` wide, centred on its bounding box
    tri_h = extent * math.sqrt(3) / 2
    ty = dy + tri_h / 2  # relative to the top vertex
    left = -math.sqrt(3) / 2 * dx - 0.5 * ty
    right = math.sqrt(3) / 2 * dx - 0.5 * ty
    bottom = dy - tri_h / 2
    return np.maximum(np.maximum(left, right), bottom)


def _render_shape_uint8(
    color: str,
    shape: str,
    direction: str | None,
    *,
    num_frames: int,
    height: int,
    width: int,
    rng: np.random.Generator,
    antialias: bool = True,
    clip_frames: int | None = None,
) -> Tensor:
    """c f h w uint8: draws extent, start and travel (over `clip_frames`, default num_frames) from rng, then
    renders num_frames frames."""
    lo, hi = SHAPE_EXTENT
    extent = float(rng.uniform(lo, hi)) * min(height, width)
    half = extent / 2
    # the bounding-box centre stays inside [half, size - half] on both axes, over the whole clip
    cx0 = float(rng.uniform(half, width - half))
    cy0 = float(rng.uniform(half, height - half))
    clip_frames = num_frames if clip_frames is None else clip_frames
    t = np.linspace(0.0, 1.0, clip_frames, dtype=np.float64) if clip_frames > 1 else np.zeros(1)
    if num_frames != clip_frames:  # the clip's own times, then its speed kept past its end (or the clip cut short)
        t = np.concatenate([t, np.arange(clip_frames, num_frames, dtype=np.float64) / (clip_frames - 1)])[:num_frames]
    cx = np.full(num_frames, cx0)
    cy = np.full(num_frames, cy0)
    if direction is not None and direction != STILL:
        ddx, ddy = DIRECTION_VECTORS[direction]
        axis = width if ddx else height
        travel = float(rng.uniform(SHAPE_TRAVEL_MIN * axis, axis - extent))
        start = float(rng.uniform(half, axis - half - travel))
        along = start + travel * t  # constant speed, increasing coordinate
        if ddx < 0 or ddy < 0:
            along = axis - along  # left / up: mirror
        if ddx:
            cx = along
        else:
            cy = along
    x = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
    y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
    d = _shape_sdf(shape, x, y, cx.astype(np.float32)[:, None, None], cy.astype(np.float32)[:, None, None], extent)
    alpha = np.clip(0.5 - d, 0.0, 1.0) if antialias else (d <= 0).astype(np.float32)  # f h w
    rgb = np.asarray(COLOR_RGB[color], dtype=np.float32)[:, None, None, None]  # c 1 1 1
    return torch.from_numpy(np.rint(alpha[None] * rgb).astype(np.uint8))  # c f h w


def render_shape_clip(
    color: str,
    shape: str,
    direction: str | None = None,
    *,
    num_frames: int = 16,
    size: int = 64,
    height: int | None = None,
    width: int | None = None,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    antialias: bool = True,
    clip_frames: int | None = None,
) -> Tensor:
    """One shapes clip, `c f h w` float in [-1, 1].

    The object (about a quarter of min(height, width) across, pure `COLOR_RGB[color]` inside) starts
    at a random place and, if `direction` is given, moves that way at constant speed, travelling at
    least SHAPE_TRAVEL_MIN (> 1/3) of the frame over the clip while staying wholly inside it;
    direction None gives a static object. Geometry comes from `rng` (a numpy Generator) or `seed`.

    `clip_frames` (default `num_frames`): draw the geometry, and so the speed, of a `clip_frames`-frame clip
    and render `num_frames` frames of it. Longer is the world's own continuation of that clip past its end
    (the object keeps its speed and leaves the frame); its first `clip_frames` frames are that clip.
    """
    _check_choice("color", color, COLORS)
    _check_choice("shape", shape, SHAPES)
    if direction is not None:
        _check_choice("direction", direction, MOTIONS)
    height = size if height is None else height
    width = size if width is None else width
    clip_frames = num_frames if clip_frames is None else clip_frames
    for name, v in (("num_frames", num_frames), ("clip_frames", clip_frames), ("height", height), ("width", width)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if clip_frames != num_frames and clip_frames < 2:
        raise ValueError(f"clip_frames={clip_frames}: a clip of one frame has no speed to continue; use clip_frames >= 2")
    if rng is not None and seed is not None:
        raise ValueError("give rng or seed, not both")
    if rng is None:
        rng = np.random.default_rng(seed)
    clip = _render_shape_uint8(
        color, shape, direction, num_frames=num_frames, height=height, width=width, rng=rng, antialias=antialias,
        clip_frames=clip_frames,
    )
    return uint8_to_float(clip)


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes, no files: sample i is a pure function of (seed, i) and the geometry.

    Videos: "a {color} {shape} moving {direction}", `num_frames` frames (`directions` chooses which: with
    STILL among them, also "a {color} {shape} standing still"). Image variant (`image=True`):
    "a {color} {shape}", one frame; with `image_start=True` the first frame of a moving clip instead,
    captioned with its direction (where an object that moves that way starts). Items: {"pixels": c f h w float in [-1, 1], "caption", "color",
    "shape", "index"} plus "direction" for videos.
    """

    media = "video"

    def __init__(
        self,
        length: int = 100_000,
        *,
        num_frames: int = 16,
        height: int = 64,
        width: int = 64,
        image: bool = False,
        image_start: bool = False,
        seed: int = 0,
        antialias: bool = True,
        directions: tuple[str, ...] | None = None,
    ):
        if image_start and not image:
            raise ValueError("ShapesDataset image_start=True needs image=True (it makes images of clip starts)")
        for name, v in (("length", length), ("num_frames", num_frames), ("height", height), ("width", width)):
            if int(v) < 1:
                raise ValueError(f"ShapesDataset {name} must be >= 1, got {v}")
        if int(seed) < 0:
            raise ValueError(f"ShapesDataset seed must be >= 0, got {seed}")
        self.length, self.height, self.width = int(length), int(height), int(width)
        self.image, self.seed, self.antialias = bool(image), int(seed), bool(antialias)
        self.image_start = bool(image_start)
        # the directions drawn from, uniformly (a word listed twice is drawn twice as often); None: DIRECTIONS
        self.directions = DIRECTIONS if directions is None else tuple(directions)
        if not self.directions:
            raise ValueError("ShapesDataset directions must not be empty")
        for d in self.directions:
            _check_choice("ShapesDataset direction", d, MOTIONS)
        self.num_frames = 1 if self.image else int(num_frames)
        self.media = "image" if self.image else "video"

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> tuple[dict[str, Any], np.random.Generator]:
        """The sample's labels and the generator (positioned after them) that draws its geometry."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, int(self.image), index])
        color = COLORS[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        moving = not self.image or self.image_start
        direction = self.directions[int(rng.integers(len(self.directions)))] if moving else None
        return {"color": color, "shape": shape, "direction": direction}, rng

    def load(self, index: int, rng: np.random.Generator | None = None) -> tuple[Tensor, str, str]:
        """(c f h w uint8, caption, name); `rng` is ignored (the sample is fixed by its index)."""
        labels, geometry_rng = self.describe(index)
        clip = _render_shape_uint8(
            labels["color"], labels["shape"], labels["direction"], num_frames=self.num_frames,
            height=self.height, width=self.width, rng=geometry_rng, antialias=self.antialias,
        )
        return clip, shapes_caption(**labels), f"shapes[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:
        labels, _ = self.describe(index)
        clip, caption, _ = self.load(index)
        item = {"pixels": uint8_to_float(clip), "caption": caption, "color": labels["color"],
                "shape": labels["shape"], "index": index}
        if labels["direction"] is not None:
            item["direction"] = labels["direction"]
        return item
