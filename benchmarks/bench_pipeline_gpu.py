"""Pipeline speed and GPU memory against diffusers at the real size (CUDA, fp16). UNRUN on a GPU so far:
the project's machine has none; checked by reading and by a CPU dry run with torch.cuda stubbed out.

    python benchmarks/bench_pipeline_gpu.py                   # 16 x 256x256, 25 steps; 64 frames for memory
    python benchmarks/bench_pipeline_gpu.py --steps 50 --runs 5 --dtype bf16
    python benchmarks/bench_pipeline_gpu.py --compile reduce-overhead   # + ours compiled, CUDA graphs

The checkpoint has the exact released 1.7B shapes (UNet3D 1,411M: (320, 640, 1280, 1280), the SD KL
autoencoder, the 23-layer 1024-wide OpenCLIP text tower) with random weights, written once with diffusers'
own modules (bench_pipeline.build_checkpoint; fp32 files, ~7.3 GB, cached in --folder) and loaded by both
libraries with torch_dtype=--dtype on cuda.

Measured, as ratios ours / diffusers, both pipelines loaded in this one process:
- time: one `pipe(prompt, num_frames=--frames, height=width=--size, num_inference_steps=--steps)` call,
  wall clock between torch.cuda.synchronize() calls, one warm-up call each, --runs alternating pairs,
  medians.
- memory: extra peak allocated GPU memory of a --mem-frames generation with VAE slicing:
  torch.cuda.reset_peak_memory_stats() after loading, then max_memory_allocated() minus the
  memory_allocated() before the call (the weights of both pipelines are in the baseline). The caching
  allocator's reserved memory is reported too. --mem-runs alternating pairs, medians.
- with --compile MODE, the time of a third pipeline too: ours after `pipe.compile(mode=MODE)` (torch.compile of the
  UNet and the autoencoder; "reduce-overhead" replays CUDA graphs, which pays where kernel launches dominate: few
  frames, small sizes). Its warm-up call is the compilation (printed); it is not in the memory runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import NEGATIVE, PROMPT, build_checkpoint, load  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mem-frames", type=int, default=64)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--mem-runs", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"), default=None,
                   help="also time ours after pipe.compile(mode=COMPILE) ('reduce-overhead': CUDA graphs)")
    p.add_argument("--folder", default=None, help="checkpoint folder (built if missing; default: a temp-dir cache)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    a = p.parse_args(argv)
    # bench_pipeline.build_checkpoint reads these: the released 1.7B shapes
    a.unet_channels, a.vae_channels, a.text_layers = "320,640,1280,1280", "128,256,512,512", 23
    return a


def generate(pipe, frames: int, size: int, steps: int, device: str):
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_frames=frames, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0), output_type="np",
    ).frames
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def rotated(names: list[str], r: int) -> list[str]:
    """Run r's order: each name goes first in turn (two names: alternating pairs)."""
    k = r % len(names)
    return names[k:] + names[:k]


def main(argv=None) -> int:
    import numpy as np

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_pipeline_gpu.py needs a CUDA GPU; use bench_pipeline.py on the CPU", file=sys.stderr)
        return 2
    dev = args.device
    dtype = DTYPES[args.dtype]
    folder = build_checkpoint(args)
    pipes = {impl: load(impl, folder, torch_dtype=dtype, device=dev) for impl in ("ours", "diffusers")}
    timed = dict(pipes)
    if args.compile:
        timed["ours-compiled"] = load("ours", folder, torch_dtype=dtype, device=dev).compile(mode=args.compile)

    # time
    for impl, pipe in timed.items():
        _, s = generate(pipe, args.frames, args.size, 1, dev)  # warm-up: cuDNN/cuBLAS heuristics, allocator
        if impl == "ours-compiled":
            # reduce-overhead's CUDA graphs warm up on the first call and record on the next; replays after that
            _, s2 = generate(pipe, args.frames, args.size, 2, dev)
            print(f"  ours-compiled: warm-up (compilation) {s:.0f} s, recording {s2:.0f} s", file=sys.stderr)
    seconds, frames = {k: [] for k in timed}, {}
    for r in range(args.runs):
        for impl in rotated(list(timed), r):
            frames[impl], s = generate(timed[impl], args.frames, args.size, args.steps, dev)
            seconds[impl].append(s)
            print(f"  time run {r + 1}/{args.runs} {impl:9s} {s:7.3f} s", file=sys.stderr)
    med_t = {k: statistics.median(v) for k, v in seconds.items()}
    diff = float(np.abs(np.asarray(frames["ours"]) - np.asarray(frames["diffusers"])).max())
    if args.compile:
        del timed["ours-compiled"]  # its GPU memory freed before the memory runs (dynamo and CUDA graphs hold some)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        compiled = dict(mode=args.compile, median_s=med_t["ours-compiled"],
                        ratio=med_t["ours-compiled"] / med_t["diffusers"],
                        max_abs_frame_diff=float(np.abs(np.asarray(frames["ours-compiled"]) - frames["diffusers"]).max()))

    # memory (VAE slicing on in both from here on)
    pipes["ours"].enable_vae_slicing()
    pipes["diffusers"].vae.enable_slicing()
    extra, reserved = {k: [] for k in pipes}, {k: [] for k in pipes}
    for r in range(args.mem_runs):
        for impl in rotated(list(pipes), r):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            generate(pipes[impl], args.mem_frames, args.size, args.mem_steps, dev)
            extra[impl].append((torch.cuda.max_memory_allocated(dev) - base) / 2**20)
            reserved[impl].append(torch.cuda.max_memory_reserved(dev) / 2**20)
            print(f"  memory run {r + 1}/{args.mem_runs} {impl:9s} +{extra[impl][-1]:9.1f} MiB "
                  f"(peak reserved {reserved[impl][-1]:.0f} MiB)", file=sys.stderr)
    med_m = {k: statistics.median(v) for k, v in extra.items()}

    results = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]), device=torch.cuda.get_device_name(dev),
        dtype=args.dtype, torch=torch.__version__, setup=vars(args) | {"folder": str(folder)},
        time=dict(seconds=seconds, median_s=med_t, ratio=med_t["ours"] / med_t["diffusers"], max_abs_frame_diff=diff),
        memory=dict(extra_mib=extra, peak_reserved_mib=reserved, median_extra_mib=med_m,
                    ratio=med_m["ours"] / med_m["diffusers"]),
    )
    if args.compile:
        results["time"]["compiled"] = compiled
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"time   ours/diffusers = {results['time']['ratio']:.3f}  (median {med_t['ours']:.3f} s vs "
          f"{med_t['diffusers']:.3f} s; max |frame diff| {diff:.2e})")
    if args.compile:
        print(f"time   ours compiled ({args.compile})/diffusers = {compiled['ratio']:.3f}  (median "
              f"{compiled['median_s']:.3f} s; max |frame diff| {compiled['max_abs_frame_diff']:.2e})")
    print(f"memory ours/diffusers = {results['memory']['ratio']:.3f}  (median extra peak allocated "
          f"{med_m['ours']:.0f} MiB vs {med_m['diffusers']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
