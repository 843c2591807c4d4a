"""ITM term: the fusion head's loss against a naive float64 implementation, hard-negative sampling, the term."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.objectives import Objective, StepContext
from mmpretrain.objectives.itm import (
    ITMHead,
    ITMTermConfig,
    caption_hash,
    itm_loss,
    sample_hard_negatives,
    step_uniforms,
    text_valid_mask,
)

DV, DT, HEADS = 12, 8, 2


class Holder(torch.nn.Module):
    """What a term's `ctx.model` is: something with heads, run through forward(head=...)."""

    def __init__(self, head):
        super().__init__()
        self.heads = torch.nn.ModuleDict({"itm": head})

    def forward(self, head=None, **kw):
        return self.heads[head](**kw)


def naive_head(sd, img_ND, txt_LD, valid_L, layers):
    """One pair, written out: explicit per-head softmax with -inf on padding keys, float64."""

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    def attn(q, k, v, keep_N):
        dh = q.shape[-1] // HEADS
        outs = []
        for h in range(HEADS):
            qh, kh, vh = (t[:, h * dh : (h + 1) * dh] for t in (q, k, v))
            s = (qh @ kh.T) / math.sqrt(dh)
            s = s.masked_fill(~keep_N[None, :], -math.inf)
            outs.append(torch.softmax(s, -1) @ vh)
        return torch.cat(outs, -1)

    img = lin(ln(img_ND, "image_ln"), "image_proj")
    x = txt_LD
    for i in range(layers):
        p = f"blocks.{i}."
        q, k, v = lin(ln(x, p + "ln_self"), p + "self_qkv").chunk(3, -1)
        x = x + lin(attn(q, k, v, valid_L), p + "self_out")
        q = lin(ln(x, p + "ln_cross"), p + "cross_q")
        k, v = lin(img, p + "cross_kv").chunk(2, -1)
        x = x + lin(attn(q, k, v, torch.ones(len(img), dtype=torch.bool)), p + "cross_out")
        h = ln(x, p + "ln_mlp")
        x = x + lin(F.gelu(lin(h, p + "mlp.fc1")), p + "mlp.fc2")
    return lin(ln(x[0], "ln"), "match")


def make_inputs(b=5, n=7, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, n, DV, generator=g)
    txt = torch.randn(b, L, DT, generator=g)
    lengths = torch.randint(2, L + 1, (b,), generator=g)
    valid = torch.arange(L)[None, :] < lengths[:, None]
    return img, txt, valid


def test_itm_loss_matches_naive_value_and_grads():
    torch.manual_seed(0)
    layers, b = 2, 5
    head = ITMHead(DV, DT, layers, HEADS, 16, impl="sdpa")
    img, txt, valid = make_inputs(b)
    neg_txt, neg_img = torch.tensor([3, 0, 4, 1, 0]), torch.tensor([1, 1, 0, 2, 3])  # fixed negatives

    img32, txt32 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = itm_loss(Holder(head), img32, txt32, valid, img32[neg_img], txt32[neg_txt], valid[neg_txt])
    loss.backward()

    sd = {k: v.double().requires_grad_() for k, v in head.state_dict().items()}
    img64, txt64 = img.double().requires_grad_(), txt.double().requires_grad_()
    pairs = [(i, i, 1) for i in range(b)] + [(i, neg_txt[i], 0) for i in range(b)]
    pairs += [(neg_img[t], t, 0) for t in range(b)]
    want = 0
    for i, t, label in pairs:
        logits = naive_head(sd, img64[i], txt64[t], valid[t], layers)
        want = want - torch.log_softmax(logits, -1)[label] / len(pairs)
    want.backward()

    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(img32.grad.double(), img64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(txt32.grad.double(), txt64.grad, rtol=1e-4, atol=1e-6)
    for k, p in head.named_parameters():
        torch.testing.assert_close(p.grad.double(), sd[k].grad, rtol=1e-4, atol=1e-6, msg=k)


def test_padding_positions_do_not_change_the_score():
    torch.manual_seed(1)
    head = ITMHead(DV, DT, 2, HEADS, 16, impl="sdpa").eval()
    img, txt, valid = make_inputs(3, L=6)
    valid[:, 4:] = False
    other = txt.clone()
    other[:, 4:] = torch.randn(3, 2, DT)  # whatever the padding positions hold
    torch.testing.assert_close(head(img, txt, valid), head(img, other, valid))


def test_text_valid_mask_and_caption_hash():
    tokens = torch.tensor([[49406, 5, 0, 7, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0, 0], [49406, 5, 0, 7, 49407, 0, 0]])
    assert text_valid_mask(tokens).sum(1).tolist() == [5, 2, 5]  # an inner 0 ("!") is not padding
    h = caption_hash(tokens)
    assert h[0] == h[2] and h[0] != h[1]


def _features(G, E=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(G, E, generator=g), dim=-1)
    txt = F.normalize(img + scale * torch.randn(G, E, generator=g), dim=-1)
    return img, txt


def test_sampling_never_picks_a_positive_nor_a_same_caption():
    G = 10
    img, txt = _features(G, scale=0.3)  # positives are the most similar: the likeliest if not excluded
    hash_G = torch.tensor([0, 1, 2, 2, 3, 4, 4, 4, 5, 6])
    rows = torch.arange(G)
    for step in range(100):
        neg_txt, neg_img = sample_hard_negatives(img, txt, 20.0, hash_G, rows, step_uniforms(0, step, G))
        assert (hash_G[neg_txt] != hash_G).all() and (hash_G[neg_img] != hash_G).all()
    # class labels (-1: none): a labeled sample never draws one of its class; the unlabeled ones draw by caption
    label_G = torch.tensor([0, 0, 1, 1, 0, -1, 2, 2, -1, 0])
    seen = set()
    for step in range(100):
        picks = sample_hard_negatives(img, txt, 20.0, hash_G, rows, step_uniforms(0, step, G), label_G=label_G)
        for p in picks:
            same = (label_G[p] == label_G) & (label_G >= 0)
            assert not same.any() and (hash_G[p] != hash_G).all()
            seen |= {(r, c) for r, c in zip(rows.tolist(), p.tolist()) if label_G[r] < 0 and label_G[c] < 0}
    assert seen, "unlabeled samples may draw each other (their captions differ)"
    # every caption identical: uniform over the others, never itself
    same = torch.zeros(4, dtype=torch.long)
    neg_txt, neg_img = sample_hard_negatives(img[:4], txt[:4], 20.0, same, torch.arange(4), step_uniforms(0, 1, 4))
    assert (neg_txt != torch.arange(4)).all() and (neg_img != torch.arange(4)).all()


def test_sampling_follows_the_softmax_of_similarities():
    G, draws, scale = 5, 3000, 4.0
    img, txt = _features(G, seed=3)
    hash_G, rows = torch.arange(G), torch.arange(G)
    rows = rows.repeat(draws)  # each row drawn `draws` times, with independent uniforms
    picks = sample_hard_negatives(img, txt, scale, hash_G, rows, step_uniforms(7, 0, len(rows)))
    counts = torch.zeros(2, G, G)
    for d in range(2):
        counts[d].index_put_((rows, picks[d]), torch.ones(len(rows)), accumulate=True)
    sim = (img.double() @ txt.double().T) * scale
    for d, s in enumerate((sim, sim.T)):
        p = torch.softmax(s.masked_fill(torch.eye(G, dtype=torch.bool), -math.inf), 1)
        freq = counts[d] / draws
        sigma = (p * (1 - p) / draws).sqrt()
        assert (freq - p).abs().max() <= (5 * sigma + 1e-9).max(), (freq, p)  # within 5 sigma everywhere


def test_sampling_is_seeded_and_independent_of_row_ownership():
    G = 12
    img, txt = _features(G, seed=5)
    hash_G = torch.arange(G)
    u = step_uniforms(3, 17, G)
    whole = sample_hard_negatives(img, txt, 10.0, hash_G, torch.arange(G), u)
    parts = [sample_hard_negatives(img, txt, 10.0, hash_G, torch.arange(r * 4, r * 4 + 4), u[:, r * 4 : r * 4 + 4])
             for r in range(3)]  # fmt: skip
    for d in range(2):
        assert torch.equal(whole[d], torch.cat([p[d] for p in parts]))
    again = sample_hard_negatives(img, txt, 10.0, hash_G, torch.arange(G), step_uniforms(3, 17, G), chunk=5)
    assert all(torch.equal(a, w) for a, w in zip(again, whole))
    other = sample_hard_negatives(img, txt, 10.0, hash_G, torch.arange(G), step_uniforms(3, 18, G))
    assert not all(torch.equal(a, w) for a, w in zip(other, whole))


def test_config_validate_and_check_run():
    with pytest.raises(ValueError, match=r"loss.terms.itm.layers"):
        ITMTermConfig(layers=0).validate("loss.terms.itm")
    run = SimpleNamespace(model=SimpleNamespace(text=SimpleNamespace(heads=4, width=64)),
                          train=SimpleNamespace(batch_size=32))  # fmt: skip
    with pytest.raises(ValueError, match=r"loss.terms.itm.heads must divide"):
        ITMTermConfig(heads=3).check_run(run, "loss.terms.itm")


def test_term_on_the_tiny_model_runs_and_backpropagates():
    from mmpretrain.config import load_config
    from mmpretrain.data import Tokenizer
    from mmpretrain.model import build_model
    from mmpretrain.objectives import REGISTRY

    overrides = ["model.name=tiny", "loss.terms.clip.weight=1.0", "loss.terms.itm.layers=1"]
    cfg = load_config(None, ["data.synthetic.root=/tmp/unused-shapes", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    assert isinstance(model.heads["itm"], ITMHead) and "itm" in REGISTRY
    captions = ["a red circle", "a blue square", "a red circle", "a green triangle"]
    tokens = Tokenizer(cfg.model.text.context_length)(captions)
    images = torch.randn(4, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    out = model(images, tokens, **objective.forward_kwargs())
    total, values = objective(StepContext(out, images, tokens, {}, model, None, cfg.loss, step=1))
    total.backward()
    assert set(values) == {"clip", "itm"} and torch.isfinite(total)
    assert all(p.grad is not None for p in model.heads["itm"].parameters())
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
