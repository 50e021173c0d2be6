"""T2V-Turbo-MS: the release layout (a cloneofsimo `unet_lora.pt` beside ModelScope 1.7B, from hub ids offline)
loads, and sampling equals the release's recipe rebuilt from diffusers' parts (UNet3DConditionModel with
time_cond_proj_dim=256, the LoRA collapsed into it, LCMScheduler on T2V-Turbo's timesteps, the guidance
embedding of w itself); the guidance-embedding init is what diffusers draws from a generator at torch's old default
seed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from checkpoints import install_in_hub_cache, make_diffusers_checkpoint
from modelscope_t2v import DiffusionPipeline, T2VTurboMSPipeline
from modelscope_t2v.formats.lora_layout import LoraFormatError, diffusers_module_order
from modelscope_t2v.formats.unet_layout import unet_config_to_diffusers
from modelscope_t2v.models import UNET_PRESETS
from modelscope_t2v.pipelines.t2v_turbo import TORCH_DEFAULT_SEED, demo_cond_proj_weight
from refs import max_diff

TINY = UNET_PRESETS["tiny"]
PROMPT = "a red circle moving left"
KW = dict(num_frames=3, height=32, width=32)


def test_the_demo_cond_proj_init_is_what_diffusers_draws_from_the_old_default_seed(tmp_path):
    # torch 2.13 and 2.14 seed a new process's generator at random; the seed is set as older releases left it
    config = {**unet_config_to_diffusers(TINY), "time_cond_proj_dim": 256}
    out = tmp_path / "w.pt"
    code = ("import torch, json, sys\nfrom diffusers import UNet3DConditionModel\n"
            f"torch.manual_seed({TORCH_DEFAULT_SEED})\n"
            f"u = UNet3DConditionModel.from_config(json.loads({repr(__import__('json').dumps(config))}))\n"
            f"torch.save(u.time_embedding.cond_proj.weight.detach(), {str(out)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300,
                   env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert torch.equal(torch.load(out), demo_cond_proj_weight(TINY, 256))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A hub cache holding the base (diffusers' writer) and the T2V-Turbo-MS repo (unet_lora.pt + README)."""
    root = tmp_path_factory.mktemp("turbo")
    base = make_diffusers_checkpoint(root / "base")
    config = unet_config_to_diffusers(TINY)
    g = torch.Generator().manual_seed(11)
    from diffusers import UNet3DConditionModel

    shapes = UNet3DConditionModel.from_config({**config, "time_cond_proj_dim": 256})
    tensors = []
    import dataclasses

    for name in diffusers_module_order(dataclasses.replace(TINY, timestep_cond_dim=256)):
        m = shapes.get_submodule(name)
        r = min(32, m.weight.shape[0], m.weight.shape[1])  # the release's rank 32, capped at the module's width
        if isinstance(m, nn.Linear):
            up, down = torch.randn(m.out_features, r, generator=g), torch.randn(r, m.in_features, generator=g)
        else:
            up = torch.randn(m.out_channels, r, *[1] * (m.weight.ndim - 2), generator=g)
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
        tensors += [up * 0.02, down * 0.02]
    repo = root / "turbo-repo"
    repo.mkdir()
    torch.save(tensors, repo / "unet_lora.pt")
    (repo / "README.md").write_text("T2V-Turbo-MS\n")
    cache = root / "hub"
    install_in_hub_cache(cache, "damo-vilab/text-to-video-ms-1.7b", base)
    install_in_hub_cache(cache, "jiachenli-ucsb/T2V-Turbo-MS", repo)
    return {"cache": cache, "base": base, "lora": repo / "unet_lora.pt", "tensors": tensors}


@pytest.fixture
def offline(release, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(release["cache"]))


@torch.no_grad()
def _reference_latents(release, seed: int, steps: int = 4, w: float = 7.5) -> torch.Tensor:
    """The release's recipe (app_ms.py + its pipeline) with diffusers' modules, as the latents it decodes."""
    import diffusers
    from diffusers import LCMScheduler, UNet3DConditionModel
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )
    from diffusers.utils.torch_utils import randn_tensor

    base = diffusers.TextToVideoSDPipeline.from_pretrained(release["base"])
    unet = UNet3DConditionModel.from_config(base.unet.config, time_cond_proj_dim=256)
    unet.load_state_dict(base.unet.state_dict(), strict=False)  # all but cond_proj, as app_ms.py
    unet.time_embedding.cond_proj.weight.copy_(demo_cond_proj_weight(TINY, 256))  # the demo's init
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Conv3d)]
    ups, downs = release["tensors"][0::2], release["tensors"][1::2]
    for name, up, down in zip(names, ups, downs):  # cloneofsimo's collapse_lora, scale 1
        m = unet.get_submodule(name)
        m.weight += (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape)
    unet.eval()
    scheduler = LCMScheduler()  # T2V-Turbo's scheduler's defaults are LCMScheduler's
    scheduler.set_timesteps(timesteps=[999, 759, 519, 279][:steps] if steps == 4 else None,
                            num_inference_steps=None if steps == 4 else steps)
    text = base.encode_prompt(PROMPT, "cpu", 1, False)[0]
    g = torch.Generator().manual_seed(seed)
    f = base.vae_scale_factor
    latents = randn_tensor((1, 4, KW["num_frames"], KW["height"] // f, KW["width"] // f), generator=g)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), embedding_dim=256)
    for t in scheduler.timesteps:
        pred = unet(latents, t, encoder_hidden_states=text, timestep_cond=emb).sample
        latents, denoised = scheduler.step(pred, t, latents, generator=g, return_dict=False)
    return denoised


def test_the_release_loads_offline_and_samples_as_its_recipe(release, offline):
    pipe = T2VTurboMSPipeline.from_pretrained()  # jiachenli-ucsb/T2V-Turbo-MS on damo-vilab/...-ms-1.7b
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.timestep_cond_dim == 256 and pipe.embedded_guidance
    assert pipe.generation_defaults["default_num_inference_steps"] == 4
    assert pipe.generation_defaults["default_guidance_scale"] == 7.5
    ours = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **KW).frames
    err = max_diff(ours, _reference_latents(release, 0))
    print(f"T2V-Turbo-MS recipe, 4 steps: max|diff| of the latents = {err:.3g}")
    # 0 on the machine this was written on; on another CPU the merged conv_in weight came out 3.7e-9 apart
    # (matmul kernels round differently), the UNet 1.5e-6, and 4 consistency steps (the first divides by
    # sqrt(alpha_bar_999) = 0.068) made that 4.4e-5: the bound allows for the CPU, not for a wrong recipe
    assert err <= 1e-4
    frames = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **KW).frames
    assert frames.shape == (1, 3, 32, 32, 3)


def test_kept_lora_scale_and_save_reload(release, offline, tmp_path):
    fused = T2VTurboMSPipeline.from_pretrained()
    kept = T2VTurboMSPipeline.from_pretrained(fuse_lora=False)
    for p in (fused, kept):
        p.set_progress_bar_config(disable=True)
    assert kept.get_list_adapters() == {"unet": ["t2v_turbo"]} and fused.get_list_adapters() == {}

    def run(p, **kw):
        return p(PROMPT, generator=torch.Generator().manual_seed(1), output_type="latent", **KW, **kw).frames

    a, b = run(fused), run(kept)  # merged vs kept: fp32 round-off of latents about 30 in size (random tiny UNet)
    assert max_diff(a, b) <= 1e-5 * a.abs().max()
    no_lora = T2VTurboMSPipeline.from_pretrained(fuse_lora=False)
    no_lora.set_progress_bar_config(disable=True)
    no_lora.delete_adapters("t2v_turbo")
    assert torch.equal(run(kept, cross_attention_kwargs={"scale": 0.0}), run(no_lora))
    fused.save_pretrained(tmp_path / "saved")
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    assert type(again) is T2VTurboMSPipeline and again.scheduler.config.lcm_timestep_rule == "stride"
    assert again.generation_defaults == fused.generation_defaults
    assert torch.equal(run(again), run(fused))
    two = run(fused, num_inference_steps=2)
    assert max_diff(two, _reference_latents(release, 1, steps=2)) <= 1e-5 * two.abs().max()


def test_bad_input_is_named_first(release, offline, tmp_path):
    with pytest.raises(ValueError, match="cond_proj_init"):
        T2VTurboMSPipeline.from_pretrained(cond_proj_init="random")
    torch.save(release["tensors"][:-2], tmp_path / "unet_lora.pt")
    with pytest.raises(LoraFormatError, match="holds"):
        T2VTurboMSPipeline.from_pretrained(tmp_path / "unet_lora.pt")
    pipe = T2VTurboMSPipeline.from_pretrained()
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(PROMPT, negative_prompt="blurry", **KW)
