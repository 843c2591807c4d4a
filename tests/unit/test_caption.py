"""The caption term (mmpretrain/objectives/caption.py) against a float64 loop written from the math: the decoder
one sample at a time (LayerNorm, causal self-attention, cross-attention to the image tokens, MLP, by hand), the
cross-entropy one token at a time, averaged over the predicted tokens; values and gradients. Plus the teacher-
forcing targets, the parallel (CapPa) rows, and a config that trains the term through the real model."""

import math
from types import SimpleNamespace

import pytest
import torch

from mmpretrain.objectives import StepContext
from mmpretrain.objectives.caption import CaptionDecoder, CaptionTerm, caption_targets, parallel_rows
from mmpretrain.objectives.config import CaptionTermConfig

B, L, N, DV, D, H, V, SEED, STEP = 5, 9, 6, 12, 8, 2, 40, 3, 7


class Holder:
    """Runs a head as the engine does: model(head=name, **inputs)."""

    def __init__(self, head):
        self.head = head

    def __call__(self, head, **kw):
        return self.head(**kw)


def make_tokens(g):
    tokens = torch.zeros(B, L, dtype=torch.long)
    for i in range(B):
        n = 2 + i % (L - 2)  # SOT, words, EOT at n: lengths 2 .. L-1, one caption filling the context
        tokens[i, 0] = V - 2
        tokens[i, 1:n] = torch.randint(1, V - 2, (n - 1,), generator=g)
        tokens[i, n] = V - 1
    return tokens


def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def attend(q, k, v, heads, causal):
    """One sample: q (M, D), k, v (N, D) -> (M, D), head by head, the softmax written out."""
    M, Dm = q.shape
    dh = Dm // heads
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        s = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
        if causal:
            s = s.masked_fill(torch.ones(M, k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp(s - s.max(-1, keepdim=True).values)
        out.append((p / p.sum(-1, keepdim=True)) @ v[:, sl])
    return torch.cat(out, -1)


def reference_loss(P, tokens, image_tokens, parallel, prompt=None, task=None):
    """The term's loss from the decoder's parameters P (a name -> tensor dict), one sample and token at a time.
    ``prompt``: per sample, the tokens after SOT that are given (not predicted; a parallel row keeps them as inputs).
    With ``task``: (loss, {task id: that task's token mean})."""
    total, count = 0.0, 0
    per_task: dict = {}
    prompt = [0] * B if prompt is None else prompt
    for i in range(B):
        img = ln(image_tokens[i], P["image_ln.weight"], P["image_ln.bias"]) @ P["image_proj.weight"].T
        img = img + P["image_proj.bias"]
        inp = tokens[i, :-1]
        x = torch.stack([P["mask_token"] if parallel[i] and pos >= prompt[i] else P["token_embedding.weight"][t]
                         for pos, t in enumerate(inp.tolist())])  # fmt: skip
        x = x + P["position_embedding"][: L - 1]
        for j in range(2):
            blk = {n[len(f"blocks.{j}.") :]: t for n, t in P.items() if n.startswith(f"blocks.{j}.")}

            def lin(x, name, blk=blk):
                return x @ blk[f"{name}.weight"].T + blk[f"{name}.bias"]

            def norm(x, name, blk=blk):
                return ln(x, blk[f"{name}.weight"], blk[f"{name}.bias"])

            q, k, v = lin(norm(x, "ln_self"), "self_qkv").chunk(3, -1)
            x = x + lin(attend(q, k, v, H, causal=True), "self_out")
            q = lin(norm(x, "ln_cross"), "cross_q")
            k, v = lin(img, "cross_kv").chunk(2, -1)
            x = x + lin(attend(q, k, v, H, causal=False), "cross_out")
            h = lin(norm(x, "ln_mlp"), "mlp.fc1")
            x = x + lin(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), "mlp.fc2")
        logits = ln(x, P["ln.weight"], P["ln.bias"]) @ P["lm_head.weight"].T + P["lm_head.bias"]
        eot = int(tokens[i].argmax())
        for t in range(prompt[i], eot):  # predict tokens prompt + 1 .. eot (EOT included)
            row = logits[t]
            nll = -(row[tokens[i, t + 1]] - torch.logsumexp(row, 0))
            total, count = total + nll, count + 1
            if task is not None:
                s, n = per_task.get(int(task[i]), (0.0, 0))
                per_task[int(task[i])] = (s + nll.detach(), n + 1)
    if task is not None:
        return total / count, {k: s / n for k, (s, n) in per_task.items()}
    return total / count


def close(got, want, what):
    """Relative to the largest reference entry: the model's LayerNorms compute in float32 (layers.LayerNorm)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_loss_and_gradients_equal_the_float64_loop(fraction):
    g = torch.Generator().manual_seed(0)
    tokens = make_tokens(g)
    torch.manual_seed(1)
    head = CaptionDecoder(V, L - 1, DV, D, 2, H, 4 * D, impl="sdpa").double()
    with torch.no_grad():  # non-trivial LayerNorms and mask token
        for n, p in head.named_parameters():
            if "ln" in n or n == "mask_token":
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    img = torch.randn(B, N, DV, generator=g, dtype=torch.float64, requires_grad=True)
    run_cfg = SimpleNamespace(train=SimpleNamespace(seed=SEED))
    term = CaptionTerm(CaptionTermConfig(parallel_fraction=fraction), run_cfg)
    out = SimpleNamespace(image_tokens=img)
    loss = term.loss(StepContext(out, None, tokens, {}, Holder(head), None, None, step=STEP))
    loss.backward()

    parallel = parallel_rows(SEED, STEP, fraction, B, 0, B)
    assert (fraction == 0) == (not parallel.any())
    P = {n: p.detach().clone().requires_grad_() for n, p in head.named_parameters()}
    img_ref = img.detach().clone().requires_grad_()
    want = reference_loss(P, tokens, img_ref, parallel)
    want.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)  # LayerNorm computes in float32 (layers.LayerNorm)
    close(img.grad, img_ref.grad, "image_tokens")
    for n, p in head.named_parameters():
        if n == "mask_token" and not parallel.any():
            assert p.grad is None or not p.grad.any()
            continue
        if n == "token_embedding.weight" and parallel.all():
            continue
        close(p.grad, P[n].grad, n)


def test_region_tasks_prompts_are_given_and_each_tasks_mean_is_logged():
    """Region tasks (data.train.regions): the decoder sequence's first tokens after SOT are a given prompt (not
    predicted; a parallel row's mask tokens start after it); the loss and its gradients, and each task's token mean
    (parts()), against the float64 loop."""
    g = torch.Generator().manual_seed(5)
    tokens = make_tokens(g)
    eot = tokens.argmax(-1)
    task = torch.tensor([0, 1, 2, 1, 2])
    prompt = torch.where(task > 0, torch.minimum(eot - 1, torch.tensor([0, 3, 2, 1, 4])), 0)
    assert (prompt > 0).sum() >= 3
    torch.manual_seed(1)
    head = CaptionDecoder(V, L - 1, DV, D, 2, H, 4 * D, impl="sdpa").double()
    with torch.no_grad():
        head.mask_token.add_(0.1 * torch.randn(D, generator=g, dtype=torch.float64))
    img = torch.randn(B, N, DV, generator=g, dtype=torch.float64, requires_grad=True)
    term = CaptionTerm(CaptionTermConfig(parallel_fraction=0.5), SimpleNamespace(train=SimpleNamespace(seed=SEED)))
    batch = {"decoder_text": tokens, "decoder_prompt": prompt, "decoder_task": task}
    other = torch.randint(1, V - 2, (B, L), generator=g)  # ctx.tokens: the plain captions, not read here
    loss = term.loss(StepContext(SimpleNamespace(image_tokens=img), None, other, batch, Holder(head), None, None,
                                 step=STEP))  # fmt: skip
    loss.backward()
    parallel = parallel_rows(SEED, STEP, 0.5, B, 0, B)
    assert parallel[task > 0].any(), "a parallel row with a prompt: the case where the mask must start after it"
    P = {n: p.detach().clone().requires_grad_() for n, p in head.named_parameters()}
    img_ref = img.detach().clone().requires_grad_()
    want, parts = reference_loss(P, tokens, img_ref, parallel, prompt.tolist(), task)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    close(img.grad, img_ref.grad, "image_tokens")
    for n, p in head.named_parameters():
        close(p.grad, P[n].grad, n)
    got = term.parts()
    assert set(got) == {"caption", "ref", "gcap"}
    for k, name in enumerate(("caption", "ref", "gcap")):
        torch.testing.assert_close(got[name], parts[k], rtol=1e-6, atol=0, msg=name)


def test_targets_start_after_the_prompt():
    tokens = torch.tensor([[49406, 10, 11, 12, 49407, 0], [49406, 12, 13, 49407, 0, 0]])
    _, targets, predicted = caption_targets(tokens, torch.tensor([2, 0]))
    assert targets[predicted].tolist() == [12, 49407, 12, 13, 49407]


def test_targets_are_the_caption_through_eot():
    tokens = torch.tensor([[49406, 10, 11, 49407, 0, 0], [49406, 12, 49407, 0, 0, 0]])
    inputs, targets, predicted = caption_targets(tokens)
    assert inputs.tolist() == [[49406, 10, 11, 49407, 0], [49406, 12, 49407, 0, 0]]
    assert targets[predicted].tolist() == [10, 11, 49407, 12, 49407]


def test_parallel_rows_do_not_depend_on_the_world_size():
    whole = parallel_rows(SEED, STEP, 0.5, 12, 0, 12)
    halves = torch.cat([parallel_rows(SEED, STEP, 0.5, 12, r, 6) for r in range(2)])
    quarters = torch.cat([parallel_rows(SEED, STEP, 0.5, 12, r, 3) for r in range(4)])
    assert torch.equal(whole, halves) and torch.equal(whole, quarters) and 0 < int(whole.sum()) < 12
    assert not torch.equal(whole, parallel_rows(SEED, STEP + 1, 0.5, 12, 0, 12))  # drawn anew each step


def test_padding_does_not_change_the_loss():
    """Positions after EOT are not predicted: changing the padding ids leaves loss and gradients alone."""
    g = torch.Generator().manual_seed(2)
    tokens = make_tokens(g)
    torch.manual_seed(1)
    head = CaptionDecoder(V, L - 1, DV, D, 2, H, 4 * D, impl="sdpa").double()
    img = torch.randn(B, N, DV, generator=g, dtype=torch.float64)
    term = CaptionTerm(CaptionTermConfig(), SimpleNamespace(train=SimpleNamespace(seed=SEED)))
    other = tokens.clone()
    after = torch.arange(L)[None, :] > tokens.argmax(-1)[:, None]
    other[after] = 5
    a, b = (term.loss(StepContext(SimpleNamespace(image_tokens=img), None, t, {}, Holder(head), None, None, step=1))
            for t in (tokens, other))  # fmt: skip
    assert a.item() == b.item()


def test_config_checks():
    with pytest.raises(ValueError, match="parallel_fraction"):
        CaptionTermConfig(parallel_fraction=1.5).validate("loss.terms.caption")
    with pytest.raises(ValueError, match="layers"):
        CaptionTermConfig(layers=0).validate("loss.terms.caption")


def test_the_term_trains_through_the_real_model():
    """loss.terms {siglip, caption} on the tiny SigLIP: the decoder is a head of the model, the loss is finite and
    falls over a few steps on one fixed batch."""
    from mmpretrain.config import load_config
    from mmpretrain.data import Tokenizer
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective

    cfg = load_config(None, ["model.name=tiny", "model.family=siglip", "loss.terms.siglip.weight=1.0",
                             "loss.terms.caption.parallel_fraction=0.5", "data.synthetic.root=unused"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    assert "caption" in model.heads
    tokens = Tokenizer(context_length=cfg.model.text.context_length)(["a red circle", "a blue square"] * 4)
    images = torch.randn(8, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(1, 9):
        out = model(images, tokens, **objective.forward_kwargs())
        ctx = StepContext(out, images, tokens, {"image": images, "text": tokens}, model, None, cfg.loss, step=step)
        loss = objective.terms[0].loss(ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
