"""Checkpoint formats: everything about how files name and store the models' tensors.

    tables.py        strict key-table machinery (Rename / Split / Fuse, apply_table, invert)
    unet_layout.py   the UNet's diffusers and original configs and key tables
    vae_layout.py    the autoencoder's
    text_layout.py   the text encoder's (open_clip file, transformers CLIPTextModel)
    safe_pickle.py   reading pickles without running code
    files.py         tensors and JSON in, atomic writes out
    locate.py        name -> folder (local, bundled, hub id); which file holds what
    folders.py       per component: read (config, state in our keys), build, write
    convert.py       layout -> layout conversion of a whole checkpoint
"""

from .convert import DTYPES, convert_checkpoint
from .files import LayoutError, read_json, read_tensors, write_json
from .folders import COMPONENTS, MODELSCOPE_T2V_SCHEDULER_CONFIG, load_component, released_scheduler_config
from .locate import LAYOUTS, bundled_models, bundled_path, detect_layout, resolve
from .safe_pickle import CheckpointReadError, UnsafeCheckpointError, safe_torch_load
from .tables import ConversionError, apply_table, invert

__all__ = [
    "COMPONENTS", "DTYPES", "LAYOUTS", "MODELSCOPE_T2V_SCHEDULER_CONFIG", "CheckpointReadError", "ConversionError",
    "LayoutError", "UnsafeCheckpointError", "apply_table", "bundled_models", "bundled_path", "convert_checkpoint",
    "detect_layout", "invert", "load_component", "read_json", "read_tensors", "released_scheduler_config",
    "resolve", "safe_torch_load", "write_json",
]
