"""modelscope-t2v: ModelScope Text-to-Video, written from scratch in PyTorch."""

__version__ = "0.1.0"
