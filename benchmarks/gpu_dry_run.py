"""A CPU dry run of bench_pipeline_gpu.py, to check its code paths before a GPU is lent (a lent GPU has minutes,
not hours): torch.cuda's timing and memory calls stubbed out, the benchmark checkpoint's small widths instead of the
released 1.7B shapes, torch.compile forced to its eager backend. Its numbers mean nothing; it only has to finish.

    .venv/bin/python benchmarks/gpu_dry_run.py          # ~1 min: fp16 on the CPU, 2 frames, 2 steps, --compile
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import bench_pipeline_gpu as gpu  # noqa: E402


def main() -> int:
    checks = []  # torch.cuda.is_available: True for the script's own check only (dynamo asks it too)
    torch.cuda.is_available = lambda: not checks.append(1) and len(checks) == 1
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    torch.cuda.memory_allocated = torch.cuda.max_memory_reserved = lambda *a, **k: 1 << 20
    torch.cuda.max_memory_allocated = lambda *a, **k: 3 << 20  # a nonzero "extra" for the ratio
    torch.cuda.get_device_name = lambda *a: "cpu (dry run)"
    parse, compile_ = gpu.parse_args, torch.compile

    def small(argv=None):
        a = parse(argv)
        a.unet_channels, a.vae_channels, a.text_layers = "64,128,256,256", "32,64,128,128", 2
        return a

    gpu.parse_args = small
    torch.compile = lambda fn=None, **kw: compile_(fn, **{**kw, "mode": None, "backend": "eager"})
    return gpu.main(["--device", "cpu", "--steps", "2", "--frames", "2", "--size", "64", "--runs", "3",
                     "--mem-frames", "4", "--mem-steps", "1", "--mem-runs", "2", "--compile", "reduce-overhead",
                     *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
