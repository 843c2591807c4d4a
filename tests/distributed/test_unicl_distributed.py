"""UniCL on 2 gloo ranks equals 1 process holding the whole batch: loss, feature and parameter gradients.

Labels repeat within and across the ranks' halves; they come from .cls, from captions (token rows hashed on
each rank) or both (label_source auto | cls | caption), so the keys must agree across processes. The reference
is the naive float64 UniCL of tests/unit/test_unicl.py on the whole batch. Each rank runs the unicl term
through Objective (chunked and naive kernels), then averages parameter gradients like DeepSpeed; GradCache
with 2 micro-batches per rank must give the same.
"""

from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmpretrain.distributed import free_port
from mmpretrain.loss import grad_cache_step
from tests.distributed.gloo import assert_close, init_gloo

WORLD, B_LOCAL, D_IN, D, L = 2, 7, 12, 16, 8


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, batch):
        x_img, x_txt = batch
        out = type("Out", (), {})()
        out.image_features = F.normalize(self.img(x_img), dim=-1)
        out.text_features = F.normalize(self.txt(x_txt), dim=-1)
        out.logit_scale, out.logit_bias = self.log_scale.exp(), None
        return out


def term_loss(source, impl, out, batch):
    """The unicl term through the objective layer (group None: the world group when it is up)."""
    from mmpretrain.config import Config
    from mmpretrain.objectives import LossConfig, Objective, StepContext, TermsConfig
    from mmpretrain.objectives.unicl import UniclTermConfig

    cfg = Config()
    cfg.loss = LossConfig(terms=TermsConfig(unicl=UniclTermConfig(label_source=source)), impl=impl, chunk_size=3)
    loss, _ = Objective(cfg)(StepContext(out, None, None, batch, None, None, cfg.loss))
    return loss


def reference(source, state, x_img, x_txt, tokens, cls):
    """One process, whole batch, float64 naive UniCL: loss, feature grads, parameter grads."""
    from mmpretrain.objectives.unicl import label_keys
    from tests.unit.test_unicl import naive_unicl

    towers = Towers().double()
    towers.load_state_dict(state)
    out = towers((x_img.double(), x_txt.double()))
    feats = [out.image_features, out.text_features]
    for f in feats:
        f.retain_grad()
    labels = label_keys(source, tokens, cls, 0).tolist()
    assert len(set(labels)) < len(labels) - 3, "the case must repeat labels"
    loss = naive_unicl(*feats, out.logit_scale, labels)
    loss.backward()
    return loss.item(), feats[0].grad, feats[1].grad, {n: p.grad for n, p in towers.named_parameters()}


def worker(rank, port, cases):
    init_gloo(rank, WORLD, port)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    for source, impl, state, x_img, x_txt, tokens, cls, ref in cases:
        want_loss, want_dimg, want_dtxt, want_grads = ref
        tag = f"{source}/{impl}/rank{rank}"
        batch = {"text": tokens[rows], "label": cls[rows]}
        towers = Towers()
        towers.load_state_dict(state)
        out = towers((x_img[rows], x_txt[rows]))
        for f in (out.image_features, out.text_features):
            f.retain_grad()
        loss = term_loss(source, impl, out, batch)
        loss.backward()
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        assert losses[0].item() == losses[1].item(), f"{tag}: loss differs across ranks {losses}"
        assert loss.item() == pytest.approx(want_loss, rel=1e-5), tag
        # each rank's feature gradient is world x its share, so DeepSpeed's average is the one-process gradient
        assert_close(out.image_features.grad / WORLD, want_dimg[rows], f"{tag} d_image")
        assert_close(out.text_features.grad / WORLD, want_dtxt[rows], f"{tag} d_text")
        for n, p in towers.named_parameters():
            dist.all_reduce(p.grad)
            assert_close(p.grad / WORLD, want_grads[n], f"{tag} d_{n}")

        # GradCache: 2 micro-batches per rank; the term sees the concatenated features and the whole batch
        towers.zero_grad()
        half = B_LOCAL // 2
        local = (x_img[rows], x_txt[rows])
        mbs = [tuple(t[:half] for t in local), tuple(t[half:] for t in local)]
        loss = grad_cache_step(towers, mbs, partial(term_loss, source, impl, batch=batch))
        assert loss.item() == pytest.approx(want_loss, rel=1e-5), f"{tag} grad cache"
        for n, p in towers.named_parameters():
            dist.all_reduce(p.grad)
            assert_close(p.grad / WORLD, want_grads[n], f"{tag} grad cache d_{n}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_holding_the_batch():
    B = WORLD * B_LOCAL
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Towers().state_dict().items()}
    x_img = torch.randn(B, D_IN, generator=g)
    x_txt = x_img + torch.randn(B, D_IN, generator=g)  # correlated pairs, like a trained model
    # captions: 4 distinct token rows, repeated on both ranks; .cls on about half the samples (-1: none)
    captions_4L = torch.randint(1, 100, (4, L), generator=g)
    tokens = captions_4L[torch.randint(0, 4, (B,), generator=g)]
    cls = torch.tensor([3, -1, 5, 3, -1, -1, 5, 3, -1, 5, -1, 9, -1, 3])
    cases = []
    for source, impls in [("auto", ("chunked", "naive")), ("cls", ("chunked",)), ("caption", ("chunked",))]:
        ref = reference(source, state, x_img, x_txt, tokens, cls)
        cases += [(source, impl, state, x_img, x_txt, tokens, cls, ref) for impl in impls]
    mp.spawn(worker, args=(free_port(), cases), nprocs=WORLD)
