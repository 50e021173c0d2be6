"""Tiny stand-ins for the metric networks, built in the tests (no weights are downloaded): a CLIP model in
transformers' folder layout with its processor, an open_clip CLIP registered under a tiny config, and an
I3D-shaped TorchScript detector with the reference file's forward(x, rescale, resize, return_features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def tiny_transformers_clip(folder: Path, seed: int = 0) -> Path:
    """A random transformers CLIPModel (32-pixel images, patch 8) with a CLIPProcessor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from modelscope_t2v.models import build_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer(None)).save_pretrained(folder)
    return folder


TINY_OPEN_CLIP = "tiny-clip-test"


def tiny_open_clip(folder: Path, seed: int = 0) -> Path:
    """A random open_clip CLIP registered as open_clip's model config TINY_OPEN_CLIP; returns its weights file."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP)
    torch.save(model.state_dict(), folder / "tiny_open_clip.bin")
    return folder / "tiny_open_clip.bin"


class TinyI3D(nn.Module):
    """Input b c f h w: [-1, 1] floats, or uint8 with rescale=True; resize=True resizes to 224 x 224 (as the
    reference detector does, trilinear); returns 400 logits (return_features) or their softmax."""

    def __init__(self, features: int = 400):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=(3, 7, 7), stride=(2, 4, 4), padding=(1, 3, 3))
        self.head = nn.Linear(8 * 4 * 2, features)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x.float() / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        h = torch.relu(self.conv(x))
        h = F.adaptive_avg_pool3d(h, (1, 2, 2)).flatten(1)
        logits = self.head(torch.cat([h, h ** 2], dim=1))  # b 64 -> b features
        return logits if return_features else torch.softmax(logits, dim=-1)


def tiny_i3d_file(path: Path, seed: int = 0, features: int = 400) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(TinyI3D(features).eval()).save(str(path))
    return path


def random_videos(n: int, seed: int, frames: int = 16, size: tuple[int, int] = (48, 64), brightness: float = 1.0) -> list[np.ndarray]:
    """n smooth random uint8 videos (f, h, w, 3) (smooth: they survive mp4 compression)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.random((frames // 4 + 1, 3, size[0] // 8, size[1] // 8)).astype(np.float32)
        x = F.interpolate(torch.from_numpy(low)[None].permute(0, 2, 1, 3, 4), size=(frames, *size), mode="trilinear")[0]
        out.append((x.permute(1, 2, 3, 0).clamp(0, 1).numpy() * 255 * brightness).astype(np.uint8))
    return out
