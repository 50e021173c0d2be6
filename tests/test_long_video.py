"""Long videos and pinned frames (issue 14): FreeU, FreeNoise (windows, weights, noise rescheduling, the
windowed block), FreeInit's filter against diffusers; the pipeline switches equal to plain sampling where
they must be; image-to-video, last keyframe, loops, continuation; prompt travel; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelscope_t2v.diffusion.noise import free_init_lowpass, mix_frequencies, randn
from modelscope_t2v.models.training_free import FrameWindows, shuffled_context_noise
from modelscope_t2v.models.unet import TransformerBlock
from modelscope_t2v.pipelines import TextToVideoSDPipeline
from modelscope_t2v.pipelines.long_video import as_image
from refs import max_diff, perturb_
from test_unet import TINY, _diffusers_pair, _inputs


@pytest.fixture(scope="module")
def pipe():
    p = TextToVideoSDPipeline.from_preset("tiny", seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, prompt="a red circle", seed=0, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("num_frames", 8)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).frames


# ---------------------------------------------------------------------------------------------------
# Parity with diffusers' pieces.


@pytest.mark.parametrize("freeu", [(0.9, 0.2, 1.2, 1.4), (0.5, 0.7, 1.5, 0.8)])
def test_freeu_equals_diffusers_unet3d_enable_freeu(freeu):
    ref, ours = _diffusers_pair(TINY)
    x, t, ctx = _inputs(TINY, frames=3, size=(16, 16))
    ours.enable_freeu(*freeu)
    ref.enable_freeu(*freeu)
    with torch.no_grad():
        a, b = ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample
        ours.disable_freeu()
        plain = ours(x, t, ctx)
    assert max_diff(a, b) <= 1e-5 and max_diff(a, plain) > 1e-2  # FreeU changes the output, as diffusers'
    with pytest.raises(ValueError, match="s1 must be a finite number"):
        ours.enable_freeu(float("nan"), 0.2, 1.2, 1.4)


@pytest.mark.parametrize("length, stride, frames", [(16, 4, 48), (16, 4, 64), (16, 4, 25), (5, 2, 13), (4, 4, 20)])
def test_frame_windows_and_weights_are_diffusers_freenoise(length, stride, frames):
    from diffusers.models.attention import FreeNoiseTransformerBlock

    block = FreeNoiseTransformerBlock.__new__(FreeNoiseTransformerBlock)  # only its index/weight helpers
    block.context_length, block.context_stride = length, stride
    expected = block._get_frame_indices(frames)
    if expected[-1][1] != frames:  # diffusers appends this window in forward
        expected.append((frames - length, frames))
    for scheme in ("flat", "pyramid", "delayed_reverse_sawtooth"):
        windows = FrameWindows(length, stride, scheme)
        assert windows.windows(frames) == expected
        if not (scheme == "delayed_reverse_sawtooth" and length % 2):  # diffusers' odd sawtooth has length + 1 weights
            assert windows.weights() == block._get_frame_weights(length, scheme)
    assert FrameWindows(5, 2, "delayed_reverse_sawtooth").weights() == [0.01, 0.01, 3.0, 2.0, 1.0]  # its docstring's


def test_windowed_temporal_block_equals_diffusers_freenoise_block():
    """Our temporal TransformerBlock over windows against diffusers' FreeNoiseTransformerBlock with the same
    weights (two self-attentions, GEGLU), 24 frames in windows of 8 every 4."""
    from diffusers.models.attention import FreeNoiseTransformerBlock

    ref = perturb_(FreeNoiseTransformerBlock(16, 2, 8, double_self_attention=True, context_length=8, context_stride=4,
                                             weighting_scheme="pyramid"), 3).eval()
    ours = TransformerBlock(16, 2, 8, context_dim=None).eval()
    names = {"self_attn_norm": ref.norm1, "cross_attn_norm": ref.norm2, "ff_norm": ref.norm3}
    for ours_name, module in names.items():
        getattr(ours, ours_name).load_state_dict(module.state_dict())
    for mine, theirs in ((ours.self_attn, ref.attn1), (ours.cross_attn, ref.attn2)):
        mine.q_proj.weight.data.copy_(theirs.to_q.weight)
        mine.k_proj.weight.data.copy_(theirs.to_k.weight)
        mine.v_proj.weight.data.copy_(theirs.to_v.weight)
        mine.out_proj.load_state_dict(theirs.to_out[0].state_dict())
    ours.ff.proj_in.load_state_dict(ref.ff.net[0].proj.state_dict())
    ours.ff.proj_out.load_state_dict(ref.ff.net[2].state_dict())
    h = torch.randn(6, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(h, windows=FrameWindows(8, 4, "pyramid"))
        b = ref(h)
        whole = ours(h)
    assert max_diff(a, b) <= 1e-5 and max_diff(a, whole) > 1e-3


def test_windowed_block_runs_its_feed_forward_a_window_at_a_time(monkeypatch):
    """FreeNoise's memory: without a gradient the feed-forward (the largest activation of a long video) sees at most
    a window's frames at once; the output is the unchunked one's (with a gradient nothing is chunked)."""
    import modelscope_t2v.models.unet as unet_module

    monkeypatch.setattr(unet_module, "FF_CHUNK_ELEMENTS", 1000)  # windows are merged while under it: none here
    block = perturb_(TransformerBlock(16, 2, 8, context_dim=None), 1).eval()
    h = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(0))
    windows = FrameWindows(16, 4, "pyramid")
    seen = []
    hook = block.ff.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            chunked = block(h, windows=windows)
        assert seen == [16, 16, 8]
        seen.clear()
        with torch.enable_grad():
            whole = block(h, windows=windows).detach()
        assert seen == [40]
        seen.clear()
        with torch.no_grad():
            short = block(h[:, :16], windows=windows)  # one window: the plain block, bit for bit
            assert torch.equal(short, block(h[:, :16]))
    finally:
        hook.remove()
    assert max_diff(chunked, whole) <= 1e-5 * float(whole.abs().max())


def test_windowed_temporal_layer_runs_its_pixels_in_groups(monkeypatch):
    """FreeNoise's memory, inference: the temporal transformer's block sees the pixels' sequences a group at a time
    (each sequence is independent in it); the output is the ungrouped one's (with a gradient nothing is grouped)."""
    import modelscope_t2v.models.unet as unet_module

    monkeypatch.setattr(unet_module, "FF_CHUNK_ELEMENTS", 24 * 16 * 5)  # groups of 5 of the 2 x 4 x 4 = 32 pixels
    layer = perturb_(unet_module.TemporalTransformer(16, 2, 8, 4, position_embedding=True), 4).eval()
    layer.windows = FrameWindows(8, 4, "pyramid")
    x = torch.randn(2 * 24, 16, 4, 4, generator=torch.Generator().manual_seed(0))  # (b f) c h w
    seen, positions = [], []

    def record(module, args, kwargs, out):
        seen.append(args[0].shape[0])
        positions.append(kwargs["window_position"])

    hook = layer.block.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            grouped = layer(x, 24)
        with torch.enable_grad():
            whole = layer(x, 24).detach()
    finally:
        hook.remove()
    assert seen == [5] * 6 + [2, 32]
    assert max_diff(grouped, whole) <= 1e-5 * float(whole.abs().max())
    # the layer hands each window the positions 0 .. context_length - 1 (test_windows_see_frame_positions_...)
    expected = unet_module.timestep_embedding(torch.arange(8), 16)
    assert all(p is not None and torch.equal(p, expected) for p in positions)


@torch.no_grad()
def test_windows_see_frame_positions_from_their_own_start():
    """With a frame-position embedding, FreeNoise adds it to each window as positions 0 .. context_length - 1 (as
    diffusers' FreeNoise block applies its positional embedding per window): the frames only the last window holds
    come out as from a plain call on that window, not from positions past the trained length."""
    from modelscope_t2v.models.unet import timestep_embedding

    block = perturb_(TransformerBlock(16, 2, 8, context_dim=None), 2).eval()
    h = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(0))
    windows = FrameWindows(8, 4, "pyramid")  # the last window is frames 16-23; only it holds frames 20-23
    position = timestep_embedding(torch.arange(24), 16)  # 24 c
    out = block(h, windows=windows, window_position=position[:8])
    assert max_diff(out[:, 20:], block(h[:, 16:] + position[:8])[:, 4:]) <= 1e-5
    assert max_diff(out[:, :4], block(h[:, :8] + position[:8])[:, :4]) <= 1e-5  # the first window's own frames
    assert max_diff(out[:, 20:], block(h[:, 16:] + position[16:])[:, 4:]) > 1e-3  # absolute positions differ


def test_noise_rescheduling_equals_diffusers_shuffle_context():
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    stub = AnimateDiffFreeNoiseMixin()
    stub.vae_scale_factor = 8
    for frames, length, stride in ((48, 16, 4), (30, 16, 4), (21, 8, 3)):
        stub._free_noise_context_length, stub._free_noise_context_stride = length, stride
        stub._free_noise_noise_type = "shuffle_context"
        ref = stub._prepare_latents_free_noise(2, 4, frames, 16, 16, torch.float32, torch.device("cpu"),
                                               torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        ours = shuffled_context_noise(randn((2, 4, frames, 2, 2), g), FrameWindows(length, stride), g)
        assert torch.equal(ours, ref), (frames, length, stride)
        # every window's noise is a permutation of the first window's frames
        first = {tuple(v.flatten().tolist()) for v in ours[0, :, :length].permute(1, 0, 2, 3)}
        assert {tuple(v.flatten().tolist()) for v in ours[0, :, frames - length:].permute(1, 0, 2, 3)} <= first


def test_free_init_filter_and_mix_equal_diffusers():
    from diffusers.pipelines.free_init_utils import FreeInitMixin

    mixin = FreeInitMixin()
    shape = (1, 4, 6, 8, 10)
    x, noise = torch.randn(shape), torch.randn(shape)
    for method in ("butterworth", "gaussian", "ideal"):
        for ds, dt in ((0.25, 0.25), (0.4, 0.1)):
            ref = mixin._get_free_init_freq_filter(shape, "cpu", method, 4, ds, dt)
            ours = free_init_lowpass(shape, method, 4, ds, dt)
            assert torch.equal(ref[0, 0], ours)
            assert max_diff(mixin._apply_freq_filter(x, noise, ref), mix_frequencies(x, noise, ours)) <= 1e-6


# ---------------------------------------------------------------------------------------------------
# The pipeline switches.


def test_switches_equal_plain_sampling_where_they_must(pipe):
    plain = _run(pipe)
    pipe.enable_free_noise(context_length=8)  # one window: nothing changes, bit for bit
    assert np.array_equal(_run(pipe), plain)
    pipe.disable_free_noise()
    pipe.enable_sliding_windows(context_length=8)
    assert np.array_equal(_run(pipe), plain)
    pipe.disable_sliding_windows()
    pipe.enable_free_init(num_iters=1)
    assert np.array_equal(_run(pipe), plain)
    pipe.disable_free_init()
    assert np.array_equal(_run(pipe, prompt={0: "a red circle"}), plain)  # a one-entry prompt travel
    assert np.array_equal(_run(pipe), plain)  # every switch is off again


def test_free_noise_and_sliding_windows_on_a_long_video(pipe):
    plain = _run(pipe, num_frames=20)
    pipe.enable_free_noise(context_length=8, context_stride=4)
    try:
        free = _run(pipe, num_frames=20)
        travel = _run(pipe, prompt={0: "a red circle", 10: "a blue square"}, num_frames=20)
    finally:
        pipe.disable_free_noise()
    pipe.enable_sliding_windows(context_length=8, context_stride=4)
    try:
        sliding = _run(pipe, num_frames=20)
    finally:
        pipe.disable_sliding_windows()
    for v in (free, travel, sliding):
        assert v.shape == plain.shape and np.isfinite(v).all() and np.abs(v - plain).mean() > 1e-3
    assert np.abs(travel - free).mean() > 1e-4  # the second prompt reached the frames after 10


def test_sliding_windows_average_the_windows_predictions(pipe):
    pipe.enable_sliding_windows(context_length=4, context_stride=2, weighting_scheme="pyramid")
    try:
        x = torch.randn(1, 4, 10, 2, 2)
        calls = []

        def unet_call(xw, ctx):
            calls.append(xw.shape[2])
            return xw * 2 + ctx.mean()

        out = pipe._windowed_unet(unet_call, x, torch.ones(1, 3, 5))
    finally:
        pipe.disable_sliding_windows()
    assert calls == [4, 4, 4, 4] and torch.allclose(out, x * 2 + 1, atol=1e-6)  # windows (0,4) (2,6) (4,8) (6,10)


def test_windows_fuse_by_their_weights():
    # each window's output is its own index: a frame's value is the weighted mean of the windows holding it
    windows = FrameWindows(4, 2, "pyramid")  # windows (0,4) (2,6) (4,8) (6,10), weights 1 2 2 1
    spans = windows.windows(10)
    index = {(s.start, s.stop): k for k, s in enumerate(slice(*w) for w in spans)}
    out = windows.fuse(lambda w, frames: torch.full_like(w, float(index[(frames.start, frames.stop)])),
                       torch.zeros(1, 10, 3), dim=1)
    w = windows.weights()
    expect = []
    for f in range(10):
        held = [(k, w[f - a]) for k, (a, b) in enumerate(spans) if a <= f < b]
        expect.append(sum(k * wt for k, wt in held) / sum(wt for _, wt in held))
    assert spans == [(0, 4), (2, 6), (4, 8), (6, 10)] and w == [1.0, 2.0, 2.0, 1.0]
    assert torch.allclose(out[0, :, 0], torch.tensor(expect), atol=1e-6)
    assert abs(expect[2] - 1 / 3) < 1e-9  # frame 2: window 0 (weight 2) and window 1 (weight 1)


def test_free_noise_is_the_pipelines_own_switch(pipe):
    # the windows go on the shared UNet only during this pipeline's calls: from_pipe and later calls are unaffected
    plain = _run(pipe, num_frames=12)
    pipe.enable_free_noise(context_length=8, context_stride=4)
    try:
        other = TextToVideoSDPipeline.from_pipe(pipe)
        other.disable_free_noise()
        free = _run(pipe, num_frames=12)
        assert np.array_equal(_run(other, num_frames=12), plain)
        assert all(getattr(m, "windows", None) is None for m in pipe.unet.modules())
        assert TextToVideoSDPipeline.from_pipe(pipe).free_noise_enabled
    finally:
        pipe.disable_free_noise()
    assert np.abs(free - plain).mean() > 1e-4 and np.array_equal(_run(pipe, num_frames=12), plain)


def test_prompt_travel_interpolates_between_keyframes(pipe):
    ctx = pipe._travel_embeddings({0: "a red circle", 6: "a blue square"}, 10, False, None, 1, None)
    a, _ = pipe.encode_prompt(["a red circle"], "cpu", 1, False)
    b, _ = pipe.encode_prompt(["a blue square"], "cpu", 1, False)
    assert ctx.shape == (1, 10, *a.shape[1:])
    assert torch.allclose(ctx[0, 0], a[0]) and torch.allclose(ctx[0, 6], b[0]) and torch.allclose(ctx[0, 9], b[0])
    assert torch.allclose(ctx[0, 3], (a[0] + b[0]) / 2, atol=1e-6)
    guided = pipe._travel_embeddings({2: "a red circle"}, 4, True, None, 2, None)
    assert guided.shape[:2] == (4, 4) and torch.allclose(guided[2, 0], a[0])  # uncond first, the first prompt from 0


def test_free_init_runs_its_iterations_and_fast_sampling_steps(pipe):
    steps = []
    pipe.enable_free_init(num_iters=3, use_fast_sampling=True)
    try:
        out = _run(pipe, num_inference_steps=6, callback=lambda i, t, x: steps.append(int(t)))
        assert [pipe.free_init_steps(6, i) for i in range(3)] == [2, 4, 6] and len(steps) == 12
    finally:
        pipe.disable_free_init()
    assert np.isfinite(out).all() and np.abs(out - _run(pipe, num_inference_steps=6)).mean() > 1e-4


# ---------------------------------------------------------------------------------------------------
# Pinned frames.


def _decoded_mean(pipe, frames, size: int | None = None) -> np.ndarray:
    """What a pinned frame ends as: the autoencoder's posterior mean, decoded."""
    x = pipe.preprocess_video(list(frames), size, size)  # 1 3 f h w
    z = pipe.vae.encode(x[0].permute(1, 0, 2, 3)).mode()
    return ((pipe.vae.decode(z).permute(0, 2, 3, 1).detach().numpy() + 1) / 2).clip(0, 1)


def test_image_to_video_last_image_and_continuation_pin_their_frames(pipe):
    from PIL import Image

    plain = _run(pipe)[0]
    size = plain.shape[1]  # the tiny preset's frames are size x size
    rng = np.random.default_rng(0)
    first, last = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2))
    small = Image.fromarray(first).resize((size // 2, size // 2))
    v = _run(pipe, image=small, last_image=torch.from_numpy(last).permute(2, 0, 1))[0]
    # the image is resized to the video's size as video inputs are; the pins end as their means, exactly
    assert np.allclose(v[0], _decoded_mean(pipe, [small], size)[0], atol=1e-5)
    assert np.allclose(v[-1], _decoded_mean(pipe, [last])[0], atol=1e-5)
    assert np.abs(v[1:-1] - plain[1:-1]).mean() > 1e-4  # the rest was denoised around them
    clip = (plain * 255).round().astype(np.uint8)
    cont = _run(pipe, init_video=clip, num_init_frames=3)[0]
    assert np.allclose(cont[:3], _decoded_mean(pipe, clip[-3:]), atol=1e-5)
    soft = _run(pipe, image=first, image_strength=0.5)[0]
    assert not np.allclose(soft[0], v[0], atol=1e-3)  # a partial pin is not the image
    seen = {}
    for noise in (1.0, 0.6):  # the pinned frame is re-noised to pin_noise x t: cleaner early on, the same at the end
        out = _run(pipe, image=first, pin_noise=noise, callback=lambda i, t, x, n=noise: seen.setdefault(n, x[:, :, 0].clone()))
        assert np.allclose(out[0, 0], _decoded_mean(pipe, [first], size)[0], atol=1e-5)
    assert not torch.allclose(seen[1.0], seen[0.6])


@pytest.mark.parametrize("sampler, spacing", [("ddim", "trailing"), ("ddim", "linspace"), ("dpm", "trailing"), ("dpm", "leading")])
def test_pinned_frames_follow_the_forward_process_where_each_step_lands(pipe, sampler, spacing):
    # after step i the pinned latent is q(x_t | mean) at pin_noise x the timestep the step landed on: DDIM's
    # t - T // n (not timesteps[i + 1] for trailing / linspace), DPM-Solver's next timestep, off its schedule
    from modelscope_t2v.diffusion.schedule import add_noise
    from modelscope_t2v.schedulers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    base = pipe.scheduler
    pipe.scheduler = cls.from_config(base.config, timestep_spacing=spacing)
    try:
        image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        start = randn(pipe._latent_shape(1, 16, 16, 6), torch.Generator().manual_seed(3), "cpu", torch.float32)
        seen = []
        _run(pipe, image=image, pin_noise=0.6, num_frames=6, num_inference_steps=4, latents=start,
             height=16, width=16, callback=lambda i, t, x: seen.append(x[:, :, 0].clone()))
        pixels = pipe.preprocess_video([as_image(image)], 16, 16)[:, :, 0]
        mean = pipe.vae.encode(pixels).mode() * pipe.vae.config.scaling_factor
        landing = pipe.scheduler.landing_timesteps().tolist()
    finally:
        pipe.scheduler = base
    if sampler == "ddim":
        assert landing[:3] == [t - 250 for t in pipe_timesteps(cls, base, spacing)[:3]]
    abar = pipe.scheduler.alphas_cumprod if sampler == "ddim" else cls.from_config(base.config).alphas_cumprod
    for i, t in enumerate(landing):
        expect = mean if t < 0 else add_noise(mean, start[:, :, 0], abar, round(t * 0.6))
        assert torch.allclose(seen[i], expect, atol=1e-5), (i, t)


def pipe_timesteps(cls, base, spacing):
    s = cls.from_config(base.config, timestep_spacing=spacing)
    s.set_timesteps(4)
    return s.timesteps.tolist()


def _perturbed_sampler():
    """A tiny pipeline with perturbed weights (its temporal convs are not the identity), 8 frames of starting latents,
    and sample(latents, **kw): 3 steps from them, the latents out."""
    looped = TextToVideoSDPipeline.from_preset("tiny", seed=0)
    perturb_(looped.unet, 1)
    looped.set_progress_bar_config(disable=True)
    start = randn(looped._latent_shape(1, None, None, 8), torch.Generator().manual_seed(5), "cpu", torch.float32)

    def sample(latents, **kw):
        return looped("a red circle", latents=latents, num_frames=8, num_inference_steps=3, output_type="latent",
                      **kw).frames

    return looped, start, sample


def test_closed_loop_windows_wrap_around_and_loop_long_videos():
    """A long loop: FreeNoise's windows (and the sliding windows) closed into a loop start at every multiple of the
    stride and wrap around; with them the UNet, and a looped sampling, commute with rolling the frames by the stride."""
    from modelscope_t2v.models.unet import FrameConv

    w = FrameWindows(4, 2, "pyramid", closed_loop=True)
    assert w.windows(8) == [(0, 4), (2, 6), (4, 8), (6, 10)] and w.windows(4) == [(0, 4)]
    assert FrameWindows(4, 2).looped() == w and FrameWindows(4, 2).windows(8) == [(0, 4), (2, 6), (4, 8)]
    h = torch.randn(3, 8, 5)
    assert torch.allclose(w.fuse(lambda x, _: x, h), h, atol=1e-6)  # the weights are normalised
    seen = []
    fused = w.fuse(lambda x, frames: seen.append(frames) or torch.ones_like(x) * len(seen), h)
    assert torch.equal(seen[-1], torch.tensor([6, 7, 0, 1]))  # the last window wraps around to frames 0, 1
    # frame 0: weight 1 in window 1 (its first frame), 2 in window 4 (its third): (1 * 1 + 2 * 4) / 3
    assert torch.allclose(fused[:, 0], torch.full((3, 5), 3.0))

    _, unet = _diffusers_pair(TINY)
    x, t, ctx = _inputs(TINY, frames=8, size=(16, 16))
    roll = lambda v, k=2: torch.roll(v, k, dims=2)  # noqa: E731
    with torch.no_grad(), unet.circular_frames():
        with unet.windowed(w):
            assert max_diff(unet(roll(x), t, ctx), roll(unet(x, t, ctx))) <= 1e-5
        with unet.windowed(FrameWindows(4, 2, "pyramid")):  # open windows: the ends are ends
            assert max_diff(unet(roll(x), t, ctx), roll(unet(x, t, ctx))) > 1e-3

    looped, start, sample = _perturbed_sampler()

    for enable in (looped.enable_free_noise, looped.enable_sliding_windows):
        enable(context_length=4, context_stride=2)
        try:
            assert max_diff(sample(roll(start), loop=True), roll(sample(start, loop=True))) <= 1e-4
            assert max_diff(sample(roll(start)), roll(sample(start))) > 1e-2
        finally:
            looped.disable_free_noise()
            looped.disable_sliding_windows()
    assert not any(m.circular for m in looped.unet.modules() if isinstance(m, FrameConv))
    assert all(m.windows is None for m in looped.unet.modules() if hasattr(m, "windows") and not callable(m.windows))


def test_what_wraps_around_in_a_loop(pipe):
    """Inside sliding windows nothing wraps (a window's ends are not neighbours, nor FreeNoise's windows inside it);
    video-to-video loops too (upscaling a loop); shuffled FreeNoise noise over a length that is not a multiple of
    the context would repeat inside a window across the seam, and is refused."""
    from modelscope_t2v.models.unet import FrameConv, TemporalTransformer

    seen = []

    def record(module, args):
        windows = {m.windows for m in module.modules() if isinstance(m, TemporalTransformer)}
        seen.append((args[0].shape[2], {w.closed_loop if w else None for w in windows},
                     {m.circular for m in module.modules() if isinstance(m, FrameConv)}))

    handle = pipe.unet.register_forward_pre_hook(record)
    try:
        pipe.enable_free_noise(context_length=4, context_stride=2)
        pipe.enable_sliding_windows(context_length=8, context_stride=4)
        _run(pipe, loop=True, num_frames=16, num_inference_steps=1)
        assert seen and all(s == (8, {False}, {False}) for s in seen)  # 8-frame windows, open inside
        pipe.disable_sliding_windows()
        seen.clear()
        _run(pipe, loop=True, num_frames=16, num_inference_steps=1)
        assert seen and all(s == (16, {True}, {True}) for s in seen)  # the whole video: everything wraps
        seen.clear()
        with pytest.raises(ValueError, match="noise_type='shuffle_context': the rescheduled noise repeats every "
                                             "context_length \\(4\\) frames"):
            _run(pipe, loop=True, num_frames=10)
        assert not seen
        pipe.enable_free_noise(context_length=4, context_stride=2, noise_type="random")
        assert _run(pipe, loop=True, num_frames=10, num_inference_steps=1).shape[1] == 10
        pipe.disable_free_noise()
        seen.clear()
        video = np.zeros((8, 16, 16, 3), np.uint8)
        pipe(prompt="a red circle", video=video, strength=0.5, num_inference_steps=2, loop=True, output_type="np")
        assert seen and all(s == (8, {None}, {True}) for s in seen)  # video-to-video: a loop stays one
    finally:
        handle.remove()
        pipe.disable_free_noise()
        pipe.disable_sliding_windows()


def test_loop_wraps_the_temporal_convs_around(pipe):
    """loop=True: the temporal convs pad by wrapping around for the call, so a UNet without a frame-position embedding
    is equivariant to rolling the frames, and so is a looped sampling: the video has no first or last frame."""
    from modelscope_t2v import lora
    from modelscope_t2v.lora.targets import LoraSpec
    from modelscope_t2v.models.unet import FrameConv

    _, unet = _diffusers_pair(TINY)  # perturbed: its temporal convs are not the identity
    x, t, ctx = _inputs(TINY, frames=6, size=(16, 16))
    roll = lambda v, k=2: torch.roll(v, k, dims=2)  # noqa: E731
    with torch.no_grad():
        assert max_diff(unet(roll(x), t, ctx), roll(unet(x, t, ctx))) > 1e-3  # zero padding: frames have an order
        with unet.circular_frames():
            assert max_diff(unet(roll(x), t, ctx), roll(unet(x, t, ctx))) <= 1e-5
        assert not any(m.circular for m in unet.modules() if isinstance(m, FrameConv))  # put back after the block
        # an unfused LoRA on the temporal convs wraps around too (its down-projection is a Conv3d of its own)
        lora.add_adapter(unet, "t", LoraSpec(rank=2, target="temporal_conv"))
        for name, p_ in lora.adapter_parameters(unet, "t").items():
            p_.copy_(torch.randn_like(p_) * 0.3)
        downs = [m for n, m in unet.named_modules() if n.endswith("lora_A.t")]
        assert downs and all(isinstance(m, FrameConv) for m in downs)  # peft builds them as the base layer's type
        with unet.circular_frames():
            assert max_diff(unet(roll(x), t, ctx), roll(unet(x, t, ctx))) <= 1e-5
        assert not any(m.circular for m in unet.modules() if isinstance(m, FrameConv))
        with pytest.raises(RuntimeError, match="inside"), unet.circular_frames():
            raise RuntimeError("inside")
        assert not any(m.circular for m in unet.modules() if isinstance(m, FrameConv))  # put back on an error too

    looped, start, sample = _perturbed_sampler()

    assert max_diff(sample(roll(start, 3), loop=True), roll(sample(start, loop=True), 3)) <= 1e-4
    assert max_diff(sample(roll(start, 3)), roll(sample(start), 3)) > 1e-2  # without the loop the ends are ends
    assert not any(m.circular for m in looped.unet.modules() if isinstance(m, FrameConv))
    # prompt travel keys index the video's frames; the video keeps its length
    with pytest.raises(ValueError, match="integer frame indices in \\[0, 8\\)"):
        _run(pipe, loop=True, prompt={0: "a red circle", 8: "a blue square"})
    assert _run(pipe, loop=True, prompt={0: "a red circle", 4: "a blue square"}).shape[1] == 8
    assert _run(pipe, loop=True, num_frames=1).shape[1] == 1  # a frame that is its own neighbour

def test_generate_continued_chains_clips(pipe):
    long = pipe.generate_continued("a red circle", num_clips=3, num_init_frames=2, num_frames=6,
                                   num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert long.shape[0] == 6 + 4 + 4 and long.shape[3] == 3 and np.isfinite(long).all()
    # what it chains: each clip continues the last 2 frames of the one before, from the same generator
    g = torch.Generator().manual_seed(0)
    first = _run_with(pipe, g, num_frames=6, num_inference_steps=2)
    second = _run_with(pipe, g, num_frames=6, num_inference_steps=2, init_video=first, num_init_frames=2)
    assert np.array_equal(long[:10], np.concatenate([first, second[2:]]))
    # the pinned frames of the second clip are the first clip's last two, through the autoencoder
    assert np.allclose(second[:2], _decoded_mean(pipe, (first * 255).round().astype(np.uint8)[-2:]), atol=2e-2)
    for kw, message in ((dict(num_init_frames=6), "num_init_frames must be an int in \\[1, num_frames=6\\)"),
                        (dict(loop=True), "loop does not apply to chained clips"),
                        (dict(last_image=np.zeros((8, 8, 3), np.uint8)), "last_image does not apply"),
                        (dict(latents=torch.zeros(1)), "latents is set per clip")):
        with pytest.raises(ValueError, match=message):
            pipe.generate_continued("a red circle", num_clips=2, **{"num_init_frames": 2, "num_frames": 6, **kw})


def _run_with(pipe, generator, **kw):
    return np.asarray(pipe("a red circle", generator=generator, output_type="np", **kw).frames[0])


@pytest.mark.parametrize("call, error, message", [
    (dict(image="frame.png"), TypeError, "image must be a PIL image"),
    (dict(image=np.zeros((4, 4)), num_frames=8), TypeError, "image must be a PIL image"),
    (dict(loop=True, last_image=np.zeros((8, 8, 3), np.uint8)), ValueError, "cannot also take a last_image"),
    (dict(loop="yes"), TypeError, "loop must be True or False"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), image_strength=2), ValueError, "image_strength must be in"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), pin_noise=-0.1), ValueError, "pin_noise must be in"),
    (dict(num_init_frames=2), ValueError, "num_init_frames needs init_video"),
    (dict(init_video=np.zeros((2, 16, 16, 3), np.uint8), num_init_frames=3), ValueError, "needs at least 3"),
    (dict(init_video=np.zeros((9, 16, 16, 3), np.uint8), num_init_frames=8), ValueError, "8 pinned frames for a clip of 8 frames leave none"),
    (dict(init_video=np.zeros((9, 16, 16, 3), np.uint8), num_init_frames=0), ValueError, "num_init_frames must be an integer >= 1"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), video=np.zeros((8, 16, 16, 3), np.uint8)), ValueError, "text-to-video options"),
])
def test_bad_pins_are_refused_before_work(pipe, call, error, message):
    with pytest.raises(error, match=message):
        _run(pipe, **call)


def test_bad_long_video_settings_are_refused(pipe):
    with pytest.raises(ValueError, match="context_stride must be a positive int"):
        pipe.enable_free_noise(context_stride=0)
    with pytest.raises(ValueError, match="context_stride .* must be <= context_length"):
        pipe.enable_free_noise(context_length=4, context_stride=6)
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        pipe.enable_sliding_windows(weighting_scheme="gauss")
    with pytest.raises(ValueError, match="noise_type must be one of"):
        pipe.enable_free_noise(noise_type="fresh")
    with pytest.raises(ValueError, match="method must be one of"):
        pipe.enable_free_init(method="box")
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        pipe.enable_free_init(order=0)
    with pytest.raises(ValueError, match="num_iters must be an integer >= 1"):
        pipe.enable_free_init(num_iters=0)
    with pytest.raises(TypeError, match="prompt_interpolation_callback must be callable"):
        pipe.enable_free_noise(prompt_interpolation_callback="slerp")
    from modelscope_t2v.schedulers import DDIMScheduler

    base = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(base.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.enable_free_init(num_iters=2)
    try:
        with pytest.raises(ValueError, match="FreeInit re-noises each result to t=999, where this scheduler keeps no signal"):
            _run(pipe)
    finally:
        pipe.disable_free_init()
        pipe.scheduler = base
    with pytest.raises(ValueError, match="without prompt_embeds or negative_prompt_embeds"):
        _run(pipe, prompt={0: "a red circle"}, negative_prompt_embeds=torch.zeros(1, 77, 32))
    pipe.enable_free_noise(context_length=16)
    try:
        with pytest.raises(ValueError, match="context_length 16 is longer than the video \\(8 frames\\)"):
            _run(pipe)
    finally:
        pipe.disable_free_noise()
    with pytest.raises(ValueError, match="integer frame indices in \\[0, 8\\)"):
        _run(pipe, prompt={9: "a red circle"})

def test_sample_py_image_to_video_loops_and_chained_clips(tmp_path):
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sample
    from modelscope_t2v.data.decode import read_all_frames

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "start.png")
    base = dict(prompt="a red circle", model="tiny", steps=2, num_frames=6, progress=False, device="cpu")
    with pytest.raises(ValueError, match="windows of 16 frames; num_frames=6 is shorter"):
        sample.generate({**base, "free_noise": True, "out": str(tmp_path / "a.mp4")})
    out = sample.generate({**base, "num_frames": 20, "image": str(tmp_path / "start.png"), "free_noise": True,
                           "out": str(tmp_path / "a.mp4")})
    assert read_all_frames(out).shape[0] == 20
    out = sample.generate({**base, "loop": True, "freeu": [0.9, 0.2, 1.2, 1.4], "out": str(tmp_path / "b.mp4")})
    assert read_all_frames(out).shape[0] == 6
    out = sample.generate({**base, "clips": 3, "clip_overlap": 2, "out": str(tmp_path / "c.mp4")})
    assert read_all_frames(out).shape[0] == 6 + 4 + 4
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="image: .*notes.png' is not an image file"):
        sample.generate({**base, "image": str(tmp_path / "notes.png"), "out": str(tmp_path / "d.mp4")})
    with pytest.raises(ValueError, match="cannot also take last_image"):
        sample.generate({**base, "loop": True, "last_image": str(tmp_path / "start.png"), "out": str(tmp_path / "e.mp4")})
    out = sample.generate({**base, "loop": True, "num_frames": 32, "free_noise": True, "out": str(tmp_path / "f.mp4")})
    assert read_all_frames(out).shape[0] == 32


# ---------------------------------------------------------------------------------------------------
# The measurements (eval/long_video.py), on the shapes renderer's own clips: known answers.


class _RendererPipe:
    """Stands in for a pipeline: the shapes renderer's clip for the prompt and the generator's seed (its
    object enters at a random place, so a pinned `image` is the renderer's first frame only by its seed)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, num_frames=16, generator=None, **kw):
        from types import SimpleNamespace

        from modelscope_t2v.data.shapes import parse_shapes_caption, render_shape_clip

        self.calls.append(kw)
        color, shape, direction = parse_shapes_caption(prompt)
        clip = render_shape_clip(color, shape, direction, seed=generator.initial_seed(), num_frames=num_frames)
        return SimpleNamespace(frames=[((clip.permute(1, 2, 3, 0).numpy() + 1) / 2).clip(0, 1)])


def test_long_video_measures_read_the_renderers_clips_as_prompted():
    from modelscope_t2v.eval import long_video as lv
    from modelscope_t2v.eval.shapes import prompt_seed_pairs

    pairs = prompt_seed_pairs(4)
    fake = _RendererPipe()
    r, videos = lv.measure(fake, pairs, "plain", 32, steps_=2, guidance=1.0)
    assert r.windows == 8 and r.window_color == r.window_shape == 1.0  # two windows of each 32-frame clip
    assert r.jump_within_2x == 1.0 and r.jump_max < 2  # constant speed: every step near the median
    r16, _ = lv.measure(fake, pairs, "plain", 16, steps_=2, guidance=1.0)
    assert r16.extra["direction"] == 1.0 and r16.extra["loop_gap_median"] > 2  # a moving object does not loop
    loop, looped = lv.measure(fake, pairs, "loop", 32, steps_=2, guidance=1.0, pin_noise=0.3)
    assert fake.calls[-1] == dict(loop=True, pin_noise=0.3, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    assert looped[0].shape[0] == 32 and loop.extra["loop_gap_median"] > 2  # a loop of any length, its gap measured
    jumpy = videos[0].copy()
    jumpy[20:] = np.roll(jumpy[20:], 12, axis=2)  # the object jumps 12 pixels at frame 20
    assert lv.jump_ratio(jumpy) > 4 and lv.jump_ratio(jumpy, [20]) == lv.jump_ratio(jumpy)
    assert lv.jump_ratio(videos[0], [20]) < 2
    gone = videos[0].copy()
    gone[5] = 0  # a vanished object is an infinite jump
    assert lv.jump_ratio(gone) == float("inf")
    assert lv.psnr(videos[0][0], videos[0][0]) == float("inf") and 0 < lv.psnr(videos[0][0], videos[0][8]) < 30


def test_the_worlds_own_long_video_loses_its_object(tmp_path):
    """The shapes world's physics bound what a faithful long video can score (docs/long_video.md): its clips,
    continued at their own speed, keep the object wholly inside for at most WORLD_FRAMES_INSIDE frames."""
    import json

    import evaluate
    from modelscope_t2v.data.shapes import render_shape_clip
    from modelscope_t2v.eval import long_video as lv
    from modelscope_t2v.eval.shapes import prompt_seed_pairs

    clip = render_shape_clip("red", "circle", "left", seed=3)
    longer = render_shape_clip("red", "circle", "left", seed=3, num_frames=48, clip_frames=16)
    assert torch.equal(longer[:, :16], clip) and longer.shape[1] == 48  # the clip, then its continuation
    assert lv.WORLD_FRAMES_INSIDE == 34 and abs(lv.WORLD_STEP_MIN - 0.024) < 1e-12
    with pytest.raises(ValueError, match="a clip of one frame has no speed"):
        render_shape_clip("red", "circle", "left", seed=3, num_frames=4, clip_frames=1)
    # the slowest, smallest triangle moving up: wholly inside for as many frames as the bound allows, no more
    class Slowest:  # the renderer's draws: smallest extent, centred across, least travel, starting 2 px off the edge
        def __init__(self):
            self.picks = iter([lambda lo, hi: lo, lambda lo, hi: (lo + hi) / 2, lambda lo, hi: lo,
                               lambda lo, hi: lo, lambda lo, hi: lo + 2])

        def uniform(self, lo, hi):
            return next(self.picks)(lo, hi)

    tri = render_shape_clip("white", "triangle", "up", rng=Slowest(), num_frames=64, clip_frames=16)
    tri = ((tri.permute(1, 2, 3, 0).numpy() + 1) / 2).clip(0, 1)
    assert 30 <= lv.inside(tri).sum() <= lv.WORLD_FRAMES_INSIDE
    pairs = prompt_seed_pairs(12)
    for prompt, seed in pairs:
        v = lv.world_video(prompt, seed, 64)
        assert lv.inside(v).sum() <= lv.WORLD_FRAMES_INSIDE and not lv.inside(v)[-1]  # it has left
        assert lv.speed(v) >= lv.WORLD_STEP_MIN * lv.WORLD_SPEED_TOLERANCE  # no world clip is slower (to rounding)
    r, _ = lv.measure(None, pairs, "world", 48, steps_=0, guidance=None)
    assert r.jump_within_2x == 0 and r.extra["smooth_at_world_speed"] == 0 and r.window_shape < 0.8
    assert r.extra["speed_over_world_min"] >= 1 and r.extra["frames_inside"] <= 33 / 48
    r16, _ = lv.measure(None, pairs, "world", 16, steps_=0, guidance=None)
    assert r16.window_shape == 1 and r16.extra["smooth_at_world_speed"] == 1
    # a stopped object has speed 0; a slow one is measured as slow; one on the border is not inside
    still = np.repeat(lv.world_video(*pairs[0], 16)[:1], 16, axis=0)
    assert lv.speed(still) == pytest.approx(0, abs=1e-9)
    clip16 = lv.world_video(*pairs[0], 16)
    half = np.repeat(clip16, 2, axis=0)  # every frame twice: half the speed
    assert lv.speed(half) == pytest.approx(lv.speed(clip16) / 2, rel=0.05)
    edge = still.copy()
    edge[:, :, 0] = 1.0  # a white column on the left border
    assert not lv.inside(edge).any() and lv.inside(still).all()
    with pytest.raises(ValueError, match="margin must be an int >= 1"):
        lv.inside(still, margin=0)
    # evaluate.py --long world needs no model and no sampler setting
    assert evaluate.main(["--long", "world", "--frames", "16", "48", "--pairs", "4", "--settings", "none",
                          "--out", str(tmp_path / "w.json")]) == 0
    rows = json.loads((tmp_path / "w.json").read_text())["rows"]
    assert [(r["mode"], r["num_frames"], r["sampler"]) for r in rows] == [("world", 16, None), ("world", 48, None)]
    assert json.loads((tmp_path / "w.json").read_text())["settings"] is None


def test_evaluate_long_modes_switch_the_pipeline_as_named(monkeypatch, tmp_path):
    """evaluate.py --long: each mode measures what it names (FreeNoise / sliding windows on, loop=True or not)."""
    import evaluate
    from modelscope_t2v.eval import long_video as lv

    seen = []

    def fake_measure(pipe, pairs, mode, num_frames, **kw):
        seen.append((mode, num_frames, pipe.free_noise_enabled, pipe._sliding_windows is not None))
        return lv.LongResult(mode, num_frames, len(pairs), 0.0), []

    monkeypatch.setattr(lv, "measure", fake_measure)
    modes = ["plain", "free-noise", "sliding", "loop", "free-noise-loop", "sliding-loop"]
    assert evaluate.main(["--long", *modes, "--frames", "32", "--pairs", "1", "--settings", "ddim:1",
                          "--out", str(tmp_path / "r.json")]) == 0
    assert seen == [("plain", 32, False, False), ("plain", 32, True, False), ("sliding", 32, False, True),
                    ("loop", 32, False, False), ("loop", 32, True, False), ("loop", 32, False, True)]
