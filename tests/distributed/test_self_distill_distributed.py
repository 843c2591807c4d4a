"""The self_distill term across ranks and restarts.

- 2 gloo ranks under ZeRO-3 (the student partitioned; its tower and heads gathered for the teacher's copy and EMA)
  take the same steps as 1 rank under ZeRO-0 holding the whole batch: the logged terms, the gradient norm and the
  EMA teacher with its centers after the last step; both ranks hold the same teacher. Fixed global batches with
  their local crops; the term switches on at step 2 of 4, so the off steps run too.
- Exact resume through the command: a run stopped at step 3 (the term on since step 2) and restarted equals the
  uninterrupted run, losses and the teacher (objective_state.pt) <= 1e-6.

This file is also the torchrun worker of the first test:
    torchrun --nproc_per_node=2 tests/distributed/test_self_distill_distributed.py OUT engine.zero_stage=3
"""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
GLOBAL_BATCH, WORKER_STEPS = 8, 4
TERM = ["loss.terms.siglip.weight=1.0", "loss.terms.self_distill.start_fraction=0.25",
        "loss.terms.self_distill.prototypes=32", "loss.terms.self_distill.head_width=16",
        "loss.terms.self_distill.momentum=0.9", "data.train.local_crops=2"]  # fmt: skip


def worker(out_path, overrides):
    """Train WORKER_STEPS steps on fixed global batches (each rank its rows); write the terms and the teacher."""
    from mmpretrain.config import load_config
    from mmpretrain.distributed import destroy, init_distributed
    from mmpretrain.engine import build_engine, release_engine
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective
    from mmpretrain.step import TrainStep

    cfg = load_config(None, ["model.name=siglip-tiny", "data.synthetic.root=unused", f"train.steps={WORKER_STEPS}",
                             f"train.batch_size={GLOBAL_BATCH}", "optim.warmup_steps=1", *TERM, *overrides],
                      world_size=int(os.environ.get("WORLD_SIZE", 1)))  # fmt: skip
    info = init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    per_rank = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=per_rank, total_steps=WORKER_STEPS)
    objective.setup(info.device)
    train_step = TrainStep(engine, objective, cfg.engine, grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss,
                           device=info.device)  # fmt: skip
    record = {"loss": [], "self_distill": [], "siglip": [], "grad_norm": []}
    s, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    for step in range(WORKER_STEPS):
        g = torch.Generator().manual_seed(100 + step)
        images = torch.randint(0, 256, (GLOBAL_BATCH, 3, s, s), dtype=torch.uint8, generator=g)
        local = torch.randint(0, 256, (GLOBAL_BATCH, 2, 3, s, s), dtype=torch.uint8, generator=g)
        tokens = torch.randint(1, 1000, (GLOBAL_BATCH, ctx), generator=g)
        res = train_step({"image": images[mine], "local_crops": local[mine], "text": tokens[mine]}, step + 1)
        assert not res.skipped
        for key in ("self_distill", "siglip"):
            record[key].append(res.terms[key])
        record["loss"].append(float(res.loss))
        record["grad_norm"].append(res.grad_norm)
    json.dump(record, open(f"{out_path}.rank{info.rank}.json", "w"))
    torch.save(objective.state_dict(), f"{out_path}.rank{info.rank}.pt")
    release_engine(engine)
    destroy()


def run_worker(tmp_path, nproc, overrides):
    from mmpretrain.distributed import free_port

    out = tmp_path / f"n{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           __file__, str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [(json.load(open(f"{out}.rank{r}.json")), torch.load(f"{out}.rank{r}.pt")) for r in range(nproc)]


@pytest.mark.slow
def test_two_ranks_zero3_equal_one_rank_holding_the_batch(tmp_path):
    ((ref, ref_teacher),) = run_worker(tmp_path, 1, ["engine.zero_stage=0"])
    got = run_worker(tmp_path, 2, ["engine.zero_stage=3"])
    assert ref["self_distill"][0] == 0.0 and all(v > 0 for v in ref["self_distill"][1:])  # on from step 2
    for rank, (rec, _) in enumerate(got):
        for step in range(WORKER_STEPS):
            for key in ("self_distill", "siglip", "loss", "grad_norm"):
                assert rec[key][step] == pytest.approx(ref[key][step], rel=1e-5), (key, step, rank)
    teachers = [t for _, t in got]
    assert teachers[0].keys() == ref_teacher.keys()
    assert int(ref_teacher["self_distill.started"]) == 1
    for k, want in ref_teacher.items():
        assert torch.equal(teachers[0][k], teachers[1][k]), k  # every rank holds the same whole teacher
        torch.testing.assert_close(teachers[0][k], want, rtol=1e-4, atol=1e-6, msg=k)
    # the teacher moved with the student (EMA after the steps), and so did the centers
    assert any(not torch.equal(ref_teacher[k], got_k) for k, got_k in teachers[0].items())
    assert ref_teacher["self_distill.center_patch"].abs().sum() > 0


# ----------------------------------------------------------------------------- exact resume through the command


def train_cli(args):
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.train", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]


def teacher_state(out):
    from mmpretrain.checkpoint import OBJECTIVE_STATE, find_step_dir

    return torch.load(os.path.join(find_step_dir(out), OBJECTIVE_STATE), weights_only=True)


@pytest.mark.slow
def test_resume_mid_self_distillation_equals_the_uninterrupted_run(shapes_dataset, tmp_path):
    def args(out):
        return [TINY, f"output_dir={out}", f"data.train.urls={shapes_dataset.train_urls}",
                f"data.eval.zeroshot={shapes_dataset.zeroshot_root}",
                f"data.eval.retrieval={shapes_dataset.retrieval_root}", "model.name=siglip-tiny", *TERM,
                "checkpoint.every_steps=3"]  # fmt: skip

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train_cli(args(full))
    first = train_cli(["--stop-after-steps", "3", *args(resumed)])
    assert "stopped at step 3/6" in first.stdout
    second = train_cli(args(resumed))
    assert "resumed from" in second.stdout
    a, b = losses(full), losses(resumed)
    assert [m["step"] for m in b] == list(range(1, 7))
    assert a[0]["loss/self_distill"] == 0.0 and all(m["loss/self_distill"] > 0 for m in a[1:])
    for x, y in zip(a, b):
        for key in ("loss", "loss/self_distill", "loss/siglip"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (x["step"], key)
    t_full, t_resumed = teacher_state(full), teacher_state(resumed)
    assert t_full.keys() == t_resumed.keys()
    for k in t_full:
        torch.testing.assert_close(t_resumed[k], t_full[k], rtol=1e-6, atol=1e-6, msg=k)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
