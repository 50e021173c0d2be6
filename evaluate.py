"""Measure a shapes text-to-video model: generate videos for prompt/seed pairs of the shapes grammar, read
them back (colour, shape from the bounding-box fill, direction from the centroid drift:
modelscope_t2v/eval/shapes.py) and report accuracy per attribute for each sampler setting, plus each
setting's error against a many-step reference from the same noise.

    python evaluate.py                                   # the bundled model, the settings of docs/shapes_model.md
    python evaluate.py --model runs/shapes-unet/checkpoints/last --pairs 84 --settings ddim:50 dpm++2m:25
    python evaluate.py --settings ddim:50 --reference none --out results.json --videos eval_videos/
    python evaluate.py --probe 16 --settings none            # only: which caption words does the model read?
    python evaluate.py --prompts still --lora shapes-still    # the bundled shapes LoRA (docs/lora.md)

A setting is SAMPLER:STEPS[:SPACING] (samplers as in sample.py: ddim, dpm++2m, dpm++2m-sde, dpm++3m;
spacing leading | linspace | trailing, default the checkpoint's own). Pair i is
(prompt, seed) with the grammar's 84 prompts in a fixed shuffled order and seed i, so a video is exactly
what `python sample.py prompt=<prompt> seed=<seed> sampler=... steps=...` writes. The error is the mean
absolute difference of the frames (in [0, 1]) from the reference setting's frames of the same pair, over
the first --reference-pairs pairs. --probe N adds the caption probe (eval.shapes.caption_probe): the
training loss on N held-out clips (and on N start images, where the direction word alone places the
object) at high noise with the true caption and with one word swapped, which tells a word the model
ignores from one it reads. Prints Markdown tables; --out writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from modelscope_t2v import jobs, schedulers
from modelscope_t2v.eval import shapes as se

DEFAULT_SETTINGS = ["ddim:50", "dpm++2m:10", "dpm++2m:25"]


def parse_setting(text: str) -> tuple[str, int, str | None]:
    """'dpm++2m:25' -> ('dpm++2m', 25, None); 'ddim:1000:trailing' -> ('ddim', 1000, 'trailing').
    argparse-friendly errors name the setting."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 1000:
        raise argparse.ArgumentTypeError(f"setting {text!r} must be SAMPLER:STEPS[:SPACING] with 1 <= STEPS <= 1000")
    spacing = parts[2] if len(parts) == 3 else None
    if spacing not in (None, "leading", "linspace", "trailing"):
        raise argparse.ArgumentTypeError(f"setting {text!r}: SPACING must be leading, linspace or trailing")
    try:
        return schedulers.sampler_name(parts[0]), int(parts[1]), spacing
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_setting_or_none(text: str) -> tuple[str, int, str | None] | None:
    return None if text == "none" else parse_setting(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="bundled model name, folder or hub id (default: shapes)")
    p.add_argument("--pairs", type=int, default=84, help="prompt/seed pairs (default 84: every prompt once)")
    p.add_argument("--seed0", type=int, default=0, help="seed of the first pair")
    p.add_argument("--settings", nargs="+", type=parse_setting_or_none,
                   default=[parse_setting(s) for s in DEFAULT_SETTINGS],
                   help=f"SAMPLER:STEPS settings to measure, or 'none' (default: {' '.join(DEFAULT_SETTINGS)})")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's default_guidance_scale, else 9)")
    p.add_argument("--reference", default="ddim:1000:trailing",
                   help="reference setting, or 'none' (default ddim:1000:trailing: every timestep, 999 to 0)")
    p.add_argument("--reference-pairs", type=int, default=12, help="pairs the reference is run for (default 12)")
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="also run the caption probe on N held-out clips (default 0: no probe)")
    p.add_argument("--prompts", choices=("moving", "still"), default="moving",
                   help="moving: the 84 prompts 'a {colour} {shape} moving {direction}' (default); still: the 21 "
                        "'a {colour} {shape} standing still' (the shapes LoRA's concept, docs/lora.md)")
    p.add_argument("--lora", nargs="+", default=[], metavar="PATH",
                   help="LoRA(s) to load into the model first (files, folders or hub ids, as sample.py lora=)")
    p.add_argument("--lora-scale", nargs="+", type=float, default=None, metavar="S",
                   help="each LoRA's weight (one, or one per LoRA; default 1)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--videos", type=Path, default=None, help="also write every video (mp4) under this folder")
    return p


def run(args: argparse.Namespace) -> dict:
    from modelscope_t2v.pipelines import TextToVideoSDPipeline
    from modelscope_t2v.video_io import export_to_video

    if args.pairs < 1 or args.batch_size < 1 or args.reference_pairs < 0 or args.probe < 0:
        raise ValueError("--pairs and --batch-size must be >= 1, --reference-pairs and --probe >= 0")
    for path in (args.out, args.videos):  # checked before a long run, not after it
        if path is not None:
            jobs.check_writable(path)
    settings = [s for s in args.settings if s is not None]
    if args.reference_pairs > args.pairs:
        raise ValueError(f"--reference-pairs ({args.reference_pairs}) must be <= --pairs ({args.pairs})")
    reference = None if args.reference == "none" or not settings else parse_setting(args.reference)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = args.lora_scale or [1.0]
    if args.lora and len(scales) not in (1, len(args.lora)):
        raise ValueError(f"--lora-scale: {len(scales)} weights for {len(args.lora)} LoRA(s); give one, or one per LoRA")
    from modelscope_t2v.formats.locate import bundled_lora_path

    for ref in args.lora:
        if not Path(ref).exists() and ref.count("/") != 1 and bundled_lora_path(ref) is None:
            raise ValueError(f"--lora {ref!r}: no such file or folder, not a bundled LoRA, and not a hub id (org/name)")
    pipe = TextToVideoSDPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        names = [pipe.load_lora_weights(ref, adapter_name=f"lora{i}") for i, ref in enumerate(args.lora)]
        pipe.set_adapters(names, scales * len(names) if len(scales) == 1 else scales)
    released = dict(pipe.scheduler.config)
    directions = (se.STILL,) if args.prompts == "still" else se.DIRECTIONS
    pairs = se.prompt_seed_pairs(args.pairs, args.seed0, directions)
    prompts = [p for p, _ in pairs]

    def videos(setting, subset):
        sampler, steps, spacing = setting
        return se.run_setting(pipe, subset, sampler, steps, config=released, guidance=guidance,
                              spacing=spacing, batch_size=args.batch_size)

    guidance = pipe.resolve_guidance_scale(args.guidance)
    result = {"model": str(args.model), "lora": list(args.lora), "lora_scale": scales if args.lora else None,
              "prompts": args.prompts, "pairs": args.pairs, "guidance": guidance,
              "reference": args.reference, "reference_pairs": args.reference_pairs if reference else 0,
              "settings": []}
    ref_videos = None
    if reference is not None and args.reference_pairs:
        print(f"reference {args.reference} on {args.reference_pairs} pairs ...", file=sys.stderr, flush=True)
        ref_videos, seconds = videos(reference, pairs[:args.reference_pairs])
        readings = [se.read_video(v) for v in ref_videos]
        result["reference_result"] = {
            "accuracy": se.accuracy(prompts[:args.reference_pairs], readings), "seconds": seconds}
    if args.probe:
        print(f"caption probe on {args.probe} held-out clips ...", file=sys.stderr, flush=True)
        result["probe"] = se.caption_probe(pipe, args.probe)
        result["probe_start_images"] = se.caption_probe(pipe, args.probe, start_images=True)
    for sampler, steps, spacing in settings:
        print(f"{sampler}:{steps} on {args.pairs} pairs ...", file=sys.stderr, flush=True)
        vids, seconds = videos((sampler, steps, spacing), pairs)
        readings = [se.read_video(v) for v in vids]
        row = {"sampler": sampler, "steps": steps, "spacing": pipe.scheduler.config.timestep_spacing, "accuracy": se.accuracy(prompts, readings),
               "seconds": seconds, "seconds_per_video": seconds / len(pairs),
               "readings": [{"prompt": p, "seed": s, **asdict(r)} for (p, s), r in zip(pairs, readings)]}
        if ref_videos is not None:
            diff = np.abs(vids[:len(ref_videos)] - ref_videos)
            row["error_vs_reference"] = {"mean_abs": float(diff.mean()),
                                         "rms": float(np.sqrt((diff ** 2).mean()))}
        result["settings"].append(row)
        if args.videos is not None:
            for (p, s), v in zip(pairs, vids):
                name = f"{sampler}-{steps}/{s:03d}-{p.replace(' ', '-')}.mp4"
                (args.videos / name).parent.mkdir(parents=True, exist_ok=True)
                export_to_video(list(v), str(args.videos / name), fps=8)
    return result


def table(result: dict) -> str:
    ref = result["reference"] if result.get("reference_pairs") else None
    head = "| sampler | steps | colour | shape | direction | all three |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if ref:
        head += f" mean abs error vs {ref} |"
        rule += "---:|"
    lines = [head, rule]
    for row in result["settings"]:
        a = row["accuracy"]
        line = (f"| {row['sampler']} | {row['steps']} | {a['color']:.1%} | {a['shape']:.1%} | "
                f"{a['direction']:.1%} | {a['all']:.1%} |")
        if ref:
            line += f" {row['error_vs_reference']['mean_abs']:.4f} |"
        lines.append(line)
    return "\n".join(lines)


def probe_table(probe: dict) -> str:
    loss = probe["loss"]
    ts = sorted(next(iter(loss.values())), reverse=True)
    lines = ["| caption | " + " | ".join(f"loss at t={t}" for t in ts) + " |", "|---|" + "---:|" * len(ts)]
    lines += [f"| {v} | " + " | ".join(f"{loss[v][t]:.4f}" for t in ts) + " |" for v in loss]
    if math.isfinite(probe["frame_variation"]):
        lines.append(f"\nframe variance of the x0 estimate at t={ts[0]}: {probe['frame_variation']:.4f} "
                     f"(of the clean latents: {probe['data_frame_variation']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lora = f" + LoRA {', '.join(result['lora'])}" if result["lora"] else ""
    print(f"{result['model']}{lora}: {result['pairs']} prompt/seed pairs ({result['prompts']}), guidance "
          f"{result['guidance']}")
    if result["settings"]:
        print(table(result))
    if "probe" in result:
        print("\ncaption probe, videos:\n" + probe_table(result["probe"]))
        print("\ncaption probe, start images:\n" + probe_table(result["probe_start_images"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
