"""LoRA fine-tuning (trainer.lora.*): only the adapter trains and is saved, as a LoRA folder that the pipelines
load; a resumed run equals an uninterrupted one bit for bit; settings a LoRA run cannot take are refused first.
(Two processes under DDP: tests/test_train.py's torchrun test.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modelscope_t2v import lora
from modelscope_t2v.pipelines import TextToVideoSDPipeline
from modelscope_t2v.training import ConfigError, check_config, train
from test_train import BASE, compose_cfg, metrics

LORA = BASE + ["trainer.lora.rank=4", "trainer.lora.alpha=8", "trainer.lora.target=[spatial,temporal_conv]",
               "trainer.lr=1e-2"]
FILES = ["pytorch_lora_weights.safetensors", "raw/pytorch_lora_weights.safetensors",
         "training_state/optimizer.safetensors"]


def test_only_the_adapter_trains_and_the_checkpoint_is_a_lora_folder(tmp_path):
    run = tmp_path / "run"
    last = train(compose_cfg(LORA + ["trainer.max_steps=6", "trainer.checkpoint_every=3", f"run_dir={run}"]))
    assert sorted(p.name for p in last.iterdir()) == ["lora_run.json", "pytorch_lora_weights.safetensors", "raw",
                                                      "training_state"]
    info = json.loads((last / "lora_run.json").read_text())
    assert info["base_model"] == "tiny" and info["rank"] == 4 and info["alpha"] == 8
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["loss"] > 0 for r in rows)
    state = load_file(str(last / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    assert all(".attentions." in k or ".temp_convs." in k for k in state)  # spatial + temporal convs only
    assert not any(".temp_attentions." in k for k in state)
    # the base the run started from, with the LoRA loaded: the base weights are untouched, the update is not 0
    base = TextToVideoSDPipeline.from_preset("tiny", seed=3)
    pipe = TextToVideoSDPipeline.from_preset("tiny", seed=3)
    pipe.load_lora_weights(last)
    assert all(torch.equal(a, b) for a, b in zip(lora.base_state_dict(pipe.unet).values(), base.unet.state_dict().values()))
    ups = [e.up for e in lora.adapter_weights(pipe.unet, "default_0").values()]
    assert any(u.abs().max() > 0 for u in ups)  # lora_B starts at zero: it trained
    kw = dict(num_frames=2, height=16, width=16, num_inference_steps=2, output_type="np")
    a = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **kw).frames
    b = base("a red circle moving left", generator=torch.Generator().manual_seed(0), **kw).frames
    assert abs(a - b).max() > 0


def test_a_resumed_lora_run_equals_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = LORA + ["trainer.checkpoint_every=2", "trainer.grad_accum=2"]
    train(compose_cfg(common + ["trainer.max_steps=4", f"run_dir={straight}"]))
    train(compose_cfg(common + ["trainer.max_steps=2", f"run_dir={split}"]))
    train(compose_cfg(common + ["trainer.max_steps=4", f"run_dir={split}", "resume=true"]))
    for name in FILES:
        x, y = (load_file(str(r / "checkpoints" / "last" / name)) for r in (straight, split))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(split)]


@pytest.mark.parametrize("extra,match", [
    (["trainer.target=vae"], "needs trainer.target=unet"),
    (["trainer.train_text_encoder=true", "trainer.text_cache_size=0"], "train_text_encoder"),
    (["trainer.parallel=fsdp"], "DDP"),
    (["trainer.lora.target=wings"], "unknown LoRA target 'wings'"),
    (["trainer.lora.rank=0"], "trainer.lora.rank must be an integer >= 1"),
    (["trainer.lora.dropout=1.5"], "trainer.lora.dropout"),
    (["trainer.lora.new_concept='[still'"], "is not a regex"),
    (["trainer.lora.new_concept=still", "trainer.lora.prior_loss_weight=-1"], "prior_loss_weight"),
])
def test_settings_a_lora_run_cannot_take_are_refused_first(extra, match):
    with pytest.raises(ConfigError, match=match):
        check_config(compose_cfg(LORA + extra))


def test_prior_preservation_without_a_lora_is_refused():
    with pytest.raises(ConfigError, match="prior preservation needs a LoRA"):
        check_config(compose_cfg(BASE + ["trainer.lora.new_concept=still"]))


def test_prior_preservation_trains_the_other_samples_toward_the_base_model(tmp_path):
    # no dropout in the UNet: the trained forward then equals the teacher's (eval-mode) forward at the start
    common = LORA + ["trainer.max_steps=3", "trainer.batch_size=2", "trainer.caption_dropout=0",
                     "+model.unet.dropout=0.0"]

    def losses(name, extra=()):
        train(compose_cfg(common + list(extra) + [f"run_dir={tmp_path / name}"]))
        return [r["loss"] for r in metrics(tmp_path / name)]

    plain = losses("plain")
    # no caption is new: every sample trains toward the base model's own prediction, which the LoRA equals at
    # the start (lora_B = 0), so there is nothing to learn and it never moves
    assert losses("all-preserved", ["trainer.lora.new_concept=never-said"]) == [0.0, 0.0, 0.0]
    # every caption is new: the data loss, as without preservation
    assert losses("none-preserved", ["trainer.lora.new_concept=."]) == pytest.approx(plain, rel=1e-6)
    assert all(x > 0 for x in plain)
