"""The autoencoder's two released checkpoint layouts: their configs and their key tables.

- diffusers: `vae/config.json` of `AutoencoderKL` and its parameter names;
- original: the LDM autoencoder inside `VQGAN_autoencoder.pth` (keys under 'first_stage_model.' in a whole
  Lightning checkpoint; its config is not stored, so it is read from the tensors).

Tables map the foreign key to ours (`models.vae` names); `tables.invert` gives the way back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from ..models.vae import VAEConfig
from .tables import Rename, Rule, with_src_ndim


_DIFFUSERS_DEFAULTS = {  # diffusers.AutoencoderKL.__init__ defaults, for keys a config file leaves out
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def vae_config_from_diffusers(d: Mapping) -> VAEConfig:
    """A diffusers `AutoencoderKL` config (vae/config.json) -> VAEConfig. Keys starting with '_' and
    `force_upcast` (a runtime dtype policy) are ignored; anything this architecture cannot express is a
    ValueError naming the field."""
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"diffusers VAE config: unknown field(s) {unknown}")
    g = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if not isinstance(g[key], (list, tuple)):
            raise ValueError(f"diffusers VAE config: {key} must be a list, got {g[key]!r}")
    n = len(g["block_out_channels"])
    fixed = {
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
        "use_quant_conv": True, "use_post_quant_conv": True,
    }
    for key, want in fixed.items():
        got = list(g[key]) if isinstance(g[key], (list, tuple)) else g[key]
        if got != want:
            raise ValueError(f"diffusers VAE config: {key}={g[key]!r} is not supported (expected {want!r})")
    size = g["sample_size"]
    if isinstance(size, (list, tuple)):  # diffusers tiles with the first entry
        size = size[0]
    return VAEConfig(
        in_channels=g["in_channels"], out_channels=g["out_channels"],
        block_channels=tuple(g["block_out_channels"]), layers_per_block=g["layers_per_block"],
        latent_channels=g["latent_channels"], norm_groups=g["norm_num_groups"],
        scaling_factor=float(g["scaling_factor"]), sample_size=int(size),
        mid_attention=bool(g["mid_block_add_attention"]),
    )


def vae_config_to_diffusers(c: VAEConfig) -> dict:
    """VAEConfig -> the keyword arguments of diffusers' `AutoencoderKL` (its config.json fields)."""
    n = len(c.block_channels)
    return {
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(c.block_channels), "layers_per_block": c.layers_per_block,
        "act_fn": "silu", "latent_channels": c.latent_channels, "norm_num_groups": c.norm_groups,
        "sample_size": c.sample_size, "scaling_factor": c.scaling_factor, "force_upcast": True,
        "mid_block_add_attention": c.mid_attention,
    }


def vae_config_from_original(state: Mapping[str, Tensor]) -> VAEConfig:
    """Infer the config of an LDM autoencoder state dict (keys without 'first_stage_model.') from its
    tensors: widths from conv shapes, depth from key indices. The original code hard-codes 32 norm
    groups, and the checkpoint does not hold the scaling factor or a tile size: those get the defaults."""
    def need(key: str) -> Tensor:
        if key not in state:
            raise ValueError(f"original VAE state dict: missing {key!r}")
        return state[key]

    def count(prefix: str) -> int:
        n = 0
        while f"{prefix}.{n}.conv1.weight" in state:
            n += 1
        return n

    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in state:
        levels += 1
    if levels == 0:
        raise ValueError("original VAE state dict: no 'encoder.down.0.block.0.*' tensors")
    if any(".attn." in k for k in state if k.startswith(("encoder.down.", "decoder.up."))):
        raise ValueError("original VAE state dict: attention outside the middle block (attn_resolutions) "
                         "is not supported")
    z = need("encoder.conv_out.weight").shape[0] // 2
    embed = need("quant_conv.weight").shape[0] // 2
    if embed != z:
        raise ValueError(f"original VAE state dict: embed_dim {embed} != z_channels {z} is not supported")
    return VAEConfig(
        in_channels=need("encoder.conv_in.weight").shape[1],
        out_channels=need("decoder.conv_out.weight").shape[0],
        block_channels=tuple(need(f"encoder.down.{i}.block.0.conv2.weight").shape[0] for i in range(levels)),
        layers_per_block=count("encoder.down.0.block"),
        latent_channels=z,
        norm_groups=32,
        mid_attention="encoder.mid.attn_1.q.weight" in state,
    )


def vae_config_to_original(c: VAEConfig) -> dict:
    """VAEConfig -> {'ddconfig': LDM Encoder/Decoder kwargs, 'embed_dim': int}, what the original
    `AutoencoderKL(ddconfig, embed_dim)` takes. `resolution` only decides where attn_resolutions
    apply (none here); it is set to the tile size."""
    ch = c.block_channels[0]
    if any(b % ch for b in c.block_channels):
        raise ValueError(f"block_channels {c.block_channels} must be multiples of the first for LDM's ch_mult")
    if c.norm_groups != 32:
        raise ValueError(f"norm_groups={c.norm_groups}: the original code hard-codes 32")
    if not c.mid_attention:
        raise ValueError("mid_attention=False: the original code always builds the mid-block attention")
    ddconfig = {
        "double_z": True, "z_channels": c.latent_channels, "resolution": c.sample_size,
        "in_channels": c.in_channels, "out_ch": c.out_channels, "ch": ch,
        "ch_mult": [b // ch for b in c.block_channels], "num_res_blocks": c.layers_per_block,
        "attn_resolutions": [], "dropout": 0.0,
    }
    return {"ddconfig": ddconfig, "embed_dim": c.latent_channels}


# ---------------------------------------------------------------------------------------------------
# Key tables: foreign key -> ours. Written per block; `invert` gives ours -> foreign.


def _wb(src: str, dst: str) -> list[Rule]:
    """A conv/linear/norm: weight and bias."""
    return [Rename(f"{src}.weight", f"{dst}.weight"), Rename(f"{src}.bias", f"{dst}.bias")]


def _resnet(src: str, dst: str, shortcut: str | None) -> list[Rule]:
    rules = [r for part in ("norm1", "conv1", "norm2", "conv2") for r in _wb(f"{src}.{part}", f"{dst}.{part}")]
    return rules + (_wb(f"{src}.{shortcut}", f"{dst}.shortcut") if shortcut else [])


def _attention(src: str, dst: str, norm: str, q: str, k: str, v: str, out: str) -> list[Rule]:
    parts = ((norm, "norm"), (q, "to_q"), (k, "to_k"), (v, "to_v"), (out, "to_out"))
    return [r for theirs, ours in parts for r in _wb(f"{src}.{theirs}", f"{dst}.{ours}")]


def _widths(c: VAEConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(in, out) width of each encoder level and each decoder level (decoder: lowest resolution first)."""
    enc, dec = c.block_channels, c.block_channels[::-1]
    return ([(enc[max(i - 1, 0)], enc[i]) for i in range(len(enc))],
            [(dec[max(i - 1, 0)], dec[i]) for i in range(len(dec))])


@dataclass(frozen=True)
class _Names:
    """How a layout names the autoencoder's parts ({i}: the layout's level index, {j}: the resnet)."""

    down_resnet: str
    downsample: str
    up_resnet: str
    upsample: str
    mid: tuple[str, str, str]  # resnet, attention, resnet
    attention: tuple[str, str, str, str, str]  # norm, q, k, v, out
    shortcut: str
    norm_out: str
    decoder_reversed: bool  # whether the decoder's levels are stored highest resolution first


_DIFFUSERS_NAMES = _Names(
    "encoder.down_blocks.{i}.resnets.{j}", "encoder.down_blocks.{i}.downsamplers.0.conv",
    "decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.upsamplers.0.conv",
    ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"),
    ("group_norm", "to_q", "to_k", "to_v", "to_out.0"), "conv_shortcut", "conv_norm_out", decoder_reversed=False)
# LDM stores the decoder's `up` list highest resolution first, the reverse of the order it runs (and of ours)
_ORIGINAL_NAMES = _Names(
    "encoder.down.{i}.block.{j}", "encoder.down.{i}.downsample.conv",
    "decoder.up.{i}.block.{j}", "decoder.up.{i}.upsample.conv",
    ("mid.block_1", "mid.attn_1", "mid.block_2"), ("norm", "q", "k", "v", "proj_out"), "nin_shortcut", "norm_out",
    decoder_reversed=True)


def _table(c: VAEConfig, names: _Names) -> list[Rule]:
    """The layout's keys -> ours, component by component in our module order."""
    enc, dec = _widths(c)
    n, t = len(enc), []
    t += _wb("encoder.conv_in", "encoder.conv_in")
    for i, (cin, cout) in enumerate(enc):
        for j in range(c.layers_per_block):
            t += _resnet(names.down_resnet.format(i=i, j=j), f"encoder.levels.{i}.resnets.{j}",
                         names.shortcut if j == 0 and cin != cout else None)
        if i < n - 1:
            t += _wb(names.downsample.format(i=i), f"encoder.levels.{i}.resample.conv")
    for part in ("encoder", "decoder"):
        res1, attn, res2 = (f"{part}.{name}" for name in names.mid)
        t += _resnet(res1, f"{part}.mid.res1", None)
        if c.mid_attention:
            t += _attention(attn, f"{part}.mid.attention", *names.attention)
        t += _resnet(res2, f"{part}.mid.res2", None)
    t += _wb(f"encoder.{names.norm_out}", "encoder.norm_out")
    t += _wb("encoder.conv_out", "encoder.conv_out")
    t += _wb("quant_conv", "moments_proj")
    t += _wb("post_quant_conv", "latent_proj")
    t += _wb("decoder.conv_in", "decoder.conv_in")
    for i, (cin, cout) in enumerate(dec):
        theirs = n - 1 - i if names.decoder_reversed else i  # the layout's index of our decoder level i
        for j in range(c.layers_per_block + 1):
            t += _resnet(names.up_resnet.format(i=theirs, j=j), f"decoder.levels.{i}.resnets.{j}",
                         names.shortcut if j == 0 and cin != cout else None)
        if i < n - 1:
            t += _wb(names.upsample.format(i=theirs), f"decoder.levels.{i}.resample.conv")
    t += _wb(f"decoder.{names.norm_out}", "decoder.norm_out")
    t += _wb("decoder.conv_out", "decoder.conv_out")
    return t


def vae_diffusers_table(c: VAEConfig) -> list[Rule]:
    """diffusers `AutoencoderKL` keys -> ours."""
    return _table(c, _DIFFUSERS_NAMES)


def vae_original_table(c: VAEConfig) -> list[Rule]:
    """LDM autoencoder keys (without 'first_stage_model.') -> ours; LDM's mid-block attention projections
    are 1x1 Conv2d weights, (o, i, 1, 1)."""
    return with_src_ndim(_table(c, _ORIGINAL_NAMES), 4, lambda k: ".mid.attn_1." in k and k.endswith(
        ("q.weight", "k.weight", "v.weight", "proj_out.weight")))


