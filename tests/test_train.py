"""train.py / modelscope_t2v.training: loss falls, resume is bit-exact (also after SIGKILLs), 2-process
DDP and FSDP on gloo, unreadable videos are skipped and counted, mixed batches reach the model as images
and videos, checkpoints load as pipelines, a NaN loss stops the run. Tiny model, 4 frames of 16x16 pixels
(8x8 latents), CPU.

In-process runs and command-line runs are built from the same override lists through Hydra's compose
API, so a run of one kind can be compared with a run of the other bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from safetensors.torch import load_file

from modelscope_t2v.training import checkpoints as ckpt
from modelscope_t2v import data as data_lib
from modelscope_t2v.pipelines import TextToVideoSDPipeline
from modelscope_t2v.diffusion.losses import draw_timesteps, timestep_weights
from modelscope_t2v.training import ConfigError, NonFiniteLossError, TrainConfig, TrainerConfig, check_config, lr_at, train
from modelscope_t2v.training import loop as training_loop
from modelscope_t2v.training.objectives import timestep_weights_for
from modelscope_t2v.models import UNet3D

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402  (registers the structured config schema)

# trainer=debug: fp32, lr 1e-3, EMA 0.99, no warmup. Dropout (0.1) and caption dropout (0.1) stay on, so
# exact resume also proves that the random draws are restored.
BASE = ["model=tiny", "data=shapes", "trainer=debug", "seed=3", "data.num_frames=4", "data.height=16",
        "data.width=16", "trainer.batch_size=1", "trainer.log_every=1", "trainer.warmup_steps=3"]
WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "raw/unet/diffusion_pytorch_model.safetensors",
           "training_state/optimizer.safetensors"]


def compose_cfg(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=train_script.expand_model_shorthand(overrides))
    return OmegaConf.to_object(cfg)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in WEIGHTS:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "HYDRA_FULL_ERROR": "1"}


def cli(overrides: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# ---------------------------------------------------------------------------------------------------
# Configs and pure functions.


def test_config_schema_rejects_typos_wrong_types_and_bad_values():
    cfg = compose_cfg(BASE)
    assert isinstance(cfg, TrainConfig) and cfg.trainer.lr == 1e-3 and cfg.data.num_frames == 4
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(BASE + ["trainer.max_step=3"])
    assert "Key 'max_step' not in 'TrainerConfig'" in str(e.value.__cause__)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['trainer.max_step'\]"):
        check_config(compose_cfg(BASE + ["+trainer.max_step=3"]))  # Hydra's append skips the schema check
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(BASE + ["trainer.max_steps=many"])
    assert isinstance(e.value.__cause__, ValidationError) and "max_steps" in str(e.value.__cause__)
    bad = compose_cfg(BASE + ["trainer.precision=fp8"])
    with pytest.raises(ConfigError, match=r"trainer.precision must be one of .*'bf16'.*got 'fp8'"):
        check_config(bad)
    with pytest.raises(ConfigError, match="zero_terminal_snr=true needs trainer.prediction_type=v_prediction"):
        check_config(compose_cfg(BASE + ["trainer.zero_terminal_snr=true"]))
    # model=<folder or hub id> is short for the checkpoint option
    assert train_script.expand_model_shorthand(["model=tiny", "model=org/name"]) == [
        "model=tiny", "model=checkpoint", "model.name_or_path=org/name"]
    assert compose_cfg(BASE + ["model=runs/a/checkpoints/last"]).model.name_or_path == "runs/a/checkpoints/last"


def test_lr_schedule_is_a_function_of_the_step():
    t = TrainerConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    t.lr_schedule = "linear"
    assert lr_at(60, t) == pytest.approx(0.55)


def test_timestep_bias_draws_the_biased_slice_as_often_as_asked():
    # uniform: the same draws as before the option existed (a resumed old run keeps its timesteps)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(draw_timesteps(64, 1000, g1, timestep_weights_for(TrainerConfig(), 1000)),
                       torch.randint(0, 1000, (64,), generator=g2))
    w = timestep_weights(1000, "later", 9.0, 0.25)
    assert float(w[750:].sum() / w.sum()) == pytest.approx(0.75) and w[:750].eq(1).all()
    assert timestep_weights(1000, "earlier", 0.0, 0.1)[:100].eq(0).all()
    assert timestep_weights(1000, "range", 3.0, begin=200, end=300)[199:301].tolist() == [1.0] + [3.0] * 100 + [1.0]
    t = TrainerConfig(timestep_bias_strategy="later", timestep_bias_multiplier=9.0, timestep_bias_portion=0.25)
    draws = draw_timesteps(20000, 1000, torch.Generator().manual_seed(0), timestep_weights_for(t, 1000))
    assert draws.min() >= 0 and draws.max() <= 999
    assert float((draws >= 750).float().mean()) == pytest.approx(0.75, abs=0.015)
    t = TrainerConfig(timestep_bias_strategy="range", timestep_bias_begin=900, timestep_bias_end=1000,
                      timestep_bias_multiplier=1e9)
    assert draw_timesteps(256, 1000, torch.Generator().manual_seed(0), timestep_weights_for(t, 1000)).min() >= 900
    for override, message in [("trainer.timestep_bias_strategy=late", r"timestep_bias_strategy must be one of"),
                              ("trainer.timestep_bias_multiplier=-1", r"trainer.timestep_bias_multiplier must be >= 0"),
                              ("trainer.timestep_bias_portion=1.5", r"trainer.timestep_bias_portion must be in \(0, 1\)"),
                              ("trainer.timestep_bias_end=1200", r"begin < end <= 1000, got 0, 1200")]:
        strategy = [] if "strategy" in override else ["trainer.timestep_bias_strategy=" + (
            "range" if "end" in override else "later")]
        with pytest.raises(ConfigError, match=message):
            check_config(compose_cfg(BASE + strategy + [override]))


def test_checkpoint_publication_is_atomic(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.write_step_checkpoint(root, 1, lambda d: (d / "a.txt").write_text("one"))
    assert (root / "last" / "a.txt").read_text() == "one"

    def crash(d):
        (d / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_step_checkpoint(root, 2, crash)
    assert (root / "last").resolve().name == "step-00000001" and not (root / "step-00000002").exists()
    assert ckpt.remove_partial(root) and ckpt.latest_checkpoint(root).name == "step-00000001"
    ckpt.write_step_checkpoint(root, 2, lambda d: (d / "a.txt").write_text("two"))
    ckpt.prune(root, keep=1)
    assert [p.name for _, p in ckpt.step_checkpoints(root)] == ["step-00000002"]


# ---------------------------------------------------------------------------------------------------
# A short run: loss falls, validation, checkpoints load.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(BASE + ["trainer.max_steps=30", "trainer.batch_size=2", "trainer.checkpoint_every=15",
                              "trainer.validate_every=15", "trainer.validation.num_inference_steps=2",
                              f"run_dir={run}"])
    last = train(cfg)
    assert last == run / "checkpoints" / "last"
    return run


def test_loss_falls_on_shapes(trained_run):
    rows = metrics(trained_run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in rows[:10]]), np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.6 * first, (first, last)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("lr", "grad_norm", "samples_per_s", "skipped", "samples", "eval_loss_ema"):
        assert key in rows[-1], key
    assert rows[-1]["samples"] == 60 and rows[-1]["video_samples"] == 60
    assert sorted(p.name for p in (trained_run / "validation" / "step-00000030").iterdir()) == ["00.mp4", "01.mp4"]
    assert any((trained_run / "tensorboard").iterdir())


def test_checkpoint_loads_as_a_pipeline_with_ema_and_raw_weights(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last"
    pipe = TextToVideoSDPipeline.from_pretrained(last)
    raw = TextToVideoSDPipeline.from_pretrained(last / "raw")
    ema_w, raw_w = dict(pipe.unet.named_parameters()), dict(raw.unet.named_parameters())
    assert ema_w.keys() == raw_w.keys()
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in ema_w)  # EMA by default, raw beside it
    state = json.loads((last / "training_state" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["ema"] is True
    # step 15 was written by save_pretrained; step 30 links the frozen parts from it and writes the rest
    # with the same writers: the same files, the frozen ones shared (raw/ and both steps: 4 links)
    first, second = trained_run / "checkpoints" / "step-00000015", last.resolve()

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(first) == files(second)
    assert os.stat(second / "text_encoder" / "model.safetensors").st_nlink == 4
    video = pipe("a red circle moving right", num_frames=2, height=16, width=16, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    assert video.shape == (2, 16, 16, 3) and np.isfinite(video).all()
    from modelscope_t2v.formats import convert_checkpoint

    out = convert_checkpoint(str(last), str(tmp_path / "export"), "diffusers", progress=False)
    exported = TextToVideoSDPipeline.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(exported.unet.parameters(), pipe.unet.parameters()))


# ---------------------------------------------------------------------------------------------------
# Resume: bit-identical after a clean stop and after SIGKILLs.


@pytest.fixture(scope="module")
def straight_30(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    train(compose_cfg(BASE + ["trainer.max_steps=30", "trainer.grad_accum=2", f"run_dir={run}"]))
    return run


def test_resume_is_bit_identical(straight_30, tmp_path):
    run = tmp_path / "run"
    common = BASE + ["trainer.grad_accum=2", f"run_dir={run}"]
    train(compose_cfg(common + ["trainer.max_steps=20"]))
    with pytest.raises(FileExistsError, match="resume=true"):
        train(compose_cfg(common + ["trainer.max_steps=30"]))
    train(compose_cfg(common + ["trainer.max_steps=30", "resume=true"]))
    assert_same_checkpoint(straight_30 / "checkpoints" / "last", run / "checkpoints" / "last")
    a, b = metrics(straight_30), metrics(run)
    assert [r["step"] for r in b] == list(range(1, 31))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_sigkill_at_any_moment_leaves_last_loadable_and_resume_exact(straight_30, tmp_path):
    run = tmp_path / "run"
    # a checkpoint every step, so a good part of the time is spent writing one
    overrides = BASE + ["trainer.grad_accum=2", "trainer.max_steps=30", "trainer.checkpoint_every=2",
                        f"run_dir={run}", "resume=true"]
    root = run / "checkpoints"
    rng = random.Random(0)

    def run_until(stop) -> int:
        proc = cli(overrides)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if stop():
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.returncode

    def step_of_last() -> int:
        last = root / "last"
        return int(last.resolve().name.split("-")[1]) if last.is_dir() else 0

    def writing() -> bool:
        return root.is_dir() and any(p.name.startswith(".tmp-step") for p in root.iterdir())

    def check_last():  # after every kill, `last` is a complete, loadable checkpoint
        pipe = TextToVideoSDPipeline.from_pretrained(root / "last")
        assert isinstance(pipe.unet, UNet3D)
        assert json.loads((root / "last" / "training_state" / "trainer_state.json").read_text())["step"] > 0

    # 1: killed while a checkpoint folder is being written (after at least 2 published ones)
    assert run_until(lambda: step_of_last() >= 4 and writing()) == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-step") for p in root.iterdir())  # it died mid-write
    check_last()
    # 2: resumed, then killed at a random moment a few checkpoints later
    target, delay, seen = step_of_last() + rng.choice([4, 6]), rng.uniform(0.0, 0.5), []

    def random_moment():
        if step_of_last() >= target:
            seen.append(seen[0] if seen else time.monotonic())
            return time.monotonic() - seen[0] >= delay
        return False

    assert run_until(random_moment) == -signal.SIGKILL
    check_last()
    # 3: resumed to the end
    assert run_until(lambda: False) == 0
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    assert_same_checkpoint(straight_30 / "checkpoints" / "last", root / "last")
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))  # lines past a checkpoint were dropped


# ---------------------------------------------------------------------------------------------------
# Several processes.


_TWO_RUNS = """
import sys
import torch.distributed as dist

sys.path[:0] = [{root!r}, {tests!r}]
dist.init_process_group("gloo")  # train() joins a process group it finds (and leaves it open)
from test_train import BASE, compose_cfg
from modelscope_t2v.training import train

for extra, run in ((["trainer.parallel=ddp"], sys.argv[1]), (["trainer.parallel=fsdp"], sys.argv[2]),
                   (["trainer.parallel=auto", "trainer.lora.rank=4"], sys.argv[3])):  # auto: DDP for a LoRA
    train(compose_cfg(BASE + ["trainer.max_steps=3", "trainer.grad_accum=2", *extra,
                              "trainer.checkpoint_every=0", f"run_dir={{run}}"]))
dist.destroy_process_group()
"""


def test_two_processes_on_gloo_ddp_and_fsdp_agree(tmp_path):
    """torchrun, 2 CPU processes, a DDP run then an FSDP2 run: they train the same thing (same per-rank
    data and seeds; only the reduction order differs), rank 0 logs, checkpoints hold whole tensors; then a
    LoRA run under DDP. (One launch for all runs: process start-up is most of the cost on a CPU.)"""
    script = tmp_path / "two_runs.py"
    script.write_text(_TWO_RUNS.format(root=str(ROOT), tests=str(ROOT / "tests")))
    runs = {"ddp": tmp_path / "ddp", "fsdp": tmp_path / "fsdp"}
    lora_run = tmp_path / "lora"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(runs["ddp"]), str(runs["fsdp"]), str(lora_run)]
    out = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for run in runs.values():
        rows = metrics(run)
        assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 logs, once per step
        assert rows[-1]["samples"] == 3 * 2 * 2  # steps x micro-batches x ranks (batch 1)
        last = run / "checkpoints" / "last"
        state = json.loads((last / "training_state" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["step"] == 3
        opt = load_file(str(last / "training_state" / "optimizer.safetensors"))
        assert opt["conv_in.weight/exp_avg"].shape == (32, 4, 3, 3)  # gathered, not a shard
    ddp, fsdp = metrics(runs["ddp"]), metrics(runs["fsdp"])
    np.testing.assert_allclose([r["loss"] for r in fsdp], [r["loss"] for r in ddp], rtol=1e-5)
    a = TextToVideoSDPipeline.from_pretrained(runs["ddp"] / "checkpoints" / "last" / "raw").unet.state_dict()
    b = TextToVideoSDPipeline.from_pretrained(runs["fsdp"] / "checkpoints" / "last" / "raw").unet.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # the LoRA run (DDP: train() checked that both ranks ended with the same adapter) saved the adapter only
    last = lora_run / "checkpoints" / "last"
    assert [r["step"] for r in metrics(lora_run)] == [1, 2, 3]
    assert sorted(p.name for p in last.iterdir()) == ["lora_run.json", "pytorch_lora_weights.safetensors", "raw",
                                                      "training_state"]
    opt = load_file(str(last / "training_state" / "optimizer.safetensors"))
    assert opt and all(".lora_A.default." in k or ".lora_B.default." in k for k in opt)


# ---------------------------------------------------------------------------------------------------
# Data: unreadable videos, mixed image / video batches.


def _webvid(root: Path, corrupt: int = 1) -> tuple[Path, Path]:
    videos = root / "videos"
    (videos / "p").mkdir(parents=True)
    rows = ["videoid,contentUrl,duration,page_dir,name"]
    rng = np.random.default_rng(0)
    for i in range(4):
        path = videos / "p" / f"{i}.mp4"
        if i < corrupt:
            path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(300))  # an mp4 header, then garbage
        else:
            data_lib.save_video_frames(path, rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), fps=8)
        rows.append(f"{i},http://x/{i}.mp4,PT00H00M01S,p,clip number {i}")
    (root / "results.csv").write_text("\n".join(rows) + "\n")
    return root / "results.csv", videos


def test_corrupt_video_is_skipped_and_counted(tmp_path):
    csv, videos = _webvid(tmp_path / "webvid")
    run = tmp_path / "run"
    cfg = compose_cfg(BASE + ["data=webvid", f"data.csv={csv}", f"data.video_root={videos}", "data.target_fps=null",
                              "data.num_frames=4", "data.height=16", "data.width=16", "trainer.batch_size=2",
                              "trainer.max_steps=4", f"run_dir={run}"])
    train(cfg)
    rows = metrics(run)
    assert rows[-1]["skipped"] >= 1  # 8 samples drawn from 4 files: the corrupt one came up at least once
    assert sum(r["skipped_step"] for r in rows) == rows[-1]["skipped"]
    assert rows[-1]["samples"] == 8 and all(np.isfinite(r["loss"]) for r in rows)


def test_mixed_batches_reach_the_model_as_images_and_videos(tmp_path, monkeypatch):
    frames_seen = []
    forward = UNet3D.forward

    def spy(self, sample, *args, **kwargs):
        frames_seen.append(sample.shape[2])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet3D, "forward", spy)
    run = tmp_path / "run"
    train(compose_cfg(BASE + ["data=mixed", "data.image_ratio=0.5", "data.num_frames=4", "data.height=16",
                              "data.width=16", "trainer.max_steps=8", f"run_dir={run}"]))
    last = metrics(run)[-1]
    assert last["image_samples"] > 0 and last["video_samples"] > 0
    assert last["image_samples"] + last["video_samples"] == 8
    assert set(frames_seen) == {1, 4}


# ---------------------------------------------------------------------------------------------------
# Non-finite losses; other precisions and objectives; the autoencoder.


def _poison(monkeypatch, bad_batches: set[int]) -> None:
    real = data_lib.make_loader

    def make_loader(cfg, **kw):
        for batch in real(cfg, **kw):
            if batch["batch_index"] in bad_batches:
                batch["pixels"] = torch.full_like(batch["pixels"], float("nan"))
            yield batch

    monkeypatch.setattr(training_loop, "make_loader", make_loader)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, {6})  # the 7th batch: step 7
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 7 .*step-00000005"):
        train(compose_cfg(BASE + ["trainer.max_steps=10", "trainer.checkpoint_every=5", f"run_dir={run}"]))
    assert (run / "checkpoints" / "last").resolve().name == "step-00000005"
    assert not (run / "checkpoints" / "step-00000007").exists()
    pipe = TextToVideoSDPipeline.from_pretrained(run / "checkpoints" / "last")
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


def test_nan_loss_can_be_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    run = tmp_path / "run"
    train(compose_cfg(BASE + ["trainer.max_steps=5", "trainer.on_nonfinite=skip", f"run_dir={run}"]))
    rows = metrics(run)
    assert rows[-1]["nonfinite_steps"] == 1 and rows[-1]["step"] == 5
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoints" / "last" / WEIGHTS[1])).values())


def test_precisions_objectives_and_caches_run_and_resume(tmp_path):
    run = tmp_path / "run"
    common = BASE + ["trainer.precision=fp16", "trainer.gradient_checkpointing=true", "trainer.grad_accum=2",
                     "trainer.prediction_type=v_prediction", "trainer.zero_terminal_snr=true",
                     "trainer.offset_noise=0.1", "trainer.latent_cache_size=64", "trainer.lr_schedule=cosine",
                     "trainer.timestep_bias_strategy=later", "trainer.timestep_bias_multiplier=4", f"run_dir={run}"]
    train(compose_cfg(common + ["trainer.max_steps=2"]))
    last = run / "checkpoints" / "last"
    assert json.loads((last / "training_state" / "scaler.json").read_text())["scale"] > 0
    sched = json.loads((last / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True
    assert sched["timestep_spacing"] == "trailing"
    train(compose_cfg(common + ["trainer.max_steps=3", "resume=true"]))
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in metrics(run))
    bf16 = tmp_path / "bf16"
    train(compose_cfg(BASE + ["trainer.precision=bf16", "trainer.max_steps=1", f"run_dir={bf16}"]))
    assert all(np.isfinite(r["loss"]) for r in metrics(bf16))


def test_text_encoder_trains_with_the_unet_and_resumes_exactly(tmp_path):
    """trainer.train_text_encoder: the checkpoint's text encoder (EMA, and raw/ beside it) moves off the
    starting one, the pipeline loads it, and 2 + 2 steps equal 4 straight (both modules, optimizer)."""
    common = BASE + ["trainer.train_text_encoder=true", "trainer.text_cache_size=0", "trainer.checkpoint_every=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(compose_cfg(common + ["trainer.max_steps=4", f"run_dir={straight}"]))
    train(compose_cfg(common + ["trainer.max_steps=2", f"run_dir={split}"]))
    train(compose_cfg(common + ["trainer.max_steps=4", f"run_dir={split}", "resume=true"]))
    text = ["text_encoder/model.safetensors", "raw/text_encoder/model.safetensors"]
    for name in WEIGHTS + text:
        x, y = (load_file(str(r / "checkpoints" / "last" / name)) for r in (straight, split))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    start = TextToVideoSDPipeline.from_preset("tiny", seed=3).text_encoder.state_dict()
    last = straight / "checkpoints" / "last"
    ema, raw = (TextToVideoSDPipeline.from_pretrained(p).text_encoder.state_dict() for p in (last, last / "raw"))
    assert ema.keys() == raw.keys() == start.keys()
    assert any(not torch.equal(raw[k], start[k]) for k in raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)
    # the frozen parts are still linked from the previous checkpoint; the trained text encoder is not
    step2, step4 = straight / "checkpoints" / "step-00000002", last.resolve()
    assert os.stat(step4 / "vae" / "diffusion_pytorch_model.safetensors").st_nlink > 1
    assert os.stat(step4 / "text_encoder" / "model.safetensors").st_nlink == 1
    assert load_file(str(step2 / text[0])).keys() == load_file(str(step4 / text[0])).keys()
    with pytest.raises(ConfigError, match="train_text_encoder=true needs trainer.text_cache_size=0"):
        check_config(compose_cfg(common + ["trainer.text_cache_size=8"]))
    with pytest.raises(ConfigError, match="train_text_encoder=true needs trainer.target=unet"):
        check_config(compose_cfg(common + ["trainer.target=vae"]))


def test_autoencoder_alone_trains_and_loads(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg(BASE + ["trainer=vae", "trainer.max_steps=30", "trainer.lr=2e-3", "trainer.batch_size=2",
                              "trainer.log_every=1", "trainer.warmup_steps=0", "trainer.checkpoint_every=30",
                              "trainer.precision=fp32", "trainer.gradient_checkpointing=false",
                              "trainer.validate_every=30", "trainer.progress_bar=false", f"run_dir={run}"]))
    rows = metrics(run)
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.6 * np.mean([r["loss"] for r in rows[:5]])
    last = run / "checkpoints" / "last"
    assert (last / "raw" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = TextToVideoSDPipeline.from_pretrained(last)
    raw = TextToVideoSDPipeline.from_pretrained(last / "raw")
    assert any(not torch.equal(a, b) for a, b in zip(pipe.vae.parameters(), raw.vae.parameters()))
    assert (run / "validation" / "step-00000030" / "00.mp4").is_file()  # input | reconstruction


def test_two_stage_training_from_scratch_autoencoder_then_unet(tmp_path):
    """trainer=vae fits the latent scaling factor; model.vae_from then trains a UNet on that autoencoder."""
    stage1 = tmp_path / "vae"
    train(compose_cfg(BASE + ["trainer=vae", "trainer.max_steps=4", "trainer.batch_size=2", "trainer.warmup_steps=0",
                              "trainer.checkpoint_every=0", "trainer.precision=fp32", "trainer.progress_bar=false",
                              "trainer.validation.loss_batches=2", f"run_dir={stage1}"]))
    vae_pipe = TextToVideoSDPipeline.from_pretrained(stage1 / "checkpoints" / "last")
    factor = vae_pipe.vae.config.scaling_factor
    assert factor != 0.18215
    x = torch.stack([data_lib.render_shape_clip("red", "circle", "left", num_frames=4, size=16, seed=s) for s in range(4)])
    with torch.no_grad():
        z = vae_pipe.vae.encode(x).mode() * factor
    assert 0.5 < float(z.std()) < 2.0  # unit-variance diffusion latents, as LDM's fitted factor gives

    stage2 = tmp_path / "unet"
    last = stage1 / "checkpoints" / "last"
    train(compose_cfg(BASE + ["trainer.max_steps=2", f"model.vae_from={last}", f"run_dir={stage2}"]))
    pipe = TextToVideoSDPipeline.from_pretrained(stage2 / "checkpoints" / "last")
    assert pipe.vae.config.scaling_factor == factor
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vae_pipe.vae.state_dict().values()))

    # model.vae fields are a check against the loaded autoencoder, not an override
    with pytest.raises(ValueError, match=r"model.vae_from=.*latent_channels \(checkpoint 4, model.vae 8\)"):
        train(compose_cfg(BASE + ["trainer.max_steps=1", f"model.vae_from={last}", "+model.vae.latent_channels=8",
                                  f"run_dir={tmp_path / 'bad'}"]))


def test_a_unet_the_diffusers_layout_cannot_hold_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="temporal_in_heads=2, but diffusers hard-codes 8"):
        train(compose_cfg(BASE + ["+model.unet.temporal_in_heads=2", f"run_dir={tmp_path}"]))


def test_a_checkpoint_takes_only_the_unet_fields_that_keep_its_tensors(trained_run, tmp_path):
    base = [o for o in BASE if not o.startswith("model=")] + [f"model={trained_run / 'checkpoints' / 'last'}"]
    with pytest.raises(ConfigError, match=r"\['block_channels'\] apply to presets .* only"):
        train(compose_cfg(base + ["+model.unet.block_channels=[32,64]", f"run_dir={tmp_path / 'a'}"]))
    last = train(compose_cfg(base + ["+model.unet.temporal_position_embedding=true", "trainer.max_steps=1",
                                     f"run_dir={tmp_path / 'b'}"]))
    unet = TextToVideoSDPipeline.from_pretrained(last).unet
    assert unet.config.temporal_position_embedding and unet.temporal_attention_in.position_embedding


def test_checkpoints_carry_the_start_models_default_guidance_scale(trained_run, tmp_path):
    """A model started from a folder with default_guidance_scale writes it into every checkpoint (the first
    is written whole, later ones link the frozen parts: both paths), EMA and raw."""

    start = tmp_path / "start"
    shutil.copytree(trained_run / "checkpoints" / "last", start, ignore=shutil.ignore_patterns("training_state", "raw"))
    index = json.loads((start / "model_index.json").read_text())
    (start / "model_index.json").write_text(json.dumps({**index, "default_guidance_scale": 3.5}))
    base = [o for o in BASE if not o.startswith("model=")] + [f"model={start}"]
    last = train(compose_cfg(base + ["trainer.max_steps=2", "trainer.checkpoint_every=1", f"run_dir={tmp_path / 'r'}"]))
    for step in ("step-00000001", "step-00000002"):
        for folder in (tmp_path / "r" / "checkpoints" / step, tmp_path / "r" / "checkpoints" / step / "raw"):
            assert TextToVideoSDPipeline.from_pretrained(folder).default_guidance_scale == 3.5, folder
    assert TextToVideoSDPipeline.from_pretrained(last).default_guidance_scale == 3.5


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_bad_validation_guidance_scale_is_refused_before_training(bad, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.validation.guidance_scale: a guidance scale is a finite number"):
        train(compose_cfg(BASE + [f"trainer.validation.guidance_scale={bad}", f"run_dir={tmp_path}"]))
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------
# One run per folder, unreadable state, data errors before the model (issue 12).


def test_a_second_process_on_the_run_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = ckpt.RunLock(run).acquire()  # another run holding the folder
    with pytest.raises(FileExistsError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
        train(compose_cfg(BASE + ["trainer.max_steps=2", f"run_dir={run}"]))
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    holder.release()
    # a process killed while it holds the lock: the kernel drops it
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from modelscope_t2v.training import checkpoints as c; " \
           f"c.RunLock(__import__('pathlib').Path({str(run)!r})).acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(FileExistsError, match="in use"):
        ckpt.RunLock(run).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(compose_cfg(BASE + ["trainer.max_steps=2", f"run_dir={run}"]))
    assert (run / "checkpoints" / "last").is_dir() and (run / "train.log").is_file()


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.safetensors", "optimizer.json"])
def test_a_truncated_state_file_on_resume_is_named(tmp_path, name):
    run = tmp_path / "run"
    train(compose_cfg(BASE + ["trainer.max_steps=2", f"run_dir={run}"]))
    path = run / "checkpoints" / "last" / "training_state" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=name):
        train(compose_cfg(BASE + ["trainer.max_steps=4", f"run_dir={run}", "resume=true"]))
    proc = cli(BASE + ["trainer.max_steps=4", f"run_dir={run}", "resume=true"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and out.strip().splitlines()[-1].startswith("error: ") and name in out


@pytest.mark.parametrize("overrides,match", [
    (["data=webvid", "data.csv={tmp}/missing.csv"], "DataConfig.csv: no such file"),
    (["data=webvid", "data.csv={tmp}/videos.csv", "data.video_root={tmp}"], "columns \\['page_dir'"),
    (["data=webvid", "data.csv={tmp}/latin1.csv", "data.video_root={tmp}"], "not UTF-8 text: line 3"),
    (["data=images", "data.image_root={tmp}/nothing"], "no such directory"),
])
def test_data_errors_come_before_the_model_and_leave_no_run_folder(tmp_path, monkeypatch, overrides, match):
    (tmp_path / "videos.csv").write_text("videoid,name\n1,a cat\n")
    (tmp_path / "latin1.csv").write_bytes(b"videoid,page_dir,name\n1,p,a cat\n2,p,caf\xe9 au lait\n")
    from modelscope_t2v.training import loop

    monkeypatch.setattr(loop, "build_pipeline", lambda *a, **k: pytest.fail("the model was built first"))
    run = tmp_path / "run"
    with pytest.raises((ValueError, OSError), match=match):
        train(compose_cfg(BASE + [o.format(tmp=tmp_path) for o in overrides] + [f"run_dir={run}"]))
    assert not run.exists()


def test_clips_too_short_for_a_sample_fail_before_the_model_with_the_arithmetic(tmp_path, monkeypatch):
    videos = tmp_path / "videos" / "p"
    videos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        data_lib.save_video_frames(videos / f"{i}.mp4", rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), fps=8)
    (tmp_path / "v.csv").write_text("videoid,page_dir,name\n" + "".join(f"{i},p,clip {i}\n" for i in range(3)))
    from modelscope_t2v.data import DataError
    from modelscope_t2v.training import loop

    monkeypatch.setattr(loop, "build_pipeline", lambda *a, **k: pytest.fail("the model was built first"))
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"6 frames at 8 fps, the clip needs 16 \(num_frames=16"):
        train(compose_cfg(BASE + ["data=webvid", f"data.csv={tmp_path / 'v.csv'}", f"data.video_root={tmp_path / 'videos'}",
                                  "data.num_frames=16", "data.target_fps=null", "data.max_skips_per_batch=2",
                                  f"run_dir={run}"]))
    assert not run.exists()


def test_a_checkpoint_samples_at_the_size_it_was_trained_at(trained_run):
    """model_index.json records the clip size of the training data; a call without one uses it."""
    last = trained_run / "checkpoints" / "last"
    index = json.loads((last / "model_index.json").read_text())
    assert (index["default_num_frames"], index["default_height"], index["default_width"]) == (4, 16, 16)
    pipe = TextToVideoSDPipeline.from_pretrained(last)
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red circle moving right", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames[0]
    assert video.shape == (4, 16, 16, 3)


def test_train_help_describes_the_options():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("train.py: train ModelScope T2V")
    assert "== Config (defaults) ==" in out.stdout and "trainer:" in out.stdout
