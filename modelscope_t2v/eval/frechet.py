"""The Frechet distance between two sets of features (FVD with I3D features, FID with Inception's), and
the reference statistics file that holds one set's mean and covariance.

Why a file: the real videos' statistics are computed once (thousands of clips through I3D) and every
model is then compared with them; the file records how they were made (detector, preprocessing, frames),
and a comparison with features made another way is refused rather than silently meaningless.

The distance is StyleGAN-V's (src/metrics/frechet_video_distance.py, the FVD most video papers report):
    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))
with scipy's matrix square root, the real part taken. The covariance's divisor differs between the two
reference codes: StyleGAN-V's FeatureStats divide by n (ddof 0), common_metrics_on_video_quality's copy
uses np.cov (n - 1, ddof 1); the statistics record which (eval.fvd.covariance_ddof ties it to the
preprocessing named after the same code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..formats.files import atomic_path


@dataclass
class FeatureStats:
    """Mean and covariance of `count` feature vectors (float64), and how the features were made."""

    mean: np.ndarray  # (d,)
    cov: np.ndarray  # (d, d)
    count: int
    meta: dict[str, Any] = field(default_factory=dict)  # detector, preprocessing, num_frames, source, ...

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def feature_stats(features, meta: dict[str, Any] | None = None, ddof: int = 1) -> FeatureStats:
    """Statistics of an (n, d) array of features, n >= 2 (a covariance needs two samples); the covariance
    divided by n - ddof."""
    x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"features must be an (n, d) array, one row a video; got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"too few videos for a covariance: {x.shape[0]} feature vector(s), need at least 2 "
                         f"(published FVDs use 2048 generated videos; with n <= d = {x.shape[1]} the covariance is singular)")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or inf values (a video or the detector produced them)")
    cov = np.atleast_2d(np.cov(x, rowvar=False, ddof=ddof))  # d d (1 x 1 for one feature)
    return FeatureStats(mean=x.mean(axis=0), cov=cov, count=int(x.shape[0]), meta={**(meta or {}), "ddof": ddof})


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Frechet distance between the Gaussians of `a` and `b` (the formula above)."""
    if a.dim != b.dim:
        raise ValueError(f"mismatched feature sizes: {a.dim} against {b.dim} (were both made by the same detector?)")
    diff = np.square(a.mean - b.mean).sum()
    product = a.cov @ b.cov
    root = scipy.linalg.sqrtm(product)
    if not np.isfinite(root).all():  # a singular product: offset both covariances a little (as pytorch-fid does)
        offset = np.eye(a.dim) * 1e-6
        root = scipy.linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    value = float(np.real(diff + np.trace(a.cov + b.cov - 2 * root)))
    if not math.isfinite(value):
        raise ValueError("the Frechet distance is not finite (covariances with NaN or inf?)")
    return value


def check_comparable(features_meta: dict[str, Any], reference_meta: dict[str, Any],
                     keys=("detector_sha256", "preprocessing", "num_frames", "resolution", "ddof")) -> None:
    """ValueError naming the first setting in which two sets of features were made differently."""
    for key in keys:
        if key in features_meta and key in reference_meta and features_meta[key] != reference_meta[key]:
            raise ValueError(f"the reference statistics were made with {key}={reference_meta[key]!r}, these features with "
                             f"{key}={features_meta[key]!r}: an FVD between them means nothing")


def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write `stats` as safetensors (float64 `mean`, `cov`; count and meta in the header), atomically."""
    path = Path(path)
    tensors = {"mean": torch.from_numpy(np.ascontiguousarray(stats.mean)), "cov": torch.from_numpy(np.ascontiguousarray(stats.cov))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "feature-stats", "count": str(stats.count),
                                               "meta": json.dumps(stats.meta, sort_keys=True)})
    return path


def load_stats(path: str | Path) -> FeatureStats:
    """Read a statistics file written by `save_stats`; ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference statistics: no such file {str(path)!r}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"reference statistics: {path} is not a safetensors file ({e})") from None
    if header.get("format") != "feature-stats" or set(tensors) != {"mean", "cov"}:
        raise ValueError(f"reference statistics: {path} is not a statistics file (it holds {sorted(tensors)[:4]}, "
                         f"format {header.get('format')!r}); make one with evaluate.py --fvd-real FOLDER --fvd-reference FILE")
    mean, cov = tensors["mean"].double().numpy(), tensors["cov"].double().numpy()
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"reference statistics: {path}: mean {tuple(mean.shape)} and covariance {tuple(cov.shape)} do not fit")
    return FeatureStats(mean=mean, cov=cov, count=int(header.get("count", 0)), meta=json.loads(header.get("meta", "{}")))
