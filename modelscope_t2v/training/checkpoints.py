"""Training checkpoints that a crash cannot corrupt: atomic step folders, a `last` link, optimizer state
in safetensors, and what a step folder holds.

Why: a run killed at any moment (SIGKILL, preemption, power) must leave `checkpoints/last` loadable and
resumable. Every checkpoint is written into a hidden temporary folder, its files are fsync'ed, and only
then is the folder renamed to `step-NNNNNNNN` (a rename is atomic) and the `last` symlink replaced by
another rename. A reader therefore sees the old checkpoint or the new one, never half of one; a
temporary folder left by a crash is removed on the next start.

    checkpoints/
      step-00000010/   a loadable pipeline folder (diffusers layout; the EMA weights if the run keeps an EMA)
                       + raw/ (the same pipeline with the raw weights) + training_state/
      step-00000020/
      last -> step-00000020

Optimizer state is stored by parameter *name* (safetensors for the tensors, JSON for the rest), so it
does not depend on parameter order or on how the model is wrapped (DDP, FSDP) when it is read back.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..formats.files import LayoutError, read_json, read_tensors, write_json, write_safetensors
from ..formats.folders import write_diffusers_component, write_model_index, write_scheduler
from ..pipelines import TextToVideoSDPipeline
from .ema import full_tensor, like_param

LAST = "last"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------------
# Atomic folders and the `last` link.


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder below `folder` to disk (a rename is only durable after this)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def write_step_checkpoint(root: Path, step: int, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Write checkpoint `step` with `write(tmp_folder)`, publish it as `root/step-N`, point `root/last`
    at it. Returns the published folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if fsync:
        _fsync_tree(tmp)
    if final.exists():
        # Re-saving a step after a resume from an earlier one: `last` never names this folder (it names
        # the checkpoint we resumed from, which is older), so moving it aside first is safe.
        stale = root / f"{_TMP_PREFIX}{final.name}-stale-{os.getpid()}"
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)
    link_tmp = root / f"{_TMP_PREFIX}{LAST}-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)  # relative: the run folder can be moved
    os.replace(link_tmp, root / LAST)
    if fsync:
        _fsync_dir(root)
    return final


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Published step checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `last` points to; if the link is gone, the newest published step folder."""
    last = root / LAST
    if last.is_dir():
        return last.resolve()
    found = step_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: Path) -> list[Path]:
    """Delete temporary folders and links left behind by a crash; returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                if p.is_symlink() or p.is_file():
                    p.unlink()
                else:
                    shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints (0: keep all); never the one `last` points to."""
    if keep <= 0:
        return
    last = latest_checkpoint(root)
    for _, path in step_checkpoints(root)[:-keep]:
        if last is None or path.resolve() != last:
            shutil.rmtree(path, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link the file `src`, or every file below the folder `src`, to `dst` (same tree), copying
    where links are not possible (another filesystem, no hard links)."""

    def link(a: Path, b: Path) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        link(src, dst)
        return
    for root, _, files in os.walk(src):
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            link(Path(root) / name, out / name)


# ---------------------------------------------------------------------------------------------------
# Optimizer state by parameter name.


def optimizer_full_state(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> tuple[dict, dict]:
    """(tensors, meta): tensors "{param name}/{state key}" -> whole CPU tensor; meta the param groups
    (parameter names instead of indices) and non-tensor state. Gathers sharded state: every rank calls."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        name = names[idx]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "format": 1}


def write_optimizer(folder: Path, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """What `optimizer_full_state` returned, as optimizer.safetensors + optimizer.json."""
    write_safetensors(folder / "optimizer.safetensors", tensors)
    write_json(folder / "optimizer.json", meta)


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: Sequence[str],
                   params: Sequence[torch.Tensor]) -> None:
    """Restore what `save_optimizer` wrote into an optimizer over `params` (named `names`), laid out
    like them (sharded if they are DTensors). Names must match exactly."""
    tensors = read_tensors(folder / "optimizer.safetensors")
    meta = read_json(folder / "optimizer.json")
    index = {n: i for i, n in enumerate(names)}
    saved_names = {k.rsplit("/", 1)[0] for k in tensors} | set(meta["scalars"])
    saved_names |= {n for g in meta["param_groups"] for n in g["params"]}
    unknown = sorted(saved_names - set(index))
    missing = sorted(set(index) - {n for g in meta["param_groups"] for n in g["params"]})
    if unknown or missing:
        raise LayoutError(f"{folder / 'optimizer.json'}: the optimizer state does not fit the model: "
                          f"unknown {unknown[:5]}, missing {missing[:5]}")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        i = index[name]
        p = params[i]
        # per-parameter moments take the parameter's layout; scalars (Adam's `step`) stay as saved
        value = like_param(value, p) if value.shape == p.shape and value.ndim > 0 else value
        state.setdefault(i, {})[field] = value
    for name, fields in meta["scalars"].items():
        state.setdefault(index[name], {}).update(fields)
    groups = [{**g, "params": [index[n] for n in g["params"]], "betas": tuple(g["betas"])} if "betas" in g
              else {**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------
# What a step folder holds.

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")  # the pipeline's folders a run may link


def write_training_checkpoint(folder: Path, *, pipe: TextToVideoSDPipeline, scheduler, shown: Mapping[str, nn.Module],
                              raw: Mapping[str, Mapping[str, torch.Tensor]] | None, previous: Path | None,
                              optimizer: tuple[dict, dict], scaler: dict | None, trainer_state: dict) -> None:
    """Fill a (temporary) step folder: the pipeline with the trained components `shown` (EMA weights, or the
    raw ones without an EMA) and `pipe`'s generation defaults in the diffusers layout, `raw/` with the `raw` weights (None: no EMA, raw/ is the
    same as the folder), and training_state/ (optimizer, grad scaler, trainer_state.json written last).

    The frozen components never change within a run: from the second checkpoint on they are hard-linked
    from `previous` (no 1.7 GB rewrite of text encoder + autoencoder at full size); the rest is what
    save_pretrained writes (tests/test_train.py compares the two file lists). raw/ links everything it
    shares with the folder."""
    trained = set(shown)
    frozen = [n for n in PIPELINE_PARTS if n not in trained]
    if previous is None or not all((previous / n).is_dir() for n in frozen):
        TextToVideoSDPipeline.from_pipe(pipe, **shown, scheduler=scheduler).save_pretrained(folder)
    else:
        for name in frozen:
            link_tree(previous / name, folder / name)
        for name, module in shown.items():
            write_diffusers_component(name, folder, module.config, module.state_dict())
        write_scheduler(folder, dict(scheduler.config))
        write_model_index(folder, TextToVideoSDPipeline.__name__, type(scheduler).__name__, pipe.generation_defaults)
    raw_dir = folder / "raw"
    for name, state in (raw or {}).items():
        write_diffusers_component(name, raw_dir, shown[name].config, state)
    for entry in list(folder.iterdir()):
        if entry.name != "raw" and (raw is None or entry.name not in trained):
            link_tree(entry, raw_dir / entry.name)
    write_training_state(folder, optimizer, scaler, trainer_state)


def write_training_state(folder: Path, optimizer: tuple[dict, dict], scaler: dict | None,
                         trainer_state: dict) -> None:
    """A step folder's training_state/: optimizer (by parameter name), grad scaler, trainer_state.json last
    (its presence says the rest is there)."""
    state_dir = folder / "training_state"
    state_dir.mkdir()
    write_optimizer(state_dir, *optimizer)
    if scaler is not None:
        write_json(state_dir / "scaler.json", scaler)
    write_json(state_dir / "trainer_state.json", trainer_state)


# ---------------------------------------------------------------------------------------------------
# One run per folder.


class RunLock:
    """An exclusive lock on `run_dir/.lock` (flock: the kernel drops it when the holding process dies, so a
    killed run never leaves it stuck). A second process on the same run folder is refused, naming the first."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"{self.path.parent} is in use by another training process (pid {holder}); "
                                  "wait for it to end or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
