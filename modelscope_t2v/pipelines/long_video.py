"""Long videos and pinned frames, training-free, with diffusers' names: FreeNoise (`enable_free_noise`, noise
rescheduling, windowed temporal attention, prompt travel), plain sliding windows over the whole UNet
(`enable_sliding_windows`, the fine-tuning community's overlap averaging), FreeU (`enable_freeu`), FreeInit
(`enable_free_init`); frames pinned to given pixels during sampling: image-to-video (`image=`), a last keyframe
(`last_image=`) and continuation of a clip (`init_video=`, `num_init_frames=`), chained into long videos by
`generate_continued`; and loops (`loop=True`).

Pinning (the A1111 text2video extension's inpainting of latents): the pinned frames' latents are the given
frames' autoencoder means, noised to the current timestep with fixed noise and blended in with `image_strength`
after every step (and before the first), so the rest of the clip is denoised around them; after the last step
they are the means themselves.

Loops: the temporal convs pad the frames by wrapping around for the call (`unet.circular_frames`), so the model
sees the last frame as the first one's neighbour at every layer; without a frame-position embedding (the
released checkpoints) the UNet is then equivariant to rolling the frames, and the video has no first or last
frame. FreeNoise's and the sliding windows close into a loop too (`FrameWindows.looped`), wrapping around from
the last frame to the first.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from einops import repeat

from ..diffusion.noise import FREE_INIT_METHODS, free_init_lowpass, mix_frequencies, randn
from ..diffusion.schedule import add_noise
from ..models.training_free import FrameWindows, shuffled_context_noise
from .checks import positive_int

NOISE_TYPES = ("shuffle_context", "repeat_context", "random")
# The pinned frames are re-noised to this fraction of the current timestep: cleaner than the rest, so that the
# early steps, which lay out where things are, already see them. On the shapes model (48 image-to-video clips,
# DPM++ 2M 10 steps, docs/long_video.md) the step into the first generated frame stayed within 2x the median
# step in 27% of the clips at 1 (the same noise as the rest), 69% at 0.6, 79% at 0.3 and 83% at 0 (t = 0).
PIN_NOISE = 0.3


@dataclass(frozen=True)
class FreeInit:
    num_iters: int = 3
    use_fast_sampling: bool = False
    method: str = "butterworth"
    order: int = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25


@dataclass
class Pins:
    """Latent frames held to given pixels: {frame index: pixels 1 c H W in [-1, 1]}."""

    frames: dict[int, torch.Tensor]
    strength: float = 1.0
    noise: float = PIN_NOISE  # pinned frames are noised to noise x the current timestep


def as_image(image, name: str = "image"):
    """A PIL image from PIL, a numpy (h, w, 3) array (uint8, or float in [0, 1]) or a tensor (3, h, w) / (h, w, 3)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (1, 3) and min(image.shape[:2]) > 0:
        if image.dtype != np.uint8:
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(f"{name}: float pixels must lie in [0, 1]")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)
    shape = getattr(image, "shape", None)
    raise TypeError(f"{name} must be a PIL image, a numpy array (h, w, 3) or a tensor (3, h, w); got "
                    f"{type(image).__name__}{'' if shape is None else f' of shape {tuple(shape)}'}")


class LongVideoMethods:
    """The pipeline methods of this module (mixed into TextToVideoSDPipeline)."""

    _free_noise: tuple[FrameWindows, str, Callable] | None = None
    _sliding_windows: FrameWindows | None = None
    _free_init: FreeInit | None = None

    # -- switches ------------------------------------------------------------------------------------

    def enable_free_noise(self, context_length: int = 16, context_stride: int = 4, weighting_scheme: str = "pyramid",
                          noise_type: str = "shuffle_context", prompt_interpolation_callback: Callable | None = None):
        """FreeNoise (arXiv 2310.15169), as diffusers' AnimateDiff pipelines name it: temporal attention over
        windows of `context_length` frames `context_stride` apart, fused by `weighting_scheme`; the initial noise
        rescheduled (`noise_type`); a prompt dict {frame: prompt} interpolated per frame (`prompt_interpolation_callback
        (start, end, start_embeds, end_embeds)`, default linear). Videos of `context_length` frames are unchanged."""
        windows = FrameWindows(context_length, context_stride, weighting_scheme)
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
        if prompt_interpolation_callback is not None and not callable(prompt_interpolation_callback):
            raise TypeError("prompt_interpolation_callback must be callable (start, end, start_embeds, end_embeds) "
                            f"-> embeddings, got {type(prompt_interpolation_callback).__name__}")
        # kept on the pipeline and put on the UNet only for the pipeline's own calls (`_unet_windows`): a
        # pipeline made by from_pipe, or the upscaler sharing this UNet, is not windowed by this switch
        self._free_noise = (windows, noise_type, prompt_interpolation_callback or lerp_embeddings)

    def disable_free_noise(self):
        self._free_noise = None

    @property
    def free_noise_enabled(self) -> bool:
        return self._free_noise is not None

    def enable_sliding_windows(self, context_length: int = 16, context_stride: int = 4, weighting_scheme: str = "flat"):
        """The whole UNet over windows of frames, the predictions averaged where windows overlap (the baseline
        FreeNoise improves on; memory bounded by the window)."""
        self._sliding_windows = FrameWindows(context_length, context_stride, weighting_scheme)

    def disable_sliding_windows(self):
        self._sliding_windows = None

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float):
        """FreeU (arXiv 2309.11497) in the UNet: diffusers' `enable_freeu` (e.g. s1=0.9, s2=0.2, b1=1.2, b2=1.4)."""
        self.unet.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self):
        self.unet.disable_freeu()

    def enable_free_init(self, num_iters: int = 3, use_fast_sampling: bool = False, method: str = "butterworth",
                         order: int = 4, spatial_stop_frequency: float = 0.25, temporal_stop_frequency: float = 0.25):
        """FreeInit (arXiv 2312.07537), as diffusers names it: sample `num_iters` times, each time re-noising the
        result to t = T - 1 with the first noise and keeping its low frequencies (the filter `method`) under
        fresh high-frequency noise; `use_fast_sampling`: iteration i of n runs steps * (i + 1) / n steps."""
        positive_int("num_iters", num_iters)
        if method not in FREE_INIT_METHODS:
            raise ValueError(f"method must be one of {FREE_INIT_METHODS}, got {method!r}")
        positive_int("order", order)  # of the butterworth filter
        for name, v in (("spatial_stop_frequency", spatial_stop_frequency), ("temporal_stop_frequency", temporal_stop_frequency)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        self._free_init = FreeInit(num_iters, bool(use_fast_sampling), method, order, spatial_stop_frequency,
                                   temporal_stop_frequency)

    def disable_free_init(self):
        self._free_init = None

    @property
    def free_init_enabled(self) -> bool:
        return self._free_init is not None

    # -- pieces of a call ----------------------------------------------------------------------------

    def _check_long_video(self, num_frames: int, loop: bool = False) -> None:
        for what, windows in (("enable_free_noise", self._free_noise and self._free_noise[0]),
                              ("enable_sliding_windows", self._sliding_windows)):
            if windows and num_frames < windows.context_length:
                raise ValueError(f"{what}: context_length {windows.context_length} is longer than the video "
                                 f"({num_frames} frames); use a context_length <= num_frames")
        if loop and not self._sliding_in_use(num_frames) and self._free_noise is not None and self._free_noise[1] != "random":
            length = self._free_noise[0].context_length
            if num_frames > length and num_frames % length:
                raise ValueError(
                    f"loop=True with FreeNoise's noise_type={self._free_noise[1]!r}: the rescheduled noise repeats every "
                    f"context_length ({length}) frames, so over {num_frames} frames a window closed across the loop's seam "
                    f"would hold repeated noise; use a multiple of {length} frames or noise_type='random'")
        if self._free_init is not None:
            t_max = self.scheduler.config.num_train_timesteps - 1
            if float(self.scheduler.alphas_cumprod[t_max]) < 1e-6:
                raise ValueError(
                    f"enable_free_init: FreeInit re-noises each result to t={t_max}, where this scheduler keeps no "
                    "signal (zero terminal SNR, rescale_betas_zero_snr=True): every iteration would start from "
                    "pure noise again. Use FreeInit with a model whose schedule keeps signal at its last timestep")

    def _sliding_in_use(self, num_frames: int) -> bool:
        """Whether the sliding windows split a video of `num_frames` (they are on and it is longer than one)."""
        return self._sliding_windows is not None and num_frames > self._sliding_windows.context_length

    def _unet_windows(self, loop: bool = False):
        """A context: FreeNoise's windows on the UNet's temporal attention for this call (else as it is); closed
        into a loop for a loop."""
        if self._free_noise is None:
            return nullcontext()
        windows = self._free_noise[0]
        return self.unet.windowed(windows.looped() if loop else windows)

    def _free_noise_latents(self, latents: torch.Tensor, generator) -> torch.Tensor:
        """The initial noise rescheduled as FreeNoise's noise_type says (after the plain draw, as diffusers)."""
        if self._free_noise is None:
            return latents
        windows, noise_type, _ = self._free_noise
        if noise_type == "random" or latents.shape[2] <= windows.context_length:
            return latents
        if noise_type == "repeat_context":
            reps = -(-latents.shape[2] // windows.context_length)
            return torch.cat([latents[:, :, :windows.context_length]] * reps, dim=2)[:, :, :latents.shape[2]]
        if isinstance(generator, (list, tuple)) and len(generator) > 1:
            return torch.cat([shuffled_context_noise(x[None], windows, g) for x, g in zip(latents, generator)])
        g = generator[0] if isinstance(generator, (list, tuple)) else generator
        return shuffled_context_noise(latents, windows, g)

    def _travel_embeddings(self, prompts: dict[int, str], num_frames: int, guided: bool, negative_prompt,
                           num_videos_per_prompt: int, clip_skip) -> torch.Tensor:
        """Prompt travel: {first frame: prompt} -> a context per frame (b, f, n, d), each frame between two
        keyframes interpolated by the callback; unconditional branch first when guided."""
        if not prompts or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < num_frames for k in prompts):
            raise ValueError(f"prompt: a dict of prompts needs integer frame indices in [0, {num_frames}), got {sorted(prompts)}")
        if not all(isinstance(v, str) for v in prompts.values()):
            raise TypeError("prompt: every value of a prompt dict must be a string")
        keys = sorted(prompts)
        if keys[0] != 0:
            keys, prompts = [0, *keys], {0: prompts[keys[0]], **prompts}  # the first prompt holds from frame 0
        callback = self._free_noise[2] if self._free_noise else lerp_embeddings
        pos, neg = self.encode_prompt([prompts[k] for k in keys], self._execution_device, 1, guided,
                                      None if negative_prompt is None else [negative_prompt] * len(keys), clip_skip=clip_skip)
        per_frame = pos.new_empty((num_frames, *pos.shape[1:]))  # f n d
        bounds = [*keys, num_frames - 1]
        per_frame[keys[-1]:] = pos[-1]
        for i in range(len(keys) - 1):
            start, end = bounds[i], bounds[i + 1]
            per_frame[start:end + 1] = callback(start, end, pos[i:i + 1], pos[i + 1:i + 2])
        context = repeat(per_frame, "f n d -> b f n d", b=num_videos_per_prompt)
        if guided:
            context = torch.cat([repeat(neg[0], "n d -> b f n d", b=num_videos_per_prompt, f=per_frame.shape[0]), context])
        return context

    def _windowed_unet(self, unet_call: Callable, x: torch.Tensor, context: torch.Tensor,
                       loop: bool = False) -> torch.Tensor:
        """unet_call(x, context) over the sliding windows' frames (a per-frame context sliced with them); closed
        into a loop for a loop."""
        if not self._sliding_in_use(x.shape[2]):
            return unet_call(x, context)
        windows = self._sliding_windows.looped() if loop else self._sliding_windows
        return windows.fuse(lambda xw, frames: unet_call(xw, context if context.ndim == 3 else context[:, frames]), x, dim=2)

    def _pins(self, image, last_image, loop: bool, init_video, num_init_frames, strength, height, width,
              num_frames: int, pin_noise: float = PIN_NOISE) -> Pins | None:
        """The pinned frames of a call, checked before any model runs (frame indices of the sampled clip)."""
        if loop and last_image is not None:
            raise ValueError("loop=True leads the last frame back to the first: it cannot also take a last_image")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"image_strength must be in [0, 1], got {strength!r}")
        if isinstance(pin_noise, bool) or not isinstance(pin_noise, (int, float)) or not 0 <= pin_noise <= 1:
            raise ValueError(f"pin_noise must be in [0, 1], got {pin_noise!r}")
        if image is not None and init_video is not None:
            raise ValueError("image and init_video both pin the first frames: give one of the two")
        if num_init_frames is not None and init_video is None:
            raise ValueError("num_init_frames needs init_video (the clip to continue)")
        factor = self.vae_scale_factor
        frames: dict[int, torch.Tensor] = {}
        if (image is not None or init_video is not None) and last_image is not None and num_frames < 2:
            raise ValueError("a first and a last pinned frame need num_frames >= 2")
        if image is not None:
            frames[0] = self.preprocess_video([as_image(image)], height, width)[:, :, 0]  # 1 c H W
        if last_image is not None:
            frames[-1] = self.preprocess_video([as_image(last_image, "last_image")], height, width)[:, :, 0]
        if init_video is not None:
            k = positive_int("num_init_frames", num_init_frames, default=1)
            video = self.preprocess_video(init_video, height, width)  # b c f H W
            if video.shape[0] != 1 or video.shape[1] != 3:
                raise ValueError(f"init_video: one RGB video to continue, got shape {tuple(video.shape)}")
            if video.shape[2] < k:
                raise ValueError(f"init_video has {video.shape[2]} frames; num_init_frames={k} needs at least {k}")
            if k >= num_frames - (last_image is not None):
                raise ValueError(f"num_init_frames: {k} pinned frames for a clip of {num_frames} frames leave none to generate")
            for j in range(k):
                frames[j] = video[:, :, video.shape[2] - k + j]
        for x in frames.values():
            if tuple(x.shape[-2:]) != (height, width) or height % factor or width % factor:
                raise ValueError(f"pinned frames are {tuple(x.shape[-2:])}; the video is {height}x{width}")
        return Pins(frames, float(strength), float(pin_noise)) if frames else None

    def _pin_hook(self, pins: Pins, latents: torch.Tensor, timesteps: torch.Tensor):
        """(the starting latents with the pins applied, the after-step hook) for `latents` b c f h w."""
        last = latents.shape[2] - 1
        index = {(last if j == -1 else j): x for j, x in pins.frames.items()}
        means = {}
        if index:
            pixels = torch.cat(list(index.values()))  # k c H W
            with self._placement.placed(self.vae):
                z = self.vae.encode(pixels.to(self._execution_device, self.vae.dtype)).mode()
            z = (z * self.vae.config.scaling_factor).to(latents.device, latents.dtype)  # k c h w
            means = {j: z[i] for i, j in enumerate(index)}
        noise = {j: latents[:, :, j] / self.scheduler.init_noise_sigma for j in means}  # fixed: the frame's own draw
        s = pins.strength
        # The forward process at the training timestep the sample is at (not the scheduler's add_noise: DPM-Solver's
        # looks the timestep up in its schedule, and pin_noise x t is off it): before the first step timesteps[0],
        # after step i where the step landed (DDIM steps by T // n, which for "trailing" and "linspace" is not
        # timesteps[i + 1]); -1: clean.
        levels = [float(timesteps[0]), *self.scheduler.landing_timesteps(timesteps).tolist()]  # fractional for Euler
        abar = self.scheduler.alphas_cumprod

        def apply(x: torch.Tensor, t: float) -> torch.Tensor:
            x = x.clone()
            # the training timestep nearest pin_noise x t (0: t = 0, nearly clean). With Karras sigmas the sample's
            # own level lies between training timesteps, so pin_noise=1 is that level only to within a timestep.
            t_pin = round(t * pins.noise) if t >= 0 else None
            for j, mean in means.items():
                target = mean.expand_as(x[:, :, j])
                if t_pin is not None:
                    target = add_noise(target, noise[j], abar, t_pin)
                x[:, :, j] = target if s == 1 else s * target + (1 - s) * x[:, :, j]
            return x

        def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
            return apply(x, levels[i + 1])

        return apply(latents, levels[0]), after_step

    def _free_init_latents(self, latents: torch.Tensor, first_noise: torch.Tensor, generator) -> torch.Tensor:
        """Iteration >= 1 of FreeInit: the result diffused back to T - 1 with the first noise, its low
        frequencies kept, fresh noise's high ones."""
        fi = self._free_init
        t = self.scheduler.config.num_train_timesteps - 1  # the forward process at T - 1 (not the scheduler's lookup)
        diffused = add_noise(latents, first_noise, self.scheduler.alphas_cumprod, t).float()
        fresh = randn(latents.shape, generator, latents.device, torch.float32)
        lowpass = free_init_lowpass(latents.shape, fi.method, fi.order, fi.spatial_stop_frequency, fi.temporal_stop_frequency)
        return mix_frequencies(diffused, fresh, lowpass).to(latents.dtype)

    def _sample_text_to_video(self, latents, context, guidance_scale, num_inference_steps: int, pins: Pins | None,
                              denoise: dict, loop: bool = False) -> torch.Tensor:
        """The denoising of a text-to-video call: FreeInit's iterations (one without it), each with the pins; a loop
        wraps around (`_denoise`)."""
        denoise = {**denoise, "loop": loop}
        iterations = self._free_init.num_iters if self._free_init is not None else 1
        first_noise = latents
        for it in range(iterations):
            if it > 0:
                latents = self._free_init_latents(latents, first_noise, denoise["generator"])
            steps = self.free_init_steps(num_inference_steps, it)
            if it > 0 or steps != num_inference_steps:
                self.scheduler.set_timesteps(steps, device=latents.device)
            timesteps = self.scheduler.timesteps
            hook = None
            if pins is not None:
                latents, hook = self._pin_hook(pins, latents, timesteps)
            if len(timesteps):
                latents = self._denoise(latents, timesteps, context, guidance_scale, after_step=hook, **denoise)
        return latents

    def free_init_steps(self, num_inference_steps: int, iteration: int) -> int:
        fi = self._free_init
        if fi is None or not fi.use_fast_sampling:
            return num_inference_steps
        return max(1, int(num_inference_steps / fi.num_iters * (iteration + 1)))

    # -- chained clips -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_continued(self, prompt: str | list[str], num_clips: int, num_init_frames: int = 4,
                           generator: torch.Generator | None = None, **kwargs: Any) -> np.ndarray:
        """A long video as `num_clips` clips, each continuing the last `num_init_frames` frames of the one before
        (memory: one clip's); `prompt` one for all or one per clip; `kwargs` go to each call (num_frames, ...).
        Returns f h w 3 floats in [0, 1], the repeated frames kept once."""
        prompts = [prompt] * num_clips if isinstance(prompt, str) else list(prompt)
        if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1 or len(prompts) != num_clips:
            raise ValueError(f"num_clips must be a positive int with one prompt or one per clip ({len(prompts)} for {num_clips})")
        for name in ("init_video", "num_init_frames", "image", "output_type", "num_videos_per_prompt", "latents"):
            if name in kwargs:
                raise ValueError(f"generate_continued: {name} is set per clip; leave it out")
        for name in ("loop", "last_image", "video", "prompt_embeds", "negative_prompt_embeds"):
            if kwargs.get(name) is not None and kwargs.get(name) is not False:
                raise ValueError(f"generate_continued: {name} does not apply to chained clips; leave it out")
        num_frames = kwargs.get("num_frames") or self.default_num_frames or 16
        if isinstance(num_init_frames, bool) or not isinstance(num_init_frames, int) or not 1 <= num_init_frames < num_frames:
            raise ValueError(f"num_init_frames must be an int in [1, num_frames={num_frames}), got {num_init_frames!r}")
        frames: list[np.ndarray] = []
        previous = None
        for i, text in enumerate(prompts):
            extra = {} if previous is None else {"init_video": previous, "num_init_frames": num_init_frames}
            clip = np.asarray(self(text, generator=generator, output_type="np", **extra, **kwargs).frames[0])
            frames.append(clip if previous is None else clip[num_init_frames:])
            previous = clip
        return np.concatenate(frames)


def lerp_embeddings(start: int, end: int, start_embeds: torch.Tensor, end_embeds: torch.Tensor) -> torch.Tensor:
    """Frames start..end (inclusive) linearly between the two embeddings (1 n d each) -> (end - start + 1) n d."""
    n = end - start + 1
    alpha = torch.linspace(0, 1, n, dtype=start_embeds.dtype, device=start_embeds.device) if n > 1 else \
        torch.zeros(1, dtype=start_embeds.dtype, device=start_embeds.device)
    return torch.lerp(start_embeds, end_embeds, alpha[:, None, None])  # k n d
