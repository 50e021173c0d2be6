"""Where a pipeline's models run during a call, and in what precision.

- Offload (`enable_model_cpu_offload`, `enable_sequential_cpu_offload`): the weights live on the CPU and
  each model (or each leaf module) moves to the accelerator only while it runs.
- Half-precision weights on a CPU compute in float32 for the call: CPUs without native half kernels run
  them 10-60x slower than float32 (measured on this project's machines: a 64-wide linear 9.6x, a 3x3 conv
  57x), which makes the seed examples' `torch_dtype=torch.float16` unusable on a CPU. fp16 -> fp32 -> fp16
  is exact, so the stored weights are unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

_noted = [False]  # the float32 notice is printed once per process


def accelerator(gpu_id: int | None, device) -> torch.device | None:
    """The device offload moves models to: `device` if given, else cuda:`gpu_id`, else None (none here)."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_id or 0)
    return None


@dataclass(frozen=True)
class Placement:
    mode: str | None = None  # None (models stay where they are) | "model" | "sequential"
    device: torch.device | None = None  # where offloaded models run

    @contextlib.contextmanager
    def placed(self, module: nn.Module) -> Iterator[None]:
        """Run `module` where the policy says; put it back on the CPU afterwards."""
        if self.mode == "model":
            module.to(self.device)
            try:
                yield
            finally:
                module.to("cpu")
        elif self.mode == "sequential":
            leaves = [m for m in module.modules()
                      if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None]

            def onto_device(m, args):  # a hook's return value would replace the inputs: return None
                m.to(self.device)

            def back_to_cpu(m, args, output):
                m.to("cpu")

            handles = [m.register_forward_pre_hook(onto_device) for m in leaves]
            handles += [m.register_forward_hook(back_to_cpu) for m in leaves]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                module.to("cpu")
        else:
            yield


@contextlib.contextmanager
def cpu_precision(modules: Sequence[nn.Module], device: torch.device, upcast: bool = True) -> Iterator[None]:
    """float16/bfloat16 `modules` computing on a CPU: float32 for the block, their dtypes restored after."""
    half = [m for m in modules if next(m.parameters()).dtype in (torch.float16, torch.bfloat16)]
    if not (upcast and half and device.type == "cpu"):
        yield
        return
    dtypes = [next(m.parameters()).dtype for m in half]
    if not _noted[0]:
        print("half-precision weights on the CPU: computing in float32 (pipe.cpu_upcast = False to opt out)",
              file=sys.stderr)
        _noted[0] = True
    for m in half:
        m.float()
    try:
        yield
    finally:
        for m, dtype in zip(half, dtypes):
            m.to(dtype)
