"""Save, resume and keep-last-k of run checkpoints, and loading a trained model back.

Layout of ``<output_dir>/checkpoints/``::

    step_<N>/                DeepSpeed engine state (ZeRO shards, optimizer, LR scheduler)
        meta.json            step, samples seen, resolved config, data position, wandb run id
        rng_rank<R>.pt       torch / CUDA / numpy / python RNG states of rank R
    latest                   text file naming the newest complete tag

``latest`` is replaced with an atomic rename only after every rank finished writing, so a
kill during a save leaves it on the previous complete checkpoint. DeepSpeed's shards are
pickles: a run folder is trusted like code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from mmpretrain.distributed import barrier

UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.UNIVERSAL_CHECKPOINT_INFO

TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at the end of the run)."""
    keep_last: int = 2
    """Keep this many newest checkpoints; older step_* folders are deleted after a save."""

    def validate(self, prefix: str) -> None:
        if self.every_steps < 0:
            raise ValueError(f"{prefix}.every_steps must be >= 0 (got {self.every_steps})")
        if self.keep_last < 1:
            raise ValueError(f"{prefix}.keep_last must be >= 1 (got {self.keep_last})")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def write_atomic(path: str, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(output_dir: str) -> str | None:
    """The tag named by ``checkpoints/latest``, or None for a fresh run."""
    path = os.path.join(checkpoint_root(output_dir), "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isfile(os.path.join(checkpoint_root(output_dir), tag, "meta.json")):
        raise ValueError(f"{path} names {tag!r}, but {tag}/meta.json is missing: the checkpoint folder is damaged")
    return tag


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, output_dir: str, step: int, meta: dict, rank: int, keep_last: int, before_commit=None) -> str:
    """Save on every rank (a collective); returns the tag. ``meta`` must be the same on all ranks.

    Order: DeepSpeed's files and the RNG states of every rank, then meta.json, then (after a
    barrier) ``latest``. A step folder without meta.json is incomplete and is never resumed from.
    ``before_commit(step)`` runs just before meta.json is written (fault injection in tests).
    """
    root = checkpoint_root(output_dir)
    tag = f"step_{step}"
    tag_dir = os.path.join(root, tag)
    if rank == 0 and os.path.exists(os.path.join(tag_dir, "meta.json")):
        # left by a save that was killed: DeepSpeed writes over the folder, but a stale meta.json must not
        # make it look complete (only rank 0 writes meta.json, after the barrier below)
        os.remove(os.path.join(tag_dir, "meta.json"))
    # the (empty) universal-checkpoint marker lets ds_to_universal convert this save for another world size
    engine.save_checkpoint(root, tag=tag, save_latest=False, client_state={UNIVERSAL_CHECKPOINT_INFO: {}})
    torch.save(_rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))
    barrier()  # every rank has written its shards and RNG state
    if before_commit is not None:
        before_commit(step)
    if rank == 0:
        write_atomic(os.path.join(tag_dir, "meta.json"), json.dumps({"step": step, **meta}, indent=1))
        write_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep_last, keep=tag)
    barrier()
    return tag


def _prune(root: str, keep_last: int, keep: str) -> None:
    steps = sorted(int(m.group(1)) for d in os.listdir(root) if (m := TAG_RE.match(d)))
    for s in steps[:-keep_last]:
        if f"step_{s}" != keep:
            shutil.rmtree(os.path.join(root, f"step_{s}"), ignore_errors=True)
            shutil.rmtree(os.path.join(root, f"step_{s}_universal"), ignore_errors=True)


def prepare_resume(output_dir: str, *, world_size: int, zero_stage: int, rank: int) -> tuple[str | None, bool]:
    """(tag to load or None, whether it is a DeepSpeed universal checkpoint). Call before building the engine.

    A checkpoint written by another number of ranks loads directly under ZeRO stage 0 (whole optimizer
    state in one file). ZeRO 1-3 partition the optimizer state by rank: rank 0 converts the checkpoint
    once with DeepSpeed's ds_to_universal into ``step_N_universal`` (weights and optimizer state per
    parameter, independent of the world size), and the engine loads that with ``load_universal``.
    """
    tag = latest_tag(output_dir)
    if tag is None:
        return None, False
    meta = json.load(open(os.path.join(checkpoint_root(output_dir), tag, "meta.json")))
    if meta["world_size"] == world_size or zero_stage == 0:
        return tag, False
    root = checkpoint_root(output_dir)
    universal = f"{tag}_universal"
    if rank == 0 and not os.path.isfile(os.path.join(root, universal, "done")):
        import subprocess
        import sys

        shutil.rmtree(os.path.join(root, universal), ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(root, tag), "--output_folder", os.path.join(root, universal),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {tag} for {world_size} ranks failed:\n{proc.stderr[-3000:]}")
        shutil.copy(os.path.join(root, tag, "meta.json"), os.path.join(root, universal, "meta.json"))
        write_atomic(os.path.join(root, universal, "done"), "ds_to_universal finished\n")
    barrier()
    return universal, True


def resume(engine, output_dir: str, rank: int, tag: str | None = None) -> dict | None:
    """Load ``tag`` (default: ``latest``) into the engine and restore this rank's RNG; returns its meta or None."""
    tag = tag or latest_tag(output_dir)
    if tag is None:
        return None
    root = checkpoint_root(output_dir)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    meta = json.load(open(os.path.join(root, tag, "meta.json")))
    rng_path = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):  # absent when resuming on a larger world size
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return meta


def find_step_dir(path: str) -> str:
    """A run folder (uses its ``latest``) or a ``checkpoints/step_N`` folder -> the step folder."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    tag = latest_tag(path) if os.path.isdir(checkpoint_root(path)) else None
    if tag is None:
        raise ValueError(f"{path}: not a run folder with checkpoints/latest, nor a checkpoint folder with meta.json")
    return os.path.join(checkpoint_root(path), tag)


def load_state_dict(step_dir: str) -> dict[str, torch.Tensor]:
    """Whole fp32 model weights from a checkpoint of any ZeRO stage and world size, on CPU.

    Stage 0 keeps whole weights in its module file (zero_to_fp32 does not handle it); stages 1-3
    go through DeepSpeed's consolidation. The work, and its checks, live in mmpretrain.convert.
    """
    from mmpretrain.convert import read_run

    return read_run(step_dir, torch.float32)[0]


def load_model_from_run(path: str):
    """(model in eval mode, config) from a run folder or a step folder; the weights load strictly."""
    from mmpretrain.convert import load_any

    return load_any(path)
