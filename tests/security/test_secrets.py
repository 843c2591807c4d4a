"""Secrets stay in the environment (issue 15, finding 3).

The reproduction: a token in a `pipe:curl -H 'Authorization: Bearer ${oc.env:HF_TOKEN}' ...` shard url was
resolved and written in plain text to config.yaml, every meta.json, the wandb config, the consolidated config.yaml
and the restart check's message. Here a one-process run reads its shards through such a `pipe:` command (the
token rides along as an argument of `true`), saves a checkpoint, logs to an offline wandb run, is consolidated and
then restarted with another url: the token is used (the run reads its data) but appears in no file of the run or
the consolidated folder, nor in the restart's error; config.yaml keeps `${oc.env:...}` as written.
"""

import os
import subprocess
import sys

import pytest

from mmpretrain.config import load_config
from mmpretrain.convert import consolidate
from mmpretrain.data import check_bad_fraction
from mmpretrain.data.pipeline import DataFaultError, FaultCounter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "integration", "tiny.yaml")
SECRET = "hf_s3cr3t-T0KEN-that-must-not-leak"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def files_holding(folder: str, needle: bytes) -> list[str]:
    hits = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and needle in open(path, "rb").read():
                hits.append(path)
    return hits


def test_oc_env_values_are_never_written(shapes_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", MMP_TEST_TOKEN=SECRET)
    run = str(tmp_path / "run")
    url = f"pipe:cat {shapes_dataset.train_urls}; true Bearer ${{oc.env:MMP_TEST_TOKEN}}"
    args = [sys.executable, "-m", "mmpretrain.train", TINY, f"output_dir={run}", f"data.train.urls={url}",
            "train.steps=2", "checkpoint.every_steps=2", "data.num_workers=0", "logging.wandb=offline"]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "32 samples read" in proc.stdout  # the pipe: command ran, with the token in its environment
    assert os.path.isdir(os.path.join(run, "wandb"))
    assert "${oc.env:MMP_TEST_TOKEN}" in open(os.path.join(run, "config.yaml")).read()  # dumped unresolved

    # a restart with another url is refused; the message shows both urls, redacted
    other = url.replace("Bearer", "Token")
    proc = subprocess.run(args[:5] + [f"data.train.urls={other}"] + args[6:], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "data.train.urls" in proc.stderr, proc.stderr[-3000:]
    assert SECRET not in proc.stderr and "${oc.env:MMP_TEST_TOKEN}" in proc.stderr

    consolidated = consolidate(run, str(tmp_path / "consolidated"))
    for folder in (run, consolidated):
        assert files_holding(folder, SECRET.encode()) == []


def test_a_broken_shard_is_counted_and_named_without_the_token(monkeypatch, caplog):
    """A shard whose pipe: command fails is counted under its url in the data stats (meta.json holds them) and
    named in the log and the error: the url as the config wrote it, token redacted."""
    monkeypatch.setenv("MMP_TEST_TOKEN", SECRET)
    url = "pipe:curl -sf -u user:${oc.env:MMP_TEST_TOKEN} https://example.invalid/0.tar"
    cfg = load_config(TINY, [f"data.train.urls={url}"])
    resolved = cfg.data.train.urls
    assert SECRET in resolved  # the command gets the token
    counter = FaultCounter("worker 0")
    counter.fault("unreadable_shard", resolved, f"command {resolved!r} exited with 22")
    stats = counter.take()
    assert list(stats["bad_shards"]) == [url]
    assert SECRET not in caplog.text and "${oc.env:MMP_TEST_TOKEN}" in caplog.text
    with pytest.raises(DataFaultError) as e:
        check_bad_fraction(stats, max_bad_fraction=0.0, min_samples=1)
    assert SECRET not in str(e.value) and url in str(e.value)
