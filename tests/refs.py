"""Shared test helpers: reference implementations and random-but-honest weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def modelscope_reference(name: str):
    """Import one of the original ModelScope files (`unet_sd`, `autoencoder`, `diffusion`) standalone.

    They live in modelscope/models/multi_modal/video_synthesis/ and import only torch/einops, so they
    are loaded from their file without importing the modelscope package (and its heavy dependencies).
    """
    key = f"_modelscope_ref_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.find_spec("modelscope")
    assert spec is not None and spec.submodule_search_locations, "the test extra installs modelscope"
    path = Path(spec.submodule_search_locations[0]) / "models/multi_modal/video_synthesis" / f"{name}.py"
    mod_spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[key] = module
    mod_spec.loader.exec_module(module)
    return module


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised branches (the temporal convs' last
    layer, proj_out of transformers, ...) are exercised by a parity test."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
