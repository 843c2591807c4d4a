"""Our own formats: a DeepSpeed run checkpoint (any ZeRO stage, any world size) and the consolidated folder.

`consolidate` turns the first into the second; the consolidated folder::

    model.safetensors   our parameter names, whole tensors, in the chosen dtype
    config.yaml         the model's config only (`model:`): no data paths, no command, nothing from the environment

ZeRO 1-3 go through DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`,
lazy mode: DeepSpeed loads the ranks' flat fp32 shards and each whole tensor is assembled from them
only when converted, so no second full fp32 copy is built next to the output). Stage 0 keeps whole
weights in `mp_rank_00_model_states.pt`, which is memory-mapped.

Trust. DeepSpeed's files are pickles, and unpickling can run code. `consolidate` is the run's own hand-off and
reads them as DeepSpeed does; every other reader (`read_run`, and through it evaluation, export, adapt,
`model.init_from`, a distillation teacher, to-hf / to-openclip) reads a stage-0 file with
`torch.load(weights_only=True)` (tensors and plain containers only, never code). ZeRO 1-3 files are first each
read the same way (allowed beyond tensors and plain values: DeepSpeed's ZeroStageEnum, its loss-scaler classes
and its fragment_address dataclass, plain attribute holders without custom unpickling); only when every one
passes does DeepSpeed's
own loader, which unpickles freely, read those same bytes. A file that a weights-only read refuses stops the
load with an error naming it and `--trust-pickles` (`trust_pickles=True`), which says the folder is trusted like
code (then nothing is checked). A folder that can change while it is read (someone else writing to it) is not
covered by that check: copy it first.
Everything read back from a consolidated folder goes through safetensors, and only its `model:` config is used.
"""

from __future__ import annotations

import glob
import importlib
import os
import pickle

import torch
from omegaconf import OmegaConf

from mmpretrain.config import Config, as_loaded, from_dict, to_dict
from mmpretrain.convert.common import (
    HEADS,
    atomic_folder,
    cast,
    check_state_dict,
    drop_heads,
    load_safetensors,
    save_safetensors,
)
from mmpretrain.model import build_model
from mmpretrain.run_folder import find_step_dir, meta_config

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def expected_shapes(model_cfg) -> dict[str, torch.Size]:
    """Our parameter names and shapes for a model config, without allocating (meta device)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


TRUST_FLAG = "--trust-pickles"  # the command-line flag; trust_pickles=True in Python, a `trust_pickles` key in a config
TRUST_HELP = (
    "SRC/CHECKPOINT is a run folder you trust like code: its DeepSpeed pickles may be unpickled (which can run code). "
    "Without it a run's files are read weights-only, and one that needs more is refused; HF, OpenCLIP and "
    "consolidated folders never need it"
)


def untrusted(path: str, why: str) -> ValueError:
    """The error of a pickle read without trust: names the file and the flag."""
    return ValueError(
        f"{path}: {why}; unpickling it can run code, so it is read only for a folder you trust like code: pass "
        f"{TRUST_FLAG} if it is yours (model.trust_pickles=true for model.init_from, loss.terms.distill.trust_pickles"
        "=true for a teacher, trust_pickles=True in Python), or use its consolidated folder (mmpretrain-convert "
        "consolidate RUN OUT, run by whoever trained it)"
    )


# What DeepSpeed's ZeRO 1-3 files hold beyond tensors and plain values: an enum and three attribute holders, none
# with __setstate__ or __reduce__ of its own (unpickling them only sets attributes). Named, not imported: importing
# DeepSpeed picks an accelerator, which a stage-0 or HF read should not do.
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _check_weights_only(step_dir: str) -> None:
    """Read every DeepSpeed file of a ZeRO 1-3 step folder weights-only (memory-mapped; SAFE_GLOBALS
    allowed); the first one refused raises, naming it and the trust flag. When all pass they hold data only, and
    DeepSpeed's loader reads the same bytes without running anything."""
    allowed = [getattr(importlib.import_module(g.rsplit(".", 1)[0]), g.rsplit(".", 1)[1]) for g in SAFE_GLOBALS]
    for path in sorted(glob.glob(os.path.join(step_dir, "*_states.pt"))):  # what zero_to_fp32 reads
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise untrusted(path, "holds Python objects that a weights-only load refuses") from None
        except Exception as e:
            raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _run_state_dict(step_dir: str, stage: int, trust_pickles: bool) -> dict[str, torch.Tensor]:
    """fp32 (stage 1-3) or saved-dtype (stage 0) weights; tensors may be lazy (read on access)."""
    if stage == 0:
        path = os.path.join(step_dir, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing, the checkpoint is incomplete")
        try:  # DeepSpeed's stage-0 file holds tensors, numbers, strings and containers: weights_only reads it
            states = torch.load(path, map_location="cpu", weights_only=not trust_pickles, mmap=True)
        except pickle.UnpicklingError as e:
            if trust_pickles:
                raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
            raise untrusted(path, "holds Python objects that a weights-only load refuses") from None
        except Exception as e:
            raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise ValueError(f"{path}: not a DeepSpeed model-states file (no 'module' state dict)")
        return states["module"]
    # only ZeRO 1-3 need DeepSpeed here; importing it picks an accelerator, which a stage-0 or HF read should not do
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not trust_pickles:  # DeepSpeed's consolidation unpickles every rank's files without restriction
        _check_weights_only(step_dir)

    root, tag = os.path.split(os.path.normpath(step_dir))
    try:
        return dict(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True))
    except Exception as e:
        raise ValueError(f"{step_dir}: DeepSpeed could not consolidate it ({type(e).__name__}: {e})") from None


def step_weights(
    step_dir: str, zero_stage: int, dtype: torch.dtype = torch.float32, trust_pickles: bool = False
) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint folder (any ZeRO stage, any world size) in dtype, whole, on CPU, unchecked: the
    reader under read_run, and what other trainers' checkpoints (mmpretrain.instruct's) load from."""
    sd = _run_state_dict(step_dir, zero_stage, trust_pickles)
    out = {}
    for k in list(sd):
        v = sd.pop(k)  # drop our reference as we go: a lazy tensor is materialized once, then cast
        if not isinstance(v, torch.Tensor):  # DeepSpeed's lazy tensor: contiguous() assembles it from the shards
            v = v.contiguous()
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return out


def read_run(
    path: str, dtype: torch.dtype = torch.float32, trust_pickles: bool = False
) -> tuple[dict[str, torch.Tensor], Config]:
    """(state dict in dtype, Config) from a run folder or a step folder; keys and shapes checked against the config.

    Without ``trust_pickles`` every DeepSpeed file is read weights-only first, and one refused there raises (module
    docstring). The Config is `as_loaded`: our default `data:` (a folder's data paths are never used), no trust.
    The objective heads' keys (heads.<term>.*, training-only) are passed through unchecked (model.init_from
    may load them); every writer of another format and `load_any` drop them."""
    step_dir = find_step_dir(path)
    cfg = as_loaded(meta_config(step_dir))
    out = step_weights(step_dir, cfg.engine.zero_stage, dtype, trust_pickles)
    check_state_dict({k: v for k, v in out.items() if not k.startswith(HEADS)}, expected_shapes(cfg.model), step_dir)
    return out, cfg


def consolidate(path: str, out_dir: str, dtype: torch.dtype = torch.float32, force: bool = False) -> str:
    """Run / step folder -> out_dir with model.safetensors + config.yaml. Returns out_dir.

    The run's own hand-off: its DeepSpeed pickles are read as DeepSpeed does (run it on runs you trust)."""
    sd, cfg = read_run(path, dtype, trust_pickles=True)
    write_folder(sd, cfg, out_dir, force)
    return out_dir


def write_folder(sd: dict[str, torch.Tensor], cfg, out_dir: str, force: bool = False) -> None:
    """Our consolidated layout: model.safetensors + config.yaml (cfg: a Config; only its `model:` section is
    written, `${oc.env:VAR}` values redacted); objective heads are dropped."""
    sd = drop_heads(sd, "consolidate")
    with atomic_folder(out_dir, force) as tmp:
        save_safetensors(sd, os.path.join(tmp, WEIGHTS))
        OmegaConf.save(OmegaConf.create({"model": to_dict(cfg)["model"]}), os.path.join(tmp, CONFIG))


def is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, CONFIG))


def read_consolidated(path: str, dtype: torch.dtype | None = None):
    """(state dict, Config) from a consolidated folder; keys and shapes checked against its config. Only the
    config's `model:` section is read (an older folder's other sections, data paths among them, are ignored); the
    rest of the Config is our defaults."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path}: no such file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
    except Exception as e:
        raise ValueError(f"{cfg_path}: unreadable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{cfg_path}: no model: section")
    cfg = as_loaded(from_dict({"model": raw["model"]}, cfg_path))
    sd = drop_heads(load_safetensors(os.path.join(path, WEIGHTS)), path)
    check_state_dict(sd, expected_shapes(cfg.model), os.path.join(path, WEIGHTS))
    return (cast(sd, dtype) if dtype is not None else sd), cfg


def load_consolidated(path: str):
    """(model in eval mode, fp32, Config) from a consolidated folder; strict."""
    sd, cfg = read_consolidated(path, torch.float32)
    model = build_model(cfg.model)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg
