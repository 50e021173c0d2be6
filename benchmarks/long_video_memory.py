"""Extra peak memory of long videos on the bundled shapes model (CPU, fp32): plain sampling, FreeNoise and
sliding windows at 64 and 128 frames, each in a fresh process (one step: the peak is per step), VAE slicing
on. The extra peak is the resident memory's high-water mark during the call minus the resident memory
before it (bench_pipeline.py's measurement).

    python benchmarks/long_video_memory.py [--frames 64 128] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("plain", "free-noise", "sliding")


def child(mode: str, frames: int, threads: int) -> dict:
    import torch

    from bench_pipeline import extra_peak
    from modelscope_t2v.pipelines import TextToVideoSDPipeline

    torch.set_num_threads(threads)
    pipe = TextToVideoSDPipeline.from_pretrained("shapes")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_vae_slicing()
    if mode == "free-noise":
        pipe.enable_free_noise()
    elif mode == "sliding":
        pipe.enable_sliding_windows()
    result = extra_peak(lambda: pipe("a red circle moving left", num_frames=frames, num_inference_steps=1,
                                     generator=torch.Generator().manual_seed(0), output_type="np"))
    return {"mode": mode, "frames": frames, **result}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", nargs="+", type=int, default=[64, 128])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.threads)))
        return 0
    rows = []
    for frames in args.frames:
        for mode in MODES:
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(frames), "--threads", str(args.threads)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{mode:10s} {frames:4d} frames: +{rows[-1]['extra_mb']:.0f} MB", file=sys.stderr)
    print("| frames | " + " | ".join(MODES) + " |\n|---:|" + "---:|" * len(MODES))
    for frames in args.frames:
        cells = []
        for mode in MODES:
            vals = sorted(r["extra_mb"] for r in rows if r["mode"] == mode and r["frames"] == frames)
            cells.append(f"+{vals[len(vals) // 2]:.0f} MB")
        print(f"| {frames} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
