"""The training targets, one objective each: which pipeline components it trains, its loss, its eval loss,
its validation videos, and what it adds to a checkpoint. `OBJECTIVES` (trainer.target -> class) is the
only place the trainer looks a target up; the loop and the checkpoint writer see the interface of
`Objective` and nothing else.

    "unet"  the space-time UNet on the diffusion objective (eps / v at drawn timesteps), with the frozen
            autoencoder and text encoder as conditioning; with trainer.train_text_encoder the text encoder
            is trained too (both as one module)
    "vae"   the autoencoder alone: reconstruction + KL; its checkpoints carry a fitted scaling_factor
    "lcd"   a few-step student of the UNet by latent consistency distillation (T2V-Turbo's recipe): the UNet
            with a guidance embedding and a LoRA, its teacher the same UNet with the adapter off
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..diffusion.consistency import guidance_scale_embedding
from ..diffusion.losses import (
    abar_at,
    autoencoder_loss,
    consistency_output,
    diffusion_loss,
    diffusion_target,
    distillation_timesteps,
    draw_timesteps,
    guided_ddim_step,
    pseudo_huber_loss,
    split_prediction,
    timestep_weights,
)
from .. import lora
from ..diffusion.schedule import add_noise
from ..models import UNET_PRESETS
from ..models.vae import DiagonalGaussian
from ..pipelines import TextToVideoSDPipeline
from ..video_io import frames_to_uint8
from . import lora as lora_run
from .distributed import autocast

if TYPE_CHECKING:
    from ..data import DataConfig
    from .config import TrainConfig, TrainerConfig

log = logging.getLogger("modelscope_t2v.train")

Generators = tuple[torch.Generator, torch.Generator]  # (CPU, device) generators of one step


# ---------------------------------------------------------------------------------------------------
# The trained module: one pipeline component, or several trained as one.


class JointModule(nn.Module):
    """Several pipeline components trained as one module (trainer.train_text_encoder: the UNet and the text
    encoder), so that the optimizer, gradient clipping, EMA and checkpoints treat them alike; parameter names
    are prefixed by component (`unet.`, `text_encoder.`). Called like its first component (the others run
    inside its conditioning: the pipeline's encode_prompt holds the same text encoder)."""

    def __init__(self, parts: Mapping[str, nn.Module]):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)
        self.first = next(iter(parts))

    def enable_gradient_checkpointing(self) -> None:
        getattr(self, self.first).enable_gradient_checkpointing()

    def forward(self, *args, **kwargs) -> Tensor:
        return getattr(self, self.first)(*args, **kwargs)


def trained_module(pipe: TextToVideoSDPipeline, components: Sequence[str]) -> nn.Module:
    """The pipeline's component itself (its own parameter names), or a JointModule of several."""
    if len(components) == 1:
        return getattr(pipe, components[0])
    return JointModule({name: getattr(pipe, name) for name in components})


def split_state(state: Mapping[str, Tensor], components: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """A trained module's state dict -> {component: its state dict} (the inverse of `join_state`)."""
    if len(components) == 1:
        return {components[0]: dict(state)}
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in components}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        parts[head][rest] = value
    return parts


def join_state(parts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """{component: state dict} -> the state dict of `trained_module` over those components."""
    if len(parts) == 1:
        return dict(next(iter(parts.values())))
    return {f"{name}.{k}": v for name, state in parts.items() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------
# Conditioning: text embeddings and latents from the pipeline's other models, with optional caches.


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class Conditioning:
    """Text embeddings and autoencoder posteriors under the training precision. A cache (LRU, in memory) keys
    embeddings by caption and posteriors by a hash of the pixels (computed one sample at a time, so a resumed
    run computes the same numbers)."""

    def __init__(self, pipe: TextToVideoSDPipeline, tc: TrainerConfig, device: torch.device, amp: torch.dtype | None):
        self.pipe, self.device, self.amp = pipe, device, amp
        self.text_cache = _LRU(tc.text_cache_size) if tc.text_cache_size else None
        self.latent_cache = _LRU(tc.latent_cache_size) if tc.latent_cache_size else None

    def text(self, captions: list[str], *, trained: bool = False) -> Tensor:
        """b n d float32 embeddings; `trained` keeps the graph (trainer.train_text_encoder: no cache)."""

        def embed(prompts: list[str]) -> Tensor:
            with autocast(self.device, self.amp):
                return self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)[0].float()

        if trained:
            return embed(captions)
        with torch.no_grad():
            if self.text_cache is None:
                return embed(captions)  # b n d
            return torch.cat([self.text_cache.get_or(c, lambda c=c: embed([c])) for c in captions])  # b n d

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> DiagonalGaussian:
        vae = self.pipe.vae

        def moments(x):
            # bf16 or fp32: the SD autoencoder is known to overflow in fp16
            with autocast(self.device, self.amp if self.amp == torch.bfloat16 else None):
                return vae.encode(x.to(self.device)).moments.float()

        if self.latent_cache is None:
            return DiagonalGaussian(moments(pixels))  # b 2z f h w
        rows = []
        for x in pixels.split(1):
            key = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
            rows.append(self.latent_cache.get_or(key, lambda x=x: moments(x).cpu()).to(self.device))
        return DiagonalGaussian(torch.cat(rows))  # b 2z f h w

    def latents(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        """Scaled latents b c f h w: a posterior sample, or its mean without a generator."""
        posterior = self.posterior(pixels)
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return z * self.pipe.vae.config.scaling_factor


def to_uint8(video: Tensor) -> np.ndarray:
    """c f h w in [-1, 1] -> f h w 3 uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def sample_validation_prompts(pipe, v, data: DataConfig, guidance: float, device: torch.device) -> list[np.ndarray]:
    """trainer.validation's prompts sampled by `pipe` (its size defaulting to the data's), one seed each: f h w 3
    uint8 videos."""
    videos = []
    for i, prompt in enumerate(v.prompts):
        out = pipe(prompt, num_frames=v.num_frames or data.num_frames, height=v.height or data.height,
                   width=v.width or data.width, num_inference_steps=v.num_inference_steps, guidance_scale=guidance,
                   generator=torch.Generator(device).manual_seed(v.seed + i), output_type="np").frames
        videos.append(frames_to_uint8(out[0]))  # f h w 3
    return videos


# ---------------------------------------------------------------------------------------------------
# The objectives.


def timestep_weights_for(tc: TrainerConfig, num_train_timesteps: int) -> Tensor | None:
    """The trainer.timestep_bias_* weights for `diffusion.losses.draw_timesteps` (None: uniform)."""
    if tc.timestep_bias_strategy == "none":
        return None
    return timestep_weights(num_train_timesteps, tc.timestep_bias_strategy, tc.timestep_bias_multiplier,
                            tc.timestep_bias_portion, tc.timestep_bias_begin, tc.timestep_bias_end)


class Objective:
    """What one training target trains and how (subclasses fill it in)."""

    # the pipeline components whose weights the target trains (and its checkpoints write, EMA and raw)
    components: ClassVar[tuple[str, ...]] = ()
    # the pipeline components it runs, frozen, on the training device
    conditioning_components: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def trained_components(cls, tc: TrainerConfig) -> tuple[str, ...]:
        return cls.components

    @classmethod
    def refuses(cls, cfg: TrainConfig) -> str | None:
        """Why this target cannot run with `cfg` (a message naming the field), or None; checked before
        anything is built (training.config.check_config)."""
        return None

    @classmethod
    def prepare_pipeline(cls, pipe: TextToVideoSDPipeline, tc: TrainerConfig) -> None:
        """Change the loaded pipeline's modules before the trained module is taken from it (and before a LoRA
        is attached); the same on a fresh start and on resume."""

    def run_metadata(self) -> dict:
        """What a LoRA run's lora_run.json records besides the adapter's settings (loaders read it)."""
        return {}

    def __init__(self, tc: TrainerConfig, pipe: TextToVideoSDPipeline, scheduler, device: torch.device,
                 amp: torch.dtype | None):
        self.tc, self.pipe, self.scheduler, self.device, self.amp = tc, pipe, scheduler, device, amp
        self.components = self.trained_components(tc)
        self.conditioning = Conditioning(pipe, tc, device, amp)

    def loss(self, model: nn.Module, batch: dict, gens: Generators) -> Tensor:
        """The training loss of one micro-batch; `model` is the trained module as the optimizer sees it
        (wrapped for DDP / FSDP)."""
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, batches: list[dict]) -> float:
        """A low-variance loss on fixed batches (fixed noise), for tracking fit."""
        raise NotImplementedError

    def validation_videos(self, model: nn.Module, batches: list[dict], data: DataConfig) -> list[np.ndarray]:
        """Videos (f h w 3 uint8) that show what the weights in `model` do now."""
        raise NotImplementedError

    def prepare_checkpoint(self, shown: Mapping[str, nn.Module], batches: Callable[[], list[dict]]) -> None:
        """Adjust the modules a checkpoint shows (the EMA weights, if any) before they are written;
        `batches()` gives the fixed batches."""


class DiffusionObjective(Objective):
    """MSE between the UNet's output and eps (or v) at timesteps drawn uniformly or with a bias; caption
    dropout to "" trains the unconditional branch of classifier-free guidance."""

    components = ("unet",)
    conditioning_components = ("vae", "text_encoder")

    @classmethod
    def trained_components(cls, tc: TrainerConfig) -> tuple[str, ...]:
        return ("unet", "text_encoder") if tc.train_text_encoder else ("unet",)

    @classmethod
    def refuses(cls, cfg: TrainConfig) -> str | None:
        tc = cfg.trainer
        if tc.train_text_encoder and tc.text_cache_size:
            return (f"trainer.train_text_encoder=true needs trainer.text_cache_size=0 (the embeddings change every "
                    f"step), got {tc.text_cache_size}")
        return None

    def __init__(self, tc, pipe, scheduler, device, amp):
        super().__init__(tc, pipe, scheduler, device, amp)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        self.timestep_weights = timestep_weights_for(tc, len(self.alphas_cumprod))

    def _latents(self, batch: dict, generator: torch.Generator | None) -> Tensor:
        return self.conditioning.latents(batch["pixels"], generator)  # b c f h w

    def loss(self, model, batch, gens):
        tc, (cpu, dev) = self.tc, gens
        captions = original = list(batch["captions"])
        if tc.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=cpu) < tc.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        text = self.conditioning.text(captions, trained=tc.train_text_encoder)  # b n d
        latents = self._latents(batch, dev)  # b c f h w
        noise = torch.randn(latents.shape, generator=dev, device=self.device)  # b c f h w
        if tc.offset_noise > 0:
            b, c = latents.shape[:2]
            noise = noise + tc.offset_noise * torch.randn((b, c, 1, 1, 1), generator=dev, device=self.device)
        ac = self.alphas_cumprod
        timesteps = draw_timesteps(latents.shape[0], len(ac), cpu, self.timestep_weights).to(self.device)  # b
        noisy = add_noise(latents, noise, ac, timesteps)  # b c f h w
        target = diffusion_target(latents, noise, ac, timesteps, tc.prediction_type)  # b c f h w
        prior = lora_run.preserved(tc.lora, original, captions)
        if prior is not None and any(prior):  # those samples' target: the base model's own prediction
            idx = torch.tensor(prior, device=self.device)
            bare = getattr(model, "module", model)  # past DDP: this forward is one rank's, not a collective
            bare.eval()  # the base model's prediction itself: no dropout
            try:
                with torch.no_grad(), lora.scaled(self.pipe.unet, 0.0), autocast(self.device, self.amp):
                    teacher = bare(noisy[idx], timesteps[idx], text[idx])  # p c f h w, the adapter off
            finally:
                bare.train()
            target = target.clone()
            target[idx] = teacher.to(target.dtype)
        with autocast(self.device, self.amp):
            pred = model(noisy, timesteps, text)  # b c f h w
        if prior is None:
            return diffusion_loss(pred, target)
        weights = torch.tensor([tc.lora.prior_loss_weight if p else 1.0 for p in prior], device=self.device)
        return diffusion_loss(pred, target, weights)

    @torch.no_grad()
    def eval_loss(self, model, batches):
        """At `validation.loss_timesteps` evenly spaced timesteps, with noise from a fixed generator."""
        if not batches:
            return math.nan
        steps, ac = self.tc.validation.loss_timesteps, self.alphas_cumprod
        gen = torch.Generator(self.device).manual_seed(1234)
        total = 0.0
        for batch in batches:
            text = self.conditioning.text(list(batch["captions"]))  # b n d
            latents = self._latents(batch, None)  # b c f h w
            for i in range(steps):
                ts = torch.full((latents.shape[0],), int((i + 0.5) * len(ac) / steps), device=self.device)  # b
                noise = torch.randn(latents.shape, generator=gen, device=self.device)
                noisy = add_noise(latents, noise, ac, ts)
                target = diffusion_target(latents, noise, ac, ts, self.tc.prediction_type)
                with autocast(self.device, self.amp):
                    pred = model(noisy, ts, text)
                total += float(diffusion_loss(pred, target)) / steps
        return total / len(batches)

    def validation_videos(self, model, batches, data):
        """The validation prompts sampled by the pipeline (which holds the trained modules themselves: the
        caller swaps the EMA weights in)."""
        v = self.tc.validation
        pipe = TextToVideoSDPipeline.from_pipe(self.pipe, scheduler=self.scheduler)
        pipe.set_progress_bar_config(disable=True)
        guidance = pipe.resolve_guidance_scale(v.guidance_scale)
        return sample_validation_prompts(pipe, v, data, guidance, self.device)


class AutoencoderObjective(Objective):
    """Reconstruction (L1 or MSE) + kl_weight * KL, both per pixel (diffusion.losses.autoencoder_loss)."""

    components = ("vae",)

    @classmethod
    def refuses(cls, cfg: TrainConfig) -> str | None:
        if cfg.trainer.train_text_encoder:
            return "trainer.train_text_encoder=true needs trainer.target=unet"
        if cfg.model.vae_from is not None and cfg.model.name_or_path not in UNET_PRESETS:
            return "model.vae_from with trainer.target=vae: start from the checkpoint itself (model.name_or_path) instead"
        return None

    def _loss(self, model, batch: dict, generator: torch.Generator | None, sample_posterior: bool) -> Tensor:
        x = batch["pixels"].to(self.device)  # b c f h w
        with autocast(self.device, self.amp):
            recon, posterior = model(x, sample_posterior=sample_posterior, generator=generator)  # b c f h w
        return autoencoder_loss(recon, x, posterior.kl(), self.tc.vae_kl_weight, self.tc.vae_recon_loss)

    def loss(self, model, batch, gens):
        return self._loss(model, batch, gens[1], sample_posterior=True)

    @torch.no_grad()
    def eval_loss(self, model, batches):
        if not batches:
            return math.nan
        return sum(float(self._loss(model, b, None, sample_posterior=False)) for b in batches) / len(batches)

    @torch.no_grad()
    def validation_videos(self, model, batches, data):
        """The first fixed batch beside its reconstruction (posterior means)."""
        if not batches:
            return []
        x = batches[0]["pixels"].to(self.device)
        with autocast(self.device, self.amp):
            recon, _ = model(x, sample_posterior=False)
        return [to_uint8(v) for v in torch.cat([x, recon.float()], dim=-1)]  # b c f h 2w -> each f h 2w 3

    @torch.no_grad()
    def prepare_checkpoint(self, shown, batches):
        """With trainer.vae_fit_scaling_factor: scaling_factor = 1 / std of the latents (posterior means) of
        the fixed batches, so that diffusion latents have unit variance (LDM's recipe)."""
        vae = shown["vae"]
        if not self.tc.vae_fit_scaling_factor or not batches():
            return
        device = next(vae.parameters()).device
        z = torch.cat([vae.encode(b["pixels"].to(device)).mode().float().flatten() for b in batches()])
        factor = float(1.0 / z.std())
        log.info("autoencoder scaling_factor = 1 / std(latents) = %.5f", factor)
        vae.config = dataclasses.replace(vae.config, scaling_factor=factor)


class ConsistencyDistillationObjective(Objective):
    """Latent consistency distillation (LCM, Luo et al. 2023, Alg. 1 with classifier-free guidance; T2V-Turbo's
    LoRA recipe without its reward terms). The student is the UNet with a zero-initialised guidance embedding
    (T2V-Turbo-MS's `time_cond_proj`, pipelines.t2v_turbo.turbo_unet) and the LoRA of trainer.lora, which
    adapts that embedding too when the target includes the stem group; with the adapter off and no embedding
    it is exactly the loaded UNet, the teacher, so one UNet serves as both. Per sample:

        t = a grid point (trainer.lcd.num_ddim_timesteps), t_prev = t - k, g ~ U[guidance_min, guidance_max]
        x_t      = the forward process at t
        x_prev   = one DDIM step of the teacher guided at g (two branches)         (diffusion.losses)
        pred     = f(x_t, t, g), the student                                     (the gradient flows here)
        target   = f(x_prev, t_prev, g), the student itself without gradient     (LCM-LoRA: no target EMA)
        loss     = pseudo-Huber(pred, target)

    with f = c_skip x + c_out x0_hat (the boundary scalings; f = x at t_prev = -1). The run's step folders
    hold the adapter in diffusers' layout, and lora_run.json what the student pipeline needs
    (T2VTurboMSPipeline.from_pretrained reads the folder; sample.py model=<folder>)."""

    components = ("unet",)
    conditioning_components = ("vae", "text_encoder")

    @classmethod
    def refuses(cls, cfg: TrainConfig) -> str | None:
        tc, lc = cfg.trainer, cfg.trainer.lcd
        if tc.lora.rank is None:
            return "trainer.target=lcd trains a LoRA student: set trainer.lora.rank (e.g. 32, target all)"
        if tc.train_text_encoder:
            return "trainer.train_text_encoder=true needs trainer.target=unet"
        if tc.lora.new_concept is not None:
            return "trainer.lora.new_concept (prior preservation) needs trainer.target=unet"
        if tc.caption_dropout != 0:
            return (f"trainer.target=lcd distils the captioned model (the teacher's unconditional branch is run, not "
                    f"trained): set trainer.caption_dropout=0, got {tc.caption_dropout}")
        if tc.timestep_bias_strategy != "none":
            return "trainer.timestep_bias_strategy: trainer.target=lcd draws its timesteps on the grid of trainer.lcd"
        n = lc.num_ddim_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            return f"trainer.lcd.num_ddim_timesteps must be an integer in [1, 1000], got {n!r}"
        for key in ("guidance_min", "guidance_max", "timestep_scaling", "huber_c"):
            value = getattr(lc, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                return f"trainer.lcd.{key} must be a finite number >= 0, got {value!r}"
        if not 1 <= lc.guidance_min <= lc.guidance_max:
            return (f"trainer.lcd.guidance_min and guidance_max must satisfy 1 <= min <= max (diffusers' scale; 1 is "
                    f"no guidance), got {lc.guidance_min}, {lc.guidance_max}")
        d = lc.guidance_embedding_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 4:
            return f"trainer.lcd.guidance_embedding_dim must be an integer >= 4, got {d!r}"
        if tc.validate_every and tc.validation.num_inference_steps > n:
            return (f"trainer.validation.num_inference_steps={tc.validation.num_inference_steps} is more than the "
                    f"student's grid, trainer.lcd.num_ddim_timesteps={n} (a student samples in e.g. 4 steps)")
        return None

    @classmethod
    def prepare_pipeline(cls, pipe, tc):
        from ..pipelines.t2v_turbo import turbo_unet

        pipe.unet = turbo_unet(pipe.unet, cond_proj_init="zeros", cond_dim=tc.lcd.guidance_embedding_dim)

    def __init__(self, tc, pipe, scheduler, device, amp):
        super().__init__(tc, pipe, scheduler, device, amp)
        teacher = pipe.scheduler.config  # the loaded model's own objective: the student must keep it
        if (teacher.get("prediction_type"), bool(teacher.get("rescale_betas_zero_snr"))) != (
                tc.prediction_type, bool(tc.zero_terminal_snr)):
            raise ValueError(
                f"trainer.target=lcd distils the model on its own objective: its scheduler has prediction_type="
                f"{teacher.get('prediction_type')!r}, rescale_betas_zero_snr={teacher.get('rescale_betas_zero_snr')}"
                f"; set trainer.prediction_type and trainer.zero_terminal_snr to match (got {tc.prediction_type!r}, "
                f"{tc.zero_terminal_snr})")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        self.uncond: Tensor | None = None  # the "" embedding, once

    def run_metadata(self) -> dict:
        lc = self.tc.lcd
        return {"distillation": {
            "pipeline": "T2VTurboMSPipeline", "method": "latent consistency distillation",
            "guidance_embedding_dim": lc.guidance_embedding_dim, "cond_proj_init": "zeros",
            "scheduler": self.student_scheduler_config(),
            "default_guidance_scale": (lc.guidance_min + lc.guidance_max) / 2, "default_num_inference_steps": 4,
            "guidance_min": lc.guidance_min, "guidance_max": lc.guidance_max,
        }}

    def student_scheduler_config(self) -> dict:
        """The LCMScheduler config the student samples with: the teacher's schedule on the training grid."""
        from ..schedulers import LCMScheduler

        lc = self.tc.lcd
        sched = LCMScheduler.from_config(self.scheduler.config, original_inference_steps=lc.num_ddim_timesteps,
                                         timestep_scaling=float(lc.timestep_scaling))
        return dict(sched.config)

    def _text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(the captions' embeddings, the "" embedding, each b n d)."""
        if self.uncond is None:
            self.uncond = self.conditioning.text([""])  # 1 n d
        text = self.conditioning.text(captions)  # b n d
        return text, self.uncond.expand(len(captions), -1, -1)

    def _pair(self, model: nn.Module, latents: Tensor, text: Tensor, uncond: Tensor, noise: Tensor, t: Tensor,
              t_prev: Tensor, g: Tensor, *, grad: bool) -> tuple[Tensor, Tensor]:
        """(the student's f at t, the target f at t_prev) for one batch (see the class doc)."""
        lc, ptype, ac = self.tc.lcd, self.tc.prediction_type, self.alphas_cumprod
        emb = guidance_scale_embedding(g, lc.guidance_embedding_dim).to(self.device)  # b d
        x_t = add_noise(latents, noise, ac, t)  # b c f h w
        abar_t, abar_prev = abar_at(ac, t, x_t), abar_at(ac, t_prev, x_t)  # b 1 1 1 1
        with torch.set_grad_enabled(grad), autocast(self.device, self.amp):
            out = model(x_t, t, text, timestep_cond=emb)  # b c f h w
        pred = consistency_output(x_t, split_prediction(out.float(), x_t, abar_t, ptype)[0], t, lc.timestep_scaling)
        bare = getattr(model, "module", model)  # past DDP: these forwards are one rank's, not collectives
        bare.eval()  # the teacher's prediction and the target: no dropout
        try:
            with torch.no_grad(), autocast(self.device, self.amp):
                with lora.disabled(self.pipe.unet):  # the teacher: the bare UNet, no guidance embedding
                    both = bare(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, text])).float()
                u, c = both.chunk(2)  # b c f h w each
                x_prev = guided_ddim_step(split_prediction(c, x_t, abar_t, ptype), split_prediction(u, x_t, abar_t, ptype),
                                          g.to(self.device).reshape(-1, 1, 1, 1, 1), abar_prev)  # b c f h w
                t_model = t_prev.clamp(min=0)
                out_prev = bare(x_prev, t_model, text, timestep_cond=emb).float()  # b c f h w
            target = consistency_output(x_prev, split_prediction(out_prev, x_prev, abar_prev, ptype)[0], t_prev,
                                        lc.timestep_scaling)
        finally:
            if grad:
                bare.train()
        return pred, target

    def _latents(self, batch: dict, generator: torch.Generator | None) -> Tensor:
        return self.conditioning.latents(batch["pixels"], generator)  # b c f h w

    def loss(self, model, batch, gens):
        lc, (cpu, dev) = self.tc.lcd, gens
        text, uncond = self._text(list(batch["captions"]))
        latents = self._latents(batch, dev)  # b c f h w
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=dev, device=self.device)
        t, t_prev = distillation_timesteps(b, len(self.alphas_cumprod), lc.num_ddim_timesteps, cpu)  # b, b
        g = lc.guidance_min + (lc.guidance_max - lc.guidance_min) * torch.rand(b, generator=cpu, dtype=torch.float64)
        pred, target = self._pair(model, latents, text, uncond, noise, t.to(self.device), t_prev.to(self.device),
                                  g.float(), grad=True)
        return pseudo_huber_loss(pred, target, lc.huber_c)

    @torch.no_grad()
    def eval_loss(self, model, batches):
        """The distillation loss at `validation.loss_timesteps` grid points spread over the grid, the middle
        guidance scale, noise from a fixed generator."""
        if not batches:
            return math.nan
        lc, steps = self.tc.lcd, self.tc.validation.loss_timesteps
        n, k = lc.num_ddim_timesteps, len(self.alphas_cumprod) // lc.num_ddim_timesteps
        gen = torch.Generator(self.device).manual_seed(1234)
        total = 0.0
        for batch in batches:
            text, uncond = self._text(list(batch["captions"]))
            latents = self._latents(batch, None)
            b = latents.shape[0]
            g = torch.full((b,), (lc.guidance_min + lc.guidance_max) / 2)
            for i in range(steps):
                index = min(n - 1, int((i + 0.5) * n / steps))
                t = torch.full((b,), (index + 1) * k - 1, device=self.device)
                noise = torch.randn(latents.shape, generator=gen, device=self.device)
                pred, target = self._pair(model, latents, text, uncond, noise, t, t - k, g, grad=False)
                total += float(pseudo_huber_loss(pred, target, lc.huber_c)) / steps
        return total / len(batches)

    def validation_videos(self, model, batches, data):
        """The validation prompts sampled by the student (its LCM scheduler, one branch, the middle guidance
        scale embedded) at validation.num_inference_steps."""
        from ..pipelines.t2v_turbo import T2VTurboMSPipeline
        from ..schedulers import LCMScheduler

        v, lc = self.tc.validation, self.tc.lcd
        pipe = T2VTurboMSPipeline.from_pipe(self.pipe, scheduler=LCMScheduler.from_config(self.student_scheduler_config()))
        pipe.set_progress_bar_config(disable=True)
        guidance = v.guidance_scale if v.guidance_scale is not None else (lc.guidance_min + lc.guidance_max) / 2
        return sample_validation_prompts(pipe, v, data, guidance, self.device)


OBJECTIVES: Mapping[str, type[Objective]] = {"unet": DiffusionObjective, "vae": AutoencoderObjective,
                                             "lcd": ConsistencyDistillationObjective}
