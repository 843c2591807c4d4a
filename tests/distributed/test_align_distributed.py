"""ALIGN across ranks: the label-smoothed CLIP term on 2 gloo ranks equals 1 process holding the whole batch, and
the BERT-tower recipe trains under ZeRO-3 + bf16 on 2 ranks, evaluates from its run folder, and the converters
refuse it with one line naming the reason.

The term check follows tests/distributed/test_loss_distributed.py: linear "towers", a float64 one-process
reference (F.cross_entropy with label_smoothing on the full B x B matrix), each rank's feature gradient equal
to world x its rows of the reference, and parameter gradients averaged over ranks (as DeepSpeed does) equal
to the reference's.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmpretrain.distributed import free_port
from tests.distributed.gloo import assert_close, init_gloo

WORLD, B_LOCAL, D_IN, D = 2, 7, 12, 16
EPS = 0.1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, x_img, x_txt):
        out = type("Out", (), {})()
        out.image_features = F.normalize(self.img(x_img), dim=-1)
        out.text_features = F.normalize(self.txt(x_txt), dim=-1)
        out.logit_scale, out.logit_bias = self.log_scale.exp(), None
        return out


def reference(state, x_img, x_txt):
    towers = Towers().double()
    towers.load_state_dict(state)
    out = towers(x_img.double(), x_txt.double())
    feats = [out.image_features, out.text_features]
    for f in feats:
        f.retain_grad()
    logits_BB = out.logit_scale * feats[0] @ feats[1].T
    labels_B = torch.arange(logits_BB.shape[0])
    loss = 0.5 * (F.cross_entropy(logits_BB, labels_B, label_smoothing=EPS)
                  + F.cross_entropy(logits_BB.T, labels_B, label_smoothing=EPS))  # fmt: skip
    loss.backward()
    return loss.item(), feats[0].grad, feats[1].grad, {n: p.grad for n, p in towers.named_parameters()}


def worker(rank, port, cases):
    from mmpretrain.objectives import LossConfig, StepContext
    from mmpretrain.objectives.contrastive import ClipTerm, ClipTermConfig

    init_gloo(rank, WORLD, port)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    term = ClipTerm(ClipTermConfig(label_smoothing=EPS), run_cfg=None)
    for impl, state, x_img, x_txt, (want_loss, want_dimg, want_dtxt, want_grads) in cases:
        towers = Towers()
        towers.load_state_dict(state)
        out = towers(x_img[rows], x_txt[rows])
        for f in (out.image_features, out.text_features):
            f.retain_grad()
        ctx = StepContext(out=out, images=None, tokens=None, batch={}, model=None, group=None,
                          loss_cfg=LossConfig(impl=impl, chunk_size=3))  # fmt: skip
        loss = term.loss(ctx)
        loss.backward()
        tag = f"{impl}/rank{rank}"
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        assert losses[0].item() == losses[1].item(), f"{tag}: loss differs across ranks {losses}"
        assert loss.item() == pytest.approx(want_loss, rel=1e-5), tag
        assert_close(out.image_features.grad / WORLD, want_dimg[rows], f"{tag} d_image")
        assert_close(out.text_features.grad / WORLD, want_dtxt[rows], f"{tag} d_text")
        for n, p in towers.named_parameters():
            dist.all_reduce(p.grad)  # DeepSpeed: sum, then / world
            assert_close(p.grad / WORLD, want_grads[n], f"{tag} d_{n}")
    dist.destroy_process_group()


def test_label_smoothing_two_ranks_equal_one_process_holding_the_batch():
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Towers().state_dict().items()}
    x_img, x_txt = torch.randn(WORLD * B_LOCAL, D_IN), torch.randn(WORLD * B_LOCAL, D_IN)
    x_txt = x_txt + x_img  # correlated pairs, like a trained model
    ref = reference(state, x_img, x_txt)
    mp.spawn(worker, args=(free_port(), [(impl, state, x_img, x_txt, ref) for impl in ("chunked", "naive")]),
             nprocs=WORLD)  # fmt: skip


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
    from mmpretrain.evaluate import main as evaluate_main

    run = str(tmp_path / "zero3")
    lines = launch(run, shapes_dataset, "engine.zero_stage=3", "engine.precision=bf16")
    assert [m["step"] for m in lines] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)

    # The run folder (ZeRO-3 shards of the BERT tower) loads strictly and evaluates.
    out_json = str(tmp_path / "eval.json")
    assert evaluate_main([run, "--output", out_json]) == 0
    got = json.load(open(out_json))
    assert 0 <= got["zeroshot/eval/top1"] <= 1 and any(k.startswith("retrieval/") for k in got), got

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
