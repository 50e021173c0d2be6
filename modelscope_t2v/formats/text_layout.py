"""The text encoder's two released checkpoint layouts, as key tables onto transformers' `CLIPTextModel`.

- original: `open_clip_pytorch_model.bin`, a whole open_clip CLIP state dict (vision tower included, all
  24 text layers; ModelScope reads the penultimate one), or a text tower as `clip_text_to_open_clip`
  writes it;
- diffusers: `text_encoder/config.json` + `model.safetensors` with keys under "text_model." (transformers
  4.x's CLIPTextModel; transformers 5's has no such level, so reading accepts both).
"""

from __future__ import annotations

import functools
from typing import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.text import TEXT_CONFIG_FIELDS, TEXT_PRESETS, build_text_encoder, text_config
from .tables import ConversionError, Rename, Rule, Split, apply_table, invert, prefixed


@functools.lru_cache(maxsize=None)
def _model_prefix() -> str:
    """Where `CLIPTextModel` keeps the tower in its state dict: '' (transformers 5) or 'text_model.' (4.x)."""
    tiny = dict(vocab_size=4, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                num_attention_heads=1, max_position_embeddings=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**tiny))
    return "text_model." if hasattr(model, "text_model") else ""


# ----------------------------------------------------------------------------------------------------
# The original layout: open_clip's CLIP state dict <-> CLIPTextModel.
# open_clip keys (text tower of `open_clip.model.CLIP`): token_embedding.weight, positional_embedding,
# transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final,
# text_projection, logit_scale, plus the vision tower under visual.*.

_HEAD_WIDTH = 64  # every OpenCLIP text tower uses 64-wide attention heads


def heads_for_width(width: int) -> int:
    """The head count an open_clip file implies (it stores none): width // 64, at least 1.

    Right for every released OpenCLIP text tower (ViT-H/14: 1024 / 64 = 16) and for the presets here;
    a tower narrower than 64 is taken to have a single head (the "tiny" preset)."""
    return max(1, width // _HEAD_WIDTH)


def _resblock_indices(state: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})


def text_config_from_open_clip(
    state: Mapping[str, torch.Tensor], *, heads: int | None = None, drop_last: bool | None = None
) -> CLIPTextConfig:
    """The CLIPTextConfig that an open_clip state dict's text tower fills, read from tensor shapes.

    heads: the attention head count; None uses `heads_for_width` (width // 64, at least 1).
    drop_last: whether the file's last resblock is the unused one (ModelScope reads the penultimate
        layer). None decides from the file: a whole open_clip CLIP model (it has `text_projection`)
        holds all layers and drops its last; a text tower written by `clip_text_to_open_clip` (no
        `text_projection`) holds exactly the layers used.
    """
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in state:
            raise ConversionError(f"open_clip text tower: missing tensor {key!r}")
    vocab_size, width = state["token_embedding.weight"].shape
    blocks = _resblock_indices(state)
    if blocks != list(range(len(blocks))):
        raise ConversionError(f"open_clip text tower: resblock indices {blocks} are not 0..{len(blocks) - 1}")
    if drop_last is None:
        drop_last = any(k.startswith("text_projection") for k in state)
    layers = len(blocks) - int(drop_last)
    if layers < 1:
        raise ConversionError(f"open_clip text tower: {len(blocks)} resblock(s) leave no layer to use")
    if heads is None:
        heads = heads_for_width(width)
    if heads < 1 or width % heads:
        raise ValueError(f"heads: {heads} does not divide the text width {width}")
    return CLIPTextConfig(
        **{
            **TEXT_PRESETS["ms-1.7b"],
            "vocab_size": vocab_size,
            "hidden_size": width,
            "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": state["positional_embedding"].shape[0],
        }
    )


def open_clip_text_table(config: CLIPTextConfig, layers_in_file: int) -> list[Rule]:
    """open_clip key -> CLIPTextModel key, for a file with `layers_in_file` text resblocks.

    layers_in_file is config.num_hidden_layers (a text tower cut at the penultimate layer) or one more
    (a whole open_clip model; its last block is left to `open_clip_ignored`).
    """
    n = config.num_hidden_layers
    if layers_in_file not in (n, n + 1):
        raise ValueError(f"layers_in_file: {layers_in_file} resblocks cannot fill {n} layers (need {n} or {n + 1})")
    table: list[Rule] = [
        Rename("token_embedding.weight", "embeddings.token_embedding.weight"),
        Rename("positional_embedding", "embeddings.position_embedding.weight"),
    ]
    for i in range(n):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        table += [
            Rename(src + "ln_1.weight", dst + "layer_norm1.weight"),
            Rename(src + "ln_1.bias", dst + "layer_norm1.bias"),
            # nn.MultiheadAttention stacks the q, k, v projections in that order.
            Split(src + "attn.in_proj_weight", tuple(dst + f"self_attn.{p}_proj.weight" for p in "qkv")),
            Split(src + "attn.in_proj_bias", tuple(dst + f"self_attn.{p}_proj.bias" for p in "qkv")),
            Rename(src + "attn.out_proj.weight", dst + "self_attn.out_proj.weight"),
            Rename(src + "attn.out_proj.bias", dst + "self_attn.out_proj.bias"),
            Rename(src + "ln_2.weight", dst + "layer_norm2.weight"),
            Rename(src + "ln_2.bias", dst + "layer_norm2.bias"),
            Rename(src + "mlp.c_fc.weight", dst + "mlp.fc1.weight"),
            Rename(src + "mlp.c_fc.bias", dst + "mlp.fc1.bias"),
            Rename(src + "mlp.c_proj.weight", dst + "mlp.fc2.weight"),
            Rename(src + "mlp.c_proj.bias", dst + "mlp.fc2.bias"),
        ]
    table += [
        Rename("ln_final.weight", "final_layer_norm.weight"),
        Rename("ln_final.bias", "final_layer_norm.bias"),
    ]
    return prefixed(table, dst_prefix=_model_prefix())


# Whole-model open_clip keys that the text encoder does not use.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "logit_bias", "attn_mask")


def open_clip_ignored(key: str, config: CLIPTextConfig) -> bool:
    """Whether an open_clip key is legitimately left out of the text encoder: the vision tower, the last
    text resblock (only the pooled output used it), the projection and logit scale/bias, the causal
    mask buffer (CLIPTextModel builds its own). Anything else left over is an error."""
    if key.startswith("visual."):
        return True
    if key.split(".")[0] in _OPEN_CLIP_UNUSED:
        return True
    return key.startswith(f"transformer.resblocks.{config.num_hidden_layers}.")


def _open_clip_text_shapes(config: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the open_clip text tower keys that `clip_text_to_open_clip` writes."""
    w, m = config.hidden_size, config.intermediate_size
    shapes = {
        "token_embedding.weight": (config.vocab_size, w),
        "positional_embedding": (config.max_position_embeddings, w),
        "ln_final.weight": (w,),
        "ln_final.bias": (w,),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (m, w), p + "mlp.c_fc.bias": (m,),
            p + "mlp.c_proj.weight": (w, m), p + "mlp.c_proj.bias": (w,),
        })  # fmt: skip
    return shapes


def open_clip_to_clip_text(
    state: Mapping[str, torch.Tensor], config: CLIPTextConfig, *, what: str = "open_clip -> CLIPTextModel"
) -> dict[str, torch.Tensor]:
    """An open_clip state dict (whole model or text tower) as CLIPTextModel's state dict, strictly;
    `what` names the source in errors (e.g. the file)."""
    table = open_clip_text_table(config, len(_resblock_indices(state)))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_text_encoder(config).state_dict().items()}
    return apply_table(state, table, shapes, what=what, ignore=lambda k: open_clip_ignored(k, config))


def clip_text_to_open_clip(state: Mapping[str, torch.Tensor], config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """CLIPTextModel's state dict as an open_clip text tower (token_embedding, positional_embedding, the
    config.num_hidden_layers resblocks, ln_final), to write the original layout. Tensors are copied."""
    table = invert(open_clip_text_table(config, config.num_hidden_layers))
    ignore = {_model_prefix() + "embeddings.position_ids"}  # a buffer some transformers versions save
    out = apply_table(state, table, _open_clip_text_shapes(config), what="CLIPTextModel -> open_clip", ignore=ignore)
    return {k: v.clone().contiguous() for k, v in out.items()}


def text_encoder_from_open_clip(state: Mapping[str, torch.Tensor], *, heads: int | None = None) -> CLIPTextModel:
    """Convenience: infer the config, build the model, convert and load strictly."""
    config = text_config_from_open_clip(state, heads=heads)
    model = build_text_encoder(config)
    model.load_state_dict(open_clip_to_clip_text(state, config), strict=True)
    return model


# ----------------------------------------------------------------------------------------------------
# The diffusers layout: text_encoder/config.json and model.safetensors.
# The released safetensors holds keys under "text_model." (transformers 4.x's CLIPTextModel), and some
# versions saved the position_ids buffer; transformers 5's CLIPTextModel has no "text_model." level.


def diffusers_text_table(config: CLIPTextConfig) -> list[Rule]:
    """Released text_encoder/model.safetensors key -> this transformers version's CLIPTextModel key."""
    prefix = _model_prefix()
    table = open_clip_text_table(config, config.num_hidden_layers)
    model_keys: list[str] = []
    for r in table:
        model_keys += list(r.dst) if isinstance(r, Split) else [r.dst]
    return [Rename("text_model." + k[len(prefix) :], k) for k in model_keys]


def diffusers_text_ignored(key: str) -> bool:
    """Released keys that are not weights: the position_ids buffer (0..76) older transformers saved."""
    return key == "text_model.embeddings.position_ids"


def text_config_to_diffusers(config: CLIPTextConfig | dict | str) -> dict:
    """The content of text_encoder/config.json, as the released one lists it."""
    config = text_config(config)
    out = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
    out.update({k: getattr(config, k) for k in TEXT_CONFIG_FIELDS})
    out["torch_dtype"] = "float32"
    return out
