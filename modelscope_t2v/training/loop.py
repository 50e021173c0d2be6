"""The training loop: plain Python, callable from a notebook; `train.py` is the Hydra front end over it.

    from modelscope_t2v.training import TrainConfig, train
    cfg = TrainConfig(run_dir="runs/a")
    cfg.trainer.max_steps = 30
    last = train(cfg)                       # -> runs/a/checkpoints/last, a loadable pipeline folder

The recipe (paper / VGen): frozen autoencoder and text encoder, the UNet trained on the epsilon objective
(v-prediction, zero-terminal-SNR and offset noise as options), caption dropout to "" for classifier-free
guidance, AdamW with warmup, mixed precision, gradient clipping, EMA, gradient checkpointing, gradient
accumulation, DDP or FSDP2 under torchrun. What is trained and how is the target's objective
(objectives.OBJECTIVES); this file runs any of them.

What a resumed run keeps (and where VGen lost it):
- Every random draw of step s (timesteps, noise, caption dropout, posterior samples, dropout masks) comes
  from generators seeded with (seed, rank, s); the data stream is a pure function of (seed, batch index,
  rank, world size). So a run stopped at step 20 and resumed ends bit-identical to an uninterrupted one.
- The learning rate is a function of the step, never a scheduler object that restarts.
- Images and videos are mixed by the data stream, batch by batch, on every rank (not by GPU rank).
- Samples the data layer could not decode are skipped and counted (`skipped` in metrics.jsonl), never
  replaced by black clips.
- A non-finite loss stops the run with a message naming the last good checkpoint (or, with
  `on_nonfinite="skip"`, skips the update and counts it).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..data import make_loader
from ..formats.files import read_json, write_json
from ..formats.folders import COMPONENTS, instantiate, load_component
from ..pipelines import TextToVideoSDPipeline
from . import checkpoints as ckpt
from . import distributed
from . import lora as lora_run
from .config import ConfigError, NonFiniteLossError, TrainConfig, check_config, config_to_dict, flatten_config, lr_at
from .ema import EMA, full_tensor
from .objectives import OBJECTIVES, join_state, split_state, trained_module
from .start import build_pipeline, training_scheduler
from .validation import Metrics, fixed_batches, write_videos

log = logging.getLogger("modelscope_t2v.train")

COUNTERS = ("batches", "samples", "skipped", "image_samples", "video_samples", "nonfinite_steps")
# settings that may change on resume without changing what is computed
RESUME_FREE = {"trainer.max_steps", "trainer.checkpoint_every", "trainer.log_every", "trainer.validate_every",
               "trainer.keep_checkpoints", "trainer.progress_bar", "trainer.num_workers", "resume", "run_dir"}


def step_seeds(seed: int, rank: int, step: int, n: int = 3) -> list[int]:
    """`n` well-mixed 63-bit seeds for step `step` on `rank` (a counter-based RNG: no state to save)."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2 * n, dtype=np.uint32)
    return [int(words[2 * i]) << 31 ^ int(words[2 * i + 1]) for i in range(n)]


class Trainer:
    """One training run: setup (fresh or resumed), the step loop, checkpoints, logs, validation."""

    def __init__(self, cfg: TrainConfig):
        check_config(cfg)
        self.cfg, self.tc = cfg, cfg.trainer
        self.objective_class = OBJECTIVES[self.tc.target]
        self.components = self.objective_class.trained_components(self.tc)
        self.lora = lora_run.lora_spec(self.tc.lora)  # None: the components' weights are trained
        self.procs = distributed.setup(self.tc.device)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = self.procs.broadcast(cfg.run_dir or str(Path("outputs/train") / stamp))
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.amp = distributed.amp_dtype(self.tc.precision, self.procs.device)
        self.stop_requested = False
        self.consecutive_nonfinite = 0
        self._eval_batches: list[dict] | None = None

    # -- setup ----------------------------------------------------------------------------------------

    def _open_run(self) -> dict:
        """Check the run folder and the data before anything is written or built; returns the trainer state
        to resume (empty for a fresh run). The data stream is opened and its first batch read here, so a
        missing CSV or folder, or clips too short for a sample, fail before the model is built and leave no
        run folder behind; a second process on the same folder is refused (checkpoints.RunLock)."""
        cfg, tc, procs = self.cfg, self.tc, self.procs
        if len(self.components) > 1 and procs.world_size > 1:
            raise ConfigError("trainer.train_text_encoder=true runs in one process only (not under torchrun)")
        if procs.main and self.run_dir.is_dir():
            self.lock = ckpt.RunLock(self.run_dir).acquire()  # before anything in the folder is read
        resume_from = ckpt.latest_checkpoint(self.ckpt_root)
        if resume_from is not None and not cfg.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints ({resume_from.name}); pass resume=true to continue "
                f"that run or choose another run_dir"
            )
        self.resume_from = resume_from if cfg.resume else None
        state: dict = {}
        if self.resume_from is not None:
            state = read_json(self.resume_from / "training_state" / "trainer_state.json")
            self._check_resume_config(state)
        elif cfg.resume:
            log.info("resume=true but %s has no checkpoint: starting a fresh run", self.ckpt_root)
        self.step = int(state.get("step", 0))
        self.counters = {k: 0 for k in COUNTERS} | dict(state.get("counters", {}))
        if self.step > tc.max_steps:
            raise ConfigError(f"the run is at step {self.step}, past trainer.max_steps={tc.max_steps}")
        self._stream = make_loader(
            cfg.data, batch_size=tc.batch_size, seed=cfg.seed, start_batch=self.counters["batches"],
            num_workers=tc.num_workers, rank=procs.rank, world_size=procs.world_size,
        )
        self.loader = itertools.chain([next(self._stream)], self._stream)  # the first batch, read now
        if procs.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if getattr(self, "lock", None) is None:
                self.lock = ckpt.RunLock(self.run_dir).acquire()
            for p in ckpt.remove_partial(self.ckpt_root):
                log.info("removed the partial checkpoint %s left by an interrupted run", p.name)
            self._log_file = logging.FileHandler(self.run_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            logging.getLogger("modelscope_t2v").addHandler(self._log_file)
        procs.barrier()
        return state

    def _start_pipeline(self, state: dict) -> tuple[TextToVideoSDPipeline, dict | None]:
        """(the pipeline, the EMA weights to resume or None): a fresh start or the checkpoint resumed."""
        if self.resume_from is None or self.lora is not None:  # a LoRA run resumes on its base, rebuilt
            if self.lora is not None and self.resume_from is not None:
                log.info("resuming %s from %s (step %d)", self.run_dir, self.resume_from.name, state["step"])
            return build_pipeline(self.cfg.model, self.cfg.seed), None
        # the folder shows the EMA weights (if the run keeps an EMA); raw/ holds the raw ones, trained on
        pipe = TextToVideoSDPipeline.from_pretrained(self.resume_from)
        ema_parts = {}
        for name in self.components:
            if state.get("ema"):
                ema_parts[name] = getattr(pipe, name).state_dict()
            setattr(pipe, name, load_component(name, self.resume_from / "raw", "diffusers", dtype=torch.float32))
        log.info("resuming %s from %s (step %d)", self.run_dir, self.resume_from.name, state["step"])
        return pipe, join_state(ema_parts) if ema_parts else None

    def setup(self) -> None:
        cfg, tc, procs = self.cfg, self.tc, self.procs
        state = self._open_run()
        pipe, ema_weights = self._start_pipeline(state)
        self.objective_class.prepare_pipeline(pipe, tc)  # e.g. lcd: the student's guidance embedding
        factor = pipe.vae.config.downsample_factor
        if cfg.data.height % factor or cfg.data.width % factor:
            raise ConfigError(f"data.height and data.width must be multiples of the autoencoder's factor {factor}, "
                              f"got {cfg.data.height}x{cfg.data.width}")

        # checkpoints remember the clip size trained at: a pipeline samples at it by default
        pipe.default_num_frames, pipe.default_height, pipe.default_width = cfg.data.num_frames, cfg.data.height, cfg.data.width
        # the other components: frozen, and on the device where the objective runs them
        self.pipe = pipe
        self.scheduler = training_scheduler(pipe, tc)
        for name in COMPONENTS:
            if name not in self.components:
                getattr(pipe, name).eval().requires_grad_(False)
        for name in self.objective_class.conditioning_components:
            getattr(pipe, name).to(procs.device)
        self.objective = self.objective_class(tc, pipe, self.scheduler, procs.device, self.amp)

        # the trained module: float32 master weights, wrapped for several processes
        module = trained_module(pipe, self.components).to(procs.device, torch.float32).train().requires_grad_(True)
        if self.lora is not None:  # only the adapter trains
            targets = lora_run.attach(pipe.unet, self.lora)
            module.to(procs.device, torch.float32)
            log.info("LoRA rank %d on %d modules (%s): %d trainable parameters", self.lora.rank, len(targets),
                     self.lora.target, sum(p.numel() for p in module.parameters() if p.requires_grad))
            if self.resume_from is not None:
                ema_weights = lora_run.restore(self.resume_from, pipe.unet, ema=bool(state.get("ema")))
        self.module = module
        if tc.gradient_checkpointing:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            else:
                log.warning("%s has no gradient checkpointing; trainer.gradient_checkpointing ignored", tc.target)
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.model, self.parallel = distributed.wrap(module, tc.parallel, procs)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr_at(self.step, tc), betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
            weight_decay=tc.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(procs.device.type, enabled=self.amp == torch.float16)
        self.ema = EMA(module.named_parameters(), tc.ema_decay, tc.ema_warmup) if tc.ema_decay > 0 else None
        if self.resume_from is not None:
            saved = self.resume_from / "training_state"
            ckpt.load_optimizer(saved, self.optimizer, self.param_names, self.params)
            if self.ema is not None:
                if ema_weights is None:
                    log.warning("the checkpoint has no EMA weights; the EMA restarts from the raw weights")
                else:
                    self.ema.load_full_state_dict({n: ema_weights[n] for n in self.ema.names})
            if self.scaler.is_enabled() and (saved / "scaler.json").exists():
                self.scaler.load_state_dict(read_json(saved / "scaler.json"))
        if state and state.get("world_size", procs.world_size) != procs.world_size:
            log.warning("resuming a %s-process run on %d processes: the data order and random draws change",
                        state.get("world_size"), procs.world_size)

        if procs.main:
            write_json(self.run_dir / "config.json", config_to_dict(cfg))
        self.metrics = Metrics(self.run_dir, self.step, procs.main)
        self.last_saved = self.resume_from

    def _check_resume_config(self, state: dict) -> None:
        """Warn about settings that changed since the checkpoint (max_steps and logging may change freely)."""
        before = flatten_config(state.get("config", {}))
        now = flatten_config(config_to_dict(self.cfg))
        changed = sorted(k for k in set(before) | set(now)
                         if before.get(k) != now.get(k) and k not in RESUME_FREE and not k.startswith("trainer.validation."))
        if changed and self.procs.main:
            log.warning("resuming with changed settings %s: the run will differ from an uninterrupted one",
                        {k: (before.get(k), now.get(k)) for k in changed})
        if before.get("trainer.target", self.tc.target) != self.tc.target:
            raise ConfigError(f"the checkpoint trained {before['trainer.target']!r}, not trainer.target={self.tc.target!r}")

    # -- one step -------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns this step's statistics."""
        tc, procs, step = self.tc, self.procs, self.step
        lr = lr_at(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        s_global, s_cpu, s_dev = step_seeds(self.cfg.seed, procs.rank, step)
        torch.manual_seed(s_global)  # dropout masks
        gens = (torch.Generator().manual_seed(s_cpu), torch.Generator(procs.device).manual_seed(s_dev))
        loss_sum = torch.zeros((), dtype=torch.float64, device=procs.device)  # summed on the device: one sync a step
        images, videos, skipped = 0, 0, 0
        for micro in range(tc.grad_accum):
            batch = next(self.loader)
            self.counters["batches"] += 1
            skipped += int(batch.get("skipped", 0))
            n = batch["pixels"].shape[0]
            if batch.get("kind", "image" if batch["pixels"].shape[2] == 1 else "video") == "image":
                images += n
            else:
                videos += n
            with distributed.gradient_sync(self.model, self.parallel, last=micro == tc.grad_accum - 1):
                loss = self.objective.loss(self.model, batch, gens)
                self.scaler.scale(loss / tc.grad_accum).backward()
            loss_sum += loss.detach().double()
        # one all-reduce for everything every rank must agree on
        counts = torch.tensor([tc.grad_accum, skipped, images, videos, float(self.stop_requested)], dtype=torch.float64)
        stats = torch.cat([loss_sum.reshape(1), counts.to(procs.device)])
        if procs.world_size > 1:
            dist.all_reduce(stats)
        loss_mean = float(stats[0] / stats[1])
        self.counters["skipped"] += int(stats[2])
        self.counters["image_samples"] += int(stats[3])
        self.counters["video_samples"] += int(stats[4])
        self.counters["samples"] += int(stats[3] + stats[4])
        self.stop_requested = bool(stats[5] > 0)

        grad_norm = math.nan
        finite = math.isfinite(loss_mean)
        if finite:
            self.scaler.unscale_(self.optimizer)
            max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
            # with fp16 an inf gradient is the scaler's business (it skips the step and lowers the scale)
            finite = math.isfinite(grad_norm) or self.scaler.is_enabled()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(loss_mean, grad_norm)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.params, step + 1)
            self.consecutive_nonfinite = 0
        self.step = step + 1
        return {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "skipped_step": int(stats[2])}

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        where = (f"the last good checkpoint is {self.last_saved}" if self.last_saved is not None
                 else "no checkpoint has been written yet")
        self.counters["nonfinite_steps"] += 1
        self.consecutive_nonfinite += 1
        if self.tc.on_nonfinite == "skip" and self.consecutive_nonfinite <= self.tc.max_nonfinite_skips:
            log.warning("non-finite %s at step %d: update skipped (%d in a row)", what, self.step + 1,
                        self.consecutive_nonfinite)
            return
        raise NonFiniteLossError(
            f"non-finite {what} at step {self.step + 1} (data batches up to {self.counters['batches']}); the run "
            f"stopped without saving this step, {where}. Lower trainer.lr, use precision=bf16/fp32, check the "
            f"data, then continue with resume=true; or set trainer.on_nonfinite=skip to skip such steps"
            + (f" (it skipped {self.consecutive_nonfinite - 1} in a row)" if self.tc.on_nonfinite == "skip" else "")
        )

    # -- checkpoints ----------------------------------------------------------------------------------

    def save(self) -> Path:
        """Checkpoint the current step (collective: every rank gathers, rank 0 writes)."""
        path = None
        if self.procs.main or self.parallel == "fsdp":  # gathering shards is a collective
            if self.lora is not None:  # the adapter only
                named = dict(self.module.named_parameters())
                raw = {k: named[k].detach().cpu().clone() for k in self.param_names}
            else:
                raw = {k: full_tensor(v).detach().cpu() for k, v in self.module.state_dict().items()}
            ema = self.ema.full_state_dict() if self.ema is not None else None
            optimizer = ckpt.optimizer_full_state(self.optimizer, self.param_names)
        if self.procs.main:
            trainer_state = {
                "step": self.step, "counters": self.counters, "ema": ema is not None,
                "world_size": self.procs.world_size, "target": self.tc.target, "config": config_to_dict(self.cfg),
                "time": time.time(),
            }
            if self.lora is not None:
                path = ckpt.write_step_checkpoint(self.ckpt_root, self.step, lambda folder: lora_run.write_checkpoint(
                    folder, unet=self.pipe.unet, shown=ema if ema is not None else raw,
                    raw=raw if ema is not None else None, base=self.cfg.model.name_or_path, spec=self.lora,
                    optimizer=optimizer, scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    trainer_state=trainer_state, extra=self.objective.run_metadata()), fsync=self.tc.fsync_checkpoints)
                return self._published(path)
            # what the folder shows: the EMA weights over the raw state (buffers are not averaged)
            shown_parts = split_state({**raw, **ema} if ema is not None else raw, self.components)
            shown = {name: instantiate(COMPONENTS[name].build, getattr(self.pipe, name).config, part, None)
                     for name, part in shown_parts.items()}
            self.objective.prepare_checkpoint(shown, self._eval_data)
            previous = self.last_saved if self.last_saved is not None and self.last_saved.is_dir() else None

            def write(folder: Path) -> None:
                ckpt.write_training_checkpoint(
                    folder, pipe=self.pipe, scheduler=self.scheduler, shown=shown,
                    raw=split_state(raw, self.components) if ema is not None else None, previous=previous,
                    optimizer=optimizer, scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    trainer_state=trainer_state)

            path = ckpt.write_step_checkpoint(self.ckpt_root, self.step, write, fsync=self.tc.fsync_checkpoints)
        return self._published(path)

    def _published(self, path: Path | None) -> Path:
        if self.procs.main:
            ckpt.prune(self.ckpt_root, self.tc.keep_checkpoints)
            log.info("saved %s", path)
        self.procs.barrier()
        self.last_saved = self.procs.broadcast(path)
        return self.last_saved

    # -- validation -----------------------------------------------------------------------------------

    def _eval_data(self) -> list[dict]:
        if self._eval_batches is None:
            self._eval_batches = fixed_batches(self.cfg.data, self.tc.batch_size, self.cfg.seed + 1,
                                               self.tc.validation.loss_batches)
        return self._eval_batches

    @torch.no_grad()
    def validate(self) -> dict:
        """Eval losses (raw and EMA weights) and validation videos with the EMA weights."""
        out: dict[str, Any] = {}
        module, procs = self.module, self.procs
        runs = procs.main or self.parallel == "fsdp"  # sharded forward passes need every rank
        module.eval()
        try:
            if runs:
                out["eval_loss"] = self.objective.eval_loss(module, self._eval_data())
            with self.ema.swapped_into(self.params) if self.ema is not None else contextlib.nullcontext():
                if runs and self.ema is not None:
                    out["eval_loss_ema"] = self.objective.eval_loss(module, self._eval_data())
                if runs:
                    videos = self.objective.validation_videos(module, self._eval_data(), self.cfg.data)
                    if procs.main:
                        folder = self.run_dir / "validation" / ckpt.step_dirname(self.step)
                        write_videos(folder, videos, self.tc.validation.fps, self.metrics, self.step)
        finally:
            module.train()
        procs.barrier()
        return out if procs.main else {}

    # -- the loop -------------------------------------------------------------------------------------

    def _log_row(self, stats: dict, window: tuple[float, int, float]) -> dict:
        start, steps, loss = window
        elapsed = time.perf_counter() - start
        samples = steps * self.tc.batch_size * self.tc.grad_accum * self.procs.world_size
        row = {"step": self.step, **stats, "loss_avg": loss / steps, "samples_per_s": samples / elapsed,
               "steps_per_s": steps / elapsed, **self.counters, "time": time.time()}
        if self.scaler.is_enabled():
            row["grad_scale"] = float(self.scaler.get_scale())
        if self.procs.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.procs.device) / 2**30
        return row

    def run(self) -> Path:
        tc = self.tc
        previous_handler, bar = None, None
        try:
            self.setup()
            if threading.current_thread() is threading.main_thread():
                previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            if self.procs.main and tc.progress_bar:
                from tqdm.auto import tqdm

                bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            if self.step >= tc.max_steps:
                log.info("the run is already at trainer.max_steps=%d", tc.max_steps)
                return self.ckpt_root / ckpt.LAST
            window = (time.perf_counter(), 0, 0.0)  # start, steps, summed finite losses since the last log
            while self.step < tc.max_steps:
                stats = self.train_step()
                window = (window[0], window[1] + 1, window[2] + (stats["loss"] if math.isfinite(stats["loss"]) else 0.0))
                if bar is not None:
                    bar.update(1)
                step = self.step
                validate = tc.validate_every > 0 and step % tc.validate_every == 0
                end = step == tc.max_steps or self.stop_requested
                row = None
                if step % tc.log_every == 0 or validate or end:
                    row = self._log_row(stats, window)
                    if bar is not None:
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                if validate:
                    row.update(self.validate())
                if row is not None:
                    self.metrics.write(row)
                if end or (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0):
                    self.save()
                if row is not None or end:
                    window = (time.perf_counter(), 0, 0.0)
                if self.stop_requested:
                    log.warning("SIGTERM: saved step %d and stopped; continue with resume=true", step)
                    break
            distributed.check_replicas(self.params, self.parallel)
            return self.ckpt_root / ckpt.LAST
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if bar is not None:
                bar.close()
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            if hasattr(getattr(self, "_stream", None), "close"):
                self._stream.close()
            if getattr(self, "_log_file", None) is not None:
                logging.getLogger("modelscope_t2v").removeHandler(self._log_file)
                self._log_file.close()
            if getattr(self, "lock", None) is not None:
                self.lock.release()
            self.procs.close()

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True  # acted on after the current step, by every rank


def train(cfg: TrainConfig) -> Path:
    """Run (or continue, with cfg.resume) a training run; returns `run_dir/checkpoints/last`."""
    return Trainer(cfg).run()
