"""N ranks under ZeRO-3 take the same steps as one rank holding the whole global batch.

AdamW and clipping would hide a gradient that is off by the world size; the gradient norm before
clipping does not, so it is compared at every step along with the loss.
"""

import json
import os
import subprocess
import sys

import pytest

from mmpretrain.distributed import free_port

WORKER = os.path.join(os.path.dirname(__file__), "zero_equivalence_worker.py")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run_worker(tmp_path, nproc, overrides):
    out = tmp_path / f"n{nproc}_{'_'.join(overrides)}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", WORKER, str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # the worker's own traceback, not only torchrun's summary
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        pytest.fail(f"worker failed ({cmd}):\n" + "\n".join(errors[:30]) + "\n" + proc.stderr[-3000:])
    return json.loads(out.read_text())


def assert_same_steps(ref, got):
    """The same loss (1e-5) and gradient norm before clipping (1e-4) at every step."""
    assert len(ref["loss"]) == len(got["loss"])
    for step, (a, b) in enumerate(zip(ref["loss"], got["loss"])):
        assert b == pytest.approx(a, rel=1e-5), f"loss differs at step {step}: {a} vs {b}"
    for step, (a, b) in enumerate(zip(ref["grad_norm"], got["grad_norm"])):
        assert b == pytest.approx(a, rel=1e-4), f"grad norm differs at step {step}: {a} vs {b}"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip"])
def test_two_ranks_zero3_equal_one_rank_zero0(tmp_path, family):
    ref = run_worker(tmp_path, 1, ["engine.zero_stage=0"])
    got = run_worker(tmp_path, 2, ["engine.zero_stage=3"])
    assert len(ref["loss"]) == len(got["loss"]) == 4
    assert_same_steps(ref, got)
    # the steps moved the weights: losses are not all the same value
    assert len({round(x, 6) for x in ref["loss"]}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_grad_cache_on_two_ranks_equals_one_rank_full_batch(tmp_path, stage):
    """train.accum_steps=2 (GradCache) through DeepSpeed keeps every negative of the global batch."""
    ref = run_worker(tmp_path, 1, ["engine.zero_stage=0"])
    got = run_worker(tmp_path, 2, [f"engine.zero_stage={stage}", "train.accum_steps=2"])
    assert_same_steps(ref, got)


@pytest.mark.slow
def test_caption_term_on_two_ranks_zero3_equals_one_rank(tmp_path):
    """SigLIP + the caption decoder (CapPa rows on): captions of different lengths on each rank, so the token mean
    over the global batch is only right if the ranks share their token counts (objectives/caption.py)."""
    terms = ["model.family=siglip", "loss.terms.siglip.weight=1.0", "loss.terms.caption.parallel_fraction=0.5"]
    ref = run_worker(tmp_path, 1, ["engine.zero_stage=0", *terms])
    got = run_worker(tmp_path, 2, ["engine.zero_stage=3", *terms])
    assert_same_steps(ref, got)
    assert len({round(x, 6) for x in ref["loss"]}) > 1


@pytest.mark.slow
def test_caption_region_tasks_on_two_ranks_zero3_equal_one_rank(tmp_path):
    """The caption term on region tasks (data.train.regions): prompts of different lengths, given and not
    predicted, and each task's token mean logged (loss/caption/<task>) over the global batch."""
    terms = ["model.family=siglip", "loss.terms.siglip.weight=1.0", "loss.terms.caption.parallel_fraction=0.5",
             "data.train.regions.ref_fraction=0.3", "data.train.regions.gcap_fraction=0.3"]  # fmt: skip
    ref = run_worker(tmp_path, 1, ["engine.zero_stage=0", *terms])
    got = run_worker(tmp_path, 2, ["engine.zero_stage=3", *terms])
    assert_same_steps(ref, got)
    seen = set()
    for step, (a, b) in enumerate(zip(ref["terms"], got["terms"])):
        # a task's loss is there when the global batch has its tokens (8 samples a step: not always all three)
        assert set(a) == set(b) and {"siglip", "caption"} < set(a), (a, b)
        seen |= set(a)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5), f"{key} differs at step {step}: {a[key]} vs {b[key]}"
    assert seen == {"siglip", "caption", "caption/caption", "caption/ref", "caption/gcap"}, seen
