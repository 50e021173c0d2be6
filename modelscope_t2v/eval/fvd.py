"""FVD features: videos through a detector (the I3D TorchScript file that StyleGAN-V's and
common_metrics_on_video_quality's FVD code load, given by the user; or any feature extractor), with the
reference code's preprocessing.

Two preprocessings, named for the code they reproduce (both take the first `num_frames` frames):
- "common" (common_metrics_on_video_quality, fvd/styleganv/fvd.py, `preprocess_single`): frames as float
  in [0, 1]; the shorter side resized to 224 (bilinear, align_corners=False, the longer side ceil-rounded),
  a centre crop to 224 x 224, then scaled to [-1, 1]; the detector called with rescale=False, resize=False,
  return_features=True.
- "styleganv" (StyleGAN-V, src/metrics/frechet_video_distance.py): uint8 frames in [0, 255] handed to the
  detector with rescale=True, resize=True, return_features=True: the TorchScript file rescales and resizes
  itself (to 224 x 224, without keeping the aspect ratio).
The features are the 400 logits before the softmax. The covariance follows the same code: n - 1 for
"common" (np.cov), n for "styleganv" (its FeatureStats). A TorchScript file is a program: load only a detector
from a source you trust (the reference code loads the same file the same way).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

PREPROCESSINGS = ("common", "styleganv")
RESOLUTION = 224  # I3D's input size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Detector:
    """A feature extractor for FVD: `fn(x, **kwargs) -> (b, d)` on the preprocessed batch `b c f h w`.

    `Detector(any_module)` wraps any extractor (called without keyword arguments, on the "common" input);
    `Detector.from_file(path)` loads the I3D TorchScript file. `meta` goes into the statistics it makes.
    """

    fn: Callable[..., torch.Tensor]
    preprocessing: str = "common"
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"
    sha256: str | None = None

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {self.preprocessing!r}")
        if not callable(self.fn):
            raise TypeError(f"a detector must be callable, got {type(self.fn).__name__}")

    @classmethod
    def from_file(cls, path: str | Path, preprocessing: str = "common") -> "Detector":
        """The I3D TorchScript file (i3d_torchscript.pt, as the reference FVD code distributes it)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"fvd detector: no such file {str(path)!r}")
        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"fvd detector: {path} is not a TorchScript file ({first[:200]})") from None
        kwargs = {"rescale": preprocessing == "styleganv", "resize": preprocessing == "styleganv", "return_features": True}
        schema = str(module.forward.schema) if hasattr(module.forward, "schema") else ""
        missing = [k for k in kwargs if k not in schema]
        if missing:
            raise ValueError(f"fvd detector: {path} is TorchScript but its forward takes no {', '.join(missing)} "
                             f"(the I3D detector's forward is forward(x, rescale, resize, return_features)); "
                             f"wrap another extractor in eval.fvd.Detector instead")
        return cls(module, preprocessing, kwargs, name=path.name, sha256=file_sha256(path))

    @property
    def meta(self) -> dict[str, Any]:
        return {"detector": self.name, "detector_sha256": self.sha256, "preprocessing": self.preprocessing}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, **self.kwargs)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"fvd detector {self.name}: expected features (batch, d) for a batch of {x.shape[0]}, got {shape}")
        return out


def covariance_ddof(preprocessing: str) -> int:
    """The covariance divisor of the code a preprocessing is named after: StyleGAN-V's n (0), common's n - 1."""
    return 0 if preprocessing == "styleganv" else 1


def preprocess(video, preprocessing: str = "common", num_frames: int = 16) -> torch.Tensor:
    """One video, (f, h, w, 3) uint8 (or float in [0, 1]) frames -> the detector's input `c f h w`: the
    first `num_frames` frames, then the preprocessing named (module docstring)."""
    from ..video_io import frames_to_uint8

    frames = torch.from_numpy(np.ascontiguousarray(frames_to_uint8(video)))  # f h w 3 uint8
    if frames.shape[0] < num_frames:
        raise ValueError(f"FVD with num_frames={num_frames} needs videos of at least {num_frames} frames; one has {frames.shape[0]}")
    x = rearrange(frames[:num_frames], "f h w c -> c f h w")
    if preprocessing == "styleganv":
        return x.contiguous()  # uint8; the detector rescales and resizes
    if preprocessing != "common":
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
    x = x.float() / 255.0
    _, _, h, w = x.shape
    scale = RESOLUTION / min(h, w)  # the shorter side to 224, the other rounded up
    size = (RESOLUTION, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), RESOLUTION)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # c f h w: (h, w) resized per frame
    top, left = (x.shape[2] - RESOLUTION) // 2, (x.shape[3] - RESOLUTION) // 2
    x = x[:, :, top:top + RESOLUTION, left:left + RESOLUTION]
    return ((x - 0.5) * 2).contiguous()


def video_features(detector: Detector, videos: Sequence, num_frames: int = 16, batch_size: int = 8,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """(n, d) float64 features of `videos` (each (f, h, w, 3) frames), batch by batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(videos), batch_size):
        clips = [preprocess(v, detector.preprocessing, num_frames) for v in videos[start:start + batch_size]]
        if len({tuple(c.shape) for c in clips}) == 1:
            feats = detector(torch.stack(clips).to(device)).detach().double().cpu().numpy()
        else:  # styleganv keeps each video's own size: unequal sizes go through one at a time
            feats = np.concatenate([detector(c[None].to(device)).detach().double().cpu().numpy() for c in clips])
        if out and feats.shape[1] != out[0].shape[1]:
            raise ValueError(f"fvd detector {detector.name}: feature size changed from {out[0].shape[1]} to {feats.shape[1]}")
        out.append(feats)
    if not out:
        raise ValueError("no videos to compute FVD features of")
    return np.concatenate(out)
