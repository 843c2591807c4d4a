"""mmpretrain.distributed on 2 gloo ranks against what one process computes by hand, and group=None without
torch.distributed (a world of one: no communication, no error)."""

import pytest
import torch

from mmpretrain import distributed as D
from tests.distributed.harness import run_on_ranks


def collectives_on_rank(rank):
    x = torch.tensor([1.0 + rank, 10.0 * (rank + 1)])  # rank 0: [1, 10], rank 1: [2, 20]
    out = {
        "world_rank": D.world_rank(),
        "sum": D.all_reduce(x.clone()).tolist(),
        "mean": D.all_reduce(x.clone(), "mean").tolist(),
        "max": D.all_reduce(x.clone(), "max").tolist(),
        "min": D.all_reduce(x.clone(), "min").tolist(),
        "number": D.all_reduce_number(rank + 0.5),
        "objects": D.all_gather_object({"rank": rank}),
        "gather": D.all_gather(x[None]).tolist(),
        "scatter": D.reduce_scatter(torch.arange(4.0) * (rank + 1)).tolist(),
        # uneven shares: rank 0 holds rows of indices 4, 0; rank 1 rows 3, 1, 2
        "rows": [
            t.tolist()
            for t in D.gather_rows(
                *(
                    (torch.tensor([[4.0], [0.0]]), torch.tensor([4, 0]))
                    if rank == 0
                    else (torch.tensor([[3.0], [1.0], [2.0]]), torch.tensor([3, 1, 2]))
                )
            )
        ],  # fmt: skip
        "lockstep": list(D.lockstep(range(2 + rank))),
    }
    # gather with gradient: loss = sum_j w_j * gathered_j, the same on every rank; each rank's rows get the
    # sum over ranks of their gradient (world x), through a reduce-scatter
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    (D.gather_with_grad(v * (rank + 1)) * torch.arange(1.0, 5.0)).sum().backward()
    out["grad"] = v.grad.tolist()
    # global_mean: the value is the mean over ranks; the gradient N x this rank's share (1/N)
    w = torch.tensor(3.0 * (rank + 1), requires_grad=True)
    m = D.global_mean(w)
    m.backward()
    out["global_mean"], out["global_mean_grad"] = m.item(), w.grad.item()
    return out


def test_collectives_on_two_ranks():
    r0, r1 = run_on_ranks(collectives_on_rank)
    assert (r0["world_rank"], r1["world_rank"]) == ((2, 0), (2, 1))
    for r in (r0, r1):
        assert r["sum"] == [3.0, 30.0] and r["mean"] == [1.5, 15.0] and r["max"] == [2.0, 20.0]
        assert r["min"] == [1.0, 10.0]
        assert r["number"] == 2.0 and r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["gather"] == [[1.0, 10.0], [2.0, 20.0]]
        assert r["rows"] == [[[0.0], [1.0], [2.0], [3.0], [4.0]], [0, 1, 2, 3, 4]]
        assert r["global_mean"] == 4.5 and r["global_mean_grad"] == 1.0
    assert r0["scatter"] == [0.0, 3.0] and r1["scatter"] == [6.0, 9.0]  # (1 + 2) x [0, 1 | 2, 3]
    assert r0["lockstep"] == [0, 1, None] and r1["lockstep"] == [0, 1, 2]  # rank 0 runs out first
    # gathered = [v0 * 1, v1 * 2] on both ranks; d loss / d v_r = (r + 1) x weights of its rows, summed over 2 ranks
    assert r0["grad"] == [2 * 1.0, 2 * 2.0] and r1["grad"] == [2 * 2 * 3.0, 2 * 2 * 4.0]


def test_group_none_without_torch_distributed_is_a_world_of_one():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert D.world_rank() == (1, 0) and D.resolve_group() is None
    assert D.all_gather(x) is x and D.gather_with_grad(x) is x and D.reduce_scatter(x) is x
    assert D.all_reduce(x.detach().clone(), "mean").tolist() == [1.0, 2.0]
    assert D.all_reduce_number(3) == 3.0 and D.all_gather_object("a") == ["a"]
    assert list(D.lockstep([5, 6])) == [5, 6]
    assert D.global_mean(x) is x
    rows, index = D.gather_rows(torch.tensor([[2.0], [1.0]]), torch.tensor([7, 3]))
    assert rows.tolist() == [[1.0], [2.0]] and index.tolist() == [3, 7]
    with pytest.raises(ValueError, match="op must be one of"):
        D.all_reduce(x, "prod")
