"""What every converter shares: dtype flag, strict key/shape checks, safe loading, atomic output folders.

A converter is a key map. `check_state_dict` compares what a map produced with what the other side
expects and fails naming the missing, leftover and mis-shaped keys. Output folders are written
under a temporary sibling and renamed into place, so a failure never leaves a half-written folder.
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file, save_file

from mmpretrain.atomic import apply_umask, atomic_folder  # noqa: F401  (the converters take them from here)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = "heads."  # training-only objective heads (ITM fusion encoder, MIM decoder ...): not part of the two towers

log = logging.getLogger(__name__)


def drop_heads(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict without the objective heads' keys (heads.<term>.*), logging (a warning) what was dropped."""
    dropped = sorted(k for k in sd if k.startswith(HEADS))
    if not dropped:
        return sd
    terms = sorted({k.split(".")[1] for k in dropped})
    log.warning("%s: dropped %d keys of training-only objective heads (%s); the two-tower model does not use them",
                source, len(dropped), ", ".join(f"heads.{t}.*" for t in terms))  # fmt: skip
    return {k: v for k, v in sd.items() if not k.startswith(HEADS)}


def check_exportable(model_cfg, target: str) -> None:
    """Refuse, naming the reason, a model the `target` format (HF CLIPModel/SiglipModel, OpenCLIP) cannot hold."""
    t = model_cfg.text
    if t.kind != "clip":
        raise ValueError(
            f"model.text.kind={t.kind}: the {target} export needs our {model_cfg.family.upper()} text tower; this "
            f"model's text tower is a transformers encoder (model.text.hf_config={t.hf_config}, [CLS]-pooled), "
            f"which {target} has no place for. Evaluate it with `python -m mmpretrain.eval RUN`, or keep our "
            "format with `mmpretrain-convert consolidate`"
        )


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    return DTYPES[name]


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to dtype, contiguous (safetensors refuses views); others unchanged."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def check_state_dict(got: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Raise ValueError naming the missing / leftover keys and the shape mismatches (up to 5 of each)."""

    def names(keys):
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    missing, leftover = set(expected) - set(got), set(got) - set(expected)
    if missing:
        raise ValueError(f"{source}: missing keys {names(missing)}")
    if leftover:
        raise ValueError(f"{source}: unexpected keys {names(leftover)}")
    bad = [f"{k} {tuple(got[k].shape)} != {tuple(s)}" for k, s in expected.items() if tuple(got[k].shape) != tuple(s)]
    if bad:
        raise ValueError(f"{source}: shape mismatch: {'; '.join(bad[:5])}")


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file on CPU; a missing, truncated or corrupted file is a one-line ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{path}: not a readable safetensors file ({why})") from None


def load_torch_weights(path: str) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict loaded with weights_only=True (never unpickles code)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{path}: not a readable torch weights file ({why})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # OpenCLIP training checkpoints wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return sd


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """.safetensors through safetensors, anything else through torch.load(weights_only=True)."""
    return load_safetensors(path) if path.endswith(".safetensors") else load_torch_weights(path)


def save_safetensors(sd: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata or {"format": "pt"})
