"""FLOPs of one guided UNet forward (batch 2), counted on the meta device (no weights, no time): with the text given
once per video (what the pipelines pass; the cross-attentions project it once) and given per frame (projected once
per frame, as diffusers and the original ModelScope code do). What the shared-text projection saves depends on how
large the text's projections are against the rest: much at small latents and narrow widths, little at the released
size.

    .venv/bin/python benchmarks/unet_flops.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modelscope_t2v.models.unet import UNET_PRESETS, UNet3D, UNetConfig  # noqa: E402

BENCH = UNetConfig(block_channels=(64, 128, 256, 256))  # bench_pipeline.py's checkpoint
CASES = [  # name, config, frames, latent height, latent width
    ("bench checkpoint, 8 frames of 64x64 (bench_speedups.py)", BENCH, 8, 8, 8),
    ("bench checkpoint, 16 frames of 256x256 (bench_pipeline.py)", BENCH, 16, 32, 32),
    ("ms-1.7b, 16 frames of 256x256 (the released default)", UNET_PRESETS["ms-1.7b"], 16, 32, 32),
    ("zeroscope-576w, 24 frames of 576x320", UNET_PRESETS["zeroscope-576w"], 24, 40, 72),
]


def flops(config: UNetConfig, frames: int, height: int, width: int, per_frame_text: bool) -> int:
    with torch.device("meta"):
        unet = UNet3D(config).eval()
        x = torch.randn(2, config.in_channels, frames, height, width)  # b c f h w
        text = torch.randn(2, 77, config.cross_attention_dim)  # b n d
        if per_frame_text:
            text = text[:, None].expand(-1, frames, -1, -1)  # b f n d
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, 500, text)
    return counter.get_total_flops()


def main() -> int:
    print("| UNet, video | text per frame (TFLOP) | text per video (TFLOP) | saved |")
    print("|---|---:|---:|---:|")
    for name, config, frames, height, width in CASES:
        per_frame, shared = (flops(config, frames, height, width, p) for p in (True, False))
        print(f"| {name} | {per_frame / 1e12:.3f} | {shared / 1e12:.3f} | {(per_frame - shared) / per_frame:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
