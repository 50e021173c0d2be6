"""The diffusers-compatible Python API: `DiffusionPipeline.from_pretrained(...)`, `pipe(prompt).frames[0]`.

    text_to_video.py  TextToVideoSDPipeline, VideoToVideoSDPipeline, DiffusionPipeline
    checks.py         the arguments of a call, checked before any model runs; values during it
    placement.py      where the models run during a call (offload) and in what precision
"""

from .checks import OUTPUT_TYPES, NonFiniteError
from .text_to_video import (
    DiffusionPipeline,
    TextToVideoSDPipeline,
    TextToVideoSDPipelineOutput,
    VideoToVideoSDPipeline,
)

__all__ = ["OUTPUT_TYPES", "DiffusionPipeline", "NonFiniteError", "TextToVideoSDPipeline", "TextToVideoSDPipelineOutput",
           "VideoToVideoSDPipeline"]
