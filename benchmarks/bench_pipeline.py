"""Pipeline speed and memory against diffusers, same checkpoint, one run (CPU, fp32).

    .venv/bin/python benchmarks/bench_pipeline.py                       # defaults below (~30 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_pipeline.py --only time           # the timing alone (~10 min)
    .venv/bin/python benchmarks/bench_pipeline.py --steps 5 --runs 5    # more steps / runs
    .venv/bin/python benchmarks/bench_pipeline.py --profile 15          # + top ops of one 1-step generation each

The checkpoint: an ~66M-parameter UNet3D with the released block structure (3 x CrossAttnDownBlock3D +
DownBlock3D, 2 layers per block, heads of 64, 32 groups, a 1024-wide text context) at widths
(64, 128, 256, 256) instead of (320, 640, 1280, 1280); a KL autoencoder with the released structure (4
levels, factor 8) at widths (32, 64, 128, 128); a 1024-wide CLIP text tower with 2 layers (the text tower
is transformers' CLIPTextModel in both libraries: identical code). Built once with diffusers' own
modules and `TextToVideoSDPipeline.save_pretrained` (cached in --folder), then loaded by both
`diffusers.TextToVideoSDPipeline.from_pretrained` and ours.

Measured, as ratios ours / diffusers (the machine is shared and noisy; absolute seconds are not the point):
- time: one `pipe(prompt, num_frames=16, height=256, width=256, num_inference_steps=--steps)` call
  (text encoding, denoising with classifier-free guidance, decoding, conversion to numpy), both pipelines
  in one process after one warm-up call each, --runs alternating pairs (AB, BA, AB, ...), medians.
- memory: extra peak resident memory of a --mem-frames (64) frame generation with VAE slicing (ours:
  `pipe.enable_vae_slicing()`, diffusers: `pipe.vae.enable_slicing()`), each run in a fresh subprocess:
  after loading, `gc.collect()` and `malloc_trim(0)`, baseline = VmRSS; the kernel's peak-RSS mark is
  reset (`echo 5 > /proc/self/clear_refs`) and after the call extra = VmHWM - baseline (exact, not
  sampled; where clear_refs is unavailable a 1 ms VmRSS sampling thread is used instead). --mem-runs
  alternating pairs, medians.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPT = "an astronaut riding a horse on the moon, 4k"
NEGATIVE = "blurry, low quality"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="denoising steps of the timed generation")
    p.add_argument("--frames", type=int, default=16, help="frames of the timed generation")
    p.add_argument("--size", type=int, default=256, help="height = width of both generations (pixels)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per implementation (alternating)")
    p.add_argument("--mem-frames", type=int, default=64, help="frames of the memory generation")
    p.add_argument("--mem-steps", type=int, default=1, help="steps of the memory generation (peak is per step)")
    p.add_argument("--mem-runs", type=int, default=2, help="memory runs per implementation (fresh processes)")
    p.add_argument("--only", choices=("time", "memory"), default=None, help="run one of the two measurements")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: robust to other jobs on a shared 2-core machine)")
    p.add_argument("--unet-channels", default="64,128,256,256", help="UNet block widths (released: 320,640,1280,1280)")
    p.add_argument("--vae-channels", default="32,64,128,128", help="autoencoder widths (released: 128,256,512,512)")
    p.add_argument("--text-layers", type=int, default=2, help="text tower depth (released: 23), 1024 wide")
    p.add_argument("--folder", default=None, help="checkpoint folder (built if missing; default: a temp-dir cache)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one 1-step generation of each with torch.profiler; print the top N ops")
    p.add_argument("--components", action="store_true",
                   help="also time the UNet forward (batch 2, as with guidance) and the VAE decode of the timed "
                        "shape alone, process CPU time, alternating: which part makes a difference")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--child-memory", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("steps", "frames", "size", "runs", "mem_frames", "mem_steps", "mem_runs", "threads", "text_layers"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.size % 8:
        raise SystemExit(f"--size must be a multiple of 8, got {a.size}")
    return a


def channels(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated integers, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------
# The checkpoint, written by diffusers


def build_checkpoint(args) -> Path:
    """Write (once) the benchmark checkpoint in the released diffusers layout with diffusers' modules."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from modelscope_t2v.schedulers import MODELSCOPE_T2V_SCHEDULER_CONFIG
    from modelscope_t2v.formats.unet_layout import unet_config_to_diffusers
    from modelscope_t2v.formats.vae_layout import vae_config_to_diffusers
    from modelscope_t2v.models import TEXT_PRESETS, UNetConfig, VAEConfig, build_tokenizer

    unet_cfg = UNetConfig(block_channels=channels(args.unet_channels, "--unet-channels"))  # released otherwise
    vae_cfg = VAEConfig(block_channels=channels(args.vae_channels, "--vae-channels"))
    text_cfg = dict(TEXT_PRESETS["ms-1.7b"], num_hidden_layers=args.text_layers)
    tag = f"u{'-'.join(map(str, unet_cfg.block_channels))}_v{'-'.join(map(str, vae_cfg.block_channels))}_t{args.text_layers}"
    folder = Path(args.folder) if args.folder else Path(tempfile.gettempdir()) / "modelscope_t2v_bench" / tag
    if (folder / "model_index.json").exists():
        return folder

    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel.from_config(unet_config_to_diffusers(unet_cfg))
    vae = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(vae_cfg))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    with torch.no_grad():  # zero-initialised outputs (temporal convs) get weights: every branch computes
        for module in (unet, vae, text_encoder):
            for param in module.parameters():
                if not param.any():
                    param.normal_(0, 0.02)
    pipe = diffusers.TextToVideoSDPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_tokenizer(None),
        scheduler=diffusers.DDIMScheduler.from_config(dict(MODELSCOPE_T2V_SCHEDULER_CONFIG)),
    )
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp)
    _released_text_keys(tmp / "text_encoder")
    tmp.rename(folder)
    n = sum(p.numel() for p in unet.parameters())
    print(f"built {folder}: UNet {n / 1e6:.1f}M parameters", file=sys.stderr)
    return folder


def _released_text_keys(folder: Path) -> None:
    """transformers 5 writes CLIPTextModel without the `text_model.` level the released files have."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        state = load_file(path)
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()},
                  path, metadata={"format": "pt"})


def load(impl: str, folder: Path, torch_dtype: torch.dtype | None = None, device: str = "cpu"):
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" on every load
    transformers.utils.logging.disable_progress_bar()
    if impl == "ours":
        from modelscope_t2v.pipelines import TextToVideoSDPipeline
    else:
        from diffusers import TextToVideoSDPipeline
    pipe = TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, frames: int, size: int, steps: int):
    return pipe(
        PROMPT, negative_prompt=NEGATIVE, num_frames=frames, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0), output_type="np",
    ).frames


# ---------------------------------------------------------------------------------------------------
# Time: both pipelines in this process, alternating


def bench_time(folder: Path, args) -> dict:
    import numpy as np

    pipes = {impl: load(impl, folder) for impl in ("ours", "diffusers")}
    for impl, pipe in pipes.items():  # warm-up: allocator, oneDNN primitives for these shapes
        generate(pipe, args.frames, args.size, 1)
    wall, cpu = {impl: [] for impl in pipes}, {impl: [] for impl in pipes}
    outputs = {}
    for r in range(args.runs):
        for impl in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[impl] = generate(pipes[impl], args.frames, args.size, args.steps)
            wall[impl].append(time.perf_counter() - t0)
            cpu[impl].append(time.process_time() - c0)
            print(f"  time run {r + 1}/{args.runs} {impl:9s} {wall[impl][-1]:7.2f} s wall, {cpu[impl][-1]:7.2f} s CPU",
                  file=sys.stderr)
    med = {impl: statistics.median(v) for impl, v in wall.items()}
    med_cpu = {impl: statistics.median(v) for impl, v in cpu.items()}
    diff = float(np.abs(np.asarray(outputs["ours"]) - np.asarray(outputs["diffusers"])).max())
    # Process CPU time is the contention-robust companion of wall time on a shared machine: time spent
    # waiting for a core while other jobs run is not counted (with --threads 1 there is no spinning).
    return dict(seconds=wall, cpu_seconds=cpu, median_s=med, median_cpu_s=med_cpu, ratio=med["ours"] / med["diffusers"],
                cpu_ratio=med_cpu["ours"] / med_cpu["diffusers"], max_abs_frame_diff=diff)


def bench_components(folder: Path, args, repeats: int = 4) -> dict:
    """Process CPU time of the UNet forward and of the VAE decode alone (same inputs to both), alternating."""
    pipes = {impl: load(impl, folder) for impl in ("ours", "diffusers")}
    g = torch.Generator().manual_seed(0)
    latent = args.size // 8
    x = torch.randn(2, 4, args.frames, latent, latent, generator=g)  # b c f h w, batch 2 = guidance
    context = torch.randn(2, 77, 1024, generator=g)
    t = torch.tensor([500, 500])
    z = torch.randn(args.frames, 4, latent, latent, generator=g)  # (b f) c h w, unscaled latents
    calls = {
        "unet": {"ours": lambda: pipes["ours"].unet(x, t, encoder_hidden_states=context),
                 "diffusers": lambda: pipes["diffusers"].unet(x, t, encoder_hidden_states=context).sample},
        "vae_decode": {"ours": lambda: pipes["ours"].vae.decode(z),
                       "diffusers": lambda: pipes["diffusers"].vae.decode(z).sample},
    }
    out = {}
    with torch.no_grad():
        for part, fns in calls.items():
            diff = float((fns["ours"]() - fns["diffusers"]()).abs().max())  # also the warm-up
            cpu = {impl: [] for impl in fns}
            for r in range(repeats):
                for impl in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
                    c0 = time.process_time()
                    fns[impl]()
                    cpu[impl].append(time.process_time() - c0)
            med = {impl: statistics.median(v) for impl, v in cpu.items()}
            out[part] = dict(cpu_seconds=cpu, median_cpu_s=med, cpu_ratio=med["ours"] / med["diffusers"], max_abs_diff=diff)
            print(f"  {part:10s} CPU ours/diffusers {out[part]['cpu_ratio']:.3f} (median {med['ours']:.2f} s vs "
                  f"{med['diffusers']:.2f} s; max |diff| {diff:.1e})", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------------
# Memory: one fresh process per run


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    """Fallback peak tracker: VmRSS every 1 ms (torch kernels release the GIL, so this thread runs)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb, self.running = _status_kb("VmRSS"), True

    def run(self):
        while self.running:
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS"))
            time.sleep(0.001)


def child_memory(impl: str, folder: Path, args) -> dict:
    pipe = load(impl, folder)
    if impl == "ours":
        pipe.enable_vae_slicing()
    else:
        pipe.vae.enable_slicing()  # diffusers 0.42: pipe.enable_vae_slicing() is gone
    return extra_peak(lambda: generate(pipe, args.mem_frames, args.size, args.mem_steps))


def extra_peak(run) -> dict:
    """The resident memory's high-water mark during run() minus the resident memory before it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed loading buffers back: a clean baseline
    except OSError:
        pass
    baseline = _status_kb("VmRSS")
    exact = _reset_peak()
    sampler = None if exact else _RssSampler()
    if sampler:
        sampler.start()
    run()
    if sampler:
        sampler.running = False
        sampler.join()
    peak = _status_kb("VmHWM") if exact else sampler.peak_kb
    return dict(baseline_mb=baseline / 1024, peak_mb=peak / 1024, extra_mb=(peak - baseline) / 1024,
                method="VmHWM after clear_refs" if exact else "VmRSS sampled every 1 ms")


def bench_memory(folder: Path, args) -> dict:
    extra = {"ours": [], "diffusers": []}
    details = []
    for r in range(args.mem_runs):
        for impl in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
            cmd = [sys.executable, __file__, "--child-memory", impl, "--folder", str(folder),
                   "--mem-frames", str(args.mem_frames), "--mem-steps", str(args.mem_steps),
                   "--size", str(args.size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"memory run of {impl} failed:\n{out.stderr[-4000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            extra[impl].append(result["extra_mb"])
            details.append(dict(impl=impl, **result))
            print(f"  memory run {r + 1}/{args.mem_runs} {impl:9s} +{result['extra_mb']:8.1f} MB "
                  f"(baseline {result['baseline_mb']:.0f} MB)", file=sys.stderr)
    med = {impl: statistics.median(v) for impl, v in extra.items()}
    return dict(extra_mb=extra, median_extra_mb=med, ratio=med["ours"] / med["diffusers"], runs=details,
                method=details[0]["method"])


# ---------------------------------------------------------------------------------------------------
# Profile: where the time goes (torch.profiler), one 1-step generation of each


def profile(folder: Path, args) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for impl in ("ours", "diffusers"):
        pipe = load(impl, folder)
        generate(pipe, args.frames, args.size, 1)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(pipe, args.frames, args.size, 1)
        tables[impl] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
        print(f"\n== {impl}: top {args.profile} ops by self CPU time, 1-step generation ==\n{tables[impl]}",
              file=sys.stderr)
        del pipe
        gc.collect()
    return tables


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, Path(args.folder), args)))
        return 0

    folder = build_checkpoint(args)
    results = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]), folder=str(folder), threads=args.threads,
        torch=torch.__version__, setup=dict(steps=args.steps, frames=args.frames, size=args.size, runs=args.runs,
                                            mem_frames=args.mem_frames, mem_steps=args.mem_steps,
                                            mem_runs=args.mem_runs),
    )
    import diffusers

    results["diffusers"] = diffusers.__version__
    if args.only in (None, "time"):
        print(f"time: {args.frames} frames {args.size}x{args.size}, {args.steps} steps, {args.runs} runs each",
              file=sys.stderr)
        results["time"] = bench_time(folder, args)
    if args.components:
        print(f"components: UNet forward (batch 2) and VAE decode, {args.frames} frames {args.size}x{args.size}",
              file=sys.stderr)
        results["components"] = bench_components(folder, args)
    if args.only in (None, "memory"):
        print(f"memory: {args.mem_frames} frames {args.size}x{args.size}, VAE slicing, {args.mem_steps} step(s), "
              f"{args.mem_runs} fresh processes each", file=sys.stderr)
        results["memory"] = bench_memory(folder, args)
    if args.profile:
        results["profile"] = profile(folder, args)

    lines = []
    if "time" in results:
        t = results["time"]
        lines.append(f"time   ours/diffusers = {t['ratio']:.3f}  (median {t['median_s']['ours']:.2f} s vs "
                     f"{t['median_s']['diffusers']:.2f} s wall; max |frame diff| {t['max_abs_frame_diff']:.2e})")
        lines.append(f"  CPU  ours/diffusers = {t['cpu_ratio']:.3f}  (median {t['median_cpu_s']['ours']:.2f} s vs "
                     f"{t['median_cpu_s']['diffusers']:.2f} s of process CPU time)")
    for part, c in results.get("components", {}).items():
        lines.append(f"  {part:10s} CPU ours/diffusers = {c['cpu_ratio']:.3f}  (median {c['median_cpu_s']['ours']:.2f} s vs "
                     f"{c['median_cpu_s']['diffusers']:.2f} s)")
    if "memory" in results:
        m = results["memory"]
        lines.append(f"memory ours/diffusers = {m['ratio']:.3f}  (median extra peak {m['median_extra_mb']['ours']:.0f} MB "
                     f"vs {m['median_extra_mb']['diffusers']:.0f} MB; {m['method']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
