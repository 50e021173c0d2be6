"""Latent consistency distillation (trainer.target=lcd) and the students it makes: the loss's pieces as pure
functions, the teacher inside the student, a short real run whose step folder loads as a 4-step pipeline
(by folder, by DiffusionPipeline, by sample.py), bit-exact resume, settings refused before anything runs,
and the bundled student `shapes-turbo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelscope_t2v import lora
from modelscope_t2v.diffusion import losses as L
from modelscope_t2v.formats.files import LayoutError
from modelscope_t2v.diffusion.schedule import add_noise, make_alphas_cumprod, velocity
from modelscope_t2v.pipelines import DiffusionPipeline, T2VTurboMSPipeline, TextToVideoSDPipeline
from modelscope_t2v.formats.lora_layout import read_student
from modelscope_t2v.schedulers import LCMScheduler
from modelscope_t2v.training import ConfigError, check_config, train
from modelscope_t2v.training.objectives import ConsistencyDistillationObjective
from test_train import BASE, compose_cfg, metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

LCD = BASE + ["trainer.target=lcd", "trainer.lora.rank=4", "trainer.lora.target=all", "trainer.caption_dropout=0",
              "trainer.lcd.num_ddim_timesteps=10", "trainer.lcd.guidance_min=1.5", "trainer.lcd.guidance_max=3",
              "trainer.lr=1e-2"]
KW = dict(num_frames=4, height=16, width=16, output_type="np")


def _abar():
    return make_alphas_cumprod()


# -- the pure functions --------------------------------------------------------------------------------------------


def test_distillation_timesteps_lie_on_the_grid_one_teacher_step_apart():
    g = torch.Generator().manual_seed(0)
    t, prev = L.distillation_timesteps(4000, 1000, 20, g)
    assert set(t.tolist()) == {50 * (i + 1) - 1 for i in range(20)}  # every grid point is drawn, nothing else
    assert torch.equal(t - prev, torch.full_like(t, 50)) and prev.min() == -1
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        L.distillation_timesteps(1, 1000, 0, g)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_recovers_x0_and_eps_from_each_parameterisation(ptype):
    ac, g = _abar(), torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 2, 4, 4, generator=g), torch.randn(3, 2, 2, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    x = add_noise(x0, eps, ac, t)
    out = {"epsilon": eps, "v_prediction": velocity(x0, eps, ac, t), "sample": x0}[ptype]
    got_x0, got_eps = L.split_prediction(out, x, L.abar_at(ac, t, x), ptype)
    assert torch.allclose(got_x0, x0, atol=2e-4) and torch.allclose(got_eps, eps, atol=2e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        L.split_prediction(out, x, L.abar_at(ac, t, x), "flow")


def test_the_guided_teacher_step_is_ddim_on_the_cfg_combination():
    g = torch.Generator().manual_seed(2)
    c, u = (torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)), (torch.randn(2, 3, generator=g),
                                                                              torch.randn(2, 3, generator=g))
    abar = torch.tensor([[0.3], [0.8]])
    one = L.guided_ddim_step(c, u, torch.ones(2, 1), abar)  # g = 1: the conditional model alone
    assert torch.allclose(one, abar.sqrt() * c[0] + (1 - abar).sqrt() * c[1])
    two = L.guided_ddim_step(c, u, torch.full((2, 1), 2.0), abar)  # u + 2 (c - u) = 2c - u
    assert torch.allclose(two, abar.sqrt() * (2 * c[0] - u[0]) + (1 - abar).sqrt() * (2 * c[1] - u[1]))


def test_the_consistency_function_meets_its_boundary_condition():
    x, x0 = torch.randn(3, 2, 1, 2, 2), torch.randn(3, 2, 1, 2, 2)
    f = L.consistency_output(x, x0, torch.tensor([-1, 0, 999]))
    assert torch.equal(f[0], x[0]) and torch.equal(f[1], x[1])  # t_prev = -1 and t = 0: f is x itself
    assert torch.allclose(f[2], x0[2], atol=1e-5)  # high t: the data prediction (c_skip ~ 0, c_out ~ 1)


def test_the_pseudo_huber_loss():
    p, y = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0])
    assert L.pseudo_huber_loss(p, y, 0.0) == 2.0  # c = 0: the mean absolute error
    assert torch.isclose(L.pseudo_huber_loss(p, y, 3.0), torch.tensor(1.0))  # (sqrt(16 + 9) - 3 + 0) / 2
    with pytest.raises(ValueError, match="pseudo-Huber"):
        L.pseudo_huber_loss(p, y, -1.0)


def test_lora_disabled_runs_the_bare_model_and_keeps_the_trainable_flags():
    pipe = TextToVideoSDPipeline.from_preset("tiny", seed=0)
    unet = pipe.unet
    x, ctx = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        bare = unet(x, 500, ctx)
    lora.add_adapter(unet, "a", lora.LoraSpec(rank=2, target="all"))
    for layer in lora.lora_layers(unet).values():
        torch.nn.init.normal_(layer.lora_B["a"].weight)
    unet.requires_grad_(False)
    for p in lora.adapter_parameters(unet, "a").values():
        p.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    with torch.no_grad():
        with lora.disabled(unet):
            off = unet(x, 500, ctx)
        on = unet(x, 500, ctx)
    assert torch.allclose(off, bare, atol=1e-5, rtol=0) and not torch.allclose(on, bare, atol=1e-2)
    assert flags == {n: p.requires_grad for n, p in unet.named_parameters()}


# -- a real run and its student ------------------------------------------------------------------------------------


def test_the_student_holds_its_teacher_exactly():
    """With the adapter off and no guidance embedding, the prepared student computes the loaded UNet: the teacher
    the objective runs (bit for bit the student's own base weights; to fp32 round-off the original module,
    whose copy sits elsewhere in memory)."""
    pipe = TextToVideoSDPipeline.from_preset("tiny", seed=0)
    base = pipe.unet
    cfg = compose_cfg(LCD)
    ConsistencyDistillationObjective.prepare_pipeline(pipe, cfg.trainer)
    student = pipe.unet
    assert student is not base and student.config.timestep_cond_dim == 256
    assert not student.time_mlp.cond_proj.weight.any()  # zero-initialised: the student starts as the teacher
    x, ctx, t = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 77, base.config.cross_attention_dim), torch.tensor([9, 999])
    with torch.no_grad():
        plain = student(x, t, ctx)
        assert torch.allclose(plain, base(x, t, ctx), atol=1e-5, rtol=0)
    lora.add_adapter(student, "default", lora.LoraSpec(rank=2, target="all"))
    assert any(p.endswith("cond_proj") for p in lora.lora_layers(student))  # the embedding is adapted too
    for layer in lora.lora_layers(student).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    with torch.no_grad():
        with lora.disabled(student):
            assert torch.equal(student(x, t, ctx), plain)
        assert not torch.allclose(student(x, t, ctx, timestep_cond=torch.randn(2, 256)), plain, atol=1e-2)


def test_a_distillation_run_writes_a_student_that_loads_as_a_four_step_pipeline(tmp_path):
    run = tmp_path / "run"
    last = train(compose_cfg(LCD + ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.validate_every=4",
                                    "trainer.validation.num_inference_steps=2", f"run_dir={run}"]))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["loss"] < float("inf") for r in rows)
    assert 0 < rows[-1]["eval_loss"] < float("inf")  # the distillation loss on fixed batches
    assert len(list((run / "validation").rglob("*.mp4"))) == 2  # the student's own 2-step videos of the prompts
    info = read_student(last)
    d = info["distillation"]
    assert info["base_model"] == "tiny" and info["rank"] == 4 and d["guidance_embedding_dim"] == 256
    assert d["scheduler"]["original_inference_steps"] == 10 and d["default_guidance_scale"] == 2.25
    state = load_file(str(last / "pytorch_lora_weights.safetensors"))
    assert any("time_embedding.cond_proj.lora_B" in k for k in state)  # the guidance embedding, as a LoRA
    assert any(v.abs().max() > 0 for k, v in state.items() if "cond_proj.lora_B" in k)  # it trained

    # the step folder is a model: its own pipeline class, scheduler and defaults, on the base it names (the
    # preset "tiny" here, rebuilt from its seed by name: base= says which)
    base = TextToVideoSDPipeline.from_preset("tiny", seed=3)
    with pytest.raises(LayoutError, match="'tiny'"):
        T2VTurboMSPipeline.from_pretrained(last)  # "tiny" is a preset, not a checkpoint: base must be given
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    pipe = T2VTurboMSPipeline.from_pretrained(last, base=folder)
    assert type(pipe) is T2VTurboMSPipeline and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 10 and pipe.default_num_inference_steps == 4
    assert pipe.default_guidance_scale == 2.25 and pipe.embedded_guidance
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 799, 499, 299]  # the 10-point grid, diffusers' rule
    video = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **KW).frames
    assert video.shape == (1, 4, 16, 16, 3)

    # the fused weights are the base's plus the saved update: the same as the adapter applied unfused
    unfused = T2VTurboMSPipeline.from_student(last, base=TextToVideoSDPipeline.from_preset("tiny", seed=3),
                                              fuse_lora=False)
    assert lora.lora_layers(unfused.unet) and not lora.lora_layers(pipe.unet)
    unfused.set_progress_bar_config(disable=True)
    again = unfused("a red circle moving left", generator=torch.Generator().manual_seed(0), **KW).frames
    assert abs(video - again).max() < 1e-4

    # a student folder with its base named as a folder loads through the generic entry points too
    info["base_model"] = str(folder)
    (last / "lora_run.json").write_text(json.dumps(info))
    for loaded in (DiffusionPipeline.from_pretrained(last), TextToVideoSDPipeline.from_pretrained(last)):
        assert type(loaded) is T2VTurboMSPipeline and loaded.default_num_inference_steps == 4
    out = tmp_path / "v.mp4"
    path = sample.generate(dict(prompt="a red circle moving left", model=str(last), out=str(out), num_frames=4,
                                height=16, width=16, progress=False))
    side = json.loads(Path(path).with_suffix(".json").read_text())
    assert side["resolved"]["steps"] == 4 and side["resolved"]["scheduler"] == "LCMScheduler"
    with pytest.raises(ValueError, match="spacing"):
        sample.generate(dict(prompt="a red circle moving left", model=str(last), out=str(tmp_path / "w.mp4"),
                             spacing="trailing", num_frames=4, height=16, width=16, progress=False))


def test_a_resumed_distillation_run_equals_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = LCD + ["trainer.checkpoint_every=2"]
    train(compose_cfg(common + ["trainer.max_steps=3", f"run_dir={straight}"]))
    train(compose_cfg(common + ["trainer.max_steps=2", f"run_dir={split}"]))
    train(compose_cfg(common + ["trainer.max_steps=3", f"run_dir={split}", "resume=true"]))
    for name in ("pytorch_lora_weights.safetensors", "raw/pytorch_lora_weights.safetensors"):
        x, y = (load_file(str(r / "checkpoints" / "last" / name)) for r in (straight, split))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(split)]


@pytest.mark.parametrize("extra,match", [
    (["trainer.lora.rank=null"], "trains a LoRA student"),
    (["trainer.caption_dropout=0.1"], "caption_dropout=0"),
    (["trainer.lcd.num_ddim_timesteps=0"], "num_ddim_timesteps"),
    (["trainer.lcd.guidance_min=0.5"], "guidance_min and guidance_max"),
    (["trainer.lcd.guidance_min=4"], "guidance_min and guidance_max"),
    (["trainer.lcd.huber_c=-1"], "huber_c"),
    (["trainer.lcd.guidance_embedding_dim=2"], "guidance_embedding_dim"),
    (["trainer.timestep_bias_strategy=later"], "timestep_bias_strategy"),
    (["trainer.lora.new_concept=still"], "prior preservation"),
    (["trainer.validate_every=5", "trainer.validation.num_inference_steps=25"], "more than the student's grid"),
])
def test_settings_a_distillation_run_cannot_take_are_refused_first(extra, match):
    with pytest.raises(ConfigError, match=match):
        check_config(compose_cfg(LCD + extra))


def test_a_teacher_trained_on_another_objective_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        train(compose_cfg(LCD + ["trainer.prediction_type=v_prediction", "trainer.max_steps=1",
                                 f"run_dir={tmp_path / 'r'}"]))
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


@torch.no_grad()
def _student_in_diffusers(base, student, prompt: str, kw: dict, g_scale: float) -> torch.Tensor:
    """The student's 4-step latents from diffusers' own parts (see the test below)."""
    from diffusers import LCMScheduler as DiffusersLCM
    from diffusers import TextToVideoSDPipeline as DiffusersT2V
    from diffusers import UNet3DConditionModel
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )
    from diffusers.utils.torch_utils import randn_tensor
    from test_lora import _load_in_diffusers

    ref = DiffusersT2V.from_pretrained(base)
    unet = UNet3DConditionModel.from_config(ref.unet.config, time_cond_proj_dim=256)
    unet.load_state_dict(ref.unet.state_dict(), strict=False)  # all but cond_proj
    unet.time_embedding.cond_proj.weight.zero_()  # the student's embedding starts at zero: the file holds all of it
    _load_in_diffusers(unet, student, "student")
    unet.eval()
    scheduler = DiffusersLCM.from_config(read_student(student)["distillation"]["scheduler"])
    scheduler.set_timesteps(4)
    text = ref.encode_prompt(prompt, "cpu", 1, False)[0]
    g = torch.Generator().manual_seed(0)
    f = ref.vae_scale_factor
    latents = randn_tensor((1, 4, kw["num_frames"], kw["height"] // f, kw["width"] // f), generator=g)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([g_scale]), embedding_dim=256)
    for t in scheduler.timesteps:
        pred = unet(latents, t, encoder_hidden_states=text, timestep_cond=emb).sample
        latents, denoised = scheduler.step(pred, t, latents, generator=g, return_dict=False)
    return denoised


def test_a_student_samples_in_diffusers_as_here(tmp_path):
    """A student trained here runs in diffusers' own parts with our numbers: UNet3DConditionModel with
    time_cond_proj_dim=256 (cond_proj zero), the LoRA file through diffusers' reader and peft, diffusers'
    LCMScheduler from the student's config, the guidance embedding of g, one branch."""
    from checkpoints import make_diffusers_checkpoint
    from refs import max_diff

    base = make_diffusers_checkpoint(tmp_path / "base")
    last = train(compose_cfg([o for o in LCD if not o.startswith("model=")] + [
        "model=checkpoint", f"model.name_or_path={base}", "trainer.max_steps=2", f"run_dir={tmp_path / 'run'}"]))
    ours = DiffusionPipeline.from_pretrained(last)
    ours.set_progress_bar_config(disable=True)
    prompt, kw = "a red circle moving left", dict(num_frames=3, height=32, width=32)
    mine = ours(prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames
    ref = _student_in_diffusers(base, last, prompt, kw, ours.default_guidance_scale)
    err = max_diff(mine, ref)
    print(f"a student in diffusers, 4 steps: max|diff| of the latents = {err:.3g} (max|latent| {ref.abs().max():.3g})")
    # measured 5.7e-5 on latents up to 85 (a random tiny model; the first step divides by sqrt(abar_999) =
    # 0.068): 7e-7 of their size; 4.0e-5 with the LoRA unfused. The bound is for fp32 round-off, not a recipe
    assert err <= 1e-4


def test_convert_weights_writes_a_student_folder_for_its_base(tmp_path):
    """`convert_weights.py STUDENT DST --lora-for BASE --dtype fp16` (how shapes-turbo is shipped): the LoRA cast,
    lora_run.json naming BASE, and the folder loads as the student."""
    from modelscope_t2v.formats.convert import convert_lora_file

    base = tmp_path / "base"
    TextToVideoSDPipeline.from_preset("tiny", seed=3).save_pretrained(base)
    last = train(compose_cfg(LCD + ["trainer.max_steps=1", f"run_dir={tmp_path / 'run'}"]))
    out = tmp_path / "student"
    convert_lora_file(last, out, str(base), dtype="fp16")
    assert sorted(p.name for p in out.iterdir()) == ["lora_run.json", "pytorch_lora_weights.safetensors"]
    assert read_student(out)["base_model"] == str(base)
    assert all(v.dtype == torch.float16 for v in load_file(str(out / "pytorch_lora_weights.safetensors")).values())
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is T2VTurboMSPipeline and pipe.scheduler.config.original_inference_steps == 10
    with pytest.raises(ValueError, match="distilled student"):
        convert_lora_file(last, tmp_path / "x.safetensors", str(base))
