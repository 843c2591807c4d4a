"""2 gloo ranks equal 1 process holding the whole batch: CLIP and SigLIP loss, feature and parameter gradients.

A small linear "tower" per modality feeds the loss. The parent computes the one-process reference
in float64 with the full-matrix loss; each rank computes its half with the tiled loss (chunked and
naive implementations), then averages parameter gradients over ranks like DeepSpeed does
(all-reduce sum / world). The loss must be the same on every rank, each rank's feature gradient
must be world x the one-process gradient of its rows (what makes the averaging right), and the
averaged parameter gradients must equal the one-process ones. GradCache across ranks likewise.
"""

from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from mmpretrain.kernels.contrastive_loss import clip_loss_reference, siglip_loss_reference

from mmpretrain.distributed import free_port
from mmpretrain.loss import LossConfig, compute_loss, grad_cache_step
from tests.distributed.gloo import assert_close, init_gloo

WORLD, B_LOCAL, D_IN, D = 2, 7, 12, 16


class Towers(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.5))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0)) if name == "siglip" else None

    def forward(self, batch):
        x_img, x_txt = batch
        out = type("Out", (), {})()
        out.image_features = F.normalize(self.img(x_img), dim=-1)
        out.text_features = F.normalize(self.txt(x_txt), dim=-1)
        out.logit_scale, out.logit_bias = self.log_scale.exp(), self.bias
        return out


def reference(name, state, x_img, x_txt):
    """One process, whole batch, float64 full-matrix loss: loss, feature grads, parameter grads."""
    towers = Towers(name).double()
    towers.load_state_dict(state)
    out = towers((x_img.double(), x_txt.double()))
    feats = [out.image_features, out.text_features]
    for f in feats:
        f.retain_grad()
    if name == "clip":
        loss = clip_loss_reference(*feats, out.logit_scale)
    else:
        loss = siglip_loss_reference(*feats, out.logit_scale, out.logit_bias)
    loss.backward()
    grads = {n: p.grad for n, p in towers.named_parameters()}
    return loss.item(), feats[0].grad, feats[1].grad, grads


def worker(rank, port, cases):
    init_gloo(rank, WORLD, port)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    for name, impl, state, x_img, x_txt, ref in cases:
        want_loss, want_dimg, want_dtxt, want_grads = ref
        towers = Towers(name)
        towers.load_state_dict(state)
        out = towers((x_img[rows], x_txt[rows]))
        for f in (out.image_features, out.text_features):
            f.retain_grad()
        loss = compute_loss(LossConfig(name=name, impl=impl, chunk_size=3), out)  # group None -> default group
        loss.backward()
        tag = f"{name}/{impl}/rank{rank}"
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        assert losses[0].item() == losses[1].item(), f"{tag}: loss differs across ranks {losses}"
        assert loss.item() == pytest.approx(want_loss, rel=1e-5), tag
        # Each rank's feature gradient is world x its share of the one-process gradient ...
        assert_close(out.image_features.grad / WORLD, want_dimg[rows], f"{tag} d_image")
        assert_close(out.text_features.grad / WORLD, want_dtxt[rows], f"{tag} d_text")
        # ... so that DeepSpeed's averaging of parameter gradients gives the one-process gradient.
        for n, p in towers.named_parameters():
            dist.all_reduce(p.grad)
            assert_close(p.grad / WORLD, want_grads[n], f"{tag} d_{n}")

        # GradCache: each rank accumulates 2 micro-batches (rows of the same global batch, same order).
        towers.zero_grad()
        half = B_LOCAL // 2
        local = (x_img[rows], x_txt[rows])
        mbs = [(t[:half] for t in local), (t[half:] for t in local)]
        mbs = [tuple(mb) for mb in mbs]
        cfg = LossConfig(name=name, impl=impl, chunk_size=3)
        loss = grad_cache_step(towers, mbs, partial(compute_loss, cfg))
        assert loss.item() == pytest.approx(want_loss, rel=1e-5), f"{tag} grad cache"
        for n, p in towers.named_parameters():
            dist.all_reduce(p.grad)
            assert_close(p.grad / WORLD, want_grads[n], f"{tag} grad cache d_{n}")
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_holding_the_batch():
    cases = []
    for name in ("clip", "siglip"):
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in Towers(name).state_dict().items()}
        x_img, x_txt = torch.randn(WORLD * B_LOCAL, D_IN), torch.randn(WORLD * B_LOCAL, D_IN)
        x_txt = x_txt + x_img[:, :D_IN]  # correlated pairs, like a trained model
        ref = reference(name, state, x_img, x_txt)
        cases += [(name, impl, state, x_img, x_txt, ref) for impl in ("chunked", "naive")]
    mp.spawn(worker, args=(free_port(), cases), nprocs=WORLD)
