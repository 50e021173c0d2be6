"""The pipeline as files and components: loading (`from_pretrained`, `from_pipe`, `from_preset`), saving, the
components, where they run (devices, offload, precision) and the memory switches. Mixed into
TextToVideoSDPipeline, whose own module is generation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .. import lora
from ..formats import folders
from ..formats.folders import released_scheduler_config
from ..formats.locate import detect_layout, resolve
from ..formats.lora_layout import read_student
from ..models import TEXT_PRESETS, UNET_PRESETS, VAE_PRESETS, build_text_encoder, build_tokenizer
from ..models.unet import UNet3D
from ..models.vae import AutoencoderKL
from ..schedulers import scheduler_from_config
from .placement import Placement, accelerator, cpu_precision


class ComponentMethods:
    """The pipeline methods of this module (mixed into TextToVideoSDPipeline)."""

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        """Load a folder or hub id in the diffusers layout or the original ModelScope layout.

        torch_dtype: the dtype of every module (default float32, as diffusers); variant: e.g. "fp16"
        selects `*.fp16.safetensors`; components may be passed as keyword arguments to replace the
        stored ones (e.g. `scheduler=...`).
        """
        components = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
        unknown = set(kwargs) - components
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword argument(s) {sorted(unknown)}")
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype, got {torch_dtype!r}")
        folder = resolve(path_or_repo_id, revision=revision, variant=variant)
        from .t2v_turbo import T2VTurboMSPipeline

        if not (folder / "model_index.json").is_file() and read_student(folder) is not None:
            # a distilled student (a LoRA over a base model named in its lora_run.json): its own pipeline class
            return T2VTurboMSPipeline.from_student(folder, torch_dtype=torch_dtype, variant=variant, **kwargs)
        layout = detect_layout(folder)
        defaults = folders.read_generation_defaults(folder, layout)  # checked before any weights load
        parts = dict(kwargs)
        for name in folders.COMPONENTS:
            if name not in parts:
                parts[name] = folders.load_component(name, folder, layout, variant, torch_dtype)
        if "tokenizer" not in parts:
            parts["tokenizer"] = folders.read_tokenizer(folder, layout)
        if "scheduler" not in parts:
            parts["scheduler"] = scheduler_from_config(folders.read_scheduler_config(folder, layout))
        pipe = cls(**parts)
        pipe.name_or_path = str(path_or_repo_id)
        pipe.model_index_class = folders.pipeline_class_name(folder, layout)
        pipe.generation_defaults = defaults
        return pipe

    @classmethod
    def from_pipe(cls, pipe: "ComponentMethods", **components):
        """A pipeline of this class over `pipe`'s components (replaced by `components` where given), with its
        generation defaults and settings: no second copy of any weight (diffusers' `from_pipe`)."""
        out = cls(**{**pipe.components, **components})
        out.generation_defaults = pipe.generation_defaults
        out.cpu_upcast, out.tokenization, out.check_finite = pipe.cpu_upcast, pipe.tokenization, pipe.check_finite
        out._progress = dict(pipe._progress)
        # the long-video switches are the pipeline's (immutable values: the two pipelines switch independently)
        out._free_noise, out._sliding_windows, out._free_init = pipe._free_noise, pipe._sliding_windows, pipe._free_init
        out._deepcache, out._guidance_cache = pipe._deepcache, pipe._guidance_cache
        out.name_or_path = getattr(pipe, "name_or_path", None)
        return out

    @property
    def generation_defaults(self) -> dict:
        """The generation defaults that are set ({"default_guidance_scale": 2.0, ...}), as model_index.json holds them."""
        return {k: getattr(self, k) for k in folders.GENERATION_DEFAULTS if getattr(self, k) is not None}

    @generation_defaults.setter
    def generation_defaults(self, values: dict) -> None:
        values = folders.check_generation_defaults(values, "generation_defaults")
        for key in folders.GENERATION_DEFAULTS:
            setattr(self, key, values.get(key))

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, torch_dtype: torch.dtype | None = None):
        """Randomly initialised models of a size preset ("tiny", "ms-1.7b", "zeroscope-576w", ...), the
        CLIP tokenizer built offline and the released DDIM schedule: a starting point for training."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(UNET_PRESETS)}")
        size = "tiny" if name == "tiny" else "ms-1.7b"  # zeroscope shares ms-1.7b's autoencoder and text tower
        torch.manual_seed(seed)
        unet, vae = UNet3D(UNET_PRESETS[name]), AutoencoderKL(VAE_PRESETS[size])
        text_encoder = build_text_encoder(TEXT_PRESETS[size])
        pipe = cls(unet, vae, text_encoder, build_tokenizer(None), scheduler_from_config(released_scheduler_config()))
        for m in pipe._modules():
            m.to(torch_dtype or torch.float32).eval()
        pipe.name_or_path = f"preset:{name}"
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None) -> Path:
        """Write the diffusers layout (which diffusers itself, this project and the converter read)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)

        if lora.has_unfused(self.unet):
            raise ValueError(
                f"save_pretrained: LoRA adapters {lora.adapter_names(self.unet)} are loaded and not fused, so the "
                "UNet's weights alone are not the model that runs; fuse_lora() (then unload_lora_weights()) to "
                "save the adapted model, unload_lora_weights() to save the base one, or save_lora_weights() "
                "for the adapter")

        def state(m):
            return {k: v.detach().cpu() for k, v in lora.base_state_dict(m).items()}

        for name in folders.COMPONENTS:
            module = getattr(self, name)
            folders.write_diffusers_component(name, folder, module.config, state(module), variant)
        folders.write_tokenizer(folder, self.tokenizer)
        folders.write_scheduler(folder, dict(self.scheduler.config))
        folders.write_model_index(folder, type(self).__name__, type(self.scheduler).__name__, self.generation_defaults)
        return folder

    # -- devices ----------------------------------------------------------------------------------------

    @property
    def components(self) -> dict:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
        }

    def _modules(self):
        return [self.unet, self.vae, self.text_encoder]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def _execution_device(self) -> torch.device:
        return self._placement.device or self.device

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    # -- memory ---------------------------------------------------------------------------------------

    def enable_vae_slicing(self, chunk_size: int = 1):
        """Decode (and encode) `chunk_size` frames at a time: memory bounded in the number of frames."""
        self.vae.enable_slicing(chunk_size)

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self, tile_size: int | None = None, overlap: float = 0.25):
        """Decode large frames in overlapping spatial tiles (blended; close to, not equal to, untiled)."""
        self.vae.enable_tiling(tile_size, overlap)

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

    def _accelerator(self, what: str, gpu_id: int | None, device) -> torch.device | None:
        target = accelerator(gpu_id, device)
        if target is None:
            print(f"{what}: no accelerator on this machine; the models stay on {self.device}.", file=sys.stderr)
        return target

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device=None):
        """Keep every model on the CPU and move each to the accelerator only while it runs (text encoder,
        then UNet, then VAE). Without an accelerator: a one-line notice and nothing changes."""
        target = self._accelerator("enable_model_cpu_offload", gpu_id, device)
        if target is not None:
            self.to("cpu")
            self._placement = Placement("model", target)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device=None):
        """Keep weights on the CPU and move each leaf module to the accelerator only for its forward:
        the least accelerator memory, the slowest. Without an accelerator: a notice, nothing changes."""
        target = self._accelerator("enable_sequential_cpu_offload", gpu_id, device)
        if target is not None:
            self.to("cpu")
            self._placement = Placement("sequential", target)

    def call_precision(self):
        """The precision a call computes in (a context): half-precision weights on a CPU compute in float32
        and are restored afterwards, unless `pipe.cpu_upcast = False` (placement.cpu_precision)."""
        return cpu_precision(self._modules(), self._execution_device, self.cpu_upcast)

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the denoising loop, e.g. `disable=True` (as in diffusers)."""
        self._progress = dict(kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, *args, **kwargs):
        """`pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`."""
        for m in self._modules():
            m.to(*args, **kwargs)
        return self
