"""The one multi-rank harness: run code on N gloo ranks, and check that N ranks equal one process holding the batch.

    run_on_ranks(fn, *args)                              fn(rank, *args) on 2 spawned gloo ranks -> [result, ...]
    assert_n_ranks_equal_one(cases, rows_per_rank=7)     loss and gradients, N ranks == 1 process

A case's ``step(rows)`` builds the thing under test (linear towers, a head) from a fixed state, runs the forward
AND the backward on rows ``rows`` of the global batch, and returns a ``Step``: the loss, the module whose
parameter gradients count, and the per-sample tensors (features, token states) whose gradients count. The
parent runs ``reference()`` (a float64 full-matrix formula; default: ``step`` on every row, outside any process
group); each rank runs ``step`` on its own rows. Then, on every rank:

- a global term: its loss is the same on every rank and equals the reference's; a local term (``local=True``):
  the mean of the ranks' losses equals it;
- each per-sample gradient is world x the reference's rows (the gradient contract: DeepSpeed averages);
- the parameter gradients averaged over ranks (all-reduce sum / world, as DeepSpeed does) equal the reference's.

Cases cross to the spawned ranks by pickling: module-level functions or functools.partial of them.
"""

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmpretrain.distributed import free_port

WORLD = 2


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group on localhost (called first in each torch.multiprocessing.spawn worker)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription


def assert_close(got, want, what, rtol=2e-5):
    """max |got - want| <= rtol x max |want| (floored at 1e-3): a relative check of a whole tensor."""
    err, size = (got.double() - want).abs().max().item(), want.abs().max().item()
    assert err <= rtol * max(size, 1e-3), f"{what}: max error {err:.3g} vs max |ref| {size:.3g}"


class Step(NamedTuple):
    """What a case's step returns, after its backward."""

    loss: torch.Tensor  # 0-dim
    module: torch.nn.Module  # its parameters' gradients are compared
    inputs: dict  # {name: per-sample tensor (rows of the global batch)}: their .grad are compared


@dataclass(frozen=True)
class Case:
    tag: str  # names the case in failure messages
    step: Callable  # step(rows: slice) -> Step
    reference: Optional[Callable] = None  # () -> Step on one process, whole batch; None: step(slice(None))
    check: Optional[Callable] = None  # check(rank), on each rank after the comparisons (what else must hold)


class LinearTowers(torch.nn.Module):
    """A linear "tower" per modality and a learnable log scale (and logit bias): the model the loss tests train.

    model((x_img, x_txt)) -> an object with image_features, text_features (normalized), logit_scale, logit_bias.
    """

    def __init__(self, d_in: int, d: int, bias: bool = False):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(d_in, d), torch.nn.Linear(d_in, d)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.5))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, batch):
        x_img, x_txt = batch
        out = type("Out", (), {})()
        out.image_features = F.normalize(self.img(x_img), dim=-1)
        out.text_features = F.normalize(self.txt(x_txt), dim=-1)
        out.logit_scale, out.logit_bias = self.log_scale.exp(), self.bias
        return out

    @classmethod
    def from_state(cls, state: dict, dtype=torch.float32) -> "LinearTowers":
        """The towers whose state_dict is `state`, in dtype (every rank and the reference build the same)."""
        d, d_in = state["img.weight"].shape
        towers = cls(d_in, d, bias="bias" in state).to(dtype)
        towers.load_state_dict(state)
        return towers


def approx_loss(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    assert got.item() == pytest.approx(want.item(), rel=rel), what


def run_on_ranks(fn: Callable, *args, world: int = WORLD) -> list:
    """fn(rank, *args) on `world` spawned processes in one gloo group; returns [rank 0's result, rank 1's, ...]."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _rank_main(rank, world, port, out_dir, fn, args):
    init_gloo(rank, world, port)
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_n_ranks_equal_one(
    cases: Sequence[Case],
    *,
    rows_per_rank: int,
    local: bool = False,
    close: Callable = assert_close,
    loss_close: Callable = approx_loss,
    world: int = WORLD,
) -> None:
    """Every case on `world` gloo ranks (rows_per_rank each) against one process holding the whole batch.

    close(got, want, what) compares gradients (default: relative to the largest reference entry);
    loss_close(got, want, what) compares 0-dim losses (default: pytest.approx, rel 1e-5).
    """
    refs = [_grads(case.reference() if case.reference is not None else case.step(slice(None))) for case in cases]
    run_on_ranks(_compare, cases, refs, rows_per_rank, local, close, loss_close, world=world)


def _grads(out: Step):
    """(loss, {input: grad}, {parameter: grad}), detached: what crosses between processes."""
    for name, x in out.inputs.items():
        assert x.grad is not None, f"no gradient reached {name}"
    return (
        out.loss.detach(),
        {name: x.grad for name, x in out.inputs.items()},
        {name: p.grad for name, p in out.module.named_parameters()},
    )


def _compare(rank, cases, refs, rows_per_rank, local, close, loss_close):
    world = dist.get_world_size()
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    for case, (want_loss, want_inputs, want_params) in zip(cases, refs):
        tag = f"{case.tag} rank {rank}"
        loss, inputs, params = _grads(case.step(rows))
        losses = [torch.zeros_like(loss) for _ in range(world)]
        dist.all_gather(losses, loss)
        if local:  # a per-rank term: the ranks' mean is the global value
            loss_close(torch.stack(losses).mean(), want_loss, tag)
        else:
            assert all(x.item() == losses[0].item() for x in losses), f"{tag}: loss differs across ranks {losses}"
            loss_close(loss, want_loss, tag)
        # world x this rank's share of the one-process gradient, so that the engine's average is exact ...
        for name, g in inputs.items():
            close(g, world * want_inputs[name][rows], f"{tag} d_{name}")
        # ... and the averaged parameter gradients are the one-process ones
        for name, g in params.items():
            assert g is not None, f"{tag}: no gradient reached {name}"
            dist.all_reduce(g)  # DeepSpeed: sum, then / world
            close(g / world, want_params[name], f"{tag} d_{name}")
        if case.check is not None:
            case.check(rank)
