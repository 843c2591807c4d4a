"""A training run over shards with every data fault injected finishes and logs the faults by reason;
past data.max_bad_fraction it stops with an error naming the worst shards.

The loader's counts per pass are proven exact in tests/unit/test_data_faults.py; here the same loader,
replayed in this process for the same number of batches, must give exactly the totals the run logged,
and one full pass must have met every injected fault at least once.
"""

import json
import os
import subprocess
import sys

import pytest
from faults import (
    APART,
    FAULTY_MAX_CAPTION_BYTES,
    FAULTY_MAX_IMAGE_PIXELS,
    FAULTY_MAX_MEMBER_BYTES,
    write_faulty_shards,
)

from mmpretrain.config import load_config
from mmpretrain.data import Tokenizer, build_train_loader, merge_data_stats

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tiny.yaml")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
BATCH, STEPS = 8, 4  # 24 good samples a pass: 3 steps are one pass, the 4th starts the next


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return write_faulty_shards(tmp_path_factory.mktemp("faulty"))


def overrides(spec, out, *extra):
    return [f"output_dir={out}", f"data.train.urls={spec}", f"train.batch_size={BATCH}", f"train.steps={STEPS}",
            "data.num_workers=0", f"data.max_image_pixels={FAULTY_MAX_IMAGE_PIXELS}", "checkpoint.every_steps=0",
            "data.num_streams=1",  # one stream: 3 steps are one pass over the shards (streams run their own epochs)
            f"data.max_member_bytes={FAULTY_MAX_MEMBER_BYTES}", f"data.max_caption_bytes={FAULTY_MAX_CAPTION_BYTES}",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_run_over_faulty_shards_finishes_and_counts_every_fault(faulty, tmp_path):
    spec, expected = faulty
    out = str(tmp_path / "run")
    args = overrides(spec, out, "data.max_bad_fraction=0.9")
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.train", TINY, *args], env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x][-1]
    assert last["step"] == STEPS
    logged = {r: last[f"data/skipped/{r}"] for r in expected}

    cfg = load_config(TINY, args)
    loader = build_train_loader(cfg.data, tokenizer=Tokenizer(context_length=cfg.model.text.context_length),
                                image_size=cfg.model.vision.image_size, batch_size=BATCH, rank=0, world_size=1,
                                seed=cfg.train.seed)  # fmt: skip
    total: dict = {}
    for _, batch in zip(range(STEPS), loader):
        total = merge_data_stats(total, batch["data_stats"])
    assert logged == total["skipped"]
    assert last["data/read"] == total["read"] and last["skipped_samples"] == sum(total["skipped"].values())
    for reason, n in expected.items():
        assert n <= logged[reason] <= 2 * n, reason  # one whole pass read, the second one begun
    assert all(n > 0 for r, n in expected.items() if r not in APART)  # every fault kind was injected
    # the final summary says the same: every reason with its count, and the shard that does not exist
    summary = proc.stdout[proc.stdout.index(f"finished at step {STEPS}/{STEPS}") :]
    assert f"data: {last['data/read']} samples read, {last['skipped_samples']} skipped: " in summary
    assert all(f" {reason} {n}" in summary for reason, n in logged.items() if n)
    assert f"1 train shard missing (skipped as unreadable_shard): {spec.replace('{0..6}', '3')}" in summary
    assert "eval: no eval set configured" in summary


@pytest.mark.slow
def test_bad_fraction_over_the_threshold_stops_naming_the_worst_shards(faulty, tmp_path):
    spec, _ = faulty
    args = overrides(spec, str(tmp_path / "run"), "data.max_bad_fraction=0.05", "data.bad_min_samples=10")
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.train", TINY, *args], env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("mmpretrain.train: error: data: ") and "data.max_bad_fraction=0.05" in err
    assert "worst shards: " in err and "faulty-1.tar" in err  # shard 1 holds the most broken samples
