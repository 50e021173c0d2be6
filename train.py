"""Train ModelScope T2V (the UNet, or the autoencoder alone) from Hydra configs.

    python train.py model=tiny data=shapes seed=3 trainer.max_steps=30 trainer.checkpoint_every=10 run_dir=runs/a
    python train.py model=tiny data=shapes seed=3 trainer.max_steps=60 run_dir=runs/a resume=true   # continue
    python train.py model=damo-vilab/text-to-video-ms-1.7b trainer=finetune data=webvid data.root=... run_dir=...
    python train.py model=tiny data=shapes trainer=vae run_dir=runs/vae                         # the autoencoder
    torchrun --nproc_per_node 8 train.py model=ms-1.7b data=mixed trainer.precision=bf16 run_dir=runs/b

Groups: model (configs/model: tiny, ms-1.7b, zeroscope-576w, zeroscope-xl, checkpoint; `model=<folder or hub
id>` is short for `model=checkpoint model.name_or_path=<...>`), data (configs/data), trainer (configs/trainer).
Every key is typed (modelscope_t2v.training.TrainConfig): a misspelt key or a wrong type is an error.
The run writes run_dir/checkpoints/{step-N,last}, metrics.jsonl, tensorboard/, validation/; see docs/training.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from modelscope_t2v.data import DataError
from modelscope_t2v.training import NonFiniteLossError, TrainConfig, train

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def expand_model_shorthand(argv: list[str]) -> list[str]:
    """`model=<folder or hub id>` -> `model=checkpoint model.name_or_path=<...>` (a group option cannot
    hold a path); `model=tiny` and the other files in configs/model pass through."""
    options = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "model" and value not in options:
            out += ["model=checkpoint", f"model.name_or_path={value}"]
        else:
            out.append(arg)
    return out


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg) -> None:
    config: TrainConfig = OmegaConf.to_object(cfg)
    try:
        last = train(config)
    except (ValueError, OSError, DataError, NonFiniteLossError) as e:  # config, files, data: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:  # one line from a torchrun job
        if config.trainer.target == "lcd":  # a distilled student's folder is a model of its own
            print(f"sample with: python sample.py model={last} prompt=...", file=sys.stderr)
        elif config.trainer.lora.rank is not None:  # a LoRA folder: how to use it, on stderr (stdout is the path)
            print(f"sample with: python sample.py model={config.model.name_or_path} lora={last} prompt=...",
                  file=sys.stderr)
        print(last)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *expand_model_shorthand(sys.argv[1:])]
    main()
