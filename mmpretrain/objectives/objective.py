"""The run's objective: its terms, built once from ``loss``, and their weighted sum in each step.

Importing this module imports every term's module, each of which registers its term (``base.register``). A new
term: its module, one import below, and its config in ``config.py`` (TERM_CONFIGS); tests/unit/test_objectives.py
checks the two lists agree.
"""

from __future__ import annotations

import torch

from mmpretrain.objectives import (  # noqa: F401  (each registers its terms)
    caption,
    contrastive,
    distill,
    itm,
    mim,
    self_distill,
    unicl,
)
from mmpretrain.objectives.base import REGISTRY, StepContext

__all__ = ["REGISTRY", "Objective"]


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

    def after_step(self, model, step: int) -> None:
        """After each optimizer step that was taken (mmpretrain.step): the terms' own updates (an EMA teacher)."""
        for t in self.terms:
            t.after_step(model, step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every term's kept state, keyed ``<term>.<name>`` ({} when no term keeps any): a checkpoint's part."""
        return {f"{t.name}.{k}": v for t in self.terms for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Hand each term its part of ``state_dict()``'s keys; a key of no term of this run is an error."""
        names = set(self.names)
        unknown = sorted({k.split(".", 1)[0] for k in state} - names)
        if unknown:
            raise ValueError(f"objective state of terms this run does not have: {unknown} (terms: {sorted(names)})")
        for t in self.terms:
            own = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == t.name}
            if own or t.state_dict():
                t.load_state_dict(own)

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """-> (sum of weight x term, {name: unweighted term value (0-dim tensor, graph kept), and each term's
        parts as "name/part" (detached)})."""
        values = {t.name: t.loss(ctx).float() for t in self.terms}
        total = sum(t.cfg.weight * values[t.name] for t in self.terms)
        for t in self.terms:
            values.update({f"{t.name}/{k}": v.float() for k, v in t.parts().items()})
        return total, values
