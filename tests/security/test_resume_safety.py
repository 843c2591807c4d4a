"""Resuming cannot be tripped up (issue: trust what users hand each other, findings 8 and 9's RNG part).

- rank 0's conversion of a checkpoint for a new world size (ds_to_universal) may take longer than the process
  group's timeout: 2 gloo ranks with a 2 s timeout and a conversion of 5 s both come back with the universal tag;
  a conversion that fails stops rank 1 at once with rank 0's error, not after a timeout;
- the RNG files load with weights_only=True: the states round-trip (torch, numpy, python), an RNG file written
  before (numpy's ndarray tuple) still loads, and a pickle that would run code is refused naming the file.
"""

import datetime
import json
import multiprocessing
import os
import random
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mmpretrain import checkpoint

TIMEOUT_S = 2.0  # the process group's timeout in this test
CONVERT_S = 5.0  # the fake conversion: longer than the timeout


def fake_run(output_dir, world_size: int) -> None:
    """A run folder whose latest checkpoint (step_3) was written by ``world_size`` ranks."""
    step = os.path.join(output_dir, "checkpoints", "step_3")
    os.makedirs(step)
    with open(os.path.join(step, "meta.json"), "w") as f:
        json.dump({"step": 3, "world_size": world_size}, f)
    with open(os.path.join(output_dir, "checkpoints", "latest"), "w") as f:
        f.write("step_3")


def slow_conversion(step_dir, out_dir):
    time.sleep(CONVERT_S)
    os.makedirs(out_dir)


def failing_conversion(step_dir, out_dir):
    raise RuntimeError("ds_to_universal: out of memory")


def rank_main(rank: int, output_dir: str, store: str, conversion, results) -> None:
    checkpoint.convert_to_universal = conversion  # this child's own module (forked)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))  # fmt: skip
    try:
        results.put((rank, "ok", checkpoint.prepare_resume(output_dir, world_size=2, zero_stage=2, rank=rank)))
    except Exception as exn:  # noqa: BLE001 -- reported to the test
        results.put((rank, "error", f"{type(exn).__name__}: {exn}"))
    finally:
        dist.destroy_process_group()


def resume_on_two_ranks(tmp_path, conversion) -> dict:
    fake_run(str(tmp_path / "run"), world_size=1)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    args = (str(tmp_path / "run"), str(tmp_path / "store"), conversion, results)
    procs = [ctx.Process(target=rank_main, args=(rank, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = dict((r, (status, value)) for r, status, value in (results.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    return got


def test_conversion_longer_than_the_process_group_timeout(tmp_path):
    got = resume_on_two_ranks(tmp_path, slow_conversion)
    assert got == {0: ("ok", ("step_3_universal", True)), 1: ("ok", ("step_3_universal", True))}
    assert os.path.isfile(tmp_path / "run/checkpoints/step_3_universal/done")


def test_failed_conversion_stops_every_rank_with_its_error(tmp_path):
    got = resume_on_two_ranks(tmp_path, failing_conversion)
    assert got[0] == ("error", "RuntimeError: ds_to_universal: out of memory")
    status, message = got[1]
    assert status == "error" and "rank 0 could not convert" in message and "out of memory" in message


def test_rng_state_round_trips_without_pickle(tmp_path):
    path = str(tmp_path / "rng_rank0.pt")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(checkpoint.rng_state(), path)
    want = torch.rand(3), np.random.rand(3), random.random()
    torch.load(path, weights_only=True)  # plain values: torch's safe loader reads it as it is
    checkpoint.set_rng_state(checkpoint.load_rng_state(path))
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]

    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(old, path)  # the format before: numpy's tuple with its ndarray
    want = np.random.rand(3)
    checkpoint.set_rng_state(checkpoint.load_rng_state(path))
    assert np.array_equal(np.random.rand(3), want)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_rng_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    path = str(tmp_path / "rng_rank0.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": payload}, path)
    with pytest.raises(ValueError, match="rng_rank0.pt: not a readable RNG state"):
        checkpoint.load_rng_state(path)
    assert not marker.exists()
