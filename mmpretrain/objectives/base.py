"""The objective layer's contract: the term, what a step hands it, and the registry (configs: objectives/config.py).

A recipe is a set of terms, each one small module::

    @register
    class MyTerm(Term):
        name = "my"                    # the key under loss.terms
        config_cls = MyTermConfig      # a TermConfig subclass in objectives/config.py: weight + this term's options
        needs = ("image_tokens",)      # model outputs beyond the features (see mmpretrain.model.base.NEEDS)

        def build_head(self, model):   # optional: trainable parameters, attached as model.heads[name]
            return nn.Linear(...)

        def loss(self, ctx: StepContext) -> torch.Tensor:
            h = ctx.model(head=self.name, x=ctx.out.image_tokens)   # heads run through the engine
            return ...

and its config class in ``mmpretrain/objectives/config.py`` (TERM_CONFIGS; the config also says what the term needs
from the rest of the run: model family, GradCache, ``check_run``, patch masking). The trainer sums ``weight * loss``
over the terms and logs each term's (unweighted) value as ``loss/<name>``.

Gradient contract (the same as mmpretrain.loss): the tensor ``loss()`` returns is what this rank back-propagates,
and DeepSpeed then averages gradients over the N ranks. So a term over the global batch (contrastive, UniCL,
distillation) returns a value whose gradient is N x this rank's share of the global loss's gradient (the
kernels in mmpretrain.loss do this, and so do mmpretrain.distributed's gather_with_grad, global_mean and
fetch_rows); a term over this rank's samples alone (MIM) returns their mean. The value
logged is the mean over ranks of the returned values (the same on every rank for global terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmpretrain.objectives.config import TermConfig


@dataclass
class StepContext:
    """What a term sees in one step (this rank's share of the global batch; b samples)."""

    out: Any  # mmpretrain.model.ModelOutput: normalized features, logit scale/bias, token states asked for
    images: torch.Tensor  # (b, 3, H, W) normalized, in the engine's dtype
    tokens: torch.Tensor  # (b, L) token ids
    batch: dict  # the loader's batch as it came (uint8 "image", "text", "keys", "label" when the data has it)
    model: Any  # the engine (or module): call model(head=name, **inputs) to run this term's head
    group: Any  # process group of the global batch (None: world, or no torch.distributed)
    loss_cfg: Any  # the LossConfig (impl, chunk_size) for the contrastive kernels
    step: int = 0  # the optimizer step being computed (1-based), for schedules inside a term


class Term:
    """One objective; see the module docstring for the contract. Instances are built once per run."""

    name: ClassVar[str]
    config_cls: ClassVar[type] = TermConfig
    needs: ClassVar[tuple] = ()  # model outputs beyond the features: names in mmpretrain.model.base.NEEDS

    def __init__(self, cfg: TermConfig, run_cfg: Any):
        self.cfg = cfg
        self.run_cfg = run_cfg

    def patch_drop(self) -> float | None:
        """Patch-dropout fraction this term needs the vision tower to apply in training (MIM), else None."""
        return self.cfg.patch_drop()

    def build_head(self, model: nn.Module) -> nn.Module | None:
        """Trainable parameters of this term, attached as ``model.heads[name]`` before the engine exists."""
        return None

    def setup(self, device: torch.device) -> None:
        """Once, after the engine exists: load what the term needs that is not trained (a teacher)."""

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """0-dim float32 tensor (see the gradient contract)."""
        raise NotImplementedError

    def parts(self) -> dict[str, torch.Tensor]:
        """Detached parts of the last ``loss()`` to log beside it, as ``loss/<name>/<part>`` (the caption term's
        per-task losses), each under the same contract as the loss (the log takes the mean over ranks)."""
        return {}

    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (not after a skipped step): update what the term keeps (an EMA teacher).
        ``model``: the engine (or module). Every rank calls it (it may run collectives)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the term keeps beyond the model's weights (an EMA teacher), saved in each checkpoint; {} if none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s tensors on resume (after ``setup``)."""


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by (train.seed, step, stream), the same on every rank: a term draws what concerns
    the global batch from it (ITM's hard negatives: stream 0; the caption term's parallel rows: stream 1), so N
    ranks draw what one rank holding the whole batch draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + stream * 7_919_000_003) % (2**63 - 1))


REGISTRY: dict[str, type[Term]] = {}


def register(cls: type[Term]) -> type[Term]:
    """Class decorator: make a term known under ``loss.terms.<cls.name>``."""
    if cls.name in REGISTRY:
        raise ValueError(f"objective term {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
