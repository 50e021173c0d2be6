"""CLIPSIM: how well a video's frames match its caption, by a CLIP model the user supplies.

The convention of the text-to-video papers ModelScope's table compares with (its MSR-VTT CLIPSIM is
0.2930): for each frame, the cosine similarity of CLIP's image embedding and the caption's text embedding,
averaged over the frames of a video, then over the videos. Plain cosine: not x100, not clipped at 0
(torchmetrics' CLIPScore of one video's frames is 100 * max(mean cosine, 0)). Frames are prepared by the
CLIP model's own preprocessing (transformers' CLIPImageProcessor, or open_clip's transform).

A model is named by a spec:
- a folder or hub id of a transformers CLIPModel (e.g. openai/clip-vit-base-patch32, from the cache when
  HF_HUB_OFFLINE=1);
- `open_clip:ARCH:PRETRAINED`, e.g. `open_clip:ViT-B-32:/weights/open_clip_vit_b32.bin` (a file) or
  open_clip's own tag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image


class ClipScorer:
    """Frame-caption cosine similarities with one CLIP model (`image_features`, `text_features`: unit rows)."""

    def __init__(self, encode_images: Callable[[list[Image.Image]], torch.Tensor],
                 encode_texts: Callable[[list[str]], torch.Tensor], name: str):
        self._encode_images, self._encode_texts, self.name = encode_images, encode_texts, name

    @classmethod
    def from_spec(cls, spec: str, device: torch.device | str = "cpu") -> "ClipScorer":
        if spec.startswith("open_clip:"):
            parts = spec.split(":", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise ValueError(f"clip model {spec!r}: write open_clip:ARCH:PRETRAINED (a file or open_clip's tag)")
            return cls.from_open_clip(parts[1], parts[2], device)
        return cls.from_transformers(spec, device)

    @classmethod
    def from_transformers(cls, name_or_path: str, device: torch.device | str = "cpu") -> "ClipScorer":
        from transformers import CLIPModel, CLIPProcessor

        if not Path(name_or_path).is_dir() and name_or_path.count("/") != 1:
            raise ValueError(f"clip model {name_or_path!r}: not a folder, not a hub id (org/name), not open_clip:ARCH:PRETRAINED")
        try:
            model = CLIPModel.from_pretrained(name_or_path).eval().to(device)
            processor = CLIPProcessor.from_pretrained(name_or_path)
        except OSError as e:
            raise ValueError(f"clip model {name_or_path!r} could not be loaded as a transformers CLIPModel with its "
                             f"processor ({str(e).splitlines()[0][:200]})") from None

        def images(frames):
            pixels = processor(images=frames, return_tensors="pt")["pixel_values"].to(device)
            return _unit(_tensor(model.get_image_features(pixel_values=pixels)))

        def texts(captions):
            tokens = processor(text=captions, return_tensors="pt", padding=True, truncation=True).to(device)
            return _unit(_tensor(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])))

        return cls(images, texts, name=str(name_or_path))

    @classmethod
    def from_open_clip(cls, arch: str, pretrained: str, device: torch.device | str = "cpu") -> "ClipScorer":
        import open_clip

        try:
            model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"clip model open_clip:{arch}:{pretrained} could not be loaded ({str(e).splitlines()[0][:200]})") from None
        model.eval()

        def images(frames):
            return _unit(model.encode_image(torch.stack([transform(f) for f in frames]).to(device)))

        def texts(captions):
            return _unit(model.encode_text(tokenizer(captions).to(device)))

        return cls(images, texts, name=f"open_clip:{arch}:{pretrained}")

    @torch.no_grad()
    def frame_similarities(self, video, caption: str, batch_size: int = 32) -> np.ndarray:
        """(f,) cosine similarities of each frame of `video` ((f, h, w, 3) frames) with `caption`."""
        from ..video_io import frames_to_uint8

        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("CLIPSIM needs each video's caption; this one has none")
        frames = [Image.fromarray(f) for f in frames_to_uint8(video)]
        text = self._encode_texts([caption]).float()  # 1 d
        sims = [(self._encode_images(frames[i:i + batch_size]).float() @ text.T)[:, 0] for i in range(0, len(frames), batch_size)]
        return torch.cat(sims).cpu().double().numpy()

    def clipsim(self, videos: Sequence, captions: Sequence[str]) -> float:
        """The mean over videos of the frame-averaged similarity."""
        if len(videos) != len(captions) or not videos:
            raise ValueError(f"CLIPSIM needs one caption per video and at least one video ({len(videos)} videos, {len(captions)} captions)")
        return float(np.mean([self.frame_similarities(v, c).mean() for v, c in zip(videos, captions)]))


def _tensor(out) -> torch.Tensor:
    """transformers 5 may return an output object where 4.x returned the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)
