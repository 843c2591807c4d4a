"""Acceptance: the tiny models give the same loss and gradients with model.attention=triton and =sdpa.

On CPU the Triton path runs under the interpreter, in a child process (see interpret_runner.py);
on CUDA the same comparison runs a few AdamW steps at the real kernels. The CLIP twin covers
the causal text tower, the SigLIP twin a single pooling query attending over all tokens.
Shapes: B batch, E embedding width, L context length.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from interpret_runner import needs_interpreter, run_under_interpreter, runner_only

from mmpretrain.model import ModelConfig, build_model, resolve_model_config

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZES = ["tiny", "siglip-tiny"]


def contrastive_loss(out) -> torch.Tensor:
    """CLIP: mean of the two cross-entropies; SigLIP: sigmoid loss summed over pairs / B (written out here)."""
    logits_BB = out.logit_scale * out.image_features @ out.text_features.T
    labels_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    if out.logit_bias is None:
        return (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B)) / 2
    signs_BB = 2 * torch.eye(logits_BB.shape[0], device=logits_BB.device) - 1
    return -F.logsigmoid(signs_BB * (logits_BB + out.logit_bias)).sum() / logits_BB.shape[0]


def make_batch(name, B, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = resolve_model_config(ModelConfig(name=name))
    vision, text = cfg.vision, cfg.text
    images_BCHW = torch.randn(B, 3, vision.image_size, vision.image_size, generator=g)
    tokens_BL = torch.randint(1, text.vocab_size, (B, text.context_length), generator=g)
    return images_BCHW.to(device), tokens_BL.to(device)


def build_pair(name, device):
    """The same weights under both attention implementations."""
    torch.manual_seed(0)
    tri = build_model(ModelConfig(name=name, attention="triton")).to(device)
    sdpa = build_model(ModelConfig(name=name, attention="sdpa")).to(device)
    sdpa.load_state_dict(tri.state_dict())
    return tri, sdpa


def loss_and_grads(model, images_BCHW, tokens_BL):
    model.zero_grad(set_to_none=True)
    loss = contrastive_loss(model(images_BCHW, tokens_BL))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def train_steps(model, batches, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for images_BCHW, tokens_BL in batches:
        opt.zero_grad(set_to_none=True)
        loss = contrastive_loss(model(images_BCHW, tokens_BL))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@needs_interpreter
@pytest.mark.parametrize("name", SIZES)
def test_interp_tiny_model_loss_triton_equals_sdpa(name, monkeypatch):
    calls = []
    kernels = sys.modules["mmpretrain.kernels"]
    triton_attention = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: calls.append(1) or triton_attention(*a, **kw))
    tri, sdpa = build_pair(name, "cpu")
    batch = make_batch(name, 2, "cpu")  # the interpreter is slow: 2 samples
    loss_sdpa, grads_sdpa = loss_and_grads(sdpa, *batch)
    assert not calls
    loss_tri, grads_tri = loss_and_grads(tri, *batch)
    assert len(calls) >= 4, "model.attention=triton did not reach the Triton kernel"
    torch.testing.assert_close(loss_tri, loss_sdpa, rtol=1e-5, atol=1e-6)
    assert grads_tri.keys() == grads_sdpa.keys() and len(grads_tri) > 10
    for n in grads_tri:
        torch.testing.assert_close(grads_tri[n], grads_sdpa[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@needs_interpreter
def test_interp_packed_naflex_tower_triton_equals_sdpa(monkeypatch):
    """NaFlex packing (mmpretrain.model.naflex): the SigLIP vision tower over packed rows of images of several
    aspect ratios gives the same per-image features and gradients with the Triton kernel's segment masks (every
    block, and the pooling head's one query per image) as with SDPA's."""
    from mmpretrain.model.naflex import PackedImages, segment_ids_for_rows

    calls = []
    kernels = sys.modules["mmpretrain.kernels"]
    triton_attention = kernels.flash_attention

    def spy(*a, **kw):
        calls.append(kw.get("segment_ids") is not None)
        return triton_attention(*a, **kw)

    monkeypatch.setattr(kernels, "flash_attention", spy)
    tri, sdpa = build_pair("siglip-tiny", "cpu")
    shapes = [[(2, 6), (1, 7), (3, 3)], [(5, 3), (2, 2)]]  # 28 and 19 patches in rows of 32
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 32, 8 * 8 * 3, generator=g)
    packed = PackedImages(patches, segment_ids_for_rows(shapes, 32), shapes)
    w_IE = torch.randn(5, 64, generator=g)
    out = {}
    for name, model in (("sdpa", sdpa), ("triton", tri)):
        model.zero_grad(set_to_none=True)
        embeds = model.vision_model(packed).embeds
        (embeds * w_IE).sum().backward()
        out[name] = embeds.detach(), {n: p.grad for n, p in model.vision_model.named_parameters()}
    assert calls and all(calls), "the packed tower did not reach the Triton kernel with segment ids"
    torch.testing.assert_close(out["triton"][0], out["sdpa"][0], rtol=1e-5, atol=1e-5)
    for n, grad in out["triton"][1].items():
        torch.testing.assert_close(grad, out["sdpa"][1][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@runner_only
def test_run_cpu_interpreter_suite():
    run_under_interpreter(__file__, min_passed=len(SIZES) + 1)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", SIZES)
def test_cuda_tiny_model_training_matches_sdpa(name):
    tri, sdpa = build_pair(name, "cuda")
    batches = [make_batch(name, 16, "cuda", seed=s) for s in range(4)]
    # fp32 with IEEE dots (torch's default matmul precision) on both paths.
    torch.testing.assert_close(train_steps(tri, batches), train_steps(sdpa, batches), rtol=1e-4, atol=1e-5)
