"""DeepCache (issue 16): the UNet cut at each skip connection reuses exactly the feature a full forward
computes (so at the same inputs the shallow branch's output is the full output, bit for bit), the schedules of
full steps (uniform, and the paper's non-uniform one as DeepCache's code computes it), the pipeline switch (an
interval of 1 is plain sampling; interval k runs the deep layers on every k-th step only), sample.py, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from modelscope_t2v.models.training_free import DeepCache, deepcache_full_steps
from modelscope_t2v.models.unet import UNet3D
from modelscope_t2v.pipelines import TextToVideoSDPipeline
from refs import perturb_
from test_unet import TINY

# three levels of two blocks, as Stable Diffusion's and ModelScope's four levels are laid out: 1 + 3 x 2 + 2 skips
THREE_LEVELS = dataclasses.replace(TINY, block_channels=(32, 32, 64), layers_per_block=2,
                                   attention_levels=(True, True, False))


@pytest.fixture(scope="module")
def pipe():
    p = TextToVideoSDPipeline.from_preset("tiny", seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, **kw):
    kw.setdefault("num_inference_steps", 6)
    kw.setdefault("num_frames", 4)
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


@pytest.mark.parametrize("config", [TINY, THREE_LEVELS], ids=["tiny", "three-levels"])
@torch.no_grad()
def test_every_branch_reuses_exactly_the_full_forwards_feature(config):
    torch.manual_seed(0)
    unet = UNet3D(config).eval()
    perturb_(unet)
    levels, layers = len(config.block_channels), config.layers_per_block
    assert unet.num_skips == 1 + levels * layers + (levels - 1)  # ms-1.7b: 1 + 4 x 2 + 3 = 12, DeepCache's SD count
    x = torch.randn(2, 4, 3, 8, 8)
    ctx = torch.randn(2, 5, config.cross_attention_dim)
    plain = unet(x, 500, ctx)
    other = unet(x, 300, ctx)
    gaps = []
    for branch in range(unet.num_skips):
        state = DeepCache(branch)
        assert torch.equal(unet(x, 500, ctx, deep_cache=state), plain)  # a full step: unchanged, and it stores
        assert state.feature is not None
        assert torch.equal(unet(x, 500, ctx, deep_cache=state), plain)  # the shallow branch at the same inputs
        gaps.append(float((unet(x, 300, ctx, deep_cache=state) - other).abs().max()))  # a stale deep feature
    assert all(g > 1e-4 for g in gaps)
    assert gaps[-1] < gaps[0]  # the deepest cut recomputes the most
    with pytest.raises(ValueError, match="deep_cache.branch must be in"):
        unet(x, 500, ctx, deep_cache=DeepCache(unet.num_skips))
    state = DeepCache(0)
    unet(x, 500, ctx, deep_cache=state)
    with pytest.raises(ValueError, match="start with a full step"):
        unet(x[:1], 500, ctx[:1], deep_cache=state)


def test_full_step_schedules():
    assert deepcache_full_steps(10, 3) == [0, 3, 6, 9] and deepcache_full_steps(5, 1) == [0, 1, 2, 3, 4]
    # DeepCache's stable_diffusion.py setting for SD 1.5 (50 PLMS steps, interval 5, pow 1.4, center 15)
    assert deepcache_full_steps(50, 5, uniform=False, pow=1.4, center=15) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    with pytest.raises(ValueError, match="cache_interval must be a positive int"):
        deepcache_full_steps(10, 0)


def test_pipeline_deepcache(pipe):
    plain = _run(pipe)
    calls = []
    hook = pipe.unet.mid_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe.enable_deepcache(cache_interval=1)
        assert np.array_equal(_run(pipe), plain)  # every step full: plain sampling, bit for bit
        calls.clear()
        pipe.enable_deepcache(cache_interval=3, cache_branch_id=0)
        cached = _run(pipe)
        assert len(calls) == 2  # steps 0 and 3 of 6 ran the deep layers
        other = TextToVideoSDPipeline.from_pipe(pipe)
        assert other.deepcache_enabled
        other.disable_deepcache()
        assert pipe.deepcache_enabled and np.array_equal(_run(other), plain)
    finally:
        hook.remove()
        pipe.disable_deepcache()
    assert np.isfinite(cached).all() and 1e-4 < np.abs(cached - plain).mean() < 0.5
    assert np.array_equal(_run(pipe), plain)


def test_bad_deepcache_settings_are_refused(pipe):
    n = pipe.unet.num_skips
    with pytest.raises(ValueError, match=f"cache_branch_id must be an int in \\[0, {n - 1}\\]"):
        pipe.enable_deepcache(cache_branch_id=n)
    with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
        pipe.enable_deepcache(cache_interval=0)
    with pytest.raises(ValueError, match="pow must be a number > 1"):
        pipe.enable_deepcache(uniform=False, pow=1.0)
    pipe.enable_deepcache()
    pipe.enable_sliding_windows(context_length=4)
    try:
        with pytest.raises(ValueError, match="enable_deepcache and enable_sliding_windows"):
            _run(pipe)
    finally:
        pipe.disable_sliding_windows()
        pipe.disable_deepcache()


def test_sample_py_deepcache(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sample
    from modelscope_t2v.data.decode import read_all_frames

    base = dict(prompt="a red circle", model="tiny", steps=4, num_frames=4, progress=False, device="cpu")
    out = sample.generate({**base, "deepcache": 2, "deepcache_branch": 1, "guidance_cache": 2, "guidance": 5.0,
                           "out": str(tmp_path / "a.mp4")})
    assert read_all_frames(out).shape[0] == 4
    with pytest.raises(ValueError, match="deepcache must be an integer >= 1"):
        sample.generate({**base, "deepcache": 0, "out": str(tmp_path / "b.mp4")})


def test_guidance_cache(pipe):
    plain = _run(pipe, guidance_scale=7.0)
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        pipe.enable_guidance_cache(cache_interval=1)
        assert np.array_equal(_run(pipe, guidance_scale=7.0), plain)  # both branches every step: plain guidance
        batches.clear()
        pipe.enable_guidance_cache(cache_interval=3)
        cached = _run(pipe, guidance_scale=7.0)
        assert batches == [2, 1, 1, 2, 1, 1]  # the unconditional branch on steps 0 and 3 only
        batches.clear()
        pipe.enable_deepcache(cache_interval=2)  # DeepCache's full steps 0, 2, 4 run both branches too
        both = _run(pipe, guidance_scale=7.0)
        assert batches == [2, 1, 2, 2, 2, 1]
        batches.clear()
        assert np.array_equal(_run(pipe, guidance_scale=1.0), _run(pipe.__class__.from_pipe(pipe), guidance_scale=1.0))
    finally:
        hook.remove()
        pipe.disable_guidance_cache()
        pipe.disable_deepcache()
    for v in (cached, both):
        assert np.isfinite(v).all() and 1e-4 < np.abs(v - plain).mean() < 0.5
    with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
        pipe.enable_guidance_cache(0)


def test_compile_traces_without_graph_breaks_and_keeps_the_numbers():
    # fullgraph=True fails on any graph break; the eager backend runs the traced graph with the same kernels
    pipe = TextToVideoSDPipeline.from_preset("tiny", seed=1)
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe, num_inference_steps=2)
    v2v_plain = pipe("a red circle", video=(plain[0] * 255).astype(np.uint8), num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0), output_type="np").frames
    torch._dynamo.reset()
    pipe.compile(backend="eager", fullgraph=True)
    try:
        assert np.array_equal(_run(pipe, num_inference_steps=2), plain)
        v2v = pipe("a red circle", video=(plain[0] * 255).astype(np.uint8), num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np").frames
        assert np.array_equal(v2v, v2v_plain)
    finally:
        torch._dynamo.reset()


def test_inference_feed_forward_in_place_and_self_chunked():
    import modelscope_t2v.models.unet as unet_module

    torch.manual_seed(0)
    unet = perturb_(UNet3D(TINY).eval())
    x, ctx = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, TINY.cross_attention_dim)
    with torch.enable_grad():
        graded = unet(x, 500, ctx).detach()  # weights need a gradient: the product out of place
    with torch.no_grad():
        inference = unet(x, 500, ctx)
        bounds = unet_module.AUTO_CHUNK_ELEMENTS, unet_module.FF_CHUNK_ELEMENTS
        # every feed-forward of this call chunked by itself, in pieces of a few rows
        unet_module.AUTO_CHUNK_ELEMENTS, unet_module.FF_CHUNK_ELEMENTS = 1000, 1000
        pieces = []
        hooks = [m.register_forward_hook(lambda m, a, o: pieces.append(1)) for m in unet.modules()
                 if isinstance(m, unet_module.GEGLUFeedForward)]
        try:
            chunked = unet(x, 500, ctx)
        finally:
            unet_module.AUTO_CHUNK_ELEMENTS, unet_module.FF_CHUNK_ELEMENTS = bounds
            for h in hooks:
                h.remove()
        assert len(pieces) > 3 * len(hooks)  # many chunks per feed-forward
    assert torch.equal(inference, graded)
    assert float((chunked - inference).abs().max()) <= 1e-5  # 2.1e-6 when written: the GEMMs block rows differently


@torch.no_grad()
def test_shared_text_projected_once_per_video():
    # one text per video (the usual call): the cross-attentions project it once and attend to it with the frames'
    # queries as one sequence; the same text given per frame, (b, f, n, d), is projected once per frame as the
    # references do. Same numbers up to GEMM round-off.
    from modelscope_t2v.models.unet import Attention, SpatialTransformer

    torch.manual_seed(0)
    unet = perturb_(UNet3D(TINY).eval())
    x, ctx = torch.randn(2, 4, 5, 8, 8), torch.randn(2, 7, TINY.cross_attention_dim)
    projected = []  # the batch each cross-attention's key projection sees
    hooks = [m.block.cross_attn.k_proj.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[0]))
             for m in unet.modules() if isinstance(m, SpatialTransformer)]
    try:
        shared = unet(x, 500, ctx)
        assert projected and set(projected) == {2}  # once per video
        projected.clear()
        per_frame = unet(x, 500, ctx[:, None].expand(-1, 5, -1, -1))
        assert set(projected) == {2 * 5}  # once per frame
    finally:
        for h in hooks:
            h.remove()
    assert float((shared - per_frame).abs().max()) <= 1e-5 * float(per_frame.abs().max())
    attn = perturb_(Attention(16, 2, 8, context_dim=12))
    q, text = torch.randn(6, 10, 16), torch.randn(2, 3, 12)
    assert torch.allclose(attn(q, text), attn(q, text.repeat_interleave(3, dim=0)), atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        attn(q, torch.randn(4, 3, 12))


def test_in_place_product_only_without_a_gradient_through_proj_in():
    # a frozen proj_in whose output still needs a gradient (a LoRA on it): the product stays out of place
    from torch import nn

    import modelscope_t2v.models.unet as unet_module

    ff = unet_module.GEGLUFeedForward(8)
    for p in ff.proj_in.parameters():
        p.requires_grad_(False)
    adapter = nn.Linear(8, 64, bias=False)

    class WithAdapter(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.weight = base.weight

        def forward(self, x):
            return self.base(x) + adapter(x)

    ff.proj_in = WithAdapter(ff.proj_in)
    x = torch.randn(2, 3, 8)
    out = ff(x)  # no "a view is being modified in place" error
    out.sum().backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
