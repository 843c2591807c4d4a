"""Ctrl-C and a process-group SIGTERM save and stop, with real signals (issue: a new user's first hour).

One process (`python -m mmpretrain.train`, 2 data workers) in a session of its own, so that a signal reaches it
and its data workers together, as a terminal's Ctrl-C or `kill -- -PGID` / `timeout` do:
- SIGINT, then SIGTERM, to the whole group: exit 75 with a checkpoint at the step it stopped after, no traceback;
  the same command then resumes and every step's loss and sample keys equal the uninterrupted run's;
- a second Ctrl-C exits at once (130, one line, no checkpoint), and the rerun says it starts from step 0.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
STEPS = 16
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                         "MASTER_ADDR", "MMPRETRAIN_INJECT")}  # fmt: skip
ENV.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")


def command(data, out, *extra):
    return [sys.executable, "-m", "mmpretrain.train", TINY, f"output_dir={out}", f"data.train.urls={data.train_urls}",
            f"train.steps={STEPS}", "checkpoint.every_steps=100", "data.num_workers=2", "logging.sample_keys=true",
            *extra]  # fmt: skip


def metrics(out):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r}


def keys(out):
    return {r["step"]: r["keys"] for r in map(json.loads, open(os.path.join(out, "sample_keys_rank0.jsonl")))}


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    return len(metrics(out)) if os.path.exists(path) else 0


def interrupt(cmd, signals, after_steps, out, env=ENV):
    """Start cmd in its own session; once `after_steps` steps are logged, send `signals` to the whole group
    (0.3 s apart: two presses of Ctrl-C; signals sent at once would merge into one)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while steps_logged(out) < after_steps:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not reach the step to interrupt"
        time.sleep(0.05)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.3)
        os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def reference(shapes_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    proc = subprocess.run(command(shapes_dataset, out), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(out), keys(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm-group"])
def test_a_group_signal_saves_stops_75_and_the_rerun_resumes_exactly(sig, reference, shapes_dataset, tmp_path):
    out = str(tmp_path / "run")
    code, stdout, stderr = interrupt(command(shapes_dataset, out), [sig], after_steps=4, out=out)
    assert code == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    stopped = max(metrics(out))
    assert 4 <= stopped < STEPS
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    assert latest == f"step_{stopped}"  # the checkpoint is at the step it stopped after
    assert "rerun the same command to resume" in stdout + stderr
    if sig == signal.SIGINT:
        assert "Ctrl-C: stopping after this step" in stdout
    proc = subprocess.run(command(shapes_dataset, out), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_metrics, ref_keys = reference
    got = metrics(out)
    assert sorted(got) == sorted(ref_metrics)
    for step in ref_metrics:
        assert got[step]["loss"] == pytest.approx(ref_metrics[step]["loss"], rel=1e-6), step
    assert keys(out) == ref_keys


def test_a_second_ctrl_c_exits_at_once_and_the_rerun_starts_fresh(shapes_dataset, tmp_path):
    out = str(tmp_path / "run")
    # the save after the first Ctrl-C hangs (an injected slow save, before meta.json and `latest` are written):
    # the second press ends it, as a user would end a save that takes too long
    env = {**ENV, "MMPRETRAIN_INJECT": ",".join(f"slow_save@{s}" for s in range(2, 8))}
    code, stdout, stderr = interrupt(command(shapes_dataset, out), [signal.SIGINT, signal.SIGINT], 2, out, env)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted (second Ctrl-C" in stderr, stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "checkpoints", "latest"))
    cmd = command(shapes_dataset, out)
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved none, so this one starts from step 0" in proc.stdout + proc.stderr
    assert min(metrics(out)) == 1 and max(metrics(out)) == STEPS
