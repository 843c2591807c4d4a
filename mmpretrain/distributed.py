"""Every collective of the project, the process group, rank and world from the launcher, and rank-0 output.

    launch       env_rank_world, init_distributed, destroy, barrier, free_port, print0
    groups       is_initialized, resolve_group, world_rank
    tensors      all_gather, gather_with_grad, all_reduce, reduce_scatter, global_mean,
                 all_to_all, fetch_rows (chosen rows, with gradient), gather_rows (variable counts, by index)
    Python data  all_reduce_number, all_gather_object
    evaluation   lockstep
    ZeRO-3       gathered_params (whole values of partitioned parameters, read-only)

Launch. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under ``srun`` without
torchrun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are used instead. A plain
``python -m mmpretrain.train`` is a world of one with an in-memory store: no network listener opens.

Groups. Every function here takes ``group=None``, which means the default: the world's process group when
torch.distributed is initialized, else a world of one (no communication, and no error). With one rank in the
group, nothing is sent.

Layers. The loss kernels (``mmpretrain.kernels``, the layer below this one) keep their own collectives in
``kernels/collectives.py`` and import nothing from here, so they stay importable alone. There the group is
taken as given and None means no communication even inside a distributed job (how a kernel computes a
one-rank result); ``all_gather``, ``gather_with_grad`` and ``reduce_scatter`` below are those collectives
with the default group resolved (``resolve_group``), and the contrastive losses (mmpretrain.loss) resolve
the group the same way before they call a kernel.

Gradient contract (mmpretrain.objectives.base): DeepSpeed averages gradients over the N ranks, so a value
over the global batch hands each rank N x its share of the gradient. gather_with_grad's backward sums the
gradients of all ranks onto each row's owner (a reduce-scatter); global_mean and fetch_rows keep the
contract too.

Legend: b rows on this rank, B = world x b rows, m / n / M rows in counts that differ between ranks, D / F a
row's width.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import glob
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # DeepSpeed reads this when first imported; without it, it warns and guesses.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmpretrain.kernels import collectives as kernel_collectives  # noqa: E402

REDUCE_OPS = ("sum", "mean", "max", "min")


# ----------------------------------------------------------------------------- launch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_deepspeed(world: int) -> None:
    """DeepSpeed on a CPU machine, without surprises: no op is built for a one-process run (DeepSpeed would build
    its shared-memory collectives, ~40-90 s, for a world of one); for several ranks it is built once into a cache
    keyed by this Python and torch build (two environments never rebuild each other's), saying so first; and
    torch's "No CUDA runtime is found" warning, which means nothing on a CPU machine, is not printed."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    cache = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                         f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}")  # fmt: skip
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", cache)
    import deepspeed.ops

    if world == 1:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # build_shm_op then returns None
    elif not glob.glob(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm", "*.so")):
        print0(f"DeepSpeed builds its CPU shared-memory collectives once for this environment (about a minute; "
               f"cached in {os.environ['TORCH_EXTENSIONS_DIR']})")  # fmt: skip


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Create the default process group (nccl on CUDA, gloo on CPU) through DeepSpeed."""
    rank, world, local_rank = env_rank_world()
    if not torch.cuda.is_available():
        _cpu_deepspeed(world)
    import deepspeed  # seconds to import: only starting a group needs it, not every importer of this module

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized() and world == 1:
        # one process: an in-memory store, so no TCP listener opens and no port is picked (it could race)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


TEARDOWN_TIMEOUT_S = 120.0


def destroy(exit_code: int = 1, timeout_s: float = TEARDOWN_TIMEOUT_S) -> None:
    """Destroy every process group, first collecting the objects a finished run left in reference cycles (a released
    engine: mmpretrain.engine.release_engine), so the groups' threads end here and not during interpreter exit.

    Bounded: everything a command writes is written before this, so if tearing down takes longer than ``timeout_s``
    a watchdog prints every thread's stack to stderr (what hung) and ends the process with ``exit_code`` (the
    command's own code where it knows it; 1 otherwise)."""
    if not is_initialized():
        return
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(timeout_s):
            print(f"mmpretrain: tearing down the process groups took over {timeout_s:.0f} s; every thread's stack "
                  f"follows, then the process exits with code {exit_code}", file=sys.stderr, flush=True)  # fmt: skip
            faulthandler.dump_traceback(all_threads=True)
            os._exit(exit_code)

    threading.Thread(target=watchdog, name="mmpretrain-teardown-watchdog", daemon=True).start()
    try:
        gc.collect()
        deepspeed = sys.modules.get("deepspeed")
        if deepspeed is not None and deepspeed.comm.is_initialized():
            # through DeepSpeed: it also drops the groups it cached (its clone of the world group); a process that
            # starts a group again (tests, the eval CLI after training) would otherwise hand an engine a destroyed one
            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    finally:
        done.set()


# ----------------------------------------------------------------------------- groups


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(group=None):
    """The group to communicate in: `group`, else the world's when torch.distributed is initialized, else None
    (which the kernels' collectives read as no communication)."""
    if group is None and is_initialized():
        return dist.group.WORLD
    return group


def world_rank(group=None) -> tuple[int, int]:
    """(world size, rank) in the group; (1, 0) without torch.distributed."""
    return kernel_collectives.world_rank(resolve_group(group))


def _device(group) -> torch.device:
    """Where a collective's own tensors live: the current CUDA device under NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- tensors


def all_gather(x_bD: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) every rank's rows in rank order, no gradient (equal shapes on every rank)."""
    return kernel_collectives.all_gather(x_bD, resolve_group(group))  # collective


def gather_with_grad(x_bD: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) every rank's rows in rank order; backward reduce-scatters, so each row's owner gets the sum over
    ranks of its gradient (N x the gradient of a loss every rank computes alike: the gradient contract)."""
    return kernel_collectives.gather_with_grad(x_bD, resolve_group(group))  # collective


def reduce_scatter(x_BD: torch.Tensor, group=None) -> torch.Tensor:
    """(b, ...) this rank's block of rows of the sum over ranks of x (B rows on every rank)."""
    return kernel_collectives.reduce_scatter_sum(x_BD, resolve_group(group))  # collective


def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Sum, mean, max or min over ranks, in place; returns x."""
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce: op must be one of {REDUCE_OPS} (got {op!r})")
    group = resolve_group(group)
    world, _ = kernel_collectives.world_rank(group)
    if world > 1:
        reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.SUM)
        dist.all_reduce(x, op=reduce_op, group=group)  # collective
        if op == "mean":
            x.div_(world)
    return x


def global_mean(x_local: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over ranks of a per-rank mean (equal per-rank batches), with the gradient contract.

    Value: the global mean, the same on every rank. Gradient: flows into x_local as N x its share
    (d global / d x_local = 1/N, times N), so DeepSpeed's average over ranks is exact.
    """
    group = resolve_group(group)
    world, _ = kernel_collectives.world_rank(group)
    if world == 1:
        return x_local
    total = x_local.detach().clone()
    dist.all_reduce(total, group=group)  # collective
    total = total / world
    return total + (x_local - x_local.detach())


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list, in_splits: list, group=None) -> None:
    """One all_to_all_single of rows: `in_splits[r]` rows of inp go to rank r, `out_splits[r]` rows of out come from
    it. fetch_rows sends its rows (and their gradients) through this function, so tests can see what travels."""
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=resolve_group(group))  # collective


def _plan(want_m: torch.Tensor, b: int, group):
    """Who serves what: (my requests per owner, my served local rows, served rows per requester) (collectives)."""
    world, _ = kernel_collectives.world_rank(group)
    send_req = torch.bincount(want_m // b, minlength=world)  # want_m is sorted: grouped by owner
    recv_req = torch.empty_like(send_req)
    dist.all_to_all_single(recv_req, send_req, group=group)  # collective: how many of my rows each rank wants
    send_req, recv_req = send_req.tolist(), recv_req.tolist()
    serve = torch.empty(sum(recv_req), dtype=torch.long, device=want_m.device)
    dist.all_to_all_single(serve, (want_m % b).contiguous(), recv_req, send_req, group=group)  # collective
    return send_req, serve, recv_req


class _FetchRows(torch.autograd.Function):
    """Rows `want` (sorted global indices) of tensors split over ranks in blocks of b rows; backward returns the
    gradients of the fetched rows to their owners. Forward: the group, n, xs..., then wants..."""

    @staticmethod
    def forward(ctx, group, n, *args):
        xs, wants = args[:n], args[n:]
        ctx.group, ctx.n, ctx.plans, ctx.shapes = group, n, [], []
        outs = []
        for x_bF, want_m in zip(xs, wants):
            send_req, serve, recv_req = _plan(want_m, x_bF.shape[0], group)
            out_mF = x_bF.new_empty(len(want_m), x_bF.shape[1])
            all_to_all(out_mF, x_bF[serve].contiguous(), send_req, recv_req, group)  # only the chosen rows
            ctx.plans.append((send_req, serve, recv_req))
            ctx.shapes.append(x_bF.shape)
            outs.append(out_mF)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for g_mF, (send_req, serve, recv_req), shape in zip(grads, ctx.plans, ctx.shapes):
            g_sF = g_mF.new_empty(len(serve), shape[1])
            all_to_all(g_sF, g_mF.contiguous(), recv_req, send_req, ctx.group)  # gradients go home
            out.append(g_mF.new_zeros(shape).index_add_(0, serve, g_sF))
        return (None, None, *out, *([None] * ctx.n))


def fetch_rows(xs: list, wants: list, group=None) -> list:
    """[x[want] of the global (B, ...) tensors] where this rank holds rows rank*b ... (rank+1)*b - 1 of each x.

    Each want is any (m,) global indices; only their distinct rows travel (all_to_all), never a whole x.
    Differentiable: the backward sends the gradients of the fetched rows back to their owners, who add them
    to their own (so each row gets the gradients of every rank that used it: the gradient contract).
    """
    group = resolve_group(group)
    if kernel_collectives.world_rank(group)[0] == 1:
        return [x[w] for x, w in zip(xs, wants)]
    uniq, inverse = zip(*[torch.unique(w, sorted=True, return_inverse=True) for w in wants])
    flat = [x.reshape(x.shape[0], -1) for x in xs]
    fetched = _FetchRows.apply(group, len(xs), *flat, *uniq)
    return [f.view(len(u), *x.shape[1:])[i] for f, u, x, i in zip(fetched, uniq, xs, inverse)]


def gather_rows(rows_nE: torch.Tensor, index_n: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows and their global indices, sorted by index: ((M, E), (M,)), M = the sum of the ranks' n.

    Ranks may hold different numbers of rows (an eval set dealt over ranks, broken samples skipped): each pads
    to the longest share, the padding is dropped after the all-gather. The sort is stable. No gradient.
    """
    index_n = index_n.to(rows_nE.device)
    group = resolve_group(group)
    if kernel_collectives.world_rank(group)[0] > 1:
        n_max = int(all_reduce_number(len(rows_nE), "max", group, rows_nE.device))  # equal shapes to all-gather
        rows_nE = all_gather(F.pad(rows_nE, (0, 0, 0, n_max - len(rows_nE))), group)  # collective
        index_n = all_gather(F.pad(index_n, (0, n_max - len(index_n)), value=-1), group)  # collective
        keep = index_n >= 0
        rows_nE, index_n = rows_nE[keep], index_n[keep]
    order = index_n.argsort(stable=True)
    return rows_nE[order], index_n[order]


# ----------------------------------------------------------------------------- Python data


def all_reduce_number(value: float, op: str = "sum", group=None, device=None) -> float:
    """A Python number reduced over ranks (sum, mean, max or min; float64 on the wire, exact for ints below 2^53).

    device: where the one-number tensor lives (the default: the CUDA device under NCCL, else the CPU).
    """
    group = resolve_group(group)
    if kernel_collectives.world_rank(group)[0] == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or _device(group))
    return all_reduce(t, op, group).item()  # collective


def all_gather_object(obj, group=None) -> list:
    """[the object of rank 0, of rank 1, ...] for picklable objects (a collective); [obj] in a world of one."""
    group = resolve_group(group)
    world, _ = kernel_collectives.world_rank(group)
    if world == 1:
        return [obj]
    parts: list = [None] * world
    dist.all_gather_object(parts, obj, group=group)  # collective
    return parts


# ----------------------------------------------------------------------------- evaluation


def lockstep(items: Iterable, group=None, device=None) -> Iterator:
    """This rank's items, then None until every rank has run out: every rank loops the same number of times.

    For loops whose body runs collectives (under ZeRO-3 every forward gathers weights), over shares that differ
    between ranks: a rank that has run out gets None and runs a dummy body. One tiny all-reduce per loop asks
    whether any rank goes on (a sync point). An exhausted iterator is never asked again.
    """
    it = iter(items)
    item = next(it, None)
    while all_reduce_number(int(item is not None), "max", group, device):  # collective: does any rank go on?
        yield item
        item = next(it, None) if item is not None else None


@contextmanager
def gathered_params(params: Iterable[torch.Tensor]):
    """Inside the block, parameters partitioned by ZeRO-3 hold their whole values (an all-gather of each, on every
    rank; changes made inside are dropped: read only). Parameters that are not partitioned (ZeRO 0-2, a plain
    module) are left alone and nothing is communicated. Every rank of the group must enter it (a collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    deepspeed = sys.modules["deepspeed"]  # only a ZeRO-3 run gets here, and engine.py has imported deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):  # collective: all-gathers
        yield
