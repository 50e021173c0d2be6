"""The diffusers-compatible Python API: `DiffusionPipeline.from_pretrained(...)`, `pipe(prompt).frames[0]`.

    text_to_video.py  TextToVideoSDPipeline, VideoToVideoSDPipeline, DiffusionPipeline
    lora.py           their LoRA methods (load_lora_weights, set_adapters, fuse_lora, ...)
    t2v_turbo.py      T2VTurboMSPipeline: the 4-step T2V-Turbo-MS release on ModelScope 1.7B
    checks.py         the arguments of a call, checked before any model runs; values during it
    placement.py      where the models run during a call (offload) and in what precision
"""

from .checks import OUTPUT_TYPES, NonFiniteError
from .t2v_turbo import T2VTurboMSPipeline
from .text_to_video import (
    DiffusionPipeline,
    TextToVideoSDPipeline,
    TextToVideoSDPipelineOutput,
    VideoToVideoSDPipeline,
)

__all__ = ["OUTPUT_TYPES", "DiffusionPipeline", "NonFiniteError", "T2VTurboMSPipeline", "TextToVideoSDPipeline",
           "TextToVideoSDPipelineOutput", "VideoToVideoSDPipeline"]
