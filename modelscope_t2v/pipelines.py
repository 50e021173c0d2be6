"""The diffusers-compatible Python API: `DiffusionPipeline.from_pretrained(...)`, `pipe(prompt).frames[0]`.

Why: researchers come with diffusers code (the seed examples); with only the import line changed it
must run here, on our own modules, with the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import loading
from .text import build_text_encoder
from .unet import UNet3D
from .vae import AutoencoderKL


class TextToVideoSDPipeline:
    """Text-to-video with the ModelScope space-time UNet (components as in diffusers' pipeline)."""

    def __init__(self, unet: UNet3D, vae: AutoencoderKL, text_encoder, tokenizer, scheduler):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler

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
        from .schedulers import scheduler_from_config

        components = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
        unknown = set(kwargs) - components
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword argument(s) {sorted(unknown)}")
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype, got {torch_dtype!r}")
        folder = loading.resolve(path_or_repo_id, revision=revision, variant=variant)
        layout = loading.detect_layout(folder)
        parts = dict(kwargs)
        if "unet" not in parts:
            parts["unet"] = loading.instantiate(UNet3D, *loading.read_unet(folder, layout, variant), torch_dtype)
        if "vae" not in parts:
            parts["vae"] = loading.instantiate(AutoencoderKL, *loading.read_vae(folder, layout, variant), torch_dtype)
        if "text_encoder" not in parts:
            parts["text_encoder"] = loading.instantiate(
                build_text_encoder, *loading.read_text_encoder(folder, layout, variant), torch_dtype
            )
        if "tokenizer" not in parts:
            parts["tokenizer"] = loading.read_tokenizer(folder, layout)
        if "scheduler" not in parts:
            parts["scheduler"] = scheduler_from_config(loading.read_scheduler_config(folder, layout))
        pipe = cls(**parts)
        pipe.name_or_path = str(path_or_repo_id)
        pipe.model_index_class = loading.pipeline_class_name(folder, layout)
        return pipe

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, torch_dtype: torch.dtype | None = None):
        """Randomly initialised models of a size preset ("tiny", "ms-1.7b", "zeroscope-576w", ...), the
        CLIP tokenizer built offline and the released DDIM schedule: a starting point for training."""
        from .schedulers import released_scheduler_config, scheduler_from_config
        from .text import TEXT_PRESETS, build_tokenizer
        from .unet import UNET_PRESETS
        from .vae import VAE_PRESETS

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

        def state(m):
            return {k: v.detach().cpu() for k, v in m.state_dict().items()}

        loading.write_diffusers_unet(folder, self.unet.config, state(self.unet), variant)
        loading.write_diffusers_vae(folder, self.vae.config, state(self.vae), variant)
        loading.write_diffusers_text_encoder(folder, self.text_encoder.config, state(self.text_encoder), variant)
        loading.write_tokenizer(folder, self.tokenizer)
        loading.write_scheduler(folder, dict(self.scheduler.config))
        loading.write_model_index(folder, type(self).__name__, type(self.scheduler).__name__)
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
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, *args, **kwargs):
        """`pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`."""
        for m in self._modules():
            m.to(*args, **kwargs)
        return self

    # -- text -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _embed(self, prompts: list[str], device, clip_skip: int | None) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
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
        device = torch.device(device) if device is not None else self.text_encoder.device
        if prompt_embeds is None:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
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
            negative_prompt_embeds = self._embed(negative, device, None)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds


class DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained(...)` returns the pipeline class the folder's model_index.json
    names (TextToVideoSDPipeline, or VideoToVideoSDPipeline for zeroscope_v2_XL)."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs):
        folder = loading.resolve(path_or_repo_id, revision=kwargs.get("revision"), variant=kwargs.get("variant"))
        name = loading.pipeline_class_name(folder, loading.detect_layout(folder))
        classes = {c.__name__: c for c in (TextToVideoSDPipeline,)}
        if name not in classes:
            raise ValueError(f"{path_or_repo_id}: unsupported pipeline class {name!r} (supported: {sorted(classes)})")
        return classes[name].from_pretrained(folder, **kwargs)
