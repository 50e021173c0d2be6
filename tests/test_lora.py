"""LoRA: our files run in diffusers (peft on its UNet3DConditionModel) with our numbers, diffusers' files and the
community layouts (Text-To-Video-Finetuning's stable LoRA and its webui file, cloneofsimo lists) load with
the numbers their own code computes, the adapter bookkeeping is exact, and bad files change nothing."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modelscope_t2v import lora
from modelscope_t2v.formats.lora_layout import (
    LoraFormatError,
    adaptable_modules,
    diffusers_module_order,
    meta_unet,
    module_table,
    read_lora,
    write_diffusers_lora,
)
from modelscope_t2v.formats.safe_pickle import UnsafeCheckpointError
from modelscope_t2v.formats.tables import apply_table, shapes_of
from modelscope_t2v.formats.unet_layout import unet_config_to_diffusers, unet_diffusers_table, unet_original_table
from modelscope_t2v.models.unet import UNET_PRESETS, UNet3D, UNetConfig
from checkpoints import TINY_ORIGINAL_UNET, original_unet
from refs import max_diff, perturb_

TINY = UNET_PRESETS["tiny"]
TOL = 1e-5
# three levels, two layers, a guidance embedding: every kind of block and the cond_proj of T2V-Turbo
WIDE = dataclasses.replace(TINY, block_channels=(32, 64, 64), layers_per_block=2, attention_levels=(True, True, False),
                           timestep_cond_dim=16)


def _inputs(c: UNetConfig, seed: int = 0, cond: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c.in_channels, 3, 16, 16, generator=g)
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    kw = {"timestep_cond": torch.randn(2, c.timestep_cond_dim, generator=g)} if cond else {}
    return (x, torch.tensor([10, 700]), ctx), kw


def _pair(c: UNetConfig, seed: int = 0):
    from diffusers import UNet3DConditionModel

    ref = perturb_(UNet3DConditionModel.from_config(unet_config_to_diffusers(c)), seed).eval()
    ours = UNet3D(c).eval()
    state = apply_table(ref.state_dict(), unet_diffusers_table(c), shapes_of(meta_unet(c)), what="unet")
    ours.load_state_dict(state, strict=True)
    return ref, ours


@torch.no_grad()
def _random_lora(model: nn.Module, name: str, spec: lora.LoraSpec, seed: int = 0) -> list[str]:
    targets = lora.add_adapter(model, name, spec)
    g = torch.Generator().manual_seed(seed)
    for p in lora.adapter_parameters(model, name).values():
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.set_adapters(model, [name])
    return targets


def _run(model, c, seed=0, **extra):
    args, kw = _inputs(c, seed, cond=c.timestep_cond_dim is not None)
    with torch.no_grad():
        out = model(*args, **kw, **extra)
    return out.sample if hasattr(out, "sample") else out


# --- module paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [TINY, WIDE], ids=["tiny", "wide"])
def test_groups_cover_every_module_once(c):
    names = list(adaptable_modules(meta_unet(c)))
    assert names and all(lora.group_of(n) in lora.GROUPS for n in names)  # group_of raises on 0 or 2 groups
    assert sorted(lora.target_modules(meta_unet(c), "all")) == sorted(names)
    spatial, temporal = lora.target_modules(meta_unet(c), "spatial"), lora.target_modules(meta_unet(c), "temporal")
    assert not set(spatial) & set(temporal)
    assert all("spatial_attention" in n for n in spatial) and not any("spatial" in n for n in temporal)


@pytest.mark.parametrize("c", [TINY, WIDE], ids=["tiny", "wide"])
def test_diffusers_module_order_is_named_modules_order(c):
    from diffusers import UNet3DConditionModel

    ref = UNet3DConditionModel.from_config(unet_config_to_diffusers(c))
    expected = [n for n, m in ref.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Conv3d)]
    assert diffusers_module_order(c) == expected
    assert sorted(module_table(c, "diffusers")) == sorted(expected)


# --- our files in diffusers, diffusers' files here -------------------------------------------------------


def _load_in_diffusers(unet, folder, adapter_name: str) -> None:
    """diffusers reads the file (its `lora_state_dict`, metadata included) and peft applies it to diffusers'
    UNet3DConditionModel. (TextToVideoSDPipeline.load_lora_weights itself fails in diffusers 0.42: its
    UNet3DConditionModel lacks PeftAdapterMixin's load_lora_adapter.)"""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, _, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(folder, return_lora_metadata=True)
    config = LoraConfig(**{k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")})
    inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    result = set_peft_model_state_dict(unet, {k[len("unet."):]: v for k, v in state.items()}, adapter_name)
    assert not result.unexpected_keys


@pytest.mark.parametrize("target,alpha", [("all", 8.0), ("attention", None)], ids=["all-alpha8", "attention"])
def test_our_lora_file_gives_our_numbers_in_diffusers(tmp_path, target, alpha):
    from peft.tuners.lora import LoraLayer

    ref, ours = _pair(WIDE)
    _random_lora(ours, "mine", lora.LoraSpec(rank=4, alpha=alpha, target=target))
    path = write_diffusers_lora(tmp_path, lora.adapter_weights(ours, "mine"), WIDE)
    assert path.name == "pytorch_lora_weights.safetensors"
    _load_in_diffusers(ref, tmp_path, "mine")
    layers = [m for m in ref.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(lora.adapter_weights(ours, "mine")) > 0
    err = max_diff(_run(ref, WIDE), _run(ours, WIDE))
    print(f"our LoRA file ({target}) in diffusers + peft: max|diff| = {err:.3g}")
    assert err <= TOL
    for layer in layers:
        layer.set_scale("mine", 0.3)
    lora.set_adapters(ours, ["mine"], [0.3])
    assert max_diff(_run(ref, WIDE), _run(ours, WIDE)) <= TOL


def test_diffusers_written_lora_loads_here(tmp_path):
    """A LoRA trained with diffusers + peft and saved by diffusers' save_lora_weights, in both of its spellings
    (peft's lora_A/lora_B, and `convert_state_dict_to_diffusers`' lora.down/lora.up on the attention)."""
    from diffusers import TextToVideoSDPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    ref, ours = _pair(TINY)
    base = _run(ours, TINY)
    targets = r".*\.(to_q|to_k|to_v|to_out\.0|proj_in|resnets\.\d+\.conv1|temp_convs\.\d+\.conv2\.3)"
    config = LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, ref, adapter_name="default")
    perturb_(ref, 3)  # every weight, the LoRA's included (resnet and temporal convs among them)
    peft_state = get_peft_model_state_dict(ref, adapter_name="default")
    for i, state in enumerate([peft_state, convert_state_dict_to_diffusers(peft_state)]):
        folder = tmp_path / str(i)
        TextToVideoSDPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                unet_lora_adapter_metadata=config.to_dict())
        ours_i = UNet3D(TINY).eval()
        ours_i.load_state_dict(ours.state_dict())
        weights, layout = read_lora(folder / "pytorch_lora_weights.safetensors", TINY)
        assert layout == "diffusers" and all(e.alpha == 2 for e in weights.values())
        lora.load_adapter(ours_i, "theirs", weights)
        # the base weights moved too (perturb_ reached them): compare with the same base
        ours_i.load_state_dict(
            {**lora.base_state_dict(ours_i), **_base_from(ref, TINY)}, strict=False)
        assert max_diff(_run(ref, TINY), _run(ours_i, TINY)) <= TOL
    assert max_diff(base, _run(ours, TINY)) == 0


def _base_from(ref, c):
    """The plain weights of a peft-adapted diffusers UNet, in our names, under LoRA-wrapped paths."""
    from peft.tuners.lora import LoraLayer

    plain = {}
    for k, v in ref.state_dict().items():
        if ".lora_" in k:
            continue
        plain[k.replace(".base_layer.", ".")] = v
    ours = apply_table(plain, unet_diffusers_table(c), shapes_of(meta_unet(c)), what="unet")
    wrapped = {n for n, m in ref.named_modules() if isinstance(m, LoraLayer)}
    to_ours = module_table(c, "diffusers")
    wrapped_ours = {to_ours[n] for n in wrapped}
    out = {}
    for k, v in ours.items():
        module, _, leaf = k.rpartition(".")
        out[f"{module}.base_layer.{leaf}" if module in wrapped_ours else k] = v
    return out


# --- bookkeeping ----------------------------------------------------------------------------------------


def test_scale_fuse_unfuse_unload():
    ref, ours = _pair(TINY)
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    base = _run(ours, TINY)
    _random_lora(ours, "a", lora.LoraSpec(rank=4, target="all"))
    adapted = _run(ours, TINY)
    assert max_diff(adapted, base) > 1e-3
    with lora.scaled(ours, 0.0):
        assert torch.equal(_run(ours, TINY), base)  # scale 0 is the base model bit for bit
    with lora.scaled(ours, 0.5):
        half = _run(ours, TINY)
    assert torch.equal(_run(ours, TINY), adapted)  # the scalings came back exactly
    lora.set_adapters(ours, ["a"], [0.5])
    assert torch.equal(_run(ours, TINY), half)
    lora.set_adapters(ours, ["a"], [1.0])
    lora.fuse(ours)
    assert max_diff(_run(ours, TINY), adapted) <= TOL
    with pytest.raises(RuntimeError, match="unfuse_lora"):
        lora.set_adapters(ours, ["a"], [0.2])
    lora.unfuse(ours)
    restored = lora.base_state_dict(ours)
    assert max(max_diff(restored[k], base_state[k]) for k in base_state) <= 1e-6  # fp32 round-off
    assert max_diff(_run(ours, TINY), adapted) <= TOL
    lora.fuse(ours, scale=0.5)
    lora.unload(ours)  # keeps the fused LoRA, as diffusers' unload_lora_weights
    assert not lora.lora_layers(ours) and set(ours.state_dict()) == set(base_state)
    assert max_diff(_run(ours, TINY), half) <= TOL
    ours.load_state_dict(base_state)
    assert torch.equal(_run(ours, TINY), base)  # unloaded: the plain module again


def test_several_adapters_add_up():
    _, ours = _pair(TINY)
    base = _run(ours, TINY)
    _random_lora(ours, "a", lora.LoraSpec(rank=2, target="spatial"), seed=1)
    only_a = _run(ours, TINY)
    lora.load_adapter(ours, "b", {k: dataclasses.replace(e, up=-e.up) for k, e in lora.adapter_weights(ours, "a").items()})
    assert lora.active_adapters(ours) == ["a", "b"]
    assert max_diff(_run(ours, TINY), base) <= TOL  # b undoes a, summed per layer
    lora.set_adapters(ours, ["a", "b"], [1.0, 0.0])
    assert torch.equal(_run(ours, TINY), only_a)
    lora.delete_adapters(ours, ["a"])
    assert lora.adapter_names(ours) == ["b"] and lora.active_adapters(ours) == ["b"]
    lora.delete_adapters(ours, ["b"])
    assert not lora.lora_layers(ours) and torch.equal(_run(ours, TINY), base)


def test_a_failed_load_changes_nothing(tmp_path):
    _, ours = _pair(TINY)
    _random_lora(ours, "a", lora.LoraSpec(rank=2))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    out = _run(ours, TINY)
    weights = lora.adapter_weights(ours, "a")
    name = sorted(weights)[0]
    broken = dict(weights)
    broken[name] = dataclasses.replace(weights[name], up=weights[name].up[:, :1])  # rank 2 down, rank 1 up
    with pytest.raises(ValueError):
        lora.load_adapter(ours, "b", broken)
    assert lora.adapter_names(ours) == ["a"] and set(ours.state_dict()) == set(before)
    assert torch.equal(_run(ours, TINY), out)
    with pytest.raises(ValueError, match="already loaded"):
        lora.load_adapter(ours, "a", weights)


# --- files that do not fit ---------------------------------------------------------------------------------


def _diffusers_file(tmp_path, state, name="x.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_bad_files_are_named(tmp_path):
    _, ours = _pair(TINY)
    _random_lora(ours, "a", lora.LoraSpec(rank=2))
    good = write_diffusers_lora(tmp_path / "good", lora.adapter_weights(ours, "a"), TINY)
    from safetensors.torch import load_file

    state = load_file(good)
    key = sorted(k for k in state if k.endswith("lora_B.weight"))[0]
    missing_b = {k: v for k, v in state.items() if k != key}
    with pytest.raises(LoraFormatError, match="is missing"):
        read_lora(_diffusers_file(tmp_path, missing_b, "m.safetensors"), TINY)
    other = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()}
    with pytest.raises(LoraFormatError, match="another architecture"):
        read_lora(_diffusers_file(tmp_path, other, "o.safetensors"), TINY)
    wide = dataclasses.replace(TINY, block_channels=(64, 128), norm_groups=8)  # same names, other widths
    with pytest.raises(LoraFormatError, match="takes down"):
        read_lora(good, wide)
    bad_rank = dict(state)
    bad_rank[key] = state[key][:, :1].contiguous()
    with pytest.raises(LoraFormatError, match="one rank"):
        read_lora(_diffusers_file(tmp_path, bad_rank, "r.safetensors"), TINY)
    with pytest.raises(LoraFormatError, match="kohya"):
        read_lora(_diffusers_file(tmp_path, {"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)},
                                  "k.safetensors"), TINY)
    nan = dict(state)
    nan[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        read_lora(_diffusers_file(tmp_path, nan, "n.safetensors"), TINY)


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_pickle_that_carries_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump([torch.zeros(2, 2), _Evil()], f)
    with pytest.raises(UnsafeCheckpointError):
        read_lora(path, TINY)
    assert "ran code" not in capsys.readouterr().out


# --- community layouts, against their own arithmetic ------------------------------------------------------


def _loralib_delta(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stable-LoRA's (loralib's) update of a module, as its forward computes it (scaling 1)."""
    w = module.weight
    if isinstance(module, nn.Linear) or w.ndim == 2:
        return b @ a
    if w.ndim == 4:
        return (b @ a).view(w.shape)
    out_ch, in_ch, k = w.shape[:3]
    return torch.mean((b @ a).view(out_ch, in_ch, k, k, 1), dim=-2, keepdim=True)


@torch.no_grad()
def _stable_lora_state(ref: nn.Module, r: int, seed: int) -> dict[str, torch.Tensor]:
    """A stable LoRA of every Linear / Conv of a diffusers UNet, shaped as Stable-LoRA's layers make them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in ref.named_modules():
        if type(m) is nn.Linear:
            a, b = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
        elif type(m) in (nn.Conv2d, nn.Conv3d):
            k = m.kernel_size[0]
            a = torch.randn(r * k, m.in_channels * k, generator=g)
            b = torch.randn(m.out_channels * k, r * k, generator=g)
        else:
            continue
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a * 0.05, b * 0.05
    return state


@torch.no_grad()
def _merge_into(ref: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    for name, delta in deltas.items():
        m = ref.get_submodule(name)
        m.weight += delta.reshape(m.weight.shape)


def test_stable_lora_file(tmp_path):
    ref, ours = _pair(TINY)
    state = _stable_lora_state(ref, 2, seed=4)
    path = _diffusers_file(tmp_path, state, "500_lora_text_to_video_unet.safetensors")
    weights, layout = read_lora(path, TINY)
    assert layout == "stable_lora"
    lora.load_adapter(ours, "stable", weights)
    _merge_into(ref, {n[: -len(".lora_A")]: _loralib_delta(ref.get_submodule(n[: -len(".lora_A")]), v,
                                                            state[n[: -1] + "B"])
                      for n, v in state.items() if n.endswith(".lora_A")})
    assert max_diff(_run(ref, TINY), _run(ours, TINY)) <= TOL


def test_stable_lora_webui_file_against_the_original_unet(tmp_path):
    """The webui file names the original UNetSD's modules: merged into the original model the way the A1111
    extension merges it (Linear: B A; Conv2d: (B A).view; Conv3d: the mean), it gives our numbers."""
    c = TINY_ORIGINAL_UNET
    ref = perturb_(original_unet(c), 2).eval()
    ours = UNet3D(c).eval()
    ours.load_state_dict(apply_table(ref.state_dict(), unet_original_table(c), shapes_of(meta_unet(c)), what="unet"))
    g = torch.Generator().manual_seed(5)
    to_ours = module_table(c, "original")
    state, deltas = {}, {}
    for name, m in ref.named_modules():
        if name not in to_ours:
            continue
        w = m.weight
        if w.ndim == 2 or (w.ndim == 3 and w.shape[-1] == 1):  # Linear, or the temporal proj_in / proj_out Conv1d
            a = (torch.randn(2, w.shape[1], generator=g) * 0.05).half().float()
            b = (torch.randn(w.shape[0], 2, generator=g) * 0.05).half().float()
            deltas[name] = b @ a
            if "proj_" in name:  # the converter's trailing unit dim on every proj_in / proj_out
                a, b = a.unsqueeze(-1), b.unsqueeze(-1)
        else:
            k = m.kernel_size[0]
            a = (torch.randn(2 * k, m.in_channels * k, generator=g) * 0.05).half().float()
            b = (torch.randn(m.out_channels * k, 2 * k, generator=g) * 0.05).half().float()
            deltas[name] = _loralib_delta(m, a, b)
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a.half(), b.half()  # the webui file is fp16
    path = tmp_path / "webui_500_lora_text_to_video.safetensors"
    save_file(state, str(path), metadata={"stable_lora_text_to_video": "v1", "lora_name": "lora_text_to_video_abcde"})
    weights, layout = read_lora(path, c)
    assert layout == "stable_lora_webui" and len(weights) == len(adaptable_modules(ours))
    lora.load_adapter(ours, "webui", weights)
    with torch.no_grad():
        for name, delta in deltas.items():
            m = ref.get_submodule(name)
            m.weight += delta.reshape(m.weight.shape)
        x, t, ctx = _inputs(c)[0]
        expected, got = ref(x, t, ctx), ours(x, t, ctx)
    assert max_diff(expected, got) <= 1e-4


def test_cloneofsimo_list(tmp_path):
    """A `[up, down, ...]` list in diffusers' module order, merged as cloneofsimo's collapse_lora does."""
    ref, ours = _pair(WIDE)
    g = torch.Generator().manual_seed(6)
    tensors = []
    with torch.no_grad():
        for name in diffusers_module_order(WIDE):
            m = ref.get_submodule(name)
            r = min(3, m.weight.shape[0], m.weight.shape[1])
            if isinstance(m, nn.Linear):
                up, down = torch.randn(m.out_features, r, generator=g), torch.randn(r, m.in_features, generator=g)
            else:
                ones = [1] * (m.weight.ndim - 2)
                up = torch.randn(m.out_channels, r, *ones, generator=g)
                down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
            up, down = up * 0.05, down * 0.05
            tensors += [up, down]
            m.weight += (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape)
    path = tmp_path / "unet_lora.pt"
    torch.save(tensors, path)
    weights, layout = read_lora(path, WIDE)
    assert layout == "cloneofsimo" and len(weights) == len(tensors) // 2
    lora.load_adapter(ours, "clone", weights)
    assert max_diff(_run(ref, WIDE), _run(ours, WIDE)) <= TOL
    torch.save(tensors[:-2], tmp_path / "short.pt")
    with pytest.raises(LoraFormatError, match="holds 828 tensors.*this one 826"):
        read_lora(tmp_path / "short.pt", WIDE)
