"""Objectives: ``loss.terms`` composes the recipe's terms, each a small module of this package.

    loss:
      terms:
        clip: {weight: 1.0}
        mim: {weight: 0.5, mask_ratio: 0.75}

Each key is a term name and its value that term's own dataclass (``mmpretrain.objectives.config``, validated
like every config section: an unknown term or option fails, naming it). Without ``loss.terms`` the loss is the one
contrastive term ``loss.name`` (clip | siglip). The trainer sums ``weight * term`` and logs each term as
``loss/<name>``. The contract a term implements is in ``mmpretrain.objectives.base``.

    config.py        LossConfig, every term's config (TERM_CONFIGS) and the checks across sections; no project imports
    base.py          Term, StepContext, the registry
    objective.py     Objective: the run's terms, built once and summed per step; imports every term module
    contrastive.py, unicl.py, itm.py, mim.py, distill.py, caption.py, self_distill.py    one module per term

This ``__init__`` loads only the configs, so that ``mmpretrain.config`` composes ``loss`` without importing a term
(their code imports the model, the loss kernels and, for a teacher, mmpretrain.convert, which imports the config:
a cycle). The other names load their module on first use, as mmpretrain.data's do.
"""

import importlib

from mmpretrain.objectives.config import (
    LOSS_IMPLS,
    LOSS_NAMES,
    TERM_CONFIGS,
    LossConfig,
    TermConfig,
    TermsConfig,
    check_run,
)

_LAZY = {
    "Objective": "objective",
    "REGISTRY": "objective",  # filled as objective.py imports every term's module
    "StepContext": "base",
    "Term": "base",
    "register": "base",
}

__all__ = [
    "LOSS_IMPLS",
    "LOSS_NAMES",
    "TERM_CONFIGS",
    "LossConfig",
    "TermConfig",
    "TermsConfig",
    "check_run",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
