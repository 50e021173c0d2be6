"""Diffusion math as pure functions over tensors: no models, no files.

    noise.py      Gaussian noise drawn in diffusers' order (the same seed, the same video)
    schedule.py   betas, alphas_cumprod, zero terminal SNR, the forward process, timestep spacings
    samplers.py   DDIM and DPM-Solver++ (one signature), classifier-free guidance
    consistency.py  few-step consistency (LCM-style) sampling, its timesteps and guidance embedding
    losses.py     the training objectives: timestep draws, targets, the diffusion and autoencoder losses
"""

from .losses import autoencoder_loss, diffusion_loss, diffusion_target, draw_timesteps, timestep_weights
from .noise import randn, randn_like
from .samplers import cfg_model_fn, check_guidance_scale, ddim, dpm_solver_multistep
from .schedule import add_noise, make_alphas_cumprod, make_betas, make_timesteps, velocity

__all__ = [
    "add_noise", "autoencoder_loss", "cfg_model_fn", "check_guidance_scale", "ddim", "diffusion_loss",
    "diffusion_target", "dpm_solver_multistep", "draw_timesteps", "make_alphas_cumprod", "make_betas",
    "make_timesteps", "randn", "randn_like", "timestep_weights", "velocity",
]
