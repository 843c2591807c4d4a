"""Checkpoint hand-off: our runs <-> consolidated safetensors, Hugging Face transformers, OpenCLIP.

CLI: `mmpretrain-convert {consolidate,to-hf,to-openclip,from-hf,from-openclip} SRC OUT` (mmpretrain/convert/cli.py;
also `python -m mmpretrain.convert` and, in a checkout, `python tools/convert_checkpoint.py`).
Key maps and folder layouts: docs/formats.md.
"""

from mmpretrain.convert.hf import export_hf, from_hf_state_dict, hf_config, read_hf, to_hf_state_dict
from mmpretrain.convert.load import is_run, load_any, read_any
from mmpretrain.convert.openclip import (
    export_openclip,
    from_openclip_state_dict,
    openclip_config,
    read_openclip,
    to_openclip_state_dict,
)
from mmpretrain.convert.ours import consolidate, load_consolidated, read_consolidated, read_run, write_folder

__all__ = [
    "consolidate",
    "export_hf",
    "export_openclip",
    "from_hf_state_dict",
    "from_openclip_state_dict",
    "hf_config",
    "is_run",
    "load_any",
    "load_consolidated",
    "openclip_config",
    "read_any",
    "read_consolidated",
    "read_hf",
    "read_openclip",
    "read_run",
    "to_hf_state_dict",
    "to_openclip_state_dict",
    "write_folder",
]
