"""The KL autoencoder: parity with diffusers' AutoencoderKL and the original ModelScope (LDM) autoencoder
through the key tables, video/slicing/tiling behaviour, posterior sampling and the configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers.models import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from modelscope_t2v.formats.tables import ConversionError, apply_table, invert, prefixed, shapes_of
from modelscope_t2v.models.vae import VAE_PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig
from modelscope_t2v.formats.vae_layout import (
    vae_config_from_diffusers,
    vae_config_from_original,
    vae_config_to_diffusers,
    vae_config_to_original,
    vae_diffusers_table,
    vae_original_table,
)
from tests.refs import max_diff, modelscope_reference, perturb_

TOL = 1e-4
TINY = VAE_PRESETS["tiny"]
# Three levels, two resnets per level, an identity-shortcut level (64 -> 64): the table's loops.
DEEP = VAEConfig(block_channels=(32, 64, 64), layers_per_block=2, norm_groups=32, sample_size=32)
CONFIGS = {"tiny": TINY, "deep": DEEP}


def _images(n=2, h=24, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def _ours(state, table, config: VAEConfig) -> AutoencoderKL:
    model = AutoencoderKL(config).eval()
    model.load_state_dict(apply_table(state, table, shapes_of(model), what="vae"), strict=True)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def diffusers_pair(request):
    config = CONFIGS[request.param]
    torch.manual_seed(0)
    ref = perturb_(DiffusersAutoencoderKL(**vae_config_to_diffusers(config)), seed=1).eval()
    return ref, _ours(ref.state_dict(), vae_diffusers_table(config), config)


@pytest.fixture(scope="module", params=list(CONFIGS))
def original_pair(request):
    config = CONFIGS[request.param]
    torch.manual_seed(0)
    ref = modelscope_reference("autoencoder").AutoencoderKL(**vae_config_to_original(config))
    ref = perturb_(ref, seed=2).eval()
    return ref, _ours(ref.state_dict(), vae_original_table(config), config)


# -- 1. diffusers parity --------------------------------------------------------------------------


@torch.no_grad()
def test_diffusers_parity(diffusers_pair):
    ref, ours = diffusers_pair
    x = _images()
    want = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert max_diff(got.mean, want.mean) <= TOL
    assert max_diff(got.logvar, want.logvar) <= TOL
    assert max_diff(got.kl(), want.kl()) <= TOL * want.kl().abs().max().item()
    z = want.mean
    assert max_diff(ours.decode(z), ref.decode(z).sample) <= TOL
    # forward with a sampled posterior: same seed, same reconstruction
    recon, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(5))
    want_recon = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    assert max_diff(recon, want_recon) <= TOL


def test_diffusers_config_round_trip():
    for config in (*CONFIGS.values(), VAE_PRESETS["ms-1.7b"]):
        d = vae_config_to_diffusers(config)
        assert vae_config_from_diffusers(d) == config
        # a saved diffusers config (with its '_class_name' etc.) reads back to the same config
        built = DiffusersAutoencoderKL.from_config(d) if config is not VAE_PRESETS["ms-1.7b"] else None
        if built is not None:
            assert vae_config_from_diffusers(dict(built.config)) == config
    # the released vae/config.json of damo-vilab/text-to-video-ms-1.7b (fields as published)
    released = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    }
    assert vae_config_from_diffusers(released) == VAE_PRESETS["ms-1.7b"]
    # JSON round trip of our own config
    assert VAEConfig(**json.loads(json.dumps(dataclasses.asdict(TINY)))) == TINY


@pytest.mark.parametrize(
    "field, value",
    [("act_fn", "gelu"), ("up_block_types", ["UpDecoderBlock2D"]), ("use_quant_conv", False),
     ("shift_factor", 0.1), ("mystery", 1), ("norm_num_groups", 7)],
)
def test_diffusers_config_errors_name_the_field(field, value):
    d = {**vae_config_to_diffusers(TINY), field: value}
    with pytest.raises(ValueError, match=field if field != "norm_num_groups" else "norm_groups"):
        vae_config_from_diffusers(d)


# -- 2. original ModelScope (LDM) parity ----------------------------------------------------------


@torch.no_grad()
def test_original_parity(original_pair):
    ref, ours = original_pair
    x = _images(h=32, w=24)
    want = ref.encode(x)
    got = ours.encode(x)
    assert max_diff(got.mean, want.mean) <= TOL
    assert max_diff(got.logvar, want.logvar) <= TOL
    assert max_diff(got.kl(), want.kl()) <= TOL * want.kl().abs().max().item()
    z = want.mean
    assert max_diff(ours.decode(z), ref.decode(z)) <= TOL


def test_original_config_inferred_from_tensors(original_pair):
    ref, ours = original_pair
    inferred = vae_config_from_original(ref.state_dict())
    # the checkpoint holds neither the scaling factor nor a tile size: those are the defaults
    assert inferred == dataclasses.replace(ours.config, sample_size=512, scaling_factor=0.18215)
    with pytest.raises(ValueError, match="norm_groups"):
        vae_config_to_original(dataclasses.replace(TINY, block_channels=(16, 32), norm_groups=16))
    with pytest.raises(ValueError, match="missing 'quant_conv.weight'"):
        vae_config_from_original({k: v for k, v in ref.state_dict().items() if k != "quant_conv.weight"})


def test_original_ddconfig_of_the_release():
    ddconfig = vae_config_to_original(VAE_PRESETS["ms-1.7b"])
    assert ddconfig["embed_dim"] == 4
    assert {k: v for k, v in ddconfig["ddconfig"].items() if k != "resolution"} == {
        "double_z": True, "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }


def test_original_lightning_prefix_and_strictness(original_pair):
    ref, ours = original_pair
    lightning = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    lightning["model.diffusion_model.x"] = torch.zeros(1)  # another model in the same checkpoint
    table = prefixed(vae_original_table(ours.config), src_prefix="first_stage_model.")
    other = lambda k: not k.startswith("first_stage_model.")  # noqa: E731
    out = apply_table(lightning, table, shapes_of(ours), ignore=other)
    assert set(out) == set(ours.state_dict())
    del lightning["first_stage_model.decoder.up.0.block.0.conv1.weight"]
    with pytest.raises(ConversionError, match="decoder.up.0.block.0.conv1.weight"):
        apply_table(lightning, table, shapes_of(ours), ignore=other)


# -- 3. video, slicing, tiling, sampling ----------------------------------------------------------


@torch.no_grad()
def test_video_is_per_frame_and_slicing_is_exact():
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(TINY), seed=3).eval()
    b, f = 2, 3
    video = torch.rand(b, 3, f, 16, 24) * 2 - 1
    post = model.encode(video)
    assert post.mean.shape == (b, 4, f, 8, 12)
    recon = model.decode(post.mean)
    assert recon.shape == video.shape
    for t in range(f):  # frame t of the video == image t (up to the conv kernels' batch-size rounding)
        frame = model.encode(video[:, :, t])
        assert max_diff(post.mean[:, :, t], frame.mean) <= 1e-5
        assert max_diff(post.logvar[:, :, t], frame.logvar) <= 1e-5
        assert max_diff(recon[:, :, t], model.decode(post.mean[:, :, t])) <= 1e-5

    def sliced(chunk):
        model.enable_slicing(chunk)
        try:
            return model.encode(video).moments, model.decode(post.mean)
        finally:
            model.disable_slicing()

    # oneDNN picks batch-size-dependent conv kernels (measured 5e-6 on outputs of magnitude ~3) ...
    for chunk in (1, 2, 4):
        moments, images = sliced(chunk)
        assert max_diff(moments, post.moments) <= 1e-5 and max_diff(images, recon) <= 1e-5
    # ... with the batch-invariant native kernels, slicing is bit-exact
    with torch.backends.mkldnn.flags(enabled=False):
        whole = model.encode(video).moments, model.decode(post.mean)
        for chunk in (1, 4):
            moments, images = sliced(chunk)
            assert torch.equal(moments, whole[0]) and torch.equal(images, whole[1])


@torch.no_grad()
def test_tiling_matches_diffusers(diffusers_pair):
    ref, ours = diffusers_pair
    x = _images(n=1, h=56, w=72, seed=4)  # larger than the 32-px tile in both directions
    z = ours.encode(x).mean
    plain = ours.encode(x).moments, ours.decode(z)
    ours.enable_tiling()  # tile = config.sample_size = 32 px, overlap 0.25
    ref.enable_tiling()
    try:
        tiled = ours.encode(x).moments, ours.decode(z)
        assert max_diff(tiled[0], ref._encode(x)) <= TOL
        assert max_diff(tiled[1], ref.decode(z).sample) <= TOL
        assert tiled[0].shape == plain[0].shape and tiled[1].shape == plain[1].shape
        # inputs no larger than a tile are not tiled at all
        small = _images(n=1, h=32, w=32)
        assert torch.equal(ours.encode(small).moments, ours._moments_untiled(small))
    finally:
        ours.disable_tiling()
        ref.disable_tiling()
    # The tiled result really differs (each tile has its own GroupNorm statistics and receptive field).
    assert max_diff(tiled[1], plain[1]) > 1e-3


@torch.no_grad()
def test_tiling_places_and_blends_tiles_exactly():
    """With pixel-local maps standing in for encoder and decoder, tiled == untiled: any difference
    would be a misplaced tile, a wrong crop or blend weights that do not sum to one."""
    model = AutoencoderKL(TINY)  # downsample factor 2, tile 32 px / 16 latent px
    calls = []

    def encode_local(x):  # n 3 h w -> n 8 h/2 w/2
        calls.append(tuple(x.shape[-2:]))
        return torch.nn.functional.avg_pool2d(x, 2).repeat(1, 3, 1, 1)[:, :8] * torch.arange(1.0, 9.0)[:, None, None]

    def decode_local(z):  # n 4 h w -> n 3 2h 2w
        calls.append(tuple(z.shape[-2:]))
        return torch.nn.functional.interpolate(z[:, :3] + z[:, 3:], scale_factor=2.0, mode="nearest")

    model._moments_untiled, model._images_untiled = encode_local, decode_local
    x = _images(n=2, h=56, w=72, seed=6)
    z = torch.randn(2, 4, 28, 36)
    want = model.encode(x).moments, model.decode(z)
    for overlap in (0.25, 0.5):
        model.enable_tiling(overlap=overlap)
        calls.clear()
        got = model.encode(x).moments
        assert len(calls) > 4  # tiled, in both directions
        assert max_diff(got, want[0]) <= 1e-6
        calls.clear()
        got = model.decode(z)
        assert len(calls) > 4
        assert max_diff(got, want[1]) <= 1e-6
    model.enable_tiling(tile_size=16, overlap=0.0)  # no overlap: pure tiling, bit-exact
    assert torch.equal(model.decode(z), want[1])


def test_tiling_arguments_are_checked():
    model = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="tile_size"):
        model.enable_tiling(tile_size=33)
    with pytest.raises(ValueError, match="overlap"):
        model.enable_tiling(overlap=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        model.enable_slicing(0)
    with pytest.raises(ValueError, match="x must be"):
        model.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="z must be"):
        model.decode(torch.zeros(4, 8, 8))


def test_sample_matches_diffusers_seeded():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 6, 10, generator=g)
    moments[:, 4:] = moments[:, 4:].clamp(-3, 1)
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    a = ours.sample(torch.Generator().manual_seed(7))
    b = ref.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, ours.sample(torch.Generator().manual_seed(8)))
    assert torch.equal(ours.mode(), ref.mode())
    assert max_diff(ours.kl(), ref.kl()) <= 1e-4
    # per-element generators, as diffusers' randn_tensor draws them
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    assert torch.equal(ours.sample(gens()), ref.sample(gens()))
    # logvar is clamped to [-30, 20] like the references
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 99.0)], 1))
    assert extreme.logvar.max().item() == 20.0


def test_video_sample_matches_diffusers_folded_frames():
    """The diffusers pipeline encodes `(b f) c h w` and samples there: same seed, same latents."""
    b, f = 2, 3
    moments = torch.randn(b, 8, f, 4, 6, generator=torch.Generator().manual_seed(0)).clamp(-3, 2)
    folded = moments.permute(0, 2, 1, 3, 4).reshape(b * f, 8, 4, 6)
    ours = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(3))
    ref = DiagonalGaussianDistribution(folded).sample(torch.Generator().manual_seed(3))
    assert torch.equal(ours, ref.reshape(b, f, 4, 4, 6).permute(0, 2, 1, 3, 4))
    assert DiagonalGaussian(moments).kl().shape == (b,)


# -- 4. sizes and table round trips ---------------------------------------------------------------


def test_released_size():
    with torch.device("meta"):
        model = AutoencoderKL(VAE_PRESETS["ms-1.7b"])
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 83.7
    assert VAE_PRESETS["ms-1.7b"].downsample_factor == 8


@pytest.mark.parametrize("name", list(CONFIGS))
def test_table_round_trips(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    ours = perturb_(AutoencoderKL(config), seed=5)
    state = ours.state_dict()
    with torch.device("meta"):
        diff_shapes = shapes_of(DiffusersAutoencoderKL(**vae_config_to_diffusers(config)))
        orig_shapes = shapes_of(modelscope_reference("autoencoder").AutoencoderKL(**vae_config_to_original(config)))
    for table, foreign_shapes in ((vae_diffusers_table(config), diff_shapes),
                                  (vae_original_table(config), orig_shapes)):
        foreign = apply_table(state, invert(table), foreign_shapes)
        back = apply_table(foreign, table, shapes_of(ours))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
    # ours -> original: the original's own config reader sees the same architecture
    original = apply_table(state, invert(vae_original_table(config)), orig_shapes)
    assert vae_config_from_original(original) == dataclasses.replace(config, sample_size=512)
