"""LoRA files: the layouts people share for this UNet, read into one form by explicit key tables.

Why: a LoRA is a list of low-rank updates keyed by module paths, and every tool names those paths its own
way. A key that maps to no module, a missing half of a pair or a shape the module cannot take is an error
naming the key, never a silently skipped update (a LoRA that half-applies runs and is wrong).

The form everything is read into, `LoraWeights`: our module path -> `LoraEntry(down, up, alpha)`, in peft's
shapes for our module (Linear: down (r, in), up (out, r); Conv: down (r, in, *kernel), a conv with the
module's kernel, stride and padding; up (out, r, 1, ...)); the update is (alpha / r) * up @ down.

Layouts read (`LAYOUTS`):
- "diffusers": what diffusers' `save_lora_weights` and ours write: `pytorch_lora_weights.safetensors`, keys
  `unet.<diffusers module>.lora_A.weight` / `.lora_B.weight` (peft's names), alphas in the safetensors
  metadata `lora_adapter_metadata` (LoraConfig fields prefixed `unet.`; without it alpha = r). Also the older
  spellings diffusers still reads: `.lora.down/.lora.up` and `.processor.to_q_lora.down` (attention
  processors, 2023).
- "stable_lora": Text-To-Video-Finetuning's default files (`*_lora_text_to_video_unet.safetensors`, Microsoft
  loralib layers): diffusers module paths, bare `.lora_A` / `.lora_B`, alpha = r. Linear: A (r, in), B (out, r).
  Convs store A (r k, in k), B (out k, r k) and use (B @ A).view(weight) (Conv2d), and for the (3,1,1) temporal
  Conv3d the mean over one axis of (B @ A).view(out, in, 3, 3, 1). No low-rank conv reproduces those, so they
  are read as exact full-rank entries: down = the update itself, up = the identity (rank = out channels).
- "stable_lora_webui": the same LoRA as that project writes it for the A1111 text2video extension
  (`webui_*.safetensors`, metadata key `stable_lora_text_to_video`): original ModelScope module names
  (`input_blocks.1.0.in_layers.2.lora_A`), a trailing unit dim on every `proj_in`/`proj_out` tensor, and
  conv_in, conv_out and time_embedding left with their diffusers names (the extension never applies those;
  we do, as the LoRA was trained with them).
- "cloneofsimo": a pickled list `[up_0, down_0, up_1, down_1, ...]`, no names: one pair per nn.Linear, Conv2d
  and Conv3d of diffusers' UNet3DConditionModel in the order of its `named_modules()` (`diffusers_module_order`)
  (Text-To-Video-Finetuning's `lora_version: cloneofsimo`, and the T2V-Turbo-MS release `unet_lora.pt`).
  Convs: down a conv with the module's kernel, up 1x1; alpha = r.
kohya's `lora_unet_*` names were never defined for this UNet (neither community tool writes them); such a
file gets an error that says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..models.unet import FrameConv, UNet3D, UNetConfig
from .files import LayoutError, atomic_path, check_weights, read_json
from .safe_pickle import CheckpointReadError, safe_torch_load
from .tables import Rename, _to_rank
from .unet_layout import unet_diffusers_table, unet_original_table

LAYOUTS = ("diffusers", "stable_lora", "stable_lora_webui", "cloneofsimo")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file in a folder
# A distilled student's folder (trainer.target=lcd; pipelines.t2v_turbo reads it): this file with a
# "distillation" entry (its base model, guidance embedding, scheduler, defaults), beside its LoRA
STUDENT_FILE = "lora_run.json"


def read_student(folder) -> dict | None:
    """The lora_run.json of a distilled student's folder (a dict with "base_model" and "distillation"), or
    None if `folder` is not one; LayoutError naming the file when it is one but incomplete."""
    path = Path(folder) / STUDENT_FILE
    if not path.is_file():
        return None
    run = read_json(path)
    if "distillation" not in run:
        return None  # a plain LoRA run's folder
    d = run["distillation"]
    missing = [k for k in ("guidance_embedding_dim", "cond_proj_init", "scheduler") if k not in d]
    if "base_model" not in run or missing:
        lacks = (["base_model"] if "base_model" not in run else []) + missing
        raise LayoutError(f"{path}: a distilled student's record lacks {lacks}")
    if not (Path(folder) / LORA_WEIGHT_NAME).is_file():
        raise LayoutError(f"{folder}: a distilled student's folder without its LoRA {LORA_WEIGHT_NAME}")
    return run


METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key (LoraConfig fields, JSON)
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d, FrameConv)  # exact types: not peft's wrappers


class LoraFormatError(ValueError):
    """A LoRA file that is not in a layout we know, or does not fit the model it is loaded into."""


@dataclass
class LoraEntry:
    down: Tensor  # lora_A: (r, in) or (r, in, *kernel)
    up: Tensor  # lora_B: (out, r) or (out, r, 1, ...)
    alpha: float  # the update is alpha / r * up @ down

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraWeights = dict[str, LoraEntry]


# ---------------------------------------------------------------------------------------------
# Module paths: ours <-> diffusers' and the original's, from the checkpoint key tables
# ---------------------------------------------------------------------------------------------


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a LoRA can adapt (exactly nn.Linear, Conv2d, Conv3d, the UNet's FrameConv), by path, in
    registration order."""
    return {name: m for name, m in model.named_modules() if type(m) in ADAPTABLE}


def meta_unet(config: UNetConfig) -> UNet3D:
    with torch.device("meta"):
        return UNet3D(config)


def module_table(config: UNetConfig, layout: str) -> dict[str, str]:
    """Foreign module path -> our module path for every adaptable module, from the UNet's weight tables
    ("diffusers" or "original")."""
    rules = unet_diffusers_table(config) if layout == "diffusers" else unet_original_table(config)
    ours = adaptable_modules(meta_unet(config))
    out = {}
    for r in rules:
        if isinstance(r, Rename) and r.dst.endswith(".weight") and r.dst[: -len(".weight")] in ours:
            out[r.src[: -len(".weight")]] = r.dst[: -len(".weight")]
    missing = sorted(set(ours) - set(out.values()))
    if missing:  # the weight tables cover every module; this guards the derivation above
        raise AssertionError(f"module_table({layout}): no foreign name for {missing[:3]}")
    return out


def diffusers_module_order(config: UNetConfig) -> list[str]:
    """diffusers' UNet3DConditionModel's nn.Linear / Conv2d / Conv3d paths in its `named_modules()` order
    (the order a cloneofsimo list follows). Each module registers its children in __init__ order, and the
    model registers down_blocks, then up_blocks, then mid_block (the ModuleLists are created first)."""

    def attention(p: str) -> list[str]:
        return [f"{p}.to_q", f"{p}.to_k", f"{p}.to_v", f"{p}.to_out.0"]

    def transformer(p: str) -> list[str]:
        tb = f"{p}.transformer_blocks.0"
        block = attention(f"{tb}.attn1") + attention(f"{tb}.attn2") + [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
        return [f"{p}.proj_in", *block, f"{p}.proj_out"]

    def resnet(p: str, shortcut: bool) -> list[str]:
        return [f"{p}.conv1", f"{p}.time_emb_proj", f"{p}.conv2"] + ([f"{p}.conv_shortcut"] if shortcut else [])

    def temp_conv(p: str) -> list[str]:
        return [f"{p}.conv1.2", f"{p}.conv2.3", f"{p}.conv3.3", f"{p}.conv4.3"]

    def block(p: str, specs: list[tuple[int, int, bool]], sampler: str | None) -> list[str]:
        names = [n for j, (cin, cout, _) in enumerate(specs) for n in resnet(f"{p}.resnets.{j}", cin != cout)]
        names += [n for j in range(len(specs)) for n in temp_conv(f"{p}.temp_convs.{j}")]
        if specs[0][2]:
            names += [n for j in range(len(specs)) for n in transformer(f"{p}.attentions.{j}")]
            names += [n for j in range(len(specs)) for n in transformer(f"{p}.temp_attentions.{j}")]
        return names + ([f"{p}.{sampler}.0.conv"] if sampler else [])

    c, levels = config, len(config.block_channels)
    ch = c.block_channels[0]
    time = ["time_embedding.linear_1"] + (["time_embedding.cond_proj"] if c.timestep_cond_dim else [])
    names = ["conv_in", *time, "time_embedding.linear_2", *transformer("transformer_in")]
    skips, down = [ch], []
    for i, (out, attn) in enumerate(zip(c.block_channels, c.attention_levels)):
        specs = []
        for _ in range(c.layers_per_block):
            specs.append((ch, out, attn))
            ch = out
            skips.append(ch)
        if i < levels - 1:
            skips.append(ch)
        down += block(f"down_blocks.{i}", specs, "downsamplers" if i < levels - 1 else None)
    up = []
    for i in range(levels):
        out, attn = c.block_channels[levels - 1 - i], c.attention_levels[levels - 1 - i]
        specs = []
        for _ in range(c.layers_per_block + 1):
            specs.append((ch + skips.pop(), out, attn))
            ch = out
        up += block(f"up_blocks.{i}", specs, "upsamplers" if i < levels - 1 else None)
    mid = [n for j in range(2) for n in resnet(f"mid_block.resnets.{j}", False)]
    mid += [n for j in range(2) for n in temp_conv(f"mid_block.temp_convs.{j}")]
    mid += transformer("mid_block.attentions.0") + transformer("mid_block.temp_attentions.0")
    return names + down + up + mid + ["conv_out"]


# ---------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------


def read_lora_file(path: Path) -> tuple[Any, dict[str, str]]:
    """(tensors, metadata) of a LoRA file: a dict from safetensors, whatever a pickle holds (read without
    running its code) from .pt / .bin / .pth, with empty metadata."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{path}: unreadable or truncated safetensors file ({e})") from e
    return safe_torch_load(path), {}


def detect_lora_layout(obj: Any, metadata: Mapping[str, str], path: Path) -> str:
    """Which of `LAYOUTS` a file's contents are in; LoraFormatError naming the file otherwise."""
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(t, Tensor) for t in obj):
            return "cloneofsimo"
        raise LoraFormatError(f"{path}: a list that is not a list of tensors (a cloneofsimo LoRA holds only tensors)")
    if not isinstance(obj, Mapping) or not obj:
        raise LoraFormatError(f"{path}: not a LoRA file (found {type(obj).__name__}"
                              f"{' with no tensors' if isinstance(obj, Mapping) else ''})")
    keys = list(obj)
    bad = [k for k in keys if not isinstance(k, str) or not isinstance(obj[k], Tensor)]
    if bad:
        raise LoraFormatError(f"{path}: entry {bad[0]!r} is not a named tensor")
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        raise LoraFormatError(
            f"{path}: kohya-style keys ({next(k for k in keys if k.startswith('lora_'))!r}); no kohya names are "
            "defined for this UNet (neither Text-To-Video-Finetuning nor the A1111 text2video extension writes "
            "them); convert it to diffusers' layout (unet.<module>.lora_A.weight) first")
    if any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    if "stable_lora_text_to_video" in metadata or any(k.startswith(("input_blocks.", "middle_block.",
                                                                      "output_blocks.")) for k in keys):
        return "stable_lora_webui"
    if all(k.endswith((".lora_A", ".lora_B")) for k in keys):
        return "stable_lora"
    raise LoraFormatError(
        f"{path}: not a LoRA layout we know ({', '.join(LAYOUTS)}); first keys {sorted(keys)[:3]}")


def _pairs(state: Mapping[str, Tensor], suffixes: tuple[str, str], path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (down, up) from keys `<module><down suffix>` / `<module><up suffix>`; errors name a key
    with no partner or an unknown suffix."""
    down_s, up_s = suffixes
    out: dict[str, list] = {}
    for key, t in state.items():
        if key.endswith(down_s):
            out.setdefault(key[: -len(down_s)], [None, None])[0] = t
        elif key.endswith(up_s):
            out.setdefault(key[: -len(up_s)], [None, None])[1] = t
        else:
            raise LoraFormatError(f"{path}: key {key!r} is neither {down_s!r} nor {up_s!r} of a module")
    for module, (down, up) in out.items():
        if down is None or up is None:
            raise LoraFormatError(f"{path}: {module + (down_s if down is None else up_s)!r} is missing "
                                  f"(its partner {module + (up_s if down is None else down_s)!r} is there)")
    return {m: (d, u) for m, (d, u) in out.items()}


_DIFFUSERS_SPELLINGS = (  # older diffusers LoRA key spellings -> peft's (diffusers' loader reads them too)
    (re.compile(r"\.processor\.(to_[qkv])_lora\.down\.weight$"), r".\1.lora_A.weight"),
    (re.compile(r"\.processor\.(to_[qkv])_lora\.up\.weight$"), r".\1.lora_B.weight"),
    (re.compile(r"\.processor\.to_out_lora\.down\.weight$"), r".to_out.0.lora_A.weight"),
    (re.compile(r"\.processor\.to_out_lora\.up\.weight$"), r".to_out.0.lora_B.weight"),
    (re.compile(r"\.lora\.down\.weight$"), r".lora_A.weight"),
    (re.compile(r"\.lora\.up\.weight$"), r".lora_B.weight"),
)


def _diffusers_alphas(metadata: Mapping[str, str], path: Path) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha or None, alpha_pattern) of the UNet from diffusers' metadata; (None, {}) without it."""
    if METADATA_KEY not in metadata:
        return None, {}
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{path}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise LoraFormatError(f"{path}: metadata {METADATA_KEY!r} is not a JSON object")
    alpha, pattern = meta.get("unet.lora_alpha"), meta.get("unet.alpha_pattern") or {}
    rank, rank_pattern = meta.get("unet.r"), meta.get("unet.rank_pattern") or {}
    for name, value in (("unet.use_dora", meta.get("unet.use_dora")), ("unet.use_rslora", meta.get("unet.use_rslora"))):
        if value:
            raise LoraFormatError(f"{path}: {name}=true (DoRA / rsLoRA) is not supported")
    if alpha is None:
        return None, {}
    # diffusers' LoraConfig: alpha_pattern overrides per module; a module in rank_pattern without an
    # alpha of its own keeps lora_alpha (so its scale is lora_alpha / its rank)
    del rank, rank_pattern
    return float(alpha), {str(k): float(v) for k, v in pattern.items()}


def _pattern_value(pattern: Mapping[str, float], module: str) -> float | None:
    for key, value in pattern.items():  # peft's rule: the key matches the end of the module path
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _from_diffusers(state: Mapping[str, Tensor], metadata: Mapping[str, str], path: Path, config: UNetConfig):
    text = sorted(k for k in state if k.startswith("text_encoder."))
    if text:
        raise LoraFormatError(
            f"{path}: holds text-encoder LoRA entries ({len(text)} tensors, e.g. {text[0]!r}); only UNet LoRAs "
            "are supported so far")
    unet = {}
    for key, t in state.items():
        k = key[len("unet."):]
        for pattern, repl in _DIFFUSERS_SPELLINGS:
            k = pattern.sub(repl, k)
        if k.endswith(".lora_B.bias"):
            raise LoraFormatError(f"{path}: {key!r} is a LoRA bias (peft lora_bias=True), which is not supported")
        unet[k] = t
    alpha, alpha_pattern = _diffusers_alphas(metadata, path)
    pairs = _pairs(unet, (".lora_A.weight", ".lora_B.weight"), path)
    table = module_table(config, "diffusers")
    out: dict[str, tuple[Tensor, Tensor, float | None]] = {}
    for module, (down, up) in pairs.items():
        ours = _our_module(table, module, "unet." + module + ".lora_A.weight", path)
        a = _pattern_value(alpha_pattern, module)
        out[ours] = (down, up, a if a is not None else alpha)
    return out


def _our_module(table: Mapping[str, str], module: str, key: str, path: Path) -> str:
    if module not in table:
        raise LoraFormatError(f"{path}: key {key!r} names no adaptable module of this UNet ({module!r}); "
                              "a LoRA for another architecture or another size?")
    return table[module]


def _loralib_conv(down: Tensor, up: Tensor, weight_shape: torch.Size, key: str, path: Path) -> tuple[Tensor, Tensor]:
    """A loralib conv pair (A (r k, in k), B (out k, r k)) as an exact full-rank entry: down = the update
    in the kernel's shape, up = the identity (out, out, 1, ...)."""
    out_ch, in_ch, *kernel = weight_shape
    k = kernel[0]
    if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_ch * k or up.shape[0] != out_ch * k \
            or up.shape[1] != down.shape[0] or down.shape[0] % k:
        raise LoraFormatError(
            f"{path}: {key!r}: loralib conv shapes lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)} do not fit "
            f"a conv of weight {tuple(weight_shape)} (expected ({k}r, {in_ch * k}) and ({out_ch * k}, {k}r))")
    product = up.double() @ down.double()  # (out k, in k)
    if len(kernel) == 2:  # Conv2d: (B @ A).view(weight)
        delta = product.reshape(weight_shape)
    else:  # the (3,1,1) Conv3d: mean over one axis of (B @ A).view(out, in, 3, 3, 1)
        delta = product.reshape(out_ch, in_ch, k, k, 1).mean(dim=-2, keepdim=True)
    eye = torch.eye(out_ch, dtype=torch.float64).reshape(out_ch, out_ch, *([1] * len(kernel)))
    dtype = torch.promote_types(down.dtype, torch.float32)  # the update of an fp16 file is not itself fp16
    return delta.to(dtype), eye.to(dtype)


def _from_stable_lora(state, metadata, path: Path, config: UNetConfig, webui: bool):
    if webui:
        text = sorted(k for k in state if k.startswith(("resblocks.", "transformer.", "text_model.")))
        if text:
            raise LoraFormatError(
                f"{path}: holds text-encoder LoRA entries ({len(text)} tensors, e.g. {text[0]!r}); only UNet "
                "LoRAs are supported so far")
    biases = sorted(k for k in state if k.endswith(".bias"))
    if biases:
        raise LoraFormatError(f"{path}: {biases[0]!r} is a bias trained with the LoRA (lora_bias='all'), "
                              "which is not supported")
    pairs = _pairs(state, (".lora_A", ".lora_B"), path)
    table = module_table(config, "diffusers")
    if webui:  # original names, with conv_in / conv_out / time_embedding left as diffusers names
        table = {**module_table(config, "original"),
                 **{k: v for k, v in table.items() if k in ("conv_in", "conv_out") or k.startswith("time_embedding.")}}
    modules = adaptable_modules(meta_unet(config))
    out = {}
    for module, (down, up) in pairs.items():
        ours = _our_module(table, module, module + ".lora_A", path)
        m = modules[ours]
        if isinstance(m, nn.Linear):
            down, up = _to_rank(down, 2), _to_rank(up, 2)  # the webui file's trailing unit dim on proj_*
        elif all(k == 1 for k in m.kernel_size):
            down = down.reshape(*down.shape, *([1] * len(m.kernel_size)))
            up = up.reshape(*up.shape, *([1] * len(m.kernel_size)))
        else:
            down, up = _loralib_conv(down, up, m.weight.shape, module + ".lora_A", path)
        out[ours] = (down, up, None)
    return out


def _from_cloneofsimo(tensors: list[Tensor], path: Path, config: UNetConfig):
    order = diffusers_module_order(config)
    table = module_table(config, "diffusers")
    if len(tensors) % 2:
        raise LoraFormatError(f"{path}: a cloneofsimo LoRA holds (up, down) pairs, but this list has "
                              f"{len(tensors)} tensors")
    if len(tensors) != 2 * len(order):
        raise LoraFormatError(
            f"{path}: a cloneofsimo LoRA of this UNet holds {2 * len(order)} tensors (an (up, down) pair for each "
            f"of its {len(order)} Linear/Conv modules), this one {len(tensors)}: a LoRA for another architecture "
            "or size, or one trained on part of the UNet (its module list is not recorded in the file)")
    return {table[name]: (tensors[2 * i + 1], tensors[2 * i], None) for i, name in enumerate(order)}


def _check_entry(ours: str, m: nn.Module, down: Tensor, up: Tensor, where: str) -> None:
    if isinstance(m, nn.Linear):
        want_down, want_up = (None, m.in_features), (m.out_features, None)
    else:
        want_down = (None, m.in_channels, *m.kernel_size)
        want_up = (m.out_channels, None, *([1] * len(m.kernel_size)))
    r = down.shape[0] if down.ndim else None
    ok = (down.ndim == len(want_down) and up.ndim == len(want_up) and r is not None and r >= 1
          and up.shape[1] == r
          and all(w is None or w == s for w, s in zip(want_down, down.shape))
          and all(w is None or w == s for w, s in zip(want_up, up.shape)))
    if not ok:
        show = lambda shape: "(" + ", ".join("r" if s is None else str(s) for s in shape) + ")"  # noqa: E731
        raise LoraFormatError(
            f"{where}: the LoRA of {ours!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, but that "
            f"{type(m).__name__} takes down {show(want_down)} and up {show(want_up)} with one rank r")


def read_lora(path: Path, config: UNetConfig) -> tuple[LoraWeights, str]:
    """A LoRA file of any of `LAYOUTS` as `LoraWeights` for a UNet of `config`, and its layout; every
    entry checked against the module it adapts. Nothing is applied here."""
    obj, metadata = read_lora_file(Path(path))
    return convert_lora(obj, metadata, config, Path(path))


def convert_lora(obj: Any, metadata: Mapping[str, str], config: UNetConfig,
                 where: Path | str) -> tuple[LoraWeights, str]:
    """`read_lora` for contents already in memory (a state dict, a cloneofsimo list); `where` names them."""
    layout = detect_lora_layout(obj, metadata, where)
    if layout == "cloneofsimo":
        raw = _from_cloneofsimo(list(obj), where, config)
    elif layout == "diffusers":
        raw = _from_diffusers(obj, metadata, where, config)
    else:
        raw = _from_stable_lora(obj, metadata, where, config, webui=layout == "stable_lora_webui")
    modules = adaptable_modules(meta_unet(config))
    weights: LoraWeights = {}
    for ours, (down, up, alpha) in raw.items():
        _check_entry(ours, modules[ours], down, up, str(where))
        check_weights({ours + ".down": down, ours + ".up": up}, where)
        weights[ours] = LoraEntry(down.float(), up.float(), float(down.shape[0]) if alpha is None else alpha)
    return weights, layout


# ---------------------------------------------------------------------------------------------
# Writing ours: diffusers' layout
# ---------------------------------------------------------------------------------------------


def lora_metadata(weights: LoraWeights, config: UNetConfig, dropout: float = 0.0) -> dict[str, Any]:
    """The LoraConfig fields diffusers reads from `lora_adapter_metadata` (unprefixed), in diffusers' names."""
    to_theirs = {v: k for k, v in module_table(config, "diffusers").items()}
    ranks = [e.rank for e in weights.values()]
    r = max(set(ranks), key=ranks.count)
    alphas = [e.alpha for e in weights.values() if e.rank == r]
    alpha = max(set(alphas), key=alphas.count)
    rank_pattern = {f"^{re.escape(to_theirs[m])}$": e.rank for m, e in weights.items() if e.rank != r}
    alpha_pattern = {f"^{re.escape(to_theirs[m])}$": e.alpha for m, e in weights.items() if e.alpha != alpha}
    return {
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(to_theirs[m] for m in weights),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "use_dora": False,
        "use_rslora": False, "init_lora_weights": True, "peft_type": "LORA",
    }


def write_diffusers_lora(path: Path, weights: LoraWeights, config: UNetConfig, dropout: float = 0.0,
                         dtype: torch.dtype | None = None) -> Path:
    """Write `weights` as diffusers writes a UNet LoRA (peft keys under `unet.`, LoraConfig in the
    metadata); atomically. `path` may be a folder (then `pytorch_lora_weights.safetensors` inside it)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHT_NAME
    to_theirs = {v: k for k, v in module_table(config, "diffusers").items()}
    unknown = sorted(set(weights) - set(to_theirs))
    if unknown:
        raise LoraFormatError(f"write_diffusers_lora: {unknown[0]!r} is not an adaptable module of this UNet")
    state = {}
    for module, e in weights.items():
        theirs = "unet." + to_theirs[module]
        state[theirs + ".lora_A.weight"] = e.down.to(dtype or e.down.dtype).contiguous()
        state[theirs + ".lora_B.weight"] = e.up.to(dtype or e.up.dtype).contiguous()
    meta = {f"unet.{k}": v for k, v in lora_metadata(weights, config, dropout).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path
