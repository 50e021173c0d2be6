"""From a name to a checkpoint folder, and which files of it hold what.

A name is a local folder, a model bundled in the package (`BUNDLED`: trained by this project, so it works
with no download), or a hub id resolved through huggingface_hub (and its cache, with HF_HUB_OFFLINE=1).
A bundled name is looked up after local folders and before hub ids, so a folder called `shapes` in the
working directory wins over the bundled model.

Layouts
- "diffusers": model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/ (damo-vilab/
  text-to-video-ms-1.7b, cerspense/zeroscope_v2_*; also what `save_pretrained` and the converter write).
- "modelscope": configuration.json + text2video_pytorch_model.pth + VQGAN_autoencoder.pth (a whole
  Lightning checkpoint) + open_clip_pytorch_model.bin (damo-vilab/modelscope-damo-text-to-video-synthesis).
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import LayoutError

LAYOUTS = ("diffusers", "modelscope")

# The original layout's file names (configuration.json's model.model_args names them too).
MS_UNET, MS_VAE, MS_CLIP = "text2video_pytorch_model.pth", "VQGAN_autoencoder.pth", "open_clip_pytorch_model.bin"

# The weights file stem of each diffusers component.
DIFFUSERS_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}

# ---------------------------------------------------------------------------------------------------
# Bundled models: name -> folder under WEIGHTS_DIR (a diffusers-layout pipeline folder, or a distilled
# student's folder: its LoRA and lora_run.json, read by pipelines.t2v_turbo). "shapes" is the small
# text-to-video model of the shapes world (configs/model/shapes.yaml; docs/shapes_model.md); "shapes-turbo"
# its 4-step student (trainer=shapes_lcd; docs/benchmarks.md).

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BUNDLED: dict[str, str] = {"shapes": "shapes", "shapes-turbo": "shapes-turbo"}


def bundled_path(name: str) -> Path | None:
    """The folder of bundled model `name`, or None if there is no such bundled model (or it is not installed)."""
    folder = BUNDLED.get(name)
    if folder is None:
        return None
    path = WEIGHTS_DIR / folder
    return path if (path / "model_index.json").is_file() or (path / "lora_run.json").is_file() else None


# Bundled LoRAs: name -> folder under WEIGHTS_DIR holding pytorch_lora_weights.safetensors. "shapes-still" teaches
# the shapes model "a {colour} {shape} standing still" (docs/lora.md); `lora=shapes-still` in sample.py.
BUNDLED_LORAS: dict[str, str] = {"shapes-still": "shapes-still"}


def bundled_lora_path(name: str) -> Path | None:
    """The folder of bundled LoRA `name`, or None (no such LoRA, or not installed)."""
    folder = BUNDLED_LORAS.get(str(name))
    if folder is None:
        return None
    path = WEIGHTS_DIR / folder
    return path if (path / "pytorch_lora_weights.safetensors").is_file() else None


def bundled_models() -> list[str]:
    """Names of the bundled models present in this installation."""
    return sorted(name for name in BUNDLED if bundled_path(name) is not None)


# ---------------------------------------------------------------------------------------------------
# Finding the folder: a local path, a bundled model, or a hub id resolved through huggingface_hub.

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str:
    # Read at call time (huggingface_hub reads its constants once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _wanted_files(files: list[str], variant: str | None) -> list[str]:
    """Of a repo's files, the configs plus one weights file per component (safetensors before .bin,
    the requested variant before the plain file)."""
    wanted = [f for f in files if f.endswith((".json", ".txt")) and f.count("/") <= 1]
    wanted += [f for f in files if f in (MS_UNET, MS_VAE, MS_CLIP, "pytorch_lora_weights.safetensors")]  # + a student's LoRA
    for component, stem in DIFFUSERS_WEIGHTS.items():
        pick = pick_weights([f for f in files if f.startswith(component + "/")], f"{component}/{stem}", variant)
        if pick is not None:
            wanted.append(pick)
    return sorted(set(wanted))


def pick_weights(files: list[str], stem: str, variant: str | None) -> str | None:
    """The weights file of `stem` among `files`: the variant before the plain file, safetensors before .bin."""
    names = []
    if variant:
        names += [f"{stem}.{variant}.safetensors", f"{stem}.{variant}.bin"]
    names += [f"{stem}.safetensors", f"{stem}.bin"]
    for n in names:
        if n in files:
            return n
    return None


def resolve(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, variant: str | None = None) -> Path:
    """A local folder as is; a bundled model's name (`BUNDLED`) gives its folder in the package;
    otherwise a hub id, downloaded (only the files of the chosen variant and format) or, with
    HF_HUB_OFFLINE=1, found in the Hugging Face cache (HF_HUB_CACHE / HF_HOME)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    bundled = bundled_path(str(path_or_repo_id))
    if bundled is not None:
        return bundled
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or local.exists():
        raise LayoutError(f"{repo_id!r} is neither a folder nor a hub id of the form 'org/name'")
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = _hub_cache_dir()
    offline = _env_flag("HF_HUB_OFFLINE")
    if offline:
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError as e:
            raise LayoutError(
                f"{repo_id!r} is not in the Hugging Face cache at {cache_dir} and HF_HUB_OFFLINE is set"
            ) from e
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = list_repo_files(repo_id, revision=revision)
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=_wanted_files(files, variant)))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise LayoutError(f"{repo_id!r} (revision {revision or 'main'}): {str(e).strip().splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - the transport's own errors (no network, a proxy, a timeout)
        raise LayoutError(
            f"{repo_id!r}: the Hugging Face hub cannot be reached ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else '-'}). To run offline, set HF_HUB_OFFLINE=1 "
            f"with the model in the cache ({cache_dir}), or pass a local folder") from None


def detect_layout(folder: Path) -> str:
    """"diffusers" (model_index.json) or "modelscope" (configuration.json); LayoutError otherwise."""
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if (folder / "configuration.json").is_file():
        return "modelscope"
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise LayoutError(
        f"{folder}: neither a diffusers folder (model_index.json) nor an original ModelScope folder "
        f"(configuration.json); it holds {present}"
    )


# ---------------------------------------------------------------------------------------------------
# A single file (a LoRA): a path, a file in a folder, or a file of a hub repo.

def resolve_file(path_or_repo_id: str | os.PathLike, weight_name: str | None, default_names: tuple[str, ...],
                 suffixes: tuple[str, ...], *, subfolder: str | None = None, revision: str | None = None,
                 what: str = "file") -> Path:
    """A file as is; in a folder, `weight_name`, else the first of `default_names` there, else its only file
    ending in one of `suffixes`; a hub id the same way (downloaded, or from the cache with HF_HUB_OFFLINE=1).
    LayoutError naming what was looked for otherwise."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_file():
        if weight_name is not None:
            raise LayoutError(f"weight_name={weight_name!r} was given, but {local} is a file, not a folder")
        return local
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        return _pick_file(folder, [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else [],
                          weight_name, default_names, suffixes, what, lambda name: folder / name)
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or local.exists() or repo_id.startswith((".", "/", "~")):
        raise LayoutError(f"{what} {repo_id!r} is neither a file, a folder nor a hub id of the form 'org/name'")
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache_dir = _hub_cache_dir()
    names = [weight_name] if weight_name else list(default_names)
    if _env_flag("HF_HUB_OFFLINE"):
        for name in names:
            try:
                return Path(hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision,
                                            cache_dir=cache_dir, local_files_only=True))
            except (LocalEntryNotFoundError, EntryNotFoundError):
                continue
        raise LayoutError(f"{what}: none of {names} of {repo_id!r} is in the Hugging Face cache at {cache_dir} and "
                          "HF_HUB_OFFLINE is set (pass weight_name= for another file name)")
    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception as e:  # noqa: BLE001 - no network, no such repo, a proxy: say which and how to go offline
        raise LayoutError(f"{what} {repo_id!r}: the Hugging Face hub cannot be reached or has no such repo "
                          f"({type(e).__name__}); set HF_HUB_OFFLINE=1 with it in the cache ({cache_dir}) or pass a "
                          "local file") from None
    prefix = f"{subfolder}/" if subfolder else ""
    inside = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    return _pick_file(None, inside, weight_name, default_names, suffixes, f"{what} {repo_id!r}",
                      lambda name: Path(hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision,
                                                        cache_dir=cache_dir)))


def _pick_file(folder: Path | None, files: list[str], weight_name, default_names, suffixes, what, fetch) -> Path:
    where = folder if folder is not None else what
    if weight_name is not None:
        if weight_name not in files:
            raise LayoutError(f"{where}: no file {weight_name!r} (it holds {sorted(files)[:10]})")
        return fetch(weight_name)
    for name in default_names:
        if name in files:
            return fetch(name)
    candidates = sorted(f for f in files if f.endswith(suffixes))
    if len(candidates) == 1:
        return fetch(candidates[0])
    if not candidates:
        raise LayoutError(f"{where}: no {'/'.join(default_names)} and no file ending in {'/'.join(suffixes)}")
    raise LayoutError(f"{where}: several candidate files {candidates[:10]}; pass weight_name= to choose one")
