"""launch/slurm.sbatch on a real one-host SLURM: preemption warning -> checkpoint -> requeue -> resume.

The test starts slurmctld + slurmd itself (tests/launch/slurm_up.sh; Debian's slurmctld, slurmd,
slurm-client and munge must be installed, and it must run as root, as in CI) and skips with the
reason where that is not possible. The job runs 2 torchrun agents ("nodes") x 1 rank with c10d
rendezvous, like a 2-node job. The warning signal is delivered as SLURM delivers `--signal=B:USR1`,
to the batch shell only (`scancel --signal=USR1 --batch`; the timed signal can come up to a minute
early or late, too loose for a test).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mmpretrain.distributed import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
STEPS = 8


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("SLURM test: needs root to start slurmctld/slurmd")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None
               and not os.path.exists(f"/usr/sbin/{b}")]  # fmt: skip
    if missing:
        pytest.skip(
            f"SLURM test: {', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge)"
        )
    state = str(tmp_path_factory.mktemp("slurm"))
    up = sh("bash", os.path.join(HERE, "slurm_up.sh"), state, check=False)
    if up.returncode != 0:
        sh("bash", os.path.join(HERE, "slurm_down.sh"), state, check=False)
        pytest.skip(f"SLURM test: the daemons did not start: {(up.stderr or up.stdout).strip()[-500:]}")
    yield state
    sh("bash", os.path.join(HERE, "slurm_down.sh"), state, check=False)


def job_field(job: str, field: str) -> str:
    out = sh("scontrol", "show", "job", job, check=False).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def metrics_steps(out: str) -> list[int]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(x)["step"] for x in open(path) if '"loss"' in x]


@pytest.mark.slow
def test_sbatch_preempted_requeues_and_finishes_from_its_checkpoint(slurm, shapes_dataset, tmp_path):
    out, log = str(tmp_path / "run"), str(tmp_path / "job.out")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CONFIG": TINY, "OUTPUT_DIR": out, "NPROC_PER_NODE": "1", "PYTHON": sys.executable,
           "MASTER_PORT": str(free_port()), "SAVE_TIMEOUT": "120"}  # fmt: skip
    overrides = [f"data.train.urls={shapes_dataset.train_urls}", f"train.steps={STEPS}", "checkpoint.every_steps=100",
                 "data.num_workers=1"]  # fmt: skip
    sbatch = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}", "--chdir", REPO,
              os.path.join(REPO, "launch", "slurm.sbatch"), *overrides]  # fmt: skip
    job = sh(*sbatch, env=env).stdout.strip().split(";")[0]

    def wait(cond, what, timeout=240):
        t0 = time.time()
        while not cond():
            if time.time() - t0 > timeout:
                text = open(log).read()[-4000:] if os.path.exists(log) else "(no job output)"
                pytest.fail(f"timed out waiting for {what}; job state {job_field(job, 'JobState')}:\n{text}")
            time.sleep(0.2)

    try:
        wait(lambda: len(metrics_steps(out)) >= 2, "the first steps")
        sh("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@N delivers
        # the job stops with a checkpoint and requeues itself. SLURM holds a requeued job until the old job's
        # credential expires (cred_expire=10 in slurm_up.sh: ~11-25 s). Forcing StartTime=now before the old
        # steps are gone gets the job killed ("Job credential revoked"), so the test waits the hold out.
        wait(lambda: job_field(job, "Restarts") == "1", "the requeue")
        wait(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "the end", 400)
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING"):
            sh("scancel", job, check=False)
    text = open(log).read()
    assert job_field(job, "JobState") == "COMPLETED", text[-5000:]
    assert "got USR1; asked the ranks to save and stop" in text
    assert "stopped on request (stop file" in text and "requeueing job" in text
    stopped_at = int(
        text.split("requeueing job")[0].split("stopped on request")[1].split("after step ")[1].split(";")[0]
    )
    assert "restart 1" in text and f"resumed from {out}/checkpoints/step_{stopped_at}" in text
    assert text.rstrip().endswith("srun exit 0")
    assert metrics_steps(out) == list(range(1, STEPS + 1))  # one run, read as one
    assert os.path.exists(os.path.join(out, "eval.json")) or "finished at step" in text
    assert not os.path.exists(os.path.join(out, "STOP"))  # acknowledged, so the requeued run went on
