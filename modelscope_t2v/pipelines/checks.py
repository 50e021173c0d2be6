"""The checks of a pipeline call, done before any model runs, and the check of values during it.

Every argument error is a ValueError (TypeError for a wrong kind) naming the argument; values that stop
being finite during a call are a NonFiniteError naming the step and the component.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..diffusion.samplers import check_guidance_scale

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


class NonFiniteError(FloatingPointError):
    """Values stopped being finite during a call; the message names the step and the component."""


def finite_number(name: str, value, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            low is not None and value < low):
        raise ValueError(f"{name} must be a finite number{f' >= {low:g}' if low is not None else ''}, got {value!r}")
    return float(value)


def positive_int(name: str, value, default: int | None = None) -> int:
    """`value` (or `default` when None) as an int >= 1; bools are not integers here."""
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def finite_tensor(name: str, x) -> None:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf values")


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_call(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, guidance_scale,
               output_type, callback_steps, num_videos_per_prompt, decode_chunk_size, *, text_width: int) -> int:
    """Check a pipeline call's arguments (the ones both modes share); returns the prompt batch size."""
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass prompt or prompt_embeds")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if prompt is not None and not (
        isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
    ):
        raise TypeError(f"prompt must be a str or a non-empty list of str, got {type(prompt).__name__}")
    batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
        raise ValueError(f"negative_prompt has batch size {len(negative_prompt)}, but prompt has {batch}")
    if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
        raise TypeError(f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
    if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(
            f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
            f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
        )
    positive_int("num_inference_steps", num_inference_steps)
    check_guidance_scale(guidance_scale, "guidance_scale")
    width = text_width
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must be (batch, tokens, {width}) (the UNet's cross_attention_dim), got {shape}")
        finite_tensor(name, embeds)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps < 1):
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    positive_int("num_videos_per_prompt", num_videos_per_prompt)
    if decode_chunk_size is not None and (not isinstance(decode_chunk_size, int) or decode_chunk_size < 1):
        raise ValueError(f"decode_chunk_size must be a positive integer, got {decode_chunk_size!r}")
    return batch


def check_fits(videos: int, frames: int, height: int, width: int, *, factor: int, channels: int,
               device: torch.device) -> None:
    """Refuse a call whose latents or decoded frames (`height` x `width` pixels) alone cannot fit in the
    memory of `device`, before any work (else an allocator error after the text encoder and the first steps)."""
    c = channels
    need = {"latents": videos * c * frames * (height // factor) * (width // factor) * 4,
            "decoded frames": videos * 3 * frames * height * width * 4}
    free = available_memory(device)
    for what, size in need.items():
        if free is not None and size > free:
            raise ValueError(
                f"{videos} video(s) of {frames} frames at {height}x{width}: the {what} alone take "
                f"{size / 2**30:.1f} GiB (float32) but {device} has {free / 2**30:.1f} GiB "
                "available; lower num_frames, the size or the batch")


def require_finite(x: torch.Tensor, what: str, *, half: bool = False) -> None:
    """NonFiniteError naming `what` if `x` holds NaN or inf (one reduction); `half`: the models ran in
    float16, so the message says what to change."""
    if bool(torch.isfinite(x).all()):
        return
    hint = ""
    if x.dtype in (torch.float16, torch.bfloat16) or half:
        hint = (f" It ran in {x.dtype if x.dtype != torch.float32 else torch.float16}: half precision overflows "
                "here; load with torch_dtype=torch.float32 (or bfloat16), or keep the autoencoder in float32 "
                "(pipe.vae.to(torch.float32)).")
    raise NonFiniteError(f"{what} is not finite (NaN or inf).{hint}")


def lora_call_scale(cross_attention_kwargs, has_lora: bool, fused: bool) -> float:
    """The per-call LoRA scale of `cross_attention_kwargs` (diffusers' {"scale": s}, default 1); other keys go
    to attention processors in diffusers, which this UNet has none of: accepted and ignored with a warning."""
    if cross_attention_kwargs is None:
        return 1.0
    if not isinstance(cross_attention_kwargs, dict):
        raise TypeError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}")
    other = sorted(k for k in cross_attention_kwargs if k != "scale")
    if other:
        warnings.warn(f"cross_attention_kwargs {other} are ignored (this UNet has no attention processors; only "
                      "'scale', the LoRA scale, is used)", stacklevel=3)
    if "scale" not in cross_attention_kwargs:
        return 1.0
    scale = finite_number("cross_attention_kwargs['scale']", cross_attention_kwargs["scale"])
    if fused and scale != 1.0:
        warnings.warn("cross_attention_kwargs['scale'] has no effect on a fused LoRA (unfuse_lora() first, or "
                      "fuse_lora(lora_scale=...))", stacklevel=3)
    elif not has_lora and scale != 1.0:
        warnings.warn("cross_attention_kwargs['scale'] is given but no LoRA is loaded", stacklevel=3)
    return scale
