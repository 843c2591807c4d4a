"""Objectives: ``loss.terms`` composes the recipe's terms, each a small module registered in this package.

    loss:
      terms:
        clip: {weight: 1.0}
        mim: {weight: 0.5, mask_ratio: 0.75}

Each key is a term name and its value that term's own dataclass (``mmpretrain.objectives.config``, validated
like every config section: an unknown term or option fails, naming it). Without ``loss.terms`` the loss is the one
contrastive term ``loss.name`` (clip | siglip). The trainer sums ``weight * term`` and logs each term as
``loss/<name>``. The contract a term implements is in ``mmpretrain.objectives.base``.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from mmpretrain.objectives.base import REGISTRY, StepContext, Term, TermConfig, register
from mmpretrain.objectives.config import (
    LOSS_IMPLS,
    LOSS_NAMES,
    TERM_CONFIGS,
    LossConfig,
    TermsConfig,
    check_run,
)

# Every module of this package registers its terms on import (a new term = a new file here); modules whose
# name starts with "_" are skipped. Alphabetical: the order terms are summed and logged.
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_") and _m.name not in ("base", "config"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "LOSS_IMPLS",
    "LOSS_NAMES",
    "REGISTRY",
    "TERM_CONFIGS",
    "LossConfig",
    "Objective",
    "StepContext",
    "Term",
    "TermConfig",
    "TermsConfig",
    "check_run",
    "register",
]


class Objective:
    """The run's terms, built once: forward arguments, heads, setup, and the summed loss of a step."""

    def __init__(self, run_cfg):
        self.run_cfg = run_cfg
        self.terms = [REGISTRY[n](c, run_cfg) for n, c in run_cfg.loss.active().items()]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def forward_kwargs(self) -> dict:
        """Extra arguments of the model's forward: token states the terms need, patch masking."""
        kw = {}
        need = tuple(sorted({n for t in self.terms for n in t.needs}))
        if need:
            kw["need"] = need
        drops = [d for d in (t.patch_drop() for t in self.terms) if d is not None]
        if drops:
            kw["patch_drop"] = drops[0]
        return kw

    def attach_heads(self, model: torch.nn.Module) -> None:
        """Put each term's trainable head on the model (before the engine is built, so ZeRO shards it)."""
        for t in self.terms:
            head = t.build_head(model)
            if head is not None:
                model.heads[t.name] = head

    def setup(self, device) -> None:
        for t in self.terms:
            t.setup(device)

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """-> (sum of weight x term, {name: unweighted term value (0-dim tensor, graph kept)})."""
        values = {t.name: t.loss(ctx).float() for t in self.terms}
        total = sum(t.cfg.weight * values[t.name] for t in self.terms)
        return total, values
