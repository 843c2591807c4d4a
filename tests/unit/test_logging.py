"""MetricsLogger: wandb and the progress bar start after the first step, so a start interrupted before it leaves no
orphan wandb folder, and the first ETA does not count the setup (after a resume, the loader's seek)."""

import glob
import json
import os

from mmpretrain.logging import LoggingConfig, MetricsLogger


def logger(out, *, wandb="offline", progress=False, start_step=0, run_id="abcd1234"):
    cfg = LoggingConfig(wandb=wandb, progress=progress)
    return MetricsLogger(cfg, str(out), is_main=True, run_id=run_id, config={"x": 1}, start_step=start_step,
                         total_steps=1000)  # fmt: skip


def test_a_start_interrupted_before_the_first_step_leaves_no_wandb_folder(tmp_path):
    log = logger(tmp_path)
    log.write("setting up")  # e.g. then Ctrl-C while the engine builds
    log.close()
    assert not os.path.exists(tmp_path / "wandb")


def test_wandb_starts_with_the_first_step_under_the_run_id(tmp_path):
    log = logger(tmp_path)
    log.advance()
    log.log(1, {"loss": 2.0})
    log.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and runs[0].endswith("-abcd1234")
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [2.0]


def test_a_metrics_line_before_any_step_starts_wandb_too(tmp_path):
    log = logger(tmp_path)
    log.log(1000, {"zeroshot/x/top1": 0.5})  # a run resumed at its last step: only the final evaluation
    log.close()
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*-abcd1234"))) == 1


def test_the_bar_clock_starts_after_the_first_step(tmp_path):
    log = logger(tmp_path, wandb="disabled", progress=True, start_step=500)
    assert log.bar is None  # no bar (and no clock) during the setup
    log.advance()
    # the rate (and so the ETA) counts from here: tqdm measures (n - initial) / elapsed
    assert (log.bar.n, log.bar.initial, log.bar.total) == (501, 501, 1000)
    log.advance()
    assert log.bar.n == 502
    log.close()
