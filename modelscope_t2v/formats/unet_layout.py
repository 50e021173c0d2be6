"""The UNet's two released checkpoint layouts: their configs and their key tables.

- diffusers: `unet/config.json` of `UNet3DConditionModel` and its parameter names (damo-vilab/
  text-to-video-ms-1.7b, the zeroscope fine-tunes, what `save_pretrained` writes);
- original: `configuration.json`'s model.model_cfg and the UNetSD state dict `text2video_pytorch_model.pth`
  (damo-vilab/modelscope-damo-text-to-video-synthesis).

Each table maps the foreign key to ours (`models.unet` names) and is applied by `tables.apply_table`;
`tables.invert` gives the way back. The model file knows nothing of these names.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..models.unet import UNetConfig
from .tables import Rename, Rule, with_src_ndim

_DIFFUSERS_DOWN = {True: "CrossAttnDownBlock3D", False: "DownBlock3D"}
_DIFFUSERS_UP = {True: "CrossAttnUpBlock3D", False: "UpBlock3D"}
# Keys of diffusers' UNet3DConditionModel config that we read, and their only supported values.
_DIFFUSERS_FIXED = {
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "num_attention_heads": None,
}
_DIFFUSERS_KEYS = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "attention_head_dim", "time_cond_proj_dim", *_DIFFUSERS_FIXED,
}
# ours-only extra keys, written only when not the default. diffusers ignores unknown config keys, so
# it would run a folder with temporal_position_embedding=true without the embedding (a different model).
_OURS_IN_DIFFUSERS = {"dropout": 0.1, "temporal_position_embedding": False, "spatial_position_embedding": False}


def unet_config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
    """diffusers' unet/config.json (UNet3DConditionModel) -> UNetConfig; unsupported fields or values
    raise a ValueError that names them."""
    known = _DIFFUSERS_KEYS | set(_OURS_IN_DIFFUSERS)
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unet config: unsupported field(s) {unknown}")
    for key, value in _DIFFUSERS_FIXED.items():
        if key in d and d[key] != value:
            raise ValueError(f"unet config: {key}={d[key]!r} is not supported (only {value!r})")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in d and not isinstance(d[key], (list, tuple)):
            raise ValueError(f"unet config: {key} must be a list, got {d[key]!r}")
    channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    down = tuple(d.get("down_block_types", tuple(_DIFFUSERS_DOWN[a] for a in (True, True, True, False))))
    up = tuple(d.get("up_block_types", tuple(_DIFFUSERS_UP[a] for a in (False, True, True, True))))
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(
            f"unet config: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
            f"block_out_channels ({len(channels)}) must have the same length"
        )
    by_name = {v: k for k, v in _DIFFUSERS_DOWN.items()}
    bad = [t for t in down if t not in by_name]
    if bad:
        raise ValueError(f"unet config: down_block_types {bad} unsupported; allowed: {sorted(by_name)}")
    levels = tuple(by_name[t] for t in down)
    expected_up = tuple(_DIFFUSERS_UP[a] for a in reversed(levels))
    if up != expected_up:
        raise ValueError(
            f"unet config: up_block_types {list(up)} must mirror down_block_types: {list(expected_up)}"
        )
    head_dim = d.get("attention_head_dim", 64)
    if isinstance(head_dim, (list, tuple)):
        if len(set(head_dim)) != 1:
            raise ValueError(f"unet config: per-level attention_head_dim {list(head_dim)} is not supported")
        head_dim = head_dim[0]
    groups = d.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError("unet config: norm_num_groups=None (no output norm) is not supported")
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        block_channels=channels,
        layers_per_block=d.get("layers_per_block", 2),
        attention_levels=levels,
        cross_attention_dim=d.get("cross_attention_dim", 1024),
        head_dim=head_dim,
        norm_groups=groups,
        norm_eps=d.get("norm_eps", 1e-5),
        sample_size=d.get("sample_size") or 32,
        dropout=d.get("dropout", 0.1),
        timestep_cond_dim=d.get("time_cond_proj_dim"),
        temporal_position_embedding=bool(d.get("temporal_position_embedding", False)),
        spatial_position_embedding=bool(d.get("spatial_position_embedding", False)),
    )


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    """UNetConfig -> a config dict that diffusers' UNet3DConditionModel builds the same network from."""
    if c.temporal_in_heads != 8:
        raise ValueError(
            f"unet_config_to_diffusers: temporal_in_heads={c.temporal_in_heads}, but diffusers hard-codes 8"
        )
    d = {
        "_class_name": "UNet3DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": [_DIFFUSERS_DOWN[a] for a in c.attention_levels],
        "up_block_types": [_DIFFUSERS_UP[a] for a in reversed(c.attention_levels)],
        "block_out_channels": list(c.block_channels),
        "layers_per_block": c.layers_per_block,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": c.cross_attention_dim,
        "attention_head_dim": c.head_dim,
        "time_cond_proj_dim": c.timestep_cond_dim,
    }
    for key, default in _OURS_IN_DIFFUSERS.items():
        if getattr(c, key) != default:
            d[key] = getattr(c, key)
    return d


# model_cfg keys the original UNetSD has no field for (its values are hard-coded there); written
# only when a config differs from those values, read back by unet_config_from_original.
_OURS_IN_ORIGINAL = {"unet_norm_groups": ("norm_groups", 32), "unet_norm_eps": ("norm_eps", 1e-5),
                     "unet_sample_size": ("sample_size", 32),
                     "unet_temporal_position_embedding": ("temporal_position_embedding", False),
                     "unet_spatial_position_embedding": ("spatial_position_embedding", False)}


def unet_config_to_original(c: UNetConfig) -> dict:
    """UNetConfig -> the UNet part of configuration.json's model.model_cfg (original layout)."""
    ch0 = c.block_channels[0]
    if any(ch % ch0 for ch in c.block_channels):
        raise ValueError(
            f"unet_config_to_original: block_channels {c.block_channels} must be multiples of the first"
        )
    if c.timestep_cond_dim is not None:
        raise ValueError("unet_config_to_original: the original layout has no timestep_cond projection")
    d = {
        "unet_in_dim": c.in_channels,
        "unet_dim": ch0,
        "unet_y_dim": 768,  # unused by the network; the released value
        "unet_context_dim": c.cross_attention_dim,
        "unet_out_dim": c.out_channels,
        "unet_dim_mult": [ch // ch0 for ch in c.block_channels],
        "unet_num_heads": c.temporal_in_heads,
        "unet_head_dim": c.head_dim,
        "unet_res_blocks": c.layers_per_block,
        "unet_attn_scales": [1 / 2**i for i, a in enumerate(c.attention_levels) if a],
        "unet_dropout": c.dropout,
        "temporal_attention": "True",
    }
    for key, (name, default) in _OURS_IN_ORIGINAL.items():
        if getattr(c, name) != default:
            d[key] = getattr(c, name)
    return d


def unet_config_from_original(model_cfg: Mapping[str, Any], state: Mapping[str, Tensor]) -> UNetConfig:
    """configuration.json's model.model_cfg + the UNetSD state dict -> UNetConfig.

    The widths, depth, attention levels, context width and heads of the first temporal transformer
    are read from the tensors (so fine-tunes and small checkpoints load); model_cfg supplies
    head_dim and dropout and is checked against the tensors."""
    if str(model_cfg.get("temporal_attention", "True")) != "True":
        raise ValueError(
            f"original config: temporal_attention={model_cfg['temporal_attention']!r} is not supported "
            "(only 'True')"
        )

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise ValueError(f"original unet state dict: missing tensor {key!r}")
        return state[key].shape

    ch0, in_channels = shape("input_blocks.0.0.weight")[:2]
    out_channels = shape("out.2.weight")[0]
    # input blocks 1.. are resnet blocks ("<n>.0.in_layers...") or downsamplers ("<n>.op...")
    n, levels, layers = 1, [], []
    while f"input_blocks.{n}.0.out_layers.3.weight" in state or f"input_blocks.{n}.op.weight" in state:
        if f"input_blocks.{n}.op.weight" in state:
            levels.append(layers)
            layers = []
        else:
            layers.append(n)
        n += 1
    levels.append(layers)
    if not levels[0] or any(len(lv) != len(levels[0]) for lv in levels):
        raise ValueError(f"original unet state dict: uneven resnets per level {[len(lv) for lv in levels]}")
    block_channels = tuple(shape(f"input_blocks.{lv[0]}.0.out_layers.3.weight")[0] for lv in levels)
    attention_levels = tuple(f"input_blocks.{lv[0]}.1.norm.weight" in state for lv in levels)
    context_dim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    head_dim = int(model_cfg.get("unet_head_dim", 64))
    temporal_in_heads, rest = divmod(shape("input_blocks.0.1.proj_in.weight")[0], head_dim)
    if rest:
        raise ValueError(
            f"original unet state dict: input_blocks.0.1 width is not a multiple of unet_head_dim={head_dim}"
        )

    found = {
        "unet_in_dim": in_channels,
        "unet_dim": ch0,
        "unet_out_dim": out_channels,
        "unet_context_dim": context_dim,
        "unet_dim_mult": [ch // ch0 for ch in block_channels],
        "unet_res_blocks": len(levels[0]),
        "unet_num_heads": temporal_in_heads,
        "unet_attn_scales": [1 / 2**i for i, a in enumerate(attention_levels) if a],
    }
    for key, value in found.items():
        if key not in model_cfg:
            continue
        given = model_cfg[key]
        if isinstance(value, list):
            same = [float(v) for v in given] == [float(v) for v in value]
        else:
            same = given == value
        if not same:
            raise ValueError(f"original config: {key}={given} but the tensors say {value}")

    extras = {name: model_cfg[key] for key, (name, _) in _OURS_IN_ORIGINAL.items() if key in model_cfg}
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        block_channels=block_channels,
        layers_per_block=len(levels[0]),
        attention_levels=attention_levels,
        cross_attention_dim=context_dim,
        head_dim=head_dim,
        temporal_in_heads=temporal_in_heads,
        dropout=float(model_cfg.get("unet_dropout", 0.1)),
        **extras,
    )


# ---------------------------------------------------------------------------------------------
# Key tables (reference key -> our key)
# ---------------------------------------------------------------------------------------------


def _wb(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.weight", f"{dst}.weight"), (f"{src}.bias", f"{dst}.bias")]


def _rules(pairs: list[tuple[str, str]], src_prefix: str, dst_prefix: str) -> list[Rule]:
    return [Rename(src_prefix + s, dst_prefix + d) for s, d in pairs]


def _transformer_pairs() -> list[tuple[str, str]]:
    """SpatialTransformer / TemporalTransformer: the same names in both reference layouts."""
    pairs = _wb("norm", "norm") + _wb("proj_in", "proj_in") + _wb("proj_out", "proj_out")
    tb = "transformer_blocks.0"
    for theirs, ours in (("attn1", "block.self_attn"), ("attn2", "block.cross_attn")):
        pairs += [
            (f"{tb}.{theirs}.to_q.weight", f"{ours}.q_proj.weight"),
            (f"{tb}.{theirs}.to_k.weight", f"{ours}.k_proj.weight"),
            (f"{tb}.{theirs}.to_v.weight", f"{ours}.v_proj.weight"),
        ] + _wb(f"{tb}.{theirs}.to_out.0", f"{ours}.out_proj")
    pairs += _wb(f"{tb}.norm1", "block.self_attn_norm") + _wb(f"{tb}.norm2", "block.cross_attn_norm")
    pairs += _wb(f"{tb}.norm3", "block.ff_norm")
    pairs += _wb(f"{tb}.ff.net.0.proj", "block.ff.proj_in") + _wb(f"{tb}.ff.net.2", "block.ff.proj_out")
    return pairs


def _temporal_conv_pairs() -> list[tuple[str, str]]:
    """conv1 = [GroupNorm, SiLU, Conv3d]; conv2..4 = [GroupNorm, SiLU, Dropout, Conv3d] (both layouts)."""
    pairs = []
    for k in range(4):
        pairs += _wb(f"conv{k + 1}.0", f"norms.{k}") + _wb(f"conv{k + 1}.{2 if k == 0 else 3}", f"convs.{k}")
    return pairs


def _resnet_pairs(original: bool, shortcut: bool) -> list[tuple[str, str]]:
    if original:
        names = [("in_layers.0", "in_norm"), ("in_layers.2", "in_conv"), ("emb_layers.1", "time_proj"),
                 ("out_layers.0", "out_norm"), ("out_layers.3", "out_conv"), ("skip_connection", "shortcut")]
    else:
        names = [("norm1", "in_norm"), ("conv1", "in_conv"), ("time_emb_proj", "time_proj"),
                 ("norm2", "out_norm"), ("conv2", "out_conv"), ("conv_shortcut", "shortcut")]
    return [p for src, dst in names[: 6 if shortcut else 5] for p in _wb(src, dst)]


def _space_time_block(sources: tuple, dst: str, shortcut: bool, attention: bool, *, original: bool) -> list[Rule]:
    """The rules of one SpaceTimeBlock `dst`, given the source prefixes of its resnet, temporal conv,
    spatial and temporal transformer (the last two unused without attention)."""
    resnet, temporal_conv, spatial, temporal = sources
    out = _rules(_resnet_pairs(original, shortcut), resnet, f"{dst}.resnet.")
    out += _rules(_temporal_conv_pairs(), temporal_conv, f"{dst}.temporal_conv.")
    if attention:
        out += _rules(_transformer_pairs(), spatial, f"{dst}.spatial_attention.")
        out += _rules(_transformer_pairs(), temporal, f"{dst}.temporal_attention.")
    return out


def _block_specs(c: UNetConfig):
    """(path of our block, in_channels, out_channels, attention) for every SpaceTimeBlock, in order."""
    levels, ch0 = len(c.block_channels), c.block_channels[0]
    skip, ch, down, up = [ch0], ch0, [], []
    for i, (out, attn) in enumerate(zip(c.block_channels, c.attention_levels)):
        for j in range(c.layers_per_block):
            down.append((i, j, ch, out, attn))
            ch = out
            skip.append(ch)
        if i < levels - 1:
            skip.append(ch)
    for i in range(levels):
        out, attn = c.block_channels[levels - 1 - i], c.attention_levels[levels - 1 - i]
        for j in range(c.layers_per_block + 1):
            up.append((i, j, ch + skip.pop(), out, attn))
            ch = out
    return down, up


def unet_diffusers_table(c: UNetConfig) -> list[Rule]:
    """diffusers UNet3DConditionModel keys -> UNet3D keys."""
    levels = len(c.block_channels)
    time = _wb("time_embedding.linear_1", "time_mlp.fc1") + _wb("time_embedding.linear_2", "time_mlp.fc2")
    rules = _rules(time, "", "")
    if c.timestep_cond_dim is not None:
        rules.append(Rename("time_embedding.cond_proj.weight", "time_mlp.cond_proj.weight"))
    rules += _rules(_wb("conv_in", "conv_in"), "", "")
    rules += _rules(_transformer_pairs(), "transformer_in.", "temporal_attention_in.")

    def block(src: str, j: int, dst: str, cin: int, cout: int, attn: bool) -> list[Rule]:
        sources = (f"{src}.resnets.{j}.", f"{src}.temp_convs.{j}.", f"{src}.attentions.{j}.", f"{src}.temp_attentions.{j}.")
        return _space_time_block(sources, dst, cin != cout, attn, original=False)

    down, up = _block_specs(c)
    for i, j, cin, cout, attn in down:
        rules += block(f"down_blocks.{i}", j, f"down_levels.{i}.blocks.{j}", cin, cout, attn)
    for i in range(levels - 1):
        rules += _rules(_wb("downsamplers.0.conv", "downsample.conv"), f"down_blocks.{i}.", f"down_levels.{i}.")

    # mid: resnets.0/temp_convs.0/attentions.0/temp_attentions.0 form our first mid block
    ch = c.block_channels[-1]
    rules += block("mid_block", 0, "mid_blocks.0", ch, ch, True)
    rules += block("mid_block", 1, "mid_blocks.1", ch, ch, False)

    for i, j, cin, cout, attn in up:
        rules += block(f"up_blocks.{i}", j, f"up_levels.{i}.blocks.{j}", cin, cout, attn)
    for i in range(levels - 1):
        rules += _rules(_wb("upsamplers.0.conv", "upsample.conv"), f"up_blocks.{i}.", f"up_levels.{i}.")
    rules += _rules(_wb("conv_norm_out", "norm_out") + _wb("conv_out", "conv_out"), "", "")
    return rules


def unet_original_table(c: UNetConfig) -> list[Rule]:
    """Original ModelScope UNetSD keys -> UNet3D keys.

    input_blocks.0 = [conv_in, temporal transformer]; then per level, per layer, one
    input_blocks.<n> = [resnet (its temporal conv stored as `temopral_conv`), spatial, temporal]
    and one input_blocks.<n>.op downsampler; middle_block = [resnet, spatial, temporal, resnet];
    output_blocks.<n> = [resnet, spatial, temporal, upsampler] (the upsampler at the next free index).
    Temporal transformers hold Conv1d(k=1) proj_in/proj_out (reshaped to Linear by apply_table)."""
    if c.timestep_cond_dim is not None:
        raise ValueError("unet_original_table: the original layout has no timestep_cond projection")
    levels = len(c.block_channels)
    rules = _rules(_wb("time_embed.0", "time_mlp.fc1") + _wb("time_embed.2", "time_mlp.fc2"), "", "")
    rules += _rules(_wb("input_blocks.0.0", "conv_in"), "", "")
    rules += _rules(_transformer_pairs(), "input_blocks.0.1.", "temporal_attention_in.")

    def block(src: str, dst: str, cin: int, cout: int, attn: bool) -> list[Rule]:
        sources = (f"{src}.0.", f"{src}.0.temopral_conv.", f"{src}.1.", f"{src}.2.")
        return _space_time_block(sources, dst, cin != cout, attn, original=True)

    down, up = _block_specs(c)
    n = 1
    for i, j, cin, cout, attn in down:
        rules += block(f"input_blocks.{n}", f"down_levels.{i}.blocks.{j}", cin, cout, attn)
        n += 1
        if j == c.layers_per_block - 1 and i < levels - 1:
            rules += _rules(_wb(f"input_blocks.{n}.op", f"down_levels.{i}.downsample.conv"), "", "")
            n += 1

    mid = ("middle_block.0.", "middle_block.0.temopral_conv.", "middle_block.1.", "middle_block.2.")
    rules += _space_time_block(mid, "mid_blocks.0", False, True, original=True)
    rules += _space_time_block(("middle_block.3.", "middle_block.3.temopral_conv.", None, None), "mid_blocks.1",
                               False, False, original=True)

    for n, (i, j, cin, cout, attn) in enumerate(up):
        rules += block(f"output_blocks.{n}", f"up_levels.{i}.blocks.{j}", cin, cout, attn)
        if j == c.layers_per_block and i < levels - 1:
            idx = 3 if attn else 1
            rules += _rules(_wb(f"output_blocks.{n}.{idx}.conv", f"up_levels.{i}.upsample.conv"), "", "")
    rules += _rules(_wb("out.0", "norm_out") + _wb("out.2", "conv_out"), "", "")
    # The temporal transformers' proj_in/proj_out are Conv1d(k=1) weights, (o, i, 1), in this layout.
    temporal = {r.src for r in rules if isinstance(r, Rename)
                and r.dst.endswith(("proj_in.weight", "proj_out.weight"))
                and r.dst.rsplit(".", 2)[0].endswith(("temporal_attention", "temporal_attention_in"))}
    return with_src_ndim(rules, 3, temporal.__contains__)


