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
# Bundled models: name -> folder under WEIGHTS_DIR (a diffusers-layout pipeline folder). "shapes" is the
# small text-to-video model of the shapes world (configs/model/shapes.yaml; docs/shapes_model.md).

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BUNDLED: dict[str, str] = {"shapes": "shapes"}


def bundled_path(name: str) -> Path | None:
    """The folder of bundled model `name`, or None if there is no such bundled model (or it is not installed)."""
    folder = BUNDLED.get(name)
    if folder is None:
        return None
    path = WEIGHTS_DIR / folder
    return path if (path / "model_index.json").is_file() else None


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
    wanted += [f for f in files if f in (MS_UNET, MS_VAE, MS_CLIP)]
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
