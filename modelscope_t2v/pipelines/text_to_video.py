"""The diffusers-compatible Python API: `DiffusionPipeline.from_pretrained(...)`, `pipe(prompt).frames[0]`.

Why: researchers come with diffusers code (the seed examples); with only the import line changed it
must run here, on our own modules, with the same numbers.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from einops import rearrange

from ..diffusion.consistency import guidance_scale_embedding
from ..diffusion.noise import randn
from ..diffusion.samplers import cfg_model_fn
from ..formats import folders
from ..formats.locate import detect_layout, resolve
from ..formats.lora_layout import read_student
from ..models import tokenize
from ..models.unet import UNet3D
from ..models.vae import AutoencoderKL
from ..video_io import VideoFrames, video_to_tensor
from .. import lora
from .acceleration import AccelerationMethods, cached_guidance
from .checks import check_call, check_fits, finite_number, finite_tensor, lora_call_scale, positive_int, require_finite
from .components import ComponentMethods
from .long_video import LongVideoMethods
from .lora import LoraMethods
from .placement import Placement


@dataclass
class TextToVideoSDPipelineOutput:
    """`frames`: np (b, f, h, w, 3) in [0, 1]; pt (b, f, 3, h, w); pil: a list of lists of images;
    latent: (b, c, f, h, w). `.frames[0]` is the first video."""

    frames: Any


class TextToVideoSDPipeline(ComponentMethods, LoraMethods, LongVideoMethods, AccelerationMethods):
    """Text-to-video with the ModelScope space-time UNet (components as in diffusers' pipeline)."""

    video_to_video: ClassVar[bool] = False  # what a call without `video=` does (VideoToVideoSDPipeline: True)

    def __init__(self, unet: UNet3D, vae: AutoencoderKL, text_encoder, tokenizer, scheduler):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._placement = Placement()  # where each model runs during a call (the offload policy)
        self._progress: dict = {}
        # Half-precision weights on a CPU compute in float32 during a call (see `call_precision`).
        self.cpu_upcast = True
        # "open_clip": prompts tokenized as the model was trained (open_clip); "diffusers": exactly as
        # diffusers' pipeline does, which turns every "!" in a prompt into padding (text.tokenize).
        self.tokenization = "open_clip"
        # What a call without them uses (from_pretrained reads them from model_index.json, save_pretrained
        # writes them: folders.GENERATION_DEFAULTS). None: diffusers' defaults (guidance 9 for text-to-video,
        # 15 for video-to-video; 16 frames; the UNet's sample_size times the autoencoder's factor).
        self.default_guidance_scale: float | None = None
        self.default_num_frames: int | None = None  # a training checkpoint: its data's clip size
        self.default_height: int | None = None
        self.default_width: int | None = None
        self.default_num_inference_steps: int | None = None  # None: 50 (diffusers'); T2V-Turbo-MS: 4
        # Check the text embeddings, every UNet output and step, and the decoded frames for NaN / inf, and name
        # where they appeared (NonFiniteError); one reduction each, False skips them.
        self.check_finite = True
        # A UNet with a guidance embedding (unet.config.timestep_cond_dim: consistency-distilled models such as
        # T2V-Turbo-MS) is not guided by two branches: the scale goes in as `timestep_cond`, the embedding of
        # w = guidance_scale + guidance_embedding_shift. 0 is T2V-Turbo's convention; diffusers' LCM pipelines
        # embed guidance_scale - 1 (shift -1).
        self.guidance_embedding_shift = 0.0

    # -- text -------------------------------------------------------------------------------------------

    def _embed(self, prompts: list[str], device, clip_skip: int | None) -> torch.Tensor:
        # no torch.no_grad here: as in diffusers, encode_prompt follows the caller's grad mode (the
        # pipelines' __call__ runs under no_grad; training the text encoder needs the graph)
        ids = tokenize(self.tokenizer, prompts, match=self.tokenization).to(device)
        if clip_skip is None:
            return self.text_encoder(ids)[0]
        out = self.text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 1)]  # skip the last `clip_skip` layers
        tower = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4.x nests it
        return tower.final_layer_norm(hidden)

    def encode_prompt(
        self,
        prompt,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale=None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds) as diffusers' pipeline computes them: the
        unconditional branch embeds "" unless a negative prompt is given."""
        device = torch.device(device) if device is not None else self._execution_device
        if prompt_embeds is None:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
            with self._placement.placed(self.text_encoder):
                prompt_embeds = self._embed(prompt, device, clip_skip)
        batch = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative = [""] * batch
            elif isinstance(negative_prompt, str):
                negative = [negative_prompt] * batch
            elif isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt):
                if len(negative_prompt) != batch:
                    raise ValueError(
                        f"negative_prompt has batch size {len(negative_prompt)}, but prompt has {batch}"
                    )
                negative = negative_prompt
            else:
                raise TypeError(f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}")
            with self._placement.placed(self.text_encoder):
                negative_prompt_embeds = self._embed(negative, device, None)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    # -- video-to-video inputs (used by VideoToVideoSDPipeline and by `video=` here) ------------------

    def preprocess_video(self, video, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """A video in any form diffusers' VideoProcessor takes (`video_io.video_to_tensor`) -> b c f h w in
        [-1, 1] (or latents); PIL frames resized to multiples of the autoencoder's factor or to height x width."""
        return video_to_tensor(video, self.vae_scale_factor, height, width, self.unet.config.in_channels)

    def _noised_video_latents(self, pixels, timesteps, total, dtype, device, generator) -> torch.Tensor:
        """Encode the frames, sample the posterior, scale, then add noise for the first kept timestep, drawing
        in diffusers' order (posterior first, then the noise): one draw over all `(b f)` frames from a single
        generator, or one draw per video from a list of `total` generators. A video given once for several
        outputs (num_videos_per_prompt) is encoded and noised once per output, so the outputs differ."""
        pixels = pixels.repeat(total // pixels.shape[0], 1, 1, 1, 1)  # total c f h w
        frames = pixels.shape[2]
        gens = generator if isinstance(generator, list) else None
        x = rearrange(pixels.to(device, dtype), "b c f h w -> (b f) c h w")
        if x.shape[1] == self.unet.config.in_channels:  # already latents
            z = x
        else:
            with self._placement.placed(self.vae):
                x = x.to(self._execution_device, self.vae.dtype)
                if gens is None:
                    z = self.vae.encode(x).sample(generator)
                else:
                    z = torch.cat([self.vae.encode(v).sample(g) for v, g in zip(x.split(frames), gens)])
            z = (z * self.vae.config.scaling_factor).to(device, dtype)
        if len(timesteps):  # strength 0: nothing to denoise, nothing to add
            if gens is None:
                noise = randn(z.shape, generator, device, dtype)
            else:
                noise = torch.cat([randn((frames, *z.shape[1:]), g, device, dtype) for g in gens])
            z = self.scheduler.add_noise(z, noise, timesteps[:1].repeat(z.shape[0]))
        return rearrange(z, "(b f) c h w -> b c f h w", b=total)

    # -- generation -------------------------------------------------------------------------------------

    def resolve_guidance_scale(self, guidance_scale: float | None = None, *, video_to_video: bool = False) -> float:
        """The scale a call with `guidance_scale` runs at: that one if given, else the model's
        `default_guidance_scale`, else diffusers' default (9 for text-to-video, 15 for video-to-video)."""
        if guidance_scale is not None:
            return guidance_scale
        if self.default_guidance_scale is not None:
            return self.default_guidance_scale
        return 15.0 if video_to_video else 9.0

    @property
    def embedded_guidance(self) -> bool:
        """Whether the UNet takes the guidance scale as an embedding (then there is no unconditional branch)."""
        return self.unet.config.timestep_cond_dim is not None

    def _two_branches(self, guidance_scale: float) -> bool:
        """Whether a call runs classifier-free guidance (an unconditional branch beside the prompt's)."""
        return guidance_scale > 1.0 and not self.embedded_guidance

    def _text_conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale,
                           num_videos_per_prompt, clip_skip):
        guided = self._two_branches(guidance_scale)
        pos, neg = self.encode_prompt(
            prompt, self._execution_device, num_videos_per_prompt, guided, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        )
        context = torch.cat([neg, pos]) if guided else pos  # one UNet call for both branches, uncond first
        self._require_finite(context, "the text encoder's output (the prompt embeddings)")
        return context

    def _denoise(self, latents, timesteps, context, guidance_scale, *, eta, generator, callback, callback_steps,
                 callback_on_step_end, callback_on_step_end_tensor_inputs, lora_scale: float = 1.0,
                 after_step: Callable | None = None, loop: bool = False) -> torch.Tensor:
        """Run the scheduler's sampler over `timesteps` with classifier-free guidance and the callbacks;
        `after_step(i, x) -> x` (pinned frames) runs first after each step. `loop`: the UNet's temporal convs wrap
        around and FreeNoise's windows close into a loop; with sliding windows in use, those close instead and each
        window's UNet call is a plain one (a window's ends are not neighbours, nor are FreeNoise's inside it)."""
        from tqdm.auto import tqdm

        unet = self.unet
        scale_in = getattr(self.scheduler, "scale_model_input", lambda x, t: x)

        step = [0]  # the step being computed, for the messages of the finiteness checks

        extra = {}
        if self.embedded_guidance:  # the scale as the UNet's timestep_cond, one branch (see __init__)
            w = torch.full((context.shape[0],), float(guidance_scale) + self.guidance_embedding_shift)
            cond = guidance_scale_embedding(w, unet.config.timestep_cond_dim)  # b d, float32 as the references
            extra["timestep_cond"] = cond.to(latents.device, context.dtype)

        cache = self._deepcache_plan(len(timesteps))  # DeepCache's state and full steps for this run, if on

        def unet_call(x: torch.Tensor, ctx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kw = extra if cache is None else {**extra, "deep_cache": cache.for_call(step[0], x.shape[0] * x.shape[2])}
            if x.shape[0] < ctx.shape[0]:  # the conditional branch alone (guidance cache): its context
                ctx = ctx[ctx.shape[0] - x.shape[0]:]
            return unet(scale_in(x, t), t, encoder_hidden_states=ctx, **kw)  # b c f h w (2b when guided)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self._windowed_unet(lambda xw, ctx: unet_call(xw, ctx, t), x, context, loop)  # sliding windows, if on
            self._require_finite(out, f"the UNet's output at step {step[0]} (t={int(t)})")
            return out

        if self._two_branches(guidance_scale):  # the context holds the unconditional branch first
            two = self._guidance_plan(len(timesteps), cache)
            if two is None:
                model_fn = cfg_model_fn(model_fn, guidance_scale)
            else:  # the guidance cache: model_fn called with the conditional batch alone in between
                model_fn = cached_guidance(model_fn, guidance_scale, two, lambda: step[0])

        bar = tqdm(total=len(timesteps), **{"desc": "denoising", **self._progress})

        def step_callback(i: int, t: torch.Tensor, x: torch.Tensor):
            bar.update(1)
            self._require_finite(x, f"the latents after step {i} (t={int(t)}), from the {type(self.scheduler).__name__} "
                                    "update of a finite UNet output")
            step[0] = i + 1
            new = after_step(i, x) if after_step is not None else None
            x = x if new is None else new
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x)
            if callback_on_step_end is not None:
                kwargs = {"latents": x, "prompt_embeds": context}
                out = callback_on_step_end(self, i, t, {k: kwargs[k] for k in callback_on_step_end_tensor_inputs})
                if out and "latents" in out:
                    return out["latents"]
            return new

        try:
            # a loop whose whole video goes through the UNet at once: its convs and FreeNoise's windows wrap around
            wrap = loop and not self._sliding_in_use(latents.shape[2])
            with self._placement.placed(unet), lora.scaled(unet, lora_scale), self._unet_windows(wrap), \
                    (unet.circular_frames() if wrap else nullcontext()):
                return self.scheduler.sample(model_fn, latents, timesteps, generator=generator,
                                             callback=step_callback, eta=eta)
        finally:
            bar.close()

    def _require_finite(self, x: torch.Tensor, what: str) -> None:
        if self.check_finite:
            require_finite(x, what, half=self.vae.dtype == torch.float16)

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int | None = None) -> torch.Tensor:
        """latents b c f h w (scaled) -> video b c f H W in [-1, 1], float32. `decode_chunk_size` frames
        go through the VAE at a time (all at once by default, as diffusers)."""
        b = latents.shape[0]
        z = rearrange(latents / self.vae.config.scaling_factor, "b c f h w -> (b f) c h w")
        step = decode_chunk_size or z.shape[0]
        with self._placement.placed(self.vae):
            z = z.to(self._execution_device, self.vae.dtype)
            frames = torch.cat([self.vae.decode(z[i : i + step]) for i in range(0, z.shape[0], step)])
        self._require_finite(frames, "the autoencoder's decode of the final (finite) latents")
        return rearrange(frames, "(b f) c h w -> b c f h w", b=b).float()

    @staticmethod
    def postprocess(video: torch.Tensor, output_type: str):
        """b c f h w in [-1, 1] -> the requested output type (diffusers' VideoProcessor conventions)."""
        video = (video / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return rearrange(video, "b c f h w -> b f c h w").cpu()
        frames = rearrange(video, "b c f h w -> b f h w c").cpu().numpy()
        if output_type == "np":
            return frames.view(VideoFrames)
        from PIL import Image

        return [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in v] for v in frames]

    def _finish(self, latents, output_type, return_dict, decode_chunk_size):
        if output_type == "latent":
            video = latents
        else:
            video = self.postprocess(self.decode_latents(latents, decode_chunk_size), output_type)
        return TextToVideoSDPipelineOutput(frames=video) if return_dict else (video,)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback: Callable | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        num_videos_per_prompt: int = 1,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        decode_chunk_size: int | None = None,
        video=None,
        strength: float = 0.6,
        image=None,
        last_image=None,
        loop: bool = False,
        image_strength: float = 1.0,
        init_video=None,
        num_init_frames: int | None = None,
        pin_noise: float = 0.3,
    ):
        """Generate videos (diffusers 0.42's arguments and defaults: 16 frames, 50 steps, guidance_scale 9.0;
        the last six are additions; a model's generation defaults in model_index.json replace diffusers').
        Passing `video=` runs video-to-video (SDEdit, `strength` of the schedule) whatever the folder's
        model_index.json names; guidance then defaults to 15.0, as in diffusers' VideoToVideoSDPipeline, and
        the size is the video's. A model whose model_index.json carries
        `default_guidance_scale` (the bundled shapes model) uses that instead of either default when
        `guidance_scale` is not given.

        `loop=True` makes the last frame lead back to the first (pipelines/long_video.py; in video-to-video too, so
        that upscaling a loop keeps it one). Text-to-video only: `image` starts the video from an image,
        `last_image` ends it on one, `init_video` + `num_init_frames` continue a clip from its last frames (each
        pinned with `image_strength`, re-noised to `pin_noise` times the current timestep); `prompt` may be a dict
        {first frame: prompt} (prompt travel); the enable_free_noise / enable_sliding_windows / enable_freeu /
        enable_free_init switches apply.

        Noise is drawn exactly as diffusers draws it: the same `torch.Generator` gives the same video.
        Video-to-video `latents`, if given, are the already-noised starting latents at the first kept
        timestep (diffusers silently ignores them); otherwise the video is encoded and noised as diffusers does.
        """
        video_to_video = video is not None or self.video_to_video
        self._check_acceleration()
        guidance_scale = self.resolve_guidance_scale(guidance_scale, video_to_video=video_to_video)
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps or 50
        if self.embedded_guidance and (negative_prompt is not None or negative_prompt_embeds is not None):
            raise ValueError("negative_prompt / negative_prompt_embeds: this UNet embeds the guidance scale "
                             "(unet.config.timestep_cond_dim) and runs no unconditional branch to put them in")
        travel = isinstance(prompt, dict)  # prompt travel: {first frame: prompt}
        if travel and (prompt_embeds is not None or negative_prompt_embeds is not None or video_to_video or not prompt):
            raise ValueError("prompt: a dict of prompts (prompt travel) is for text-to-video, without prompt_embeds "
                             "or negative_prompt_embeds (give negative_prompt as a string)")
        if travel and not (negative_prompt is None or isinstance(negative_prompt, str)):
            raise ValueError("negative_prompt: with a prompt dict, one negative prompt (a string) or None")
        batch = check_call(next(iter(prompt.values())) if travel else prompt, negative_prompt, prompt_embeds,
                           negative_prompt_embeds, num_inference_steps,
                           guidance_scale, output_type, callback_steps, num_videos_per_prompt, decode_chunk_size,
                           text_width=self.unet.config.cross_attention_dim)
        total = batch * num_videos_per_prompt
        lora_scale = lora_call_scale(cross_attention_kwargs, bool(lora.adapter_names(self.unet)), lora.is_fused(self.unet))
        finite_number("eta", eta, low=0.0)
        finite_tensor("latents", latents)
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"generator: a list of {len(generator)} generators for {total} videos "
                             "(one per video, or a single generator)")
        bad = set(callback_on_step_end_tensor_inputs) - {"latents", "prompt_embeds"}
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: unknown names {sorted(bad)}")
        if loop not in (True, False):
            raise TypeError(f"loop must be True or False, got {loop!r}")
        keyframed = image is not None or last_image is not None or init_video is not None
        if video_to_video and (keyframed or num_init_frames is not None):
            raise ValueError("image / last_image / init_video are text-to-video options; video-to-video takes video=")
        pins = None
        if video_to_video:
            for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
                if value is not None:
                    raise ValueError(f"{name}: video-to-video takes the size of the video; leave {name} unset")
            if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
                raise ValueError(f"strength must be in [0, 1], got {strength!r}")
            if video is None and latents is None:
                raise ValueError("pass video (or latents) to video-to-video")
            pixels = self.preprocess_video(video) if video is not None else None
            if pixels is not None and pixels.shape[0] not in (1, total):
                raise ValueError(f"video has batch size {pixels.shape[0]}, but {total} videos are requested")
            if pixels is not None:
                scale = 1 if pixels.shape[1] != self.unet.config.in_channels else self.vae_scale_factor  # latents given
                check_fits(total, pixels.shape[2], pixels.shape[3] * scale, pixels.shape[4] * scale,
                           factor=self.vae_scale_factor, channels=self.unet.config.in_channels, device=self._execution_device)
        else:
            shape = self._latent_shape(total, height, width, num_frames)
            factor = self.vae_scale_factor
            pins = self._pins(image, last_image, loop, init_video, num_init_frames, image_strength,
                              shape[3] * factor, shape[4] * factor, shape[2], pin_noise)
            if latents is not None and tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            self._check_long_video(shape[2], loop=bool(loop))

        with self.call_precision():  # half weights on a CPU: float32 for this call
            if travel:
                context = self._travel_embeddings(prompt, shape[2], self._two_branches(guidance_scale),
                                                  negative_prompt, num_videos_per_prompt, clip_skip)
            else:
                context = self._text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                                  guidance_scale, num_videos_per_prompt, clip_skip)
            device, dtype = self._execution_device, context.dtype
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            if video_to_video:
                kept = min(int(num_inference_steps * strength), num_inference_steps)  # as diffusers' get_timesteps
                order = getattr(self.scheduler, "order", 1)
                timesteps = self.scheduler.timesteps[(num_inference_steps - kept) * order :]
                if hasattr(self.scheduler, "set_begin_index"):  # add_noise at the start's own index, as diffusers
                    self.scheduler.set_begin_index((num_inference_steps - kept) * order)
                if latents is None:
                    latents = self._noised_video_latents(pixels, timesteps, total, dtype, device, generator)
                latents = latents.to(device, dtype)
            else:
                if latents is None:
                    latents = self._free_noise_latents(randn(shape, generator, device, dtype), generator)
                latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
            denoise = dict(eta=eta, generator=generator, callback=callback, callback_steps=callback_steps,
                           callback_on_step_end=callback_on_step_end, lora_scale=lora_scale,
                           callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
            if video_to_video:
                if len(timesteps):
                    latents = self._denoise(latents, timesteps, context, guidance_scale, loop=bool(loop), **denoise)
            else:
                latents = self._sample_text_to_video(latents, context, guidance_scale, num_inference_steps, pins, denoise,
                                                     loop=bool(loop))
            return self._finish(latents, output_type, return_dict, decode_chunk_size)

    _generate = __call__  # the one body; VideoToVideoSDPipeline.__call__ reaches it in diffusers' argument order

    def _latent_shape(self, total: int, height: int | None, width: int | None, num_frames: int | None):
        """(b, c, f, h, w) of text-to-video latents; the size defaults to the model's (generation defaults, else
        16 frames at the UNet's sample_size)."""
        factor = self.vae_scale_factor
        num_frames = positive_int("num_frames", num_frames, default=self.default_num_frames or 16)
        height = positive_int("height", height, default=self.default_height or self.unet.config.sample_size * factor)
        width = positive_int("width", width, default=self.default_width or self.unet.config.sample_size * factor)
        for name, v in (("height", height), ("width", width)):
            if v % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {v!r}")
        check_fits(total, num_frames, height, width, factor=factor, channels=self.unet.config.in_channels,
                   device=self._execution_device)
        return (total, self.unet.config.in_channels, num_frames, height // factor, width // factor)

class VideoToVideoSDPipeline(TextToVideoSDPipeline):
    """Video-to-video (SDEdit): noise a given video to `strength` and denoise it with the prompt; the
    zeroscope_v2_XL upscaling recipe. Same components and the same `__call__` as text-to-video, in
    diffusers' argument order (prompt, video, strength, ...)."""

    video_to_video: ClassVar[bool] = True

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, video=None, strength: float = 0.6,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, **kwargs):
        """Video-to-video with diffusers 0.42's arguments and defaults (strength 0.6, guidance 15, or the
        model's `default_guidance_scale`); the other arguments are TextToVideoSDPipeline's, less the size."""
        return self._generate(prompt, video=video, strength=strength, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, **kwargs)


class DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained(...)` returns the pipeline class the folder's model_index.json
    names (TextToVideoSDPipeline, or VideoToVideoSDPipeline for zeroscope_v2_XL)."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs):
        folder = resolve(path_or_repo_id, revision=kwargs.get("revision"), variant=kwargs.get("variant"))
        from .t2v_turbo import T2VTurboMSPipeline

        if not (folder / "model_index.json").is_file() and read_student(folder) is not None:
            return T2VTurboMSPipeline.from_student(folder, **kwargs)  # a distilled student of our own
        name = folders.pipeline_class_name(folder, detect_layout(folder))

        classes = {c.__name__: c for c in (TextToVideoSDPipeline, VideoToVideoSDPipeline, T2VTurboMSPipeline)}
        if name not in classes:
            raise ValueError(f"{path_or_repo_id}: unsupported pipeline class {name!r} (supported: {sorted(classes)})")
        return classes[name].from_pretrained(folder, **kwargs)
