"""Fault tolerance end to end, with real processes and real signals (2 gloo ranks on CPU).

Launches are the cost here, so they are shared: one uninterrupted reference run; the same run on two
torchrun "nodes" (c10d rendezvous on localhost); and one chain of four launches of that run that is
killed with SIGKILL (every process: launcher, ranks, data workers) at seeded random steps, stopped
with SIGUSR1 through launch/torchrun.sh, and killed again in the middle of a checkpoint write. The
chain must read as the reference: the same losses and the same sample keys in every step.
A second chain injects non-finite steps under ZeRO-2 and changes the world size 2 -> 1 -> 2; a third changes it
2 -> 1 -> 2 and a fourth 4 -> 2 processes, and both must see the reference's global batches (the global sample
order, mmpretrain/data/streams.py).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from mmpretrain.checkpoint import find_step_dir, load_state_dict
from mmpretrain.distributed import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
PROBE = os.path.join(HERE, "resume_probe.py")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHON": sys.executable}  # fmt: skip
ENV.pop("MMPRETRAIN_INJECT", None)
STEPS = 24
EXIT_STOPPED = 75


def run_args(data, out, *extra):
    return [TINY, f"output_dir={out}", f"data.train.urls={data.train_urls}", f"train.steps={STEPS}",
            "checkpoint.every_steps=2", "checkpoint.keep_last=3", "data.num_workers=2", *extra]  # fmt: skip


def keyed_args(data, out):
    return run_args(data, out, "logging.sample_keys=true")


def torchrun(*args, nproc=2, extra_launcher=()):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *extra_launcher, "-m", "mmpretrain.train", *args]  # fmt: skip


def run(cmd, env=ENV, timeout=300):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return proc


def ok(proc):
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]


def last_step(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(x)["step"] for x in open(path) if '"step"' in x]
    return max(steps, default=0)


def keys_by_step(out, rank):
    """{step: keys} of one rank; a step written twice (replayed after a crash) must have had the same keys."""
    seen = {}
    for line in open(os.path.join(out, f"sample_keys_rank{rank}.jsonl")):
        rec = json.loads(line)
        if rec["step"] in seen:
            assert seen[rec["step"]] == rec["keys"], f"rank {rank} step {rec['step']} replayed other samples"
        seen[rec["step"]] = rec["keys"]
    return seen


def start(cmd, env=ENV):
    """A launch in its own session (process group), so a test can kill all of its processes at once."""
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def wait_until(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            text = proc.stdout.read()[-4000:]
            raise AssertionError(f"the run ended (rc={proc.returncode}) before the fault:\n{text}")
        assert time.time() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its workers in sessions of their own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all(proc):
    """SIGKILL the launcher, the ranks and their data workers at once: as when a node dies."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# ---------------------------------------------------------------- shared launches


@pytest.fixture(scope="module")
def reference(shapes_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resilience") / "reference")
    ok(run(torchrun(*keyed_args(shapes_dataset, out))))
    return out


@pytest.fixture(scope="module")
def two_nodes(shapes_dataset, tmp_path_factory):
    """The reference run as 2 torchrun agents ("nodes") x 1 process, c10d rendezvous on localhost."""
    out = str(tmp_path_factory.mktemp("resilience") / "two_nodes")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "-m", "mmpretrain.train",
           *keyed_args(shapes_dataset, out)]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-4000:]
    return out


@pytest.fixture(scope="module")
def chain(shapes_dataset, tmp_path_factory):
    """The reference run, interrupted four times at seeded random steps (SIGKILL, SIGUSR1, SIGKILL, SIGKILL
    during a checkpoint write), and finished by a fifth launch."""
    out = str(tmp_path_factory.mktemp("resilience") / "chain")
    rng = random.Random(7)
    k1 = rng.randint(2, 4)  # SIGKILL of everything once metrics reach step k1
    k2 = rng.randint(k1 + 1, 7)  # SIGUSR1 to torchrun at step >= k2: graceful stop, checkpoint, exit 75
    events = {"k1": k1, "k2": k2}

    proc = start(torchrun(*keyed_args(shapes_dataset, out)))
    wait_until(lambda: last_step(out) >= k1, proc)
    kill_all(proc)
    events["killed_at"] = killed_at = last_step(out)

    # a step above every step the killed run logged can only come from the new launch, so its handlers are up
    target = max(k2, killed_at + 1)
    launcher = ["bash", os.path.join(REPO, "launch", "torchrun.sh")]
    proc = start(launcher + keyed_args(shapes_dataset, out), env={**ENV, "NPROC": "2", "SAVE_TIMEOUT": "120"})
    wait_until(lambda: last_step(out) >= target, proc)
    proc.send_signal(signal.SIGUSR1)  # torchrun (exec'd by the script) forwards it to both ranks
    text = proc.communicate(timeout=240)[0]
    events["usr1_rc"], events["usr1_text"], events["usr1_target"] = proc.returncode, text, target
    events["usr1_latest"] = stopped = open(os.path.join(out, "checkpoints", "latest")).read().strip()

    # SIGKILL of everything again, at a random step after the stop
    k3 = int(stopped.split("_")[1]) + rng.randint(1, 3)
    events["k3"] = k3
    proc = start(torchrun(*keyed_args(shapes_dataset, out)))
    wait_until(lambda: last_step(out) >= k3, proc)
    kill_all(proc)
    events["killed_again_at"] = last_step(out)
    stopped = open(os.path.join(out, "checkpoints", "latest")).read().strip()  # the periodic save before k3

    # killed while writing the next checkpoint: DeepSpeed's files are there, meta.json / latest not yet
    stopped_step = int(stopped.split("_")[1])
    slow = stopped_step + 2 - stopped_step % 2
    events["slow_save"], events["before_slow_save"] = slow, stopped
    t_start = time.time()
    proc = start(torchrun(*keyed_args(shapes_dataset, out)), env={**ENV, "MMPRETRAIN_INJECT": f"slow_save@{slow}"})
    slow_dir = os.path.join(out, "checkpoints", f"step_{slow}")

    def written_by_this_launch(path):
        return os.path.exists(path) and os.path.getmtime(path) >= t_start

    wait_until(lambda: all(written_by_this_launch(os.path.join(slow_dir, f"rng_rank{r}.pt")) for r in (0, 1)), proc)
    time.sleep(0.5)
    kill_all(proc)
    events["latest_after_save_kill"] = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    events["slow_meta"] = os.path.exists(os.path.join(slow_dir, "meta.json"))

    events["final"] = ok(run(torchrun(*keyed_args(shapes_dataset, out))))
    return out, events


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_two_torchrun_nodes_take_the_same_steps_as_one_node(reference, two_nodes):
    ref, got = metrics(reference), metrics(two_nodes)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), f"step {a['step']}"
    for r in (0, 1):
        assert keys_by_step(two_nodes, r) == keys_by_step(reference, r)


@pytest.mark.slow
def test_killed_stopped_and_killed_mid_save_run_equals_uninterrupted(reference, chain):
    out, ev = chain
    assert ev["killed_at"] >= ev["k1"]
    # SIGUSR1: both ranks stopped after the same step, saved it, exited 75 (torchrun reports it as a failure)
    assert ev["usr1_rc"] != 0 and "stopped on request (SIGUSR1)" in ev["usr1_text"], ev["usr1_text"][-3000:]
    stopped_step = int(ev["usr1_latest"].split("_")[1])
    assert stopped_step >= ev["usr1_target"] and ev["slow_save"] < STEPS + 2
    assert ev["killed_again_at"] >= ev["k3"]
    # the kill during the next checkpoint write left `latest` on the previous complete checkpoint
    assert ev["latest_after_save_kill"] == ev["before_slow_save"] and not ev["slow_meta"]
    assert f"checkpoints/{ev['before_slow_save']}" in ev["final"].stdout  # "resumed from .../step_N"

    ref, got = metrics(reference), metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # metrics.jsonl reads as one run
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), f"step {a['step']}"
    for r in (0, 1):
        ref_keys, got_keys = keys_by_step(reference, r), keys_by_step(out, r)
        assert sorted(got_keys) == list(range(1, STEPS + 1))
        assert got_keys == ref_keys  # the same samples in the same order, step by step
        assert Counter(k for ks in got_keys.values() for k in ks) == Counter(k for ks in ref_keys.values() for k in ks)
    a, b = load_state_dict(find_step_dir(reference)), load_state_dict(find_step_dir(out))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_world_size_2_1_2_sees_the_uninterrupted_global_batches(reference, shapes_dataset, tmp_path):
    """Stopped after step 5 on 2 ranks, continued to step 13 on 1 rank, finished on 2 ranks: every step's global
    batch (both ranks' keys together) is the reference's, as a set, and the losses agree up to summation order."""
    out = str(tmp_path / "ws212")
    args = keyed_args(shapes_dataset, out)
    ok(run(torchrun(*args, "--stop-after-steps", "5")))
    text = ok(run([sys.executable, "-m", "mmpretrain.train", *args, "--stop-after-steps", "8"])).stdout
    assert "written by 2 ranks, this launch has 1: weights, optimizer state and the data order continue" in text
    ok(run(torchrun(*args)))

    ref, got = global_batches(reference), global_batches(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert len(got[step]) == len(set(got[step])) == 16 and set(got[step]) == set(ref[step]), f"step {step}"
    for a, b in zip(metrics(reference), metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), f"step {a['step']}"


def global_batches(folder):
    """{step: every rank's keys of that step together}, over whichever ranks each launch had."""
    ranks = sorted(int(f[len("sample_keys_rank") : -len(".jsonl")]) for f in os.listdir(folder)
                   if f.startswith("sample_keys_rank"))  # fmt: skip
    steps: dict = {}
    for r in ranks:
        for step, keys in keys_by_step(folder, r).items():
            steps.setdefault(step, []).extend(keys)
    return steps


@pytest.mark.slow
def test_four_processes_resumed_on_two_see_the_uninterrupted_global_batches(reference, shapes_dataset, tmp_path):
    """4 gloo processes stop after step 5, 2 processes finish the run (no data workers: the reference has 2 a rank):
    every step's global batch is the reference's as a set, and no sample is skipped or repeated."""
    out = str(tmp_path / "ws42")
    args = [*keyed_args(shapes_dataset, out), "data.num_workers=0"]
    ok(run(torchrun(*args, "--stop-after-steps", "5", nproc=4)))
    assert sorted(f for f in os.listdir(out) if f.startswith("sample_keys_rank")) == [
        f"sample_keys_rank{r}.jsonl" for r in range(4)]  # fmt: skip
    text = ok(run(torchrun(*args, nproc=2))).stdout
    assert "written by 4 ranks, this launch has 2" in text, text[-3000:]

    ref, got = global_batches(reference), global_batches(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert len(got[step]) == len(set(got[step])) == 16 and set(got[step]) == set(ref[step]), f"step {step}"
    seen = Counter(k for keys in got.values() for k in keys)
    assert seen == Counter(k for keys in ref.values() for k in keys)  # nothing skipped or repeated over the run
    for a, b in zip(metrics(reference), metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), f"step {a['step']}"


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_world_size_changes(shapes_dataset, tmp_path):
    """ZeRO-2, 2 ranks: a NaN loss (step 2) and a NaN gradient on one rank only (step 3) are skipped and
    counted; the run stops after step 4. Then 1 rank and 2 ranks load that checkpoint to the same weights
    and AdamW moments; 1 rank finishes the run, and 2 ranks load its checkpoint like 1 rank does."""
    out = str(tmp_path / "ws")
    args = [*run_args(shapes_dataset, out), "engine.zero_stage=2", "train.steps=6", "data.num_workers=1"]
    ok(run(torchrun(*args, "--stop-after-steps", "4"), env={**ENV, "MMPRETRAIN_INJECT": "nan_loss@2,nan_grad@3:1"}))
    lines = {m["step"]: m for m in metrics(out)}
    assert [lines[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert lines[2]["grad_norm"] is None and lines[3]["grad_norm"] is None and lines[4]["grad_norm"] is not None
    assert all(torch.isfinite(torch.tensor(lines[s]["loss"])) for s in (1, 4))

    def probe(nproc, name):
        path = str(tmp_path / f"{name}.pt")
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
        ok(run([*launcher, PROBE, args[0], path, *args[1:]]))
        return torch.load(path, weights_only=True)

    def same(a, b):
        assert a["step"] == b["step"] and a["state"].keys() == b["state"].keys()
        for name, tensors in a["state"].items():
            for x, y in zip(tensors, b["state"][name]):
                torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)

    two, one = probe(2, "two"), probe(1, "one")
    assert two["step"] == 4 and not two["universal"] and one["universal"]
    same(two, one)
    assert all(float(t[1].abs().sum()) > 0 for t in two["state"].values() if t[0].numel() > 1)  # moments are real

    text = ok(run([sys.executable, "-m", "mmpretrain.train", *args])).stdout  # 1 rank finishes steps 5-6
    assert "written by 2 ranks, this launch has 1" in text
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    one, two = probe(1, "one6"), probe(2, "two6")
    assert one["step"] == 6 and two["universal"]
    same(one, two)


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_with_the_checkpoint_intact(shapes_dataset, tmp_path):
    out = str(tmp_path / "nan")
    args = [*run_args(shapes_dataset, out), "train.max_skips_in_a_row=3", "data.num_workers=1"]
    env = {**ENV, "MMPRETRAIN_INJECT": "nan_loss@5,nan_loss@6,nan_loss@7"}
    proc = run([sys.executable, "-m", "mmpretrain.train", *args], env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("mmpretrain.train: error: 3 steps in a row had a non-finite") and "steps 5-7" in err
    assert "checkpoints/step_4" in err
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_4"
    assert "meta.json" in os.listdir(os.path.join(out, "checkpoints", "step_4"))
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_6")) and not os.path.exists(
        os.path.join(out, "checkpoints", "step_7")
    )


@pytest.mark.slow
def test_an_error_on_one_rank_ends_every_rank_with_its_message(shapes_dataset, tmp_path):
    out = str(tmp_path / "err")
    t0 = time.time()
    proc = run(torchrun(*run_args(shapes_dataset, out, "engine.dist_timeout_s=60", "data.num_workers=1")),
               env={**ENV, "MMPRETRAIN_INJECT": "raise@3:1"}, timeout=200)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected fault: rank 1 fails in step 3" in text  # torchrun names the failing rank's error
    assert time.time() - t0 < 150  # ended by the failure, well before the launch timeout (not a speed test)


@pytest.mark.slow
def test_a_dead_peer_ends_the_run_in_bounded_time(shapes_dataset, tmp_path):
    """SIGKILL of rank 1 alone (its process dies, as in an OOM kill): rank 0 must not wait out a timeout."""
    out = str(tmp_path / "dead")
    proc = start(torchrun(*run_args(shapes_dataset, out, "train.steps=400", "data.num_workers=1",
                                    "engine.dist_timeout_s=60")))  # fmt: skip
    wait_until(lambda: last_step(out) >= 2, proc)

    def rank_of(pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            return None
        return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)

    workers = [p for p in descendants(proc.pid) if rank_of(p) == 1]
    rank1 = min(workers)  # the training process (its data worker, a child of it, has a larger pid)
    t0 = time.time()
    os.kill(rank1, signal.SIGKILL)
    text = proc.communicate(timeout=200)[0]
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in text or "SIGKILL" in text, text[-3000:]
    assert time.time() - t0 < 120  # bounded: torchrun or gloo ends rank 0, not a 30-minute default timeout
    assert last_step(out) < 400
    time.sleep(1)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):  # nothing of this run left behind (orphans included)
        try:
            if f"output_dir={out}".encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                left.append(pid)
        except OSError:
            pass
    assert not left, f"processes of the run still alive: {left}"
