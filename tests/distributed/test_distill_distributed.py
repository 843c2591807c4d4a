"""Distillation across ranks: 2 gloo ranks equal 1 process holding the whole batch (loss, feature and parameter
gradients), and a real ``torchrun --nproc_per_node=2 -m mmpretrain.train`` with a teacher trained in the test takes
the same steps under ZeRO-3 as under ZeRO-0 (teacher built outside the engine; the projection head sharded)."""

import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpretrain.distributed import free_port
from mmpretrain.objectives.distill import distill_kl
from tests.distributed.harness import Case, LinearTowers, Step, assert_n_ranks_equal_one
from tests.unit.test_distill import naive_kl

B_LOCAL, D_IN, D, E = 7, 12, 16, 10
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def reference(state, x_img, x_txt, u, v, c):
    model = LinearTowers.from_state(state, torch.float64)
    out = model((x_img.double(), x_txt.double()))
    x, y = out.image_features, out.text_features
    x.retain_grad(), y.retain_grad()
    loss = naive_kl(x, y, out.logit_scale, u.double(), v.double(), c)
    loss.backward()
    return Step(loss, model, {"image": x, "text": y})


def distill(chunk, state, x_img, x_txt, u, v, c, rows):
    """distill_kl on this rank's rows, in the world group, `chunk` rows at a time."""
    model = LinearTowers.from_state(state)
    out = model((x_img[rows], x_txt[rows]))
    x, y = out.image_features, out.text_features
    x.retain_grad(), y.retain_grad()
    loss = distill_kl(x, y, out.logit_scale, u[rows], v[rows], torch.tensor(c), dist.group.WORLD, chunk_size=chunk)
    loss.backward()
    return Step(loss, model, {"image": x, "text": y})


def test_two_ranks_equal_one_process_holding_the_batch():
    torch.manual_seed(0)
    state = LinearTowers(D_IN, D).state_dict()
    B = 2 * B_LOCAL
    x_img, x_txt = torch.randn(B, D_IN), torch.randn(B, D_IN)
    x_txt = x_txt + x_img  # correlated pairs
    u = F.normalize(torch.randn(B, E), dim=-1)
    v = F.normalize(u + 0.5 * torch.randn(B, E), dim=-1)
    data = (state, x_img, x_txt, u, v, 30.0)
    cases = [Case(f"chunk {chunk}", partial(distill, chunk, *data), partial(reference, *data)) for chunk in (3, 64)]
    assert_n_ranks_equal_one(cases, rows_per_rank=B_LOCAL)


# ----------------------------------------------------------------------------- real runs under ZeRO-3


def data_overrides(ds, out):
    return [f"output_dir={out}", f"data.train.urls={ds.train_urls}", f"data.eval.zeroshot={ds.zeroshot_root}",
            f"data.eval.retrieval={ds.retrieval_root}"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(shapes_dataset, tmp_path_factory):
    """A tiny CLIP teacher unlike the student (48-wide embedding, 48 px images, 12-token context), trained 2 steps."""
    out = str(tmp_path_factory.mktemp("distill") / "teacher")
    cmd = [sys.executable, "-m", "mmpretrain.train", TINY, *data_overrides(shapes_dataset, out), "model.embed_dim=48",
           "model.vision.image_size=48", "model.vision.patch_size=16", "model.text.context_length=12",
           "train.steps=2", "checkpoint.every_steps=0"]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def train_lines(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]


@pytest.mark.slow
def test_zero3_takes_the_same_steps_as_zero0(teacher_run, shapes_dataset, tmp_path):
    # fp32 teacher: ZeRO-3 swaps F.linear for its own (matmul, then bias), which rounds a bf16 teacher differently
    lines = {}
    for stage in (0, 3):
        out = str(tmp_path / f"stage{stage}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "mmpretrain.train", TINY, *data_overrides(shapes_dataset, out), f"engine.zero_stage={stage}",
               "train.steps=4", "checkpoint.every_steps=0", "loss.terms.clip.weight=1.0",
               f"loss.terms.distill.teacher={teacher_run}", "loss.terms.distill.feature_weight=0.5",
               "loss.terms.distill.precision=fp32"]  # fmt: skip
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"stage {stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        lines[stage] = train_lines(out)
    assert [m["step"] for m in lines[3]] == [1, 2, 3, 4]
    for a, b in zip(lines[0], lines[3]):
        for key in ("loss", "loss/clip", "loss/distill", "grad_norm"):
            assert torch.isfinite(torch.tensor(b[key])), (key, b)
            assert b[key] == pytest.approx(a[key], rel=1e-4), f"step {a['step']} {key}"
    assert lines[3][-1]["loss/distill"] < lines[3][0]["loss/distill"]
