"""Convert a ModelScope T2V checkpoint between layouts, or a LoRA into diffusers' layout.

    python convert_weights.py SRC DST --to diffusers|modelscope [--variant fp16] [--dtype fp16]
    python convert_weights.py LORA DST --lora-for MODEL [--dtype fp16]

SRC is a local folder or a hub id in either layout (diffusers: damo-vilab/text-to-video-ms-1.7b,
cerspense/zeroscope_v2_576w; original: damo-vilab/modelscope-damo-text-to-video-synthesis). With --lora-for,
LORA is a LoRA file in any layout docs/lora.md lists (Text-To-Video-Finetuning's stable LoRA or webui file, a
cloneofsimo .pt, diffusers') for MODEL's UNet, and DST gets it as pytorch_lora_weights.safetensors.
"""

import argparse
import sys

from modelscope_t2v.formats import DTYPES, LAYOUTS, convert_checkpoint
from modelscope_t2v.formats.convert import convert_lora_file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source folder or hub id (any supported layout)")
    p.add_argument("dst", help="destination folder (created; must be empty unless --overwrite)")
    p.add_argument("--to", choices=LAYOUTS, help="layout to write (a checkpoint; required without --lora-for)")
    p.add_argument("--lora-for", default=None, metavar="MODEL",
                   help="SRC is a LoRA of MODEL's UNet (a folder, bundled model or hub id): "
                        "write it in diffusers' layout")
    p.add_argument("--variant", default=None, help="read (and, for diffusers, write) this weights variant, e.g. fp16")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights")
    p.add_argument("--revision", default=None, help="hub revision of SRC")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (only a model folder this tool writes; never SRC or a folder holding it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--default-guidance-scale", type=float, default=None, metavar="G",
                   help="the guidance scale the pipelines use when a call gives none, written to model_index.json "
                        "(diffusers layout only; default: SRC's, if it has one)")
    a = p.parse_args(argv)
    if a.lora_for is None and a.to is None:
        p.error("--to is required (or --lora-for MODEL to convert a LoRA)")
    if a.lora_for is not None and a.to not in (None, "diffusers"):
        p.error("a LoRA is written in diffusers' layout only (--to diffusers, or leave --to out)")
    try:
        if a.lora_for is not None:
            print(convert_lora_file(a.src, a.dst, a.lora_for, dtype=a.dtype, overwrite=a.overwrite))
            return 0
        out = convert_checkpoint(
            a.src, a.dst, a.to, variant=a.variant, dtype=a.dtype, revision=a.revision,
            overwrite=a.overwrite, progress=not a.quiet, default_guidance_scale=a.default_guidance_scale,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
