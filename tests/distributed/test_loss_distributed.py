"""2 gloo ranks equal 1 process holding the whole batch: CLIP and SigLIP loss, feature and parameter gradients.

A small linear "tower" per modality feeds the loss. The parent computes the one-process reference
in float64 with the full-matrix loss; each rank computes its half with the tiled loss (chunked and
naive implementations). The loss must be the same on every rank, each rank's feature gradient
must be world x the one-process gradient of its rows (what makes the averaging right), and the
parameter gradients averaged over ranks like DeepSpeed does must equal the one-process ones
(tests/distributed/harness.py). GradCache across ranks likewise.
"""

from functools import partial

import torch
from mmpretrain.kernels.contrastive_loss import clip_loss_reference, siglip_loss_reference

from mmpretrain.loss import LossConfig, compute_loss, grad_cache_step
from tests.distributed.harness import Case, LinearTowers, Step, assert_n_ranks_equal_one

B_LOCAL, D_IN, D = 7, 12, 16


def reference(name, state, x_img, x_txt):
    """One process, whole batch, float64 full-matrix loss."""
    model = LinearTowers.from_state(state, torch.float64)
    out = model((x_img.double(), x_txt.double()))
    feats = [out.image_features, out.text_features]
    for f in feats:
        f.retain_grad()
    if name == "clip":
        loss = clip_loss_reference(*feats, out.logit_scale)
    else:
        loss = siglip_loss_reference(*feats, out.logit_scale, out.logit_bias)
    loss.backward()
    return Step(loss, model, {"image": feats[0], "text": feats[1]})


def tiled(name, impl, state, x_img, x_txt, rows):
    """This rank's rows through the tiled loss (group None -> the default group)."""
    model = LinearTowers.from_state(state)
    out = model((x_img[rows], x_txt[rows]))
    for f in (out.image_features, out.text_features):
        f.retain_grad()
    loss = compute_loss(LossConfig(name=name, impl=impl, chunk_size=3), out)
    loss.backward()
    return Step(loss, model, {"image": out.image_features, "text": out.text_features})


def grad_cache(name, impl, state, x_img, x_txt, rows):
    """GradCache: 2 micro-batches of this rank's rows (rows of the same global batch, same order)."""
    model = LinearTowers.from_state(state)
    local = (x_img[rows], x_txt[rows])
    half = len(local[0]) // 2
    mbs = [tuple(t[:half] for t in local), tuple(t[half:] for t in local)]
    loss = grad_cache_step(model, mbs, partial(compute_loss, LossConfig(name=name, impl=impl, chunk_size=3)))
    return Step(loss, model, {})


def test_two_ranks_equal_one_process_holding_the_batch():
    cases = []
    for name in ("clip", "siglip"):
        torch.manual_seed(0)
        state = LinearTowers(D_IN, D, bias=name == "siglip").state_dict()
        x_img, x_txt = torch.randn(2 * B_LOCAL, D_IN), torch.randn(2 * B_LOCAL, D_IN)
        x_txt = x_txt + x_img[:, :D_IN]  # correlated pairs, like a trained model
        data = (state, x_img, x_txt)
        ref = partial(reference, name, *data)
        for impl in ("chunked", "naive"):
            cases.append(Case(f"{name}/{impl}", partial(tiled, name, impl, *data), ref))
            cases.append(Case(f"{name}/{impl} grad cache", partial(grad_cache, name, impl, *data), ref))
    assert_n_ranks_equal_one(cases, rows_per_rank=B_LOCAL)
