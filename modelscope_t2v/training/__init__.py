"""Training: `train(TrainConfig(...))` runs (or resumes) a run; `train.py` is its Hydra front end.

    config.py        the typed configs and the checks that need no model
    start.py         the starting pipeline (a preset's random init or a checkpoint) and its noise schedule
    objectives.py    one objective per target (OBJECTIVES): what it trains, its loss, eval loss, videos
    loop.py          the run: setup or resume, the step, non-finite handling, checkpoints, validation
    checkpoints.py   atomic step folders, the `last` link, optimizer state by name, a step folder's files
    validation.py    metrics.jsonl / tensorboard, the fixed eval batches, validation videos
    distributed.py   processes, devices, precision, DDP / FSDP2
    ema.py           the exponential moving average of the trained weights
    lora.py          LoRA runs (trainer.lora.rank): the adapter attached, checkpointed as a LoRA folder, resumed
"""

from .config import (
    CHECKPOINT_UNET_FIELDS,
    ConfigError,
    ModelConfig,
    NonFiniteLossError,
    TrainConfig,
    TrainerConfig,
    ValidationConfig,
    check_config,
    config_to_dict,
    lr_at,
)
from .loop import Trainer, step_seeds, train
from .objectives import OBJECTIVES
from .start import build_pipeline, training_scheduler

__all__ = [
    "CHECKPOINT_UNET_FIELDS", "OBJECTIVES", "ConfigError", "ModelConfig", "NonFiniteLossError", "TrainConfig",
    "Trainer", "TrainerConfig", "ValidationConfig", "build_pipeline", "check_config", "config_to_dict", "lr_at",
    "step_seeds", "train", "training_scheduler",
]
