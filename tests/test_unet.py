"""UNet3D: parity with diffusers' UNet3DConditionModel and the original UNetSD, the key tables, the
config converters, and the switches (chunking, checkpointing, temporal ablation)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from modelscope_t2v.formats.tables import ConversionError, apply_table, invert, shapes_of
from modelscope_t2v.models.unet import UNET_PRESETS, TemporalConvBlock, TemporalTransformer, UNet3D, UNetConfig
from modelscope_t2v.formats.unet_layout import (
    unet_config_from_diffusers,
    unet_config_from_original,
    unet_config_to_diffusers,
    unet_config_to_original,
    unet_diffusers_table,
    unet_original_table,
)
from checkpoints import original_unet
from refs import max_diff, perturb_

TOL = 1e-4
TINY = UNET_PRESETS["tiny"]
# The original UNetSD hard-codes GroupNorm(32) everywhere and a 1024-wide context in the decoder.
TINY_ORIGINAL = UNetConfig(
    block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False), cross_attention_dim=1024,
    head_dim=16, temporal_in_heads=2, norm_groups=32, sample_size=8,
)
# damo-vilab/text-to-video-ms-1.7b unet/config.json
RELEASED_DIFFUSERS = {
    "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
    "attention_head_dim": 64, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "downsample_padding": 1, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 32,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
}
# damo-vilab/modelscope-damo-text-to-video-synthesis configuration.json model.model_cfg
RELEASED_ORIGINAL = {
    "unet_in_dim": 4, "unet_dim": 320, "unet_y_dim": 768, "unet_context_dim": 1024, "unet_out_dim": 4,
    "unet_dim_mult": [1, 2, 4, 4], "unet_num_heads": 8, "unet_head_dim": 64, "unet_res_blocks": 2,
    "unet_attn_scales": [1, 0.5, 0.25], "unet_dropout": 0.1, "temporal_attention": "True",
    "num_timesteps": 1000, "mean_type": "eps", "var_type": "fixed_small", "loss_type": "mse",
}


def _inputs(c: UNetConfig, frames: int = 3, size: tuple[int, int] = (16, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c.in_channels, frames, *size, generator=g)
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


def _diffusers_pair(c: UNetConfig, seed: int = 0):
    from diffusers import UNet3DConditionModel

    ref = perturb_(UNet3DConditionModel.from_config(unet_config_to_diffusers(c)), seed).eval()
    with torch.device("meta"):
        target = shapes_of(UNet3D(c))
    ours = UNet3D(c).eval()
    ours.load_state_dict(apply_table(ref.state_dict(), unet_diffusers_table(c), target, what="unet"), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def diffusers_pair():
    return _diffusers_pair(TINY)


@pytest.fixture(scope="module")
def original_pair():
    ref = perturb_(original_unet(TINY_ORIGINAL), 1).eval()
    with torch.device("meta"):
        target = shapes_of(UNet3D(TINY_ORIGINAL))
    ours = UNet3D(TINY_ORIGINAL).eval()
    sd = apply_table(ref.state_dict(), unet_original_table(TINY_ORIGINAL), target, what="unet")
    ours.load_state_dict(sd, strict=True)
    return ref, ours


# --- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,size", [(3, (16, 16)), (1, (16, 16)), (2, (9, 13))], ids=["f3", "f1", "odd"])
@torch.no_grad()
def test_parity_with_diffusers(diffusers_pair, frames, size):
    ref, ours = diffusers_pair
    x, t, ctx = _inputs(TINY, frames, size)
    expected = ref(x, t, ctx).sample
    got = ours(x, t, ctx)
    assert got.shape == expected.shape == x.shape
    err = max_diff(got, expected)
    print(f"diffusers parity f={frames} size={size}: max|diff| = {err:.3g}")
    assert err <= TOL
    assert expected.abs().max() > 0.1  # not trivially zero


@torch.no_grad()
def test_parity_with_diffusers_timestep_forms(diffusers_pair):
    ref, ours = diffusers_pair
    x, _, ctx = _inputs(TINY, 2, (8, 8))
    for t in (500, torch.tensor(500), torch.tensor([500])):
        assert max_diff(ours(x, t, ctx), ref(x, t, ctx).sample) <= TOL
    assert torch.equal(ours(x, 500, ctx), ours(x, torch.tensor([500, 500]), ctx))


@torch.no_grad()
def test_timestep_cond_parity_and_effect():
    c = dataclasses.replace(TINY, timestep_cond_dim=16)
    ref, ours = _diffusers_pair(c, seed=3)
    x, t, ctx = _inputs(c, 2, (8, 8))
    cond = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    err = max_diff(ours(x, t, ctx, timestep_cond=cond), ref(x, t, ctx, timestep_cond=cond).sample)
    print(f"diffusers parity with timestep_cond: max|diff| = {err:.3g}")
    assert err <= TOL
    assert max_diff(ours(x, t, ctx, timestep_cond=cond), ours(x, t, ctx)) > 1e-3
    assert unet_config_from_diffusers(unet_config_to_diffusers(c)) == c


@pytest.mark.parametrize("frames", [3, 1])
@torch.no_grad()
def test_parity_with_original(original_pair, frames):
    ref, ours = original_pair
    x, _, ctx = _inputs(TINY_ORIGINAL, frames)
    t = torch.tensor([10, 999])
    expected = ref(x, t, ctx)
    got = ours(x, t, ctx)
    err = max_diff(got, expected)
    print(f"original parity f={frames}: max|diff| = {err:.3g}")
    assert err <= TOL
    assert expected.abs().max() > 0.1


def test_original_round_trip(original_pair):
    ref, ours = original_pair
    back = apply_table(ours.state_dict(), invert(unet_original_table(TINY_ORIGINAL)), shapes_of(ref))
    ref_sd = ref.state_dict()
    assert back.keys() == ref_sd.keys()
    assert all(torch.equal(back[k], v) for k, v in ref_sd.items())
    again = apply_table(back, unet_original_table(TINY_ORIGINAL), shapes_of(ours))
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


def test_tables_are_strict(diffusers_pair):
    ref, ours = diffusers_pair
    sd = dict(ref.state_dict())
    sd.pop("down_blocks.0.temp_convs.0.conv4.3.weight")
    with pytest.raises(ConversionError, match="conv4.3.weight"):
        apply_table(sd, unet_diffusers_table(TINY), shapes_of(ours))
    sd = dict(ref.state_dict(), extra=torch.zeros(1))
    with pytest.raises(ConversionError, match="extra"):
        apply_table(sd, unet_diffusers_table(TINY), shapes_of(ours))


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_config_round_trips(name):
    c = UNET_PRESETS[name]
    assert unet_config_from_diffusers(unet_config_to_diffusers(c)) == c
    assert UNetConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(c)))) == c


def test_released_configs_give_the_preset():
    assert unet_config_from_diffusers(RELEASED_DIFFUSERS) == UNET_PRESETS["ms-1.7b"]
    written = unet_config_to_original(UNET_PRESETS["ms-1.7b"])
    assert written == {k: RELEASED_ORIGINAL[k] for k in written}
    with torch.device("meta"):
        state = original_unet(UNET_PRESETS["ms-1.7b"]).state_dict()
    assert unet_config_from_original(RELEASED_ORIGINAL, state) == UNET_PRESETS["ms-1.7b"]


def test_original_config_from_tensors(original_pair):
    ref, _ = original_pair
    state = ref.state_dict()
    assert unet_config_from_original(unet_config_to_original(TINY_ORIGINAL), state) == TINY_ORIGINAL
    # widths, depth, levels, context and heads come from the tensors; only head_dim must be given
    from_tensors = unet_config_from_original({"unet_head_dim": 16}, state)
    assert from_tensors == dataclasses.replace(TINY_ORIGINAL, sample_size=32)  # not stored in the layout
    with pytest.raises(ValueError, match="unet_dim"):
        unet_config_from_original(dict(unet_config_to_original(TINY_ORIGINAL), unet_dim=320), state)
    with pytest.raises(ValueError, match="temporal_attention"):
        unet_config_from_original({"unet_head_dim": 16, "temporal_attention": "False"}, state)


def test_diffusers_config_validation():
    d = unet_config_to_diffusers(TINY)
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        unet_config_from_diffusers(dict(d, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock3D"]))
    with pytest.raises(ValueError, match="up_block_types"):
        unet_config_from_diffusers(dict(d, up_block_types=["CrossAttnUpBlock3D", "CrossAttnUpBlock3D"]))
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers(dict(d, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="act_fn"):
        unet_config_from_diffusers(dict(d, act_fn="gelu"))
    with pytest.raises(ValueError, match="temporal_in_heads"):
        unet_config_to_diffusers(dataclasses.replace(TINY, temporal_in_heads=4))
    with pytest.raises(ValueError, match="head_dim"):
        UNetConfig(block_channels=(32, 48), attention_levels=(True, False), head_dim=32, norm_groups=8)


# --- behaviour ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1])
@torch.no_grad()
def test_forward_chunking_keeps_output(diffusers_pair, dim):
    _, ours = diffusers_pair
    x, t, ctx = _inputs(TINY, 2, (8, 8))
    plain = ours(x, t, ctx)
    ours.enable_forward_chunking(chunk_size=3, dim=dim)
    try:
        chunked = ours(x, t, ctx)
    finally:
        ours.disable_forward_chunking()
    err = max_diff(chunked, plain)
    print(f"forward chunking dim={dim}: max|diff| = {err:.3g}")
    assert err <= 1e-6
    with pytest.raises(ValueError, match="dim"):
        ours.enable_forward_chunking(1, dim=2)


def test_gradient_checkpointing_keeps_loss_and_grads():
    model = perturb_(UNet3D(TINY), 7).train()  # train mode: dropout is active in both runs
    x, t, ctx = _inputs(TINY, 2, (8, 8))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(x, t, ctx).square().mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads()
    model.enable_gradient_checkpointing()
    loss_b, grads_b = loss_and_grads()
    model.disable_gradient_checkpointing()
    assert loss_a == loss_b
    worst = max(max_diff(grads_a[k], grads_b[k]) for k in grads_a)
    print(f"gradient checkpointing: max grad diff = {worst:.3g}")
    assert worst <= 1e-6


@torch.no_grad()
def test_set_temporal_makes_frames_independent(diffusers_pair):
    _, ours = diffusers_pair
    x, t, ctx = _inputs(TINY, 3, (8, 8))
    y = x.clone()
    y[:, :, 2] += 1.0  # change the last frame only
    assert max_diff(ours(x, t, ctx)[:, :, 0], ours(y, t, ctx)[:, :, 0]) > 1e-3  # frames interact
    ours.set_temporal(attention=False, conv=False)
    try:
        full = ours(x, t, ctx)
        assert max_diff(full[:, :, 0], ours(y, t, ctx)[:, :, 0]) == 0
        for i in range(3):  # every frame equals that frame run alone
            assert max_diff(full[:, :, i], ours(x[:, :, i : i + 1], t, ctx)[:, :, 0]) <= 1e-5
        ours.set_temporal(attention=True, conv=False)  # each switch acts on its own
        assert max_diff(ours(x, t, ctx), full) > 1e-3
    finally:
        ours.set_temporal()


@torch.no_grad()
def test_temporal_position_embedding_tells_frames_apart(original_pair):
    """Without it the temporal attention is blind to frame order (permuting the input frames permutes
    the output); with it, it is not. Parameter-free: the same tensors load into either network."""
    torch.manual_seed(0)
    plain = perturb_(UNet3D(TINY)).eval()
    framed = UNet3D(dataclasses.replace(TINY, temporal_position_embedding=True)).eval()
    framed.load_state_dict(plain.state_dict(), strict=True)
    x, t, ctx = _inputs(TINY, 4, (8, 8))
    perm = torch.tensor([2, 0, 3, 1])
    for model in (plain, framed):
        model.set_temporal(conv=False)  # the temporal convs' zero padding would tell the ends apart
    assert max_diff(plain(x[:, :, perm], t, ctx), plain(x, t, ctx)[:, :, perm]) <= 1e-5
    assert max_diff(framed(x[:, :, perm], t, ctx), framed(x, t, ctx)[:, :, perm]) > 1e-2
    # the flag survives both layouts' configs, and is written only when on
    assert "temporal_position_embedding" not in unet_config_to_diffusers(TINY)
    assert unet_config_from_diffusers(unet_config_to_diffusers(framed.config)) == framed.config
    c = dataclasses.replace(TINY_ORIGINAL, temporal_position_embedding=True)
    assert "unet_temporal_position_embedding" not in unet_config_to_original(TINY_ORIGINAL)
    assert unet_config_from_original(unet_config_to_original(c), original_pair[0].state_dict()) == c


@torch.no_grad()
def test_spatial_position_embedding_tells_places_apart(original_pair):
    """A spatial transformer is blind to where a pixel is (permuting the pixels permutes its output); with
    the embedding it is not, and it tells left from right (sin features are odd about the centre).
    Parameter-free: the same tensors load into either network; the flag survives both layouts' configs."""
    from modelscope_t2v.models.unet import SpatialTransformer, frame_position_features

    torch.manual_seed(0)
    plain = perturb_(SpatialTransformer(32, 16, 24, 8)).eval()
    placed = SpatialTransformer(32, 16, 24, 8, position_embedding=True).eval()
    placed.load_state_dict(plain.state_dict(), strict=True)
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 5, 24)
    perm = torch.randperm(24)

    def permuted(y):
        return y.flatten(2)[:, :, perm].reshape(y.shape)

    assert max_diff(plain(permuted(x), ctx), permuted(plain(x, ctx))) <= 1e-5
    assert max_diff(placed(permuted(x), ctx), permuted(placed(x, ctx))) > 1e-2
    f = frame_position_features(4, 6, 32).reshape(4, 6, 32)
    assert torch.allclose(f[:, :, :8], -f.flip(1)[:, :, :8], atol=1e-6)  # sin(x): odd under a left-right flip
    assert torch.allclose(f[:, :, 8:16], f.flip(1)[:, :, 8:16], atol=1e-6)  # cos(x): even
    model = UNet3D(dataclasses.replace(TINY, spatial_position_embedding=True)).eval()
    model.load_state_dict(perturb_(UNet3D(TINY)).state_dict(), strict=True)
    assert "spatial_position_embedding" not in unet_config_to_diffusers(TINY)
    assert unet_config_from_diffusers(unet_config_to_diffusers(model.config)) == model.config
    c = dataclasses.replace(TINY_ORIGINAL, spatial_position_embedding=True)
    assert "unet_spatial_position_embedding" not in unet_config_to_original(TINY_ORIGINAL)
    assert unet_config_from_original(unet_config_to_original(c), original_pair[0].state_dict()) == c


@torch.no_grad()
def test_fresh_temporal_convs_are_identity():
    torch.manual_seed(0)
    model = UNet3D(TINY).eval()
    x, t, ctx = _inputs(TINY, 2, (8, 8))
    with_conv = model(x, t, ctx)
    model.set_temporal(conv=False)
    assert torch.equal(model(x, t, ctx), with_conv)


def test_input_validation(diffusers_pair):
    _, ours = diffusers_pair
    x, t, ctx = _inputs(TINY, 2, (8, 8))
    with pytest.raises(ValueError, match="sample"):
        ours(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, t, ctx[..., :16])
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="timestep_cond"):
        ours(x, t, ctx, timestep_cond=torch.zeros(2, 4))


# --- sizes --------------------------------------------------------------------------------------


def _millions(module: torch.nn.Module, kind: type | None = None) -> float:
    mods = [module] if kind is None else [m for m in module.modules() if isinstance(m, kind)]
    return round(sum(p.numel() for m in mods for p in m.parameters()) / 1e6, 1)


@pytest.mark.parametrize("name", ["ms-1.7b", "zeroscope-576w", "zeroscope-xl"])
def test_parameter_counts(name):
    with torch.device("meta"):
        model = UNet3D(UNET_PRESETS[name])
    assert _millions(model) == 1411.2
    assert _millions(model, TemporalTransformer) == 278.4  # temporal attention, incl. the one after conv_in
    assert _millions(model, TemporalConvBlock) == 266.9


def test_full_size_tables_cover_both_layouts():
    from diffusers import UNet3DConditionModel

    c = UNET_PRESETS["ms-1.7b"]
    with torch.device("meta"):
        ours = shapes_of(UNet3D(c))
        diffusers = UNet3DConditionModel.from_config(unet_config_to_diffusers(c)).state_dict()
        original = original_unet(c).state_dict()
    assert apply_table(diffusers, unet_diffusers_table(c), ours).keys() == ours.keys()
    assert apply_table(original, unet_original_table(c), ours).keys() == ours.keys()
