"""Time of each sampling setting as a ratio to diffusers' default (DDIM 50 steps, classifier-free guidance), same
checkpoint, one run (CPU, fp32).

    .venv/bin/python benchmarks/bench_speedups.py                        # the settings below, 2 runs each
    .venv/bin/python benchmarks/bench_speedups.py --settings ddim:50 unipc:10+deepcache=2 --runs 3
    .venv/bin/python benchmarks/bench_speedups.py --json runs/speedups.json

The checkpoint is bench_pipeline.py's (the released block structure at small widths, written by diffusers).
Each setting is evaluate.py's syntax, SAMPLER:STEPS[+deepcache=INTERVAL[/BRANCH]][+guidance_cache=INTERVAL];
"diffusers" is diffusers' TextToVideoSDPipeline with its DDIMScheduler at 50 steps, the baseline every ratio is
taken against. All settings run in this process, interleaved run by run (diffusers first in odd runs, last in
even ones), after one warm-up call each; medians of wall and of process CPU time. Same prompt, negative prompt,
guidance 9 and seed everywhere. The quality of each setting is measured on the bundled shapes model by
evaluate.py with the same setting strings (docs/benchmarks.md).

"student:STEPS" times a consistency-distilled student of the checkpoint (what trainer.target=lcd makes, e.g.
shapes-turbo): the UNet with its guidance embedding (zero here: a fused LoRA costs nothing at sampling time),
one branch, the LCM sampler on a 20-point grid. Its frames are not the teacher's: its difference column is a
distance, not an error.

Prefixes run a setting on another copy of our pipeline: "compiled:SETTING" (e.g. compiled:ddim:50) after
`pipe.compile()` (torch.compile of the UNet and the autoencoder, inductor's defaults; its warm-up call is the
compilation), "bf16:SETTING" loaded with torch_dtype=torch.bfloat16 and computing in it (`pipe.cpu_upcast =
False`; not the exact path: bf16 rounds every product), both as "bf16:compiled:SETTING". "diffusers-bf16" is
diffusers' DDIM 50 in bf16, for comparison; the baseline stays diffusers' fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import bench_pipeline as bp  # noqa: E402

SETTINGS = ["ddim:50", "ddim:50+deepcache=3", "ddim:50+deepcache=5", "ddim:50+guidance_cache=2",
            "ddim:50+deepcache=3+guidance_cache=2", "dpm++2m:20", "dpm++2m-karras:20", "unipc:10", "unipc:10+deepcache=2",
            "euler:25", "euler-a:25", "dpm++2m:10", "unipc:5", "student:4"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="evaluate.py settings to time")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="height = width (pixels)")
    p.add_argument("--runs", type=int, default=2, help="timed runs per setting (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unet-channels", default="64,128,256,256")
    p.add_argument("--vae-channels", default="32,64,128,128")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--folder", default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import evaluate
    from modelscope_t2v import schedulers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    students = {s: int(s.split(":", 1)[1]) for s in args.settings if s.startswith("student:")}
    variants = {}  # label -> ((bf16, compiled), Setting) for our pipelines; errors before any model loads
    for label in args.settings:
        if label in students or label == "diffusers-bf16":
            continue
        rest, bf16, comp = label, False, False
        while rest.split(":", 1)[0] in ("bf16", "compiled"):
            head, rest = rest.split(":", 1)
            bf16, comp = bf16 or head == "bf16", comp or head == "compiled"
        variants[label] = ((bf16, comp), evaluate.parse_setting(rest))
    folder = bp.build_checkpoint(args)
    ours, ref = bp.load("ours", folder), bp.load("diffusers", folder)
    released = dict(ours.scheduler.config)
    pipes = {(False, False): ours}
    for bf16, comp in {v for v, _ in variants.values()} - {(False, False)}:
        pipe = bp.load("ours", folder, torch_dtype=torch.bfloat16 if bf16 else None)
        pipe.cpu_upcast = False  # bf16 computes in bf16 (on a CPU the pipeline's default is float32)
        pipes[bf16, comp] = pipe.compile() if comp else pipe
    ref_bf16 = bp.load("diffusers", folder, torch_dtype=torch.bfloat16) if "diffusers-bf16" in args.settings else None
    student = None
    if students:
        from modelscope_t2v.pipelines import T2VTurboMSPipeline
        from modelscope_t2v.pipelines.t2v_turbo import turbo_unet
        from modelscope_t2v.schedulers import LCMScheduler

        student = T2VTurboMSPipeline.from_pipe(ours, unet=turbo_unet(ours.unet, "zeros"),
                                               scheduler=LCMScheduler.from_config(released, original_inference_steps=20))
        student.set_progress_bar_config(disable=True)

    def call(pipe, steps):
        return pipe(bp.PROMPT, negative_prompt=bp.NEGATIVE, num_frames=args.frames, height=args.size, width=args.size,
                    num_inference_steps=steps, guidance_scale=9.0, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np").frames

    def call_student(steps):  # one branch: no negative prompt; the scale goes in as the embedding
        return student(bp.PROMPT, num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=steps,
                       guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames

    def pipe_and_setting(label):
        kind, setting = variants[label]
        return pipes[kind], setting

    def run(label):
        if label == "diffusers":
            return call(ref, 50)
        if label == "diffusers-bf16":
            return call(ref_bf16, 50)
        if label in students:
            return call_student(students[label])
        pipe, s = pipe_and_setting(label)
        pipe.scheduler = schedulers.make_sampler(s.sampler, released, s.spacing)
        with evaluate.speedups(pipe, s):
            return call(pipe, s.steps)

    labels = ["diffusers"] + [s for s in args.settings if s != "diffusers"]
    for label in labels:  # warm-up: allocator and oneDNN primitives for these shapes (and the compilation)
        t0 = time.perf_counter()
        if label in ("diffusers", "diffusers-bf16"):
            call(ref if label == "diffusers" else ref_bf16, 1)
        elif label in students:
            call_student(1)
        else:
            pipe, s = pipe_and_setting(label)
            pipe.scheduler = schedulers.make_sampler(s.sampler, released, s.spacing)
            call(pipe, 1)
        if label in variants and variants[label][0][1]:  # (bf16, compiled)
            print(f"  {label}: compiled in {time.perf_counter() - t0:.0f} s (the warm-up call)", file=sys.stderr,
                  flush=True)
    wall = {k: [] for k in labels}
    cpu = {k: [] for k in labels}
    frames = {}
    for r in range(args.runs):
        for label in (labels if r % 2 == 0 else labels[1:] + labels[:1]):
            t0, c0 = time.perf_counter(), time.process_time()
            frames[label] = run(label)
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
            print(f"  run {r + 1}/{args.runs} {label:40s} {wall[label][-1]:7.2f} s wall, {cpu[label][-1]:7.2f} s CPU",
                  file=sys.stderr, flush=True)
    base_w, base_c = statistics.median(wall["diffusers"]), statistics.median(cpu["diffusers"])
    import numpy as np

    rows = []
    for label in labels:
        w, c = statistics.median(wall[label]), statistics.median(cpu[label])
        diff = np.abs(np.asarray(frames[label], np.float32) - frames["diffusers"])
        rows.append({"setting": label, "median_s": w, "median_cpu_s": c, "ratio": w / base_w, "cpu_ratio": c / base_c,
                     "max_abs_frame_diff_vs_diffusers": float(diff.max())})
    print("| setting | time / diffusers DDIM 50 (wall) | (CPU) | max abs frame difference to diffusers |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['ratio']:.3f} | {row['cpu_ratio']:.3f} | {row['max_abs_frame_diff_vs_diffusers']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "seconds": wall, "cpu_seconds": cpu},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
