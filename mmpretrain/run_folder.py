"""The run folder: where a run keeps what it is, and how a reader finds its newest checkpoint.

    <output_dir>/
        config.yaml                  the resolved config (written once; a restart must match it)
        checkpoints/
            step_<N>/                one checkpoint; complete once meta.json exists
                meta.json            step, samples seen, resolved config, data position, wandb run id
            latest                   text file naming the newest complete tag (replaced atomically)

mmpretrain.checkpoint writes checkpoints into this layout; mmpretrain.convert and evaluation read them.
Plain files only: nothing here imports torch or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import re

from mmpretrain.atomic import write_atomic  # noqa: F401  (checkpoint.py and loop.py take it from here)
from mmpretrain.config import Config, from_dict, from_yaml_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
CONFIG = "config.yaml"
TAG_RE = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def step_tag(step: int) -> str:
    return f"step_{step}"


def latest_tag(output_dir: str) -> str | None:
    """The tag named by ``checkpoints/latest``, or None for a fresh run."""
    path = os.path.join(checkpoint_root(output_dir), LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isfile(os.path.join(checkpoint_root(output_dir), tag, META)):
        raise ValueError(f"{path} names {tag!r}, but {tag}/{META} is missing: the checkpoint folder is damaged")
    return tag


def step_numbers(output_dir: str) -> list[int]:
    """Steps of the ``step_<N>`` folders under ``checkpoints/``, ascending (complete or not)."""
    root = checkpoint_root(output_dir)
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := TAG_RE.match(d)))


def is_run(path: str) -> bool:
    """A run folder (it has ``checkpoints/``) or one of its step folders (it has ``meta.json``)."""
    return os.path.isfile(os.path.join(path, META)) or os.path.isdir(checkpoint_root(path))


def find_step_dir(path: str) -> str:
    """A run folder (uses its ``latest``) or a ``checkpoints/step_N`` folder -> the step folder."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    tag = latest_tag(path) if os.path.isdir(checkpoint_root(path)) else None
    if tag is None:
        raise ValueError(f"{path}: not a run folder with checkpoints/latest, nor a checkpoint folder with {META}")
    return os.path.join(checkpoint_root(path), tag)


def read_meta(step_dir: str) -> dict:
    """A step folder's meta.json; ValueError naming the file when it cannot be read."""
    path = os.path.join(step_dir, META)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def meta_config(step_dir: str, meta: dict | None = None) -> Config:
    """The resolved config a checkpoint was written with (from its meta.json)."""
    meta = read_meta(step_dir) if meta is None else meta
    return from_dict(meta.get("config", {}), os.path.join(step_dir, META))


def run_config(output_dir: str) -> Config | None:
    """The config a run folder was started with (its config.yaml), or None when it has none yet."""
    path = os.path.join(output_dir, CONFIG)
    return from_yaml_file(path) if os.path.isfile(path) else None
