"""What the 2-rank gloo tests share: joining the process group in a spawned worker, and the closeness check."""

import os

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group on localhost (called first in each torch.multiprocessing.spawn worker)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription


def assert_close(got, want, what, rtol=2e-5):
    """max |got - want| <= rtol x max |want| (floored at 1e-3): a relative check of a whole tensor."""
    err, size = (got.double() - want).abs().max().item(), want.abs().max().item()
    assert err <= rtol * max(size, 1e-3), f"{what}: max error {err:.3g} vs max |ref| {size:.3g}"
