"""Objectives: ``loss.terms`` composes the recipe's terms, each a small module registered in this package.

    loss:
      terms:
        clip: {weight: 1.0}
        mim: {weight: 0.5, mask_ratio: 0.75}

Each key is a term name and its value that term's own dataclass (validated like every config section: an
unknown term or option fails, naming it). Without ``loss.terms`` the loss is the one contrastive term
``loss.name`` (clip | siglip). The trainer sums ``weight * term`` and logs each term as ``loss/<name>``.
The contract a term implements is in ``mmpretrain.objectives.base``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from mmpretrain.objectives.base import REGISTRY, StepContext, Term, TermConfig, register

# Every module of this package registers its terms on import (a new term = a new file here); modules whose
# name starts with "_" are skipped. Alphabetical: the order terms are summed and logged.
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_") and _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["REGISTRY", "LossConfig", "Objective", "StepContext", "Term", "TermConfig", "register"]

LOSS_NAMES = ("clip", "siglip")
LOSS_IMPLS = ("auto", "triton", "chunked", "naive")

# One Optional field per registered term: OmegaConf then checks names and option types like any section.
TermsConfig = dataclasses.make_dataclass(
    "TermsConfig",
    [(name, Optional[cls.config_cls], field(default=None)) for name, cls in REGISTRY.items()],
)
TermsConfig.__doc__ = "loss.terms: each field is one objective's config; unset (None) terms are off."


@dataclass
class LossConfig:
    """The training objective; the root config composes it as ``loss``."""

    name: str = "clip"  # the contrastive loss when `terms` is unset: clip | siglip (must match the model family)
    impl: str = "auto"  # auto | triton | chunked | naive; auto = triton on CUDA, chunked elsewhere
    chunk_size: int = 1024  # rows of the similarity matrix per chunk on the chunked path (memory ~ 8 * chunk * B bytes)
    terms: Optional[TermsConfig] = None  # objectives summed, e.g. {clip: {}, mim: {weight: 0.5}}; unset: {name: {}}

    def validate(self, prefix: str) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"{prefix}.name must be one of {LOSS_NAMES} (got {self.name!r})")
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"{prefix}.impl must be one of {LOSS_IMPLS} (got {self.impl!r})")
        if self.chunk_size < 1:
            raise ValueError(f"{prefix}.chunk_size must be >= 1 (got {self.chunk_size})")
        if self.terms is not None and not self.active():
            raise ValueError(f"{prefix}.terms: no term is set (known: {', '.join(REGISTRY)})")

    def active(self) -> dict:
        """{term name: its config} of the terms in use, in registry order."""
        if self.terms is None:
            return {self.name: REGISTRY[self.name].config_cls()}
        return {n: getattr(self.terms, n) for n in REGISTRY if getattr(self.terms, n) is not None}


def check_run(run_cfg) -> None:
    """Cross-section checks of every active term (ValueError naming the key); the root config calls this."""
    family = run_cfg.model.family
    for name, tcfg in run_cfg.loss.active().items():
        cls = REGISTRY[name]
        prefix = f"loss.terms.{name}" if run_cfg.loss.terms is not None else "loss.name"
        if cls.family is not None and cls.family != family:
            raise ValueError(
                f"{prefix}: the {name!r} term needs a {cls.family} model; model.name={run_cfg.model.name!r} is {family}"
            )
        if run_cfg.train.accum_steps > 1 and not cls.grad_cache:
            raise ValueError(f"{prefix}: the {name!r} term does not run under train.accum_steps > 1 (GradCache)")
        cls.check_run(tcfg, run_cfg, prefix)
    masking = [t.name for t in Objective(run_cfg).terms if t.patch_drop() is not None]
    if len(masking) > 1:
        raise ValueError(f"loss.terms: {masking} each set the patch masking; at most one term may")


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
