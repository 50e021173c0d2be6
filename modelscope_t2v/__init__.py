"""modelscope-t2v: ModelScope Text-to-Video, written from scratch in PyTorch.

The diffusers-style API: `DiffusionPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b")`,
`pipe(prompt).frames[0]`, `export_to_video(frames)`.
"""

from .pipelines import (
    DiffusionPipeline,
    TextToVideoSDPipeline,
    TextToVideoSDPipelineOutput,
    VideoToVideoSDPipeline,
)
from .schedulers import DDIMScheduler, DPMSolverMultistepScheduler
from .video_io import export_to_gif, export_to_video

__version__ = "0.1.0"

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionPipeline",
    "TextToVideoSDPipeline",
    "TextToVideoSDPipelineOutput",
    "VideoToVideoSDPipeline",
    "export_to_gif",
    "export_to_video",
]
