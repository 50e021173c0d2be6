"""modelscope-t2v: ModelScope Text-to-Video, written from scratch in PyTorch.

The diffusers-style API: `DiffusionPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b")`,
`pipe(prompt).frames[0]`, `export_to_video(frames)`. The layers (docs/design.md has the map):

    models/     the networks (UNet3D, AutoencoderKL, the text tower), torch + einops
    diffusion/  noise, schedules, samplers and training losses as pure functions
    formats/    checkpoint layouts: key tables, reading, writing, conversion, safe unpickling
    data/       the data sources and the resumable batch stream
    training/   the trainer: configs, objectives, checkpoints, validation, EMA, processes
    eval/       reading generated videos back (the shapes world)
    lora/       LoRA adapters through peft: targets, load / weigh / fuse (files: formats/lora_layout.py)
    pipelines/  schedulers/  video_io.py   the diffusers-compatible API (jobs.py: many videos at once)
"""

from .pipelines import (
    DiffusionPipeline,
    T2VTurboMSPipeline,
    TextToVideoSDPipeline,
    TextToVideoSDPipelineOutput,
    VideoToVideoSDPipeline,
)
from .schedulers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler
from .video_io import export_to_gif, export_to_video

__version__ = "0.1.0"

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionPipeline",
    "LCMScheduler",
    "T2VTurboMSPipeline",
    "TextToVideoSDPipeline",
    "TextToVideoSDPipelineOutput",
    "VideoToVideoSDPipeline",
    "export_to_gif",
    "export_to_video",
]
