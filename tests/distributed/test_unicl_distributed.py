"""UniCL on 2 gloo ranks equals 1 process holding the whole batch: loss, feature and parameter gradients.

Labels repeat within and across the ranks' halves; they come from .cls, from captions (token rows hashed on
each rank) or both (label_source auto | cls | caption), so the keys must agree across processes. The reference
is the naive float64 UniCL of tests/unit/test_unicl.py on the whole batch. Each rank runs the unicl term
through Objective (chunked and naive kernels); the comparison is tests/distributed/harness.py's (parameter
gradients averaged like DeepSpeed). GradCache with 2 micro-batches per rank must give the same.
"""

from functools import partial

import pytest
import torch

from mmpretrain.config import Config
from mmpretrain.loss import grad_cache_step
from mmpretrain.objectives import LossConfig, Objective, StepContext, TermsConfig
from mmpretrain.objectives.unicl import UniclTermConfig, label_keys
from tests.distributed.harness import Case, LinearTowers, Step, assert_n_ranks_equal_one
from tests.unit.test_unicl import naive_unicl

B_LOCAL, D_IN, D, L = 7, 12, 16, 8


def term_loss(source, impl, out, batch):
    """The unicl term through the objective layer (group None: the world group when it is up)."""
    cfg = Config()
    cfg.loss = LossConfig(terms=TermsConfig(unicl=UniclTermConfig(label_source=source)), impl=impl, chunk_size=3)
    loss, _ = Objective(cfg)(StepContext(out, None, None, batch, None, None, cfg.loss))
    return loss


def reference(source, state, x_img, x_txt, tokens, cls):
    """One process, whole batch, float64 naive UniCL."""
    model = LinearTowers.from_state(state, torch.float64)
    out = model((x_img.double(), x_txt.double()))
    feats = [out.image_features, out.text_features]
    for f in feats:
        f.retain_grad()
    labels = label_keys(source, tokens, cls, 0).tolist()
    assert len(set(labels)) < len(labels) - 3, "the case must repeat labels"
    loss = naive_unicl(*feats, out.logit_scale, labels)
    loss.backward()
    return Step(loss, model, {"image": feats[0], "text": feats[1]})


def unicl(source, impl, state, x_img, x_txt, tokens, cls, rows):
    model = LinearTowers.from_state(state)
    out = model((x_img[rows], x_txt[rows]))
    for f in (out.image_features, out.text_features):
        f.retain_grad()
    loss = term_loss(source, impl, out, {"text": tokens[rows], "label": cls[rows]})
    loss.backward()
    return Step(loss, model, {"image": out.image_features, "text": out.text_features})


def grad_cache(source, impl, state, x_img, x_txt, tokens, cls, rows):
    """2 micro-batches per rank; the term sees the concatenated features and the whole batch."""
    model = LinearTowers.from_state(state)
    local = (x_img[rows], x_txt[rows])
    half = len(local[0]) // 2
    mbs = [tuple(t[:half] for t in local), tuple(t[half:] for t in local)]
    batch = {"text": tokens[rows], "label": cls[rows]}
    loss = grad_cache_step(model, mbs, partial(term_loss, source, impl, batch=batch))
    return Step(loss, model, {})


@pytest.mark.slow
def test_two_ranks_equal_one_process_holding_the_batch():
    B = 2 * B_LOCAL
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    state = LinearTowers(D_IN, D).state_dict()
    x_img = torch.randn(B, D_IN, generator=g)
    x_txt = x_img + torch.randn(B, D_IN, generator=g)  # correlated pairs, like a trained model
    # captions: 4 distinct token rows, repeated on both ranks; .cls on about half the samples (-1: none)
    captions_4L = torch.randint(1, 100, (4, L), generator=g)
    tokens = captions_4L[torch.randint(0, 4, (B,), generator=g)]
    cls = torch.tensor([3, -1, 5, 3, -1, -1, 5, 3, -1, 5, -1, 9, -1, 3])
    data = (state, x_img, x_txt, tokens, cls)
    cases = []
    for source, impls in [("auto", ("chunked", "naive")), ("cls", ("chunked",)), ("caption", ("chunked",))]:
        ref = partial(reference, source, *data)
        for impl in impls:
            cases.append(Case(f"{source}/{impl}", partial(unicl, source, impl, *data), ref))
            cases.append(Case(f"{source}/{impl} grad cache", partial(grad_cache, source, impl, *data), ref))
    assert_n_ranks_equal_one(cases, rows_per_rank=B_LOCAL)
