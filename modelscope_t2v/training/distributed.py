"""Processes, devices and precision: one process or many under torchrun (DDP, or FSDP2 for big models).

Why here: the loop should read the same with one process or many; everything that asks `world_size`
lives in this file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..models.unet import UNet3D
from ..models.vae import Level, MidBlock

FSDP_MIN_PARAMETERS = 500_000_000  # trainer.parallel=auto: FSDP from this size on, DDP below


@dataclass
class Processes:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether `setup` initialised the process group (and closes it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> Processes:
    """The process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but torch sees no CUDA device")
    dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
    return Processes(rank, world, local_rank, dev, owns)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of trainer.precision on `device` (None: float32)."""
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------
# Wrapping the trained module.


def _shard(model: nn.Module) -> None:
    """FSDP2: shard every space-time block (and the input temporal transformer / the autoencoder's levels),
    then the root; parameters become DTensors, the module keeps its class and names."""
    from torch.distributed.fsdp import fully_shard

    # the blocks return rearranged views; nothing downstream modifies them in place, which is what
    # this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if isinstance(model, UNet3D):
        units = [model.temporal_attention_in, *model.mid_blocks]
        for level in [*model.down_levels, *model.up_levels]:
            units += list(level.blocks)
    else:
        units = [m for m in model.modules() if isinstance(m, (Level, MidBlock))]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)


def wrap(module: nn.Module, parallel: str, procs: Processes) -> tuple[nn.Module, str | None]:
    """(the module the loss calls, the scheme: None for one process, "ddp" or "fsdp"). FSDP shards
    `module` in place; DDP wraps it."""
    if procs.world_size == 1:
        return module, None
    if parallel == "auto":
        # by what is trained: a LoRA of a 1.7B model has a few million parameters and trains under DDP
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        parallel = "fsdp" if trained >= FSDP_MIN_PARAMETERS else "ddp"
    if parallel == "fsdp":
        _shard(module)
        return module, "fsdp"
    device_ids = [procs.device.index] if procs.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids), "ddp"


def gradient_sync(model: nn.Module, parallel: str | None, last: bool):
    """No gradient all-reduce on the micro-batches before the last one."""
    if parallel == "ddp" and not last:
        return model.no_sync()
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def check_replicas(params: Sequence[torch.Tensor], parallel: str | None) -> None:
    """DDP keeps every rank's weights identical; check it (a cheap checksum) before declaring success."""
    if parallel != "ddp":
        return
    s = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"DDP ranks ended with different weights (checksums {lo.item()} vs {hi.item()})")
