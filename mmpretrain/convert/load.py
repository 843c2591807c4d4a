"""Read weights from any source we know, as our state dict + config.

    run folder / checkpoints/step_N      DeepSpeed checkpoint (any ZeRO stage), config from meta.json
    consolidated folder                  model.safetensors + config.yaml
    Hugging Face folder                  config.json + model.safetensors (CLIP or SigLIP)
    OpenCLIP folder                      one model-config *.json + one weights file

`load_any(path) -> (model, Config)` gives the two towers (`mmpretrain.checkpoint.load_model` also a run's objective
heads, which need the objectives' code). A Config built from an HF / OpenCLIP / consolidated folder has our defaults
everywhere but `model`; one from a run has our default `data:` (a loaded folder never supplies data paths).

Trust: HF, OpenCLIP and consolidated weights load through safetensors or torch.load(weights_only=True); a run's
DeepSpeed pickles load only after a weights-only read of each passes, unless ``trust_pickles`` (the commands'
`--trust-pickles`) says the folder is trusted like code: mmpretrain/convert/ours.py.
"""

from __future__ import annotations

import os

import torch

from mmpretrain.config import Config
from mmpretrain.convert.common import drop_heads
from mmpretrain.convert.hf import is_hf_folder, read_hf
from mmpretrain.convert.openclip import find_openclip, read_openclip
from mmpretrain.convert.ours import is_consolidated, read_consolidated, read_run
from mmpretrain.model import build_model
from mmpretrain.run_folder import is_run


def read_any(path: str, dtype: torch.dtype = torch.float32, trust_pickles: bool = False):
    """(our state dict in dtype, Config) from any supported source; one-line ValueError otherwise. ``trust_pickles``:
    a run folder's DeepSpeed pickles may be unpickled (module docstring)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder")
    if is_run(path):
        return read_run(path, dtype, trust_pickles=trust_pickles)
    if is_consolidated(path):
        return read_consolidated(path, dtype)
    if is_hf_folder(path):
        sd, model_cfg = read_hf(path, dtype)
        return sd, Config(model=model_cfg)
    if (found := find_openclip(path)) is not None:
        sd, model_cfg = read_openclip(*found, dtype)
        return sd, Config(model=model_cfg)
    raise ValueError(
        f"{path}: not a run folder, a checkpoint step folder, a consolidated folder (model.safetensors + "
        "config.yaml), a Hugging Face folder (config.json) or an OpenCLIP folder (one *.json + one weights file)"
    )


def load_any(path: str, trust_pickles: bool = False):
    """(fp32 model in eval mode, Config) from any supported source; the weights load strictly (objective heads,
    training-only, are dropped with a warning)."""
    sd, cfg = read_any(path, torch.float32, trust_pickles=trust_pickles)
    sd = drop_heads(sd, path)
    model = build_model(cfg.model)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg
