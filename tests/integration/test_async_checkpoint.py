"""Background checkpoints (checkpoint.async_save, mmpretrain.checkpoint.BackgroundSaver).

- In one process: the save returns before the files are written; what is written is the state at the save, not
  the state after the steps taken while the write ran; `latest` and meta.json appear only once the files are
  durable; the stall is returned.
- A real run killed with SIGKILL while its background write is in flight (an injected slow_save: the files are
  written, the rank's part not yet marked complete) keeps `latest` on the previous checkpoint, and the same
  command resumes from that one; every save logs checkpoint/stall_s in metrics.jsonl.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mmpretrain import checkpoint
from mmpretrain.config import load_config
from mmpretrain.distributed import init_distributed
from mmpretrain.engine import build_engine
from mmpretrain.model import build_model
from mmpretrain.objectives import Objective
from mmpretrain.step import TrainStep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                         "MASTER_ADDR", "MMPRETRAIN_INJECT")}  # fmt: skip
ENV.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")


def batch(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    size, L, vocab = cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size
    tokens = torch.randint(1, vocab - 2, (8, L), generator=g)
    tokens[:, -1] = vocab - 1
    return {"image": torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=g), "text": tokens}


def engine_and_step():
    cfg = load_config(TINY, ["train.batch_size=8", "data.synthetic.root=unused"])
    info = init_distributed()
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model), cfg.optim, cfg.engine, micro_batch_size=8, total_steps=10)
    step = TrainStep(engine, Objective(cfg), cfg.engine, grad_clip=1.0, loss_cfg=cfg.loss, device=info.device)
    step(batch(cfg, 0), 1)
    return cfg, engine, step


def test_a_synchronous_save_is_committed_when_it_returns(tmp_path):
    _, engine, _ = engine_and_step()
    tag, stall_s = checkpoint.save(engine, str(tmp_path), 1, {"world_size": 1}, 0, keep_last=2)
    step_dir = os.path.join(str(tmp_path), "checkpoints", tag)
    assert checkpoint.latest_tag(str(tmp_path)) == tag and stall_s > 0
    assert not [f for f in os.listdir(step_dir) if f.startswith("done_rank") or ".tmp" in f]
    saved = checkpoint.load_state_dict(step_dir)
    assert all(torch.equal(saved[k], v) for k, v in engine.module.state_dict().items())


def test_background_save_writes_the_state_at_the_save_and_commits_after_the_files(tmp_path, monkeypatch):
    cfg, engine, step = engine_and_step()
    at_save = {k: v.clone() for k, v in engine.module.state_dict().items()}

    release = threading.Event()
    write = checkpoint._write_durable
    monkeypatch.setattr(checkpoint, "_write_durable", lambda obj, path: (release.wait(60), write(obj, path)))
    saver = checkpoint.BackgroundSaver()
    out = str(tmp_path)
    tag, stall_s = checkpoint.save(engine, out, 1, {"world_size": 1}, 0, keep_last=2, saver=saver)
    assert tag == "step_1" and stall_s > 0
    step_dir = os.path.join(out, "checkpoints", tag)
    assert checkpoint.latest_tag(out) is None and not os.path.exists(os.path.join(step_dir, "meta.json"))
    step.before_update = saver.wait_staged  # as the loop sets it: the update waits for the host copy
    for i in range(2):  # training goes on while the write waits: the weights move
        step(batch(cfg, 1 + i), 2 + i)
    assert any(not torch.equal(v, engine.module.state_dict()[k]) for k, v in at_save.items())
    got_step, stall_total = saver.pop_stall()  # the copy is done: the update waited for it
    assert got_step == 1 and stall_total >= stall_s
    release.set()
    saver.wait()
    assert checkpoint.latest_tag(out) == "step_1" and os.path.isfile(os.path.join(step_dir, "done_rank0"))
    saved = checkpoint.load_state_dict(step_dir)
    for k, v in at_save.items():
        assert torch.equal(saved[k], v), k  # the snapshot, not the weights after the later steps
    assert not [f for f in os.listdir(step_dir) if ".tmp" in f]


def test_a_failed_background_write_is_raised_by_the_next_wait():
    saver = checkpoint.BackgroundSaver()
    saver.start(list, lambda files: open("/nonexistent-dir/x", "w"))
    with pytest.raises(RuntimeError, match="background checkpoint write failed"):
        saver.wait()


def command(data, out, *extra):
    return [sys.executable, "-m", "mmpretrain.train", TINY, f"output_dir={out}", f"data.train.urls={data.train_urls}",
            "train.steps=8", "checkpoint.every_steps=2", "data.num_workers=1", *extra]  # fmt: skip


def stall_lines(out):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "checkpoint/stall_s" in r]


@pytest.mark.slow
def test_sigkill_during_the_background_write_resumes_from_the_previous_checkpoint(shapes_dataset, tmp_path):
    out = str(tmp_path / "run")
    env = {**ENV, "MMPRETRAIN_INJECT": "slow_save@4"}  # the writer sleeps after step_4's files, before its marker
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(command(shapes_dataset, out), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    step4 = os.path.join(out, "checkpoints", "step_4")

    def writing_step4():  # its files are written (the writer now sleeps) and the loop logged both stalls
        logged = os.path.exists(os.path.join(out, "metrics.jsonl")) and len(stall_lines(out)) >= 2
        return logged and os.path.isfile(os.path.join(step4, "rng_rank0.pt"))

    deadline = time.time() + 240
    while not writing_step4():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "the run did not reach the save at step 4"
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its data worker, mid-write
    proc.wait(timeout=60)
    log.close()
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_2"
    assert not os.path.exists(os.path.join(step4, "meta.json")) and not os.path.exists(
        os.path.join(step4, "done_rank0")
    )
    assert [r["step"] for r in stall_lines(out)] == [2, 4]  # the save returned; the step went on

    rerun = subprocess.run(command(shapes_dataset, out), env=ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "checkpoints/step_2" in rerun.stdout + rerun.stderr  # "resumed from .../step_2"
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_8"
    # the resumed run's log continues from step 2 (the killed run's lines after it are dropped): one save a line
    assert [r["step"] for r in stall_lines(out)] == [2, 4, 6, 8]
    assert all(r["checkpoint/stall_s"] >= 0 for r in stall_lines(out))
