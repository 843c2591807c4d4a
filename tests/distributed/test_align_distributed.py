"""ALIGN across ranks: the label-smoothed CLIP term on 2 gloo ranks equals 1 process holding the whole batch, and
the BERT-tower recipe trains under ZeRO-3 + bf16 on 2 ranks, evaluates from its run folder, and the converters
refuse it with one line naming the reason.

The term check is tests/distributed/harness.py's: linear "towers", a float64 one-process reference
(F.cross_entropy with label_smoothing on the full B x B matrix), each rank's feature gradient equal to world x
its rows of the reference, and parameter gradients averaged over ranks (as DeepSpeed does) equal to the
reference's.
"""

import importlib.util
import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.distributed import free_port
from mmpretrain.eval.cli import main as evaluate_main
from mmpretrain.objectives import LossConfig, StepContext
from mmpretrain.objectives.contrastive import ClipTerm, ClipTermConfig
from tests.distributed.harness import Case, LinearTowers, Step, assert_n_ranks_equal_one

B_LOCAL, D_IN, D = 7, 12, 16
EPS = 0.1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def reference(state, x_img, x_txt):
    """F.cross_entropy with label_smoothing on the full B x B matrix, float64, one process."""
    model = LinearTowers.from_state(state, torch.float64)
    out = model((x_img.double(), x_txt.double()))
    feats = [out.image_features, out.text_features]
    for f in feats:
        f.retain_grad()
    logits_BB = out.logit_scale * feats[0] @ feats[1].T
    labels_B = torch.arange(logits_BB.shape[0])
    loss = 0.5 * (F.cross_entropy(logits_BB, labels_B, label_smoothing=EPS)
                  + F.cross_entropy(logits_BB.T, labels_B, label_smoothing=EPS))  # fmt: skip
    loss.backward()
    return Step(loss, model, {"image": feats[0], "text": feats[1]})


def clip_term(impl, state, x_img, x_txt, rows):
    """The label-smoothed clip term on this rank's rows (group None: the world)."""
    model = LinearTowers.from_state(state)
    out = model((x_img[rows], x_txt[rows]))
    for f in (out.image_features, out.text_features):
        f.retain_grad()
    ctx = StepContext(out=out, images=None, tokens=None, batch={}, model=None, group=None,
                      loss_cfg=LossConfig(impl=impl, chunk_size=3))  # fmt: skip
    loss = ClipTerm(ClipTermConfig(label_smoothing=EPS), run_cfg=None).loss(ctx)
    loss.backward()
    return Step(loss, model, {"image": out.image_features, "text": out.text_features})


def test_label_smoothing_two_ranks_equal_one_process_holding_the_batch():
    torch.manual_seed(0)
    state = LinearTowers(D_IN, D).state_dict()
    x_img, x_txt = torch.randn(2 * B_LOCAL, D_IN), torch.randn(2 * B_LOCAL, D_IN)
    x_txt = x_txt + x_img  # correlated pairs, like a trained model
    data = (state, x_img, x_txt)
    cases = [Case(impl, partial(clip_term, impl, *data), partial(reference, *data)) for impl in ("chunked", "naive")]
    assert_n_ranks_equal_one(cases, rows_per_rank=B_LOCAL)


# ----------------------------------------------------------------------------- a real ALIGN run


def launch(out, shapes_dataset, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "mmpretrain.train", os.path.join(ROOT, "configs", "recipes", "align-tiny.yaml"), f"output_dir={out}",
           "train.steps=2", "train.batch_size=16", "checkpoint.every_steps=2", "logging.wandb=disabled",
           "logging.log_every=1", "logging.progress=false", f"data.train.urls={shapes_dataset.train_urls}",
           f"data.eval.zeroshot={shapes_dataset.zeroshot_root}", f"data.eval.retrieval={shapes_dataset.retrieval_root}",
           *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{out}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def load_convert_cli():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_align_zero3_bf16_trains_evaluates_and_refuses_export(shapes_dataset, tmp_path, capsys):
    run = str(tmp_path / "zero3")
    lines = launch(run, shapes_dataset, "engine.zero_stage=3", "engine.precision=bf16")
    assert [m["step"] for m in lines] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)

    # The run folder (ZeRO-3 shards of the BERT tower) loads strictly (weights-only, no trust flag) and evaluates on
    # the sets named on the command line (a folder's own data settings are never used)
    out_json = str(tmp_path / "eval.json")
    sets = ["--zeroshot", shapes_dataset.zeroshot_root, "--retrieval", shapes_dataset.retrieval_root]
    assert evaluate_main([run, *sets, "--output", out_json]) == 0
    got = json.load(open(out_json))
    assert 0 <= got["zeroshot/shapes/top1"] <= 1 and any(k.startswith("retrieval/") for k in got), got

    cli = load_convert_cli()
    capsys.readouterr()
    for command, target in (("to-hf", "Hugging Face CLIPModel"), ("to-openclip", "OpenCLIP")):
        assert cli.main([command, run, str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(
            f"convert_checkpoint.py: error: model.text.kind=hf: the {target} export needs our CLIP"
        ), err
        assert not os.path.exists(tmp_path / command)
    assert cli.main(["consolidate", run, str(tmp_path / "consolidated")]) == 0
