"""Training-step speed and memory of our UNet3D against diffusers' UNet3DConditionModel (same config, same
weights, same data), as ratios ours / diffusers.

    .venv/bin/python benchmarks/bench_train.py                          # defaults below (CPU, ~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --preset tiny --runs 5   # the test preset
    .venv/bin/python benchmarks/bench_train.py --device cuda --precision bf16 --channels 320,640,1280,1280 \\
        --frames 16 --latent 32 --batch 1                               # the released size, on a GPU

The model: the released block structure (3 x CrossAttnDownBlock3D + DownBlock3D, 2 layers per block, heads
of 64, 32 groups, a 1024-wide text context) at --channels widths (default 64,128,256,256, ~66M parameters;
released: 320,640,1280,1280). diffusers' model is built from our config (`unet_config_to_diffusers`) and
gets our weights through the key table, so both compute the same function.

The training step, identical for both: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps at uniform timesteps,
MSE(model(x_t, t, text), eps), backward, AdamW step, zero_grad; in train mode (our resnets also apply the
original's dropout 0.1, which diffusers' port drops: a little extra work on our side). Inputs (latents,
noise, timesteps, text embeddings) are drawn once per step index and shared by both.

Measured:
- time: both models in one process, one warm-up step each, then --runs alternating pairs (AB, BA, ...) of
  --steps timed steps; samples/s per run; ratio ours / diffusers (> 1: we are faster) of the medians and
  the median of the per-pair ratios (robust to the load drift of a shared machine).
- memory: each implementation in a fresh subprocess (--mem-runs alternating pairs): after one warm-up step
  (so gradients and Adam state exist), gc + malloc_trim, baseline = resident memory; peak extra memory of
  one more step = VmHWM after `echo 5 > /proc/self/clear_refs` minus baseline (CPU) or
  max_memory_allocated minus memory_allocated (CUDA); medians, ratio ours / diffusers (< 1: we use less).
  Our UNet with gradient checkpointing is measured too (diffusers' UNet3D has none).
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelscope_t2v.diffusion.schedule import add_noise, make_alphas_cumprod  # noqa: E402
from modelscope_t2v.formats.tables import apply_table, invert, shapes_of  # noqa: E402
from modelscope_t2v.formats.unet_layout import unet_config_to_diffusers, unet_diffusers_table  # noqa: E402
from modelscope_t2v.models.unet import UNET_PRESETS, UNet3D, UNetConfig  # noqa: E402

IMPLS = ("ours", "diffusers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(UNET_PRESETS), help="a UNet preset instead of --channels")
    p.add_argument("--channels", default="64,128,256,256", help="block widths of the released structure")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--text-tokens", type=int, default=77)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--runs", type=int, default=3, help="timed runs per implementation (alternating)")
    p.add_argument("--mem-runs", type=int, default=2, help="memory runs per implementation (fresh processes)")
    p.add_argument("--only", choices=("time", "memory"), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=("ours", "ours+ckpt", "diffusers"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config(args) -> UNetConfig:
    if args.preset:
        return UNET_PRESETS[args.preset]
    widths = tuple(int(c) for c in args.channels.split(","))
    return UNetConfig(block_channels=widths, attention_levels=(True,) * (len(widths) - 1) + (False,))


def build(impl: str, c: UNetConfig, device: str) -> torch.nn.Module:
    """The implementation's model with the same weights (seeded init of ours, converted for diffusers)."""
    torch.manual_seed(0)
    ours = UNet3D(c)
    for p in ours.parameters():  # wake the zero-initialised branches, so both do real work
        p.data.add_(torch.randn_like(p) * 1e-2)
    if impl.startswith("ours"):
        if impl == "ours+ckpt":
            ours.enable_gradient_checkpointing()
        return ours.to(device).train()
    from diffusers import UNet3DConditionModel

    ref = UNet3DConditionModel.from_config(unet_config_to_diffusers(c))
    ref.load_state_dict(apply_table(ours.state_dict(), invert(unet_diffusers_table(c)), shapes_of(ref), what="unet"),
                        strict=True)
    return ref.to(device).train()


def batch(i: int, c: UNetConfig, args, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + i)
    x0 = torch.randn(args.batch, c.in_channels, args.frames, args.latent, args.latent, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    text = torch.randn(args.batch, args.text_tokens, c.cross_attention_dim, generator=g)
    return tuple(v.to(device) for v in (x0, noise, t, text))


class Step:
    """One training step of `model` (ours or diffusers'), the same for both."""

    def __init__(self, impl: str, model: torch.nn.Module, args):
        self.impl, self.model, self.args = impl, model, args
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.abar = make_alphas_cumprod().to(args.device)
        self.amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def __call__(self, inputs) -> float:
        x0, noise, t, text = inputs
        xt = add_noise(x0, noise, self.abar, t)
        with torch.autocast(torch.device(self.args.device).type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(xt, t, text) if self.impl.startswith("ours") else self.model(
                xt, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_time(c: UNetConfig, args) -> dict:
    steps = {impl: Step(impl, build(impl, c, args.device), args) for impl in IMPLS}
    inputs = [batch(i, c, args, args.device) for i in range(args.steps + 1)]
    # same weights, same inputs, no dropout: the same loss
    with torch.no_grad():
        for s in steps.values():
            s.model.eval()
        x0, noise, t, text = inputs[0]
        xt = add_noise(x0, noise, steps["ours"].abar, t)
        a = F.mse_loss(steps["ours"].model(xt, t, text), noise).item()
        b = F.mse_loss(steps["diffusers"].model(xt, t, encoder_hidden_states=text).sample, noise).item()
        for s in steps.values():
            s.model.train()
    for s in steps.values():
        s(inputs[0])  # warm-up
    per_run: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(args.runs):
        for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
            sync(args.device)
            t0 = time.perf_counter()
            for i in range(1, args.steps + 1):
                steps[impl](inputs[i])
            sync(args.device)
            per_run[impl].append(args.steps * args.batch / (time.perf_counter() - t0))
    med = {impl: statistics.median(v) for impl, v in per_run.items()}
    # the ratio within each adjacent pair cancels the slow drift of a shared machine's load
    pairs = [o / d for o, d in zip(per_run["ours"], per_run["diffusers"])]
    return {"samples_per_s": per_run, "median_samples_per_s": med,
            "throughput_ratio_ours_over_diffusers": med["ours"] / med["diffusers"],
            "median_pair_throughput_ratio": statistics.median(pairs),
            "eval_loss_ours": a, "eval_loss_diffusers": b}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(impl: str, c: UNetConfig, args) -> dict:
    step = Step(impl, build(impl, c, args.device), args)
    step(batch(0, c, args, args.device))  # gradients and Adam state now exist
    inputs = batch(1, c, args, args.device)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(inputs)
        torch.cuda.synchronize()
        return {"extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "method": "cuda allocator"}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    step(inputs)
    return {"extra_mib": (_status_kb("VmHWM") - base) / 1024, "method": "VmHWM after clear_refs"}


def bench_memory(args) -> dict:
    impls = ("ours", "diffusers", "ours+ckpt")
    per_run: dict[str, list[float]] = {impl: [] for impl in impls}
    argv, skip = [], False
    for a in sys.argv[1:]:  # the parent's arguments, less --json
        if skip or a.startswith("--json"):
            skip = a == "--json" and not skip
            continue
        argv.append(a)
    for r in range(args.mem_runs):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            out = subprocess.run([sys.executable, __file__, *argv, "--child", impl], capture_output=True,
                                 text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            per_run[impl].append(json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"])
    med = {impl: statistics.median(v) for impl, v in per_run.items()}
    return {"extra_peak_mib": per_run, "median_extra_peak_mib": med,
            "memory_ratio_ours_over_diffusers": med["ours"] / med["diffusers"],
            "memory_ratio_ours_ckpt_over_diffusers": med["ours+ckpt"] / med["diffusers"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    c = config(args)
    if args.child:
        print(json.dumps(child(args.child, c, args)))
        return 0
    n = sum(p.numel() for p in UNet3D(c).parameters())
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "params_m": n / 1e6,
              "shape": f"{args.batch} x 4 x {args.frames} x {args.latent} x {args.latent}", "device": args.device,
              "precision": args.precision, "threads": args.threads, "torch": torch.__version__}
    if args.only in (None, "time"):
        result.update(bench_time(c, args))
        print(json.dumps(result, indent=2), flush=True)
    if args.only in (None, "memory"):
        result.update(bench_memory(args))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
