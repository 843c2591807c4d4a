"""The loss kernels' collectives: all-gather, all-reduce, reduce-scatter, and the all-gather with gradient.

Why here and not in mmpretrain.distributed: kernels/ is the bottom layer and imports nothing from mmpretrain,
so a kernel can be imported, tested and benchmarked alone. mmpretrain.distributed, the project's one public
collectives module, wraps these (and only these) for everything above the kernels.

The group is the one to use, as given: None means no communication (a world of one), also when
torch.distributed is initialized. That is how a kernel computes a one-rank result inside a distributed job;
mmpretrain.distributed resolves its own default (the world) before it calls in here.

Shapes: b rows on this rank, B = world x b rows in all, D a row's width.
"""

import torch
import torch.distributed as dist


def world_rank(group) -> tuple[int, int]:
    """(world size, rank) in the group; (1, 0) for None (no communication)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather(x_bD: torch.Tensor, group) -> torch.Tensor:
    """(B, ...) every rank's rows in rank order (one all_gather_into_tensor; equal shapes on every rank)."""
    world, _ = world_rank(group)
    if world == 1:
        return x_bD
    out_BD = torch.empty((world * x_bD.shape[0], *x_bD.shape[1:]), dtype=x_bD.dtype, device=x_bD.device)
    dist.all_gather_into_tensor(out_BD, x_bD.contiguous(), group=group)
    return out_BD


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks, in place; returns x."""
    if world_rank(group)[0] > 1:
        dist.all_reduce(x, group=group)
    return x


def reduce_scatter_sum(x_BD: torch.Tensor, group) -> torch.Tensor:
    """(b, ...) this rank's block of rows of the sum over ranks (one reduce_scatter_tensor)."""
    world, _ = world_rank(group)
    if world == 1:
        return x_BD
    out_bD = torch.empty((x_BD.shape[0] // world, *x_BD.shape[1:]), dtype=x_BD.dtype, device=x_BD.device)
    dist.reduce_scatter_tensor(out_bD, x_BD.contiguous(), group=group)
    return out_bD


class _GatherWithGrad(torch.autograd.Function):
    """All-gather (b, D) -> (B, D); backward: reduce-scatter, each rank gets the sum over ranks of its rows' grad."""

    @staticmethod
    def forward(ctx, x_bD, group):
        ctx.group = group
        return all_gather(x_bD, group)  # collective

    @staticmethod
    def backward(ctx, grad_BD):
        return reduce_scatter_sum(grad_BD, ctx.group), None  # collective


def gather_with_grad(x_bD: torch.Tensor, group) -> torch.Tensor:
    """(B, D) every rank's rows in rank order; the gradient of each rank's loss flows back to the rows' owners,
    summed over ranks (so a loss computed alike on every rank gets N x its gradient: the engine averages)."""
    if world_rank(group)[0] == 1:
        return x_bD
    return _GatherWithGrad.apply(x_bD, group)
