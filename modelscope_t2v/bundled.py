"""Models that ship inside the package: trained by this project, so they work with no download.

    TextToVideoSDPipeline.from_pretrained("shapes")   # or: python sample.py prompt="a red circle moving left"

"shapes" is the small text-to-video model of the shapes world (configs/model/shapes.yaml; how it was
trained and how well it does: docs/shapes_model.md). A bundled name is looked up after local folders and
before hub ids, so a folder called `shapes` in the working directory wins over it.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> folder under WEIGHTS_DIR (a diffusers-layout pipeline folder)
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
