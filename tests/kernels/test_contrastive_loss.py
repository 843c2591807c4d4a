"""Tiled contrastive loss against independent references.

- chunked torch path (CPU) and Triton (``test_interp_*``: run under TRITON_INTERPRET=1 in a child
  process by ``test_triton_interpreter``) vs the float64 full-matrix loss: loss and the gradients
  of image, text, scale and bias; fp32, relative error <= 1e-5 (max-norm), B not a tile multiple.
- open_clip's ClipLoss / SigLipLoss on the same inputs.
- GradCache with the tiny model and patch dropout equals one full-batch step; naive accumulation does not.
- CUDA (skipped without a GPU): fp32 / bf16 at real shapes up to B = 65536.
"""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from interpret_runner import needs_interpreter, run_under_interpreter, runner_only
from mmpretrain.kernels import contrastive_loss
from mmpretrain.kernels.contrastive_loss import clip_loss_reference, siglip_loss_reference

from mmpretrain.loss import LossConfig, clip_loss, compute_loss, grad_cache_step, siglip_loss

RTOL = 1e-5
# (loss, scale, bias): CLIP at its init scale and at the clamp; SigLIP at its init and in a livelier regime.
SETTINGS = [("clip", 1 / 0.07, None), ("clip", 100.0, None), ("siglip", 10.0, -10.0), ("siglip", 3.0, -1.0)]


def make_inputs(B, D, scale, bias, seed=0):
    """float64 normalized features with positives correlated (like a trained model), scale, bias."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, D, generator=g, dtype=torch.float64)
    txt = img + 1.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    bias = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(scale, dtype=torch.float64), bias


def loss_and_grads(fn, inputs, dtype):
    """fn(*leaves) -> scalar; returns [loss, d img, d txt, d scale, (d bias)] as float64."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs if t is not None]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


def reference(name, inputs):
    fn = clip_loss_reference if name == "clip" else siglip_loss_reference
    return loss_and_grads(fn, inputs, torch.float64)


def ours(name, impl, chunk_size=1024):
    if name == "clip":
        return lambda img, txt, s: clip_loss(img, txt, s, impl=impl, chunk_size=chunk_size)
    return lambda img, txt, s, b: siglip_loss(img, txt, s, b, impl=impl, chunk_size=chunk_size)


def assert_close_rel(got, ref, scale, rtol=RTOL):
    """max |got - ref| <= rtol * max(max |ref|, floor) per tensor (loss, then each gradient).

    Floors for values that cancel to ~0: the loss is a difference of log-sum-exps of logits up to
    `scale` (B = 1 gives exactly 0), a feature gradient a difference of terms of size scale / B.
    """
    loss_floor, feature_floor = max(1.0, scale / 10), scale / ref[1].shape[0]
    labels = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    for label, g, r in zip(labels, got, ref):
        assert g.shape == r.shape, label
        err, size = (g - r).abs().max().item(), r.abs().max().item()
        floor = {"loss": loss_floor, "d_image": feature_floor, "d_text": feature_floor}.get(label, 1e-2)
        assert err <= rtol * max(size, floor), f"{label}: max error {err:.3g} vs max |ref| {size:.3g}"


@pytest.mark.parametrize("name,scale,bias", SETTINGS)
@pytest.mark.parametrize("B,D", [(1, 16), (33, 32), (130, 16), (130, 48)])
@pytest.mark.parametrize("chunk_size", [16, 1024])
def test_chunked_matches_float64_reference(name, scale, bias, B, D, chunk_size):
    inputs = make_inputs(B, D, scale, bias)
    got = loss_and_grads(ours(name, "chunked", chunk_size), inputs, torch.float32)
    assert_close_rel(got, reference(name, inputs), scale)


@pytest.mark.parametrize("name,scale,bias", [SETTINGS[0], SETTINGS[3]])
def test_chunked_column_blocks(monkeypatch, name, scale, bias):
    """Elementwise temporaries a column block at a time: blocks smaller than B, one partial."""
    monkeypatch.setattr(contrastive_loss, "COL_BLOCK", 16)
    inputs = make_inputs(70, 16, scale, bias)
    got = loss_and_grads(ours(name, "chunked", 24), inputs, torch.float32)
    assert_close_rel(got, reference(name, inputs), scale)


@needs_interpreter
@pytest.mark.parametrize("name,scale,bias", [SETTINGS[0], SETTINGS[3]])
@pytest.mark.parametrize("B", [1, 33, 130])
@pytest.mark.parametrize("D", [16, 32])
def test_interp_triton_matches_float64_reference(name, scale, bias, B, D):
    inputs = make_inputs(B, D, scale, bias)
    got = loss_and_grads(ours(name, "triton"), inputs, torch.float32)
    assert_close_rel(got, reference(name, inputs), scale)


@needs_interpreter
@pytest.mark.parametrize("name,scale,bias", [SETTINGS[1], SETTINGS[2]])
def test_interp_triton_saturated_scales(name, scale, bias):
    inputs = make_inputs(70, 32, scale, bias, seed=1)
    got = loss_and_grads(ours(name, "triton"), inputs, torch.float32)
    assert_close_rel(got, reference(name, inputs), scale)


@runner_only
def test_triton_interpreter():
    run_under_interpreter(__file__, min_passed=14)


@pytest.mark.parametrize("name,scale,bias", [SETTINGS[0], SETTINGS[3]])
def test_naive_impl_matches_chunked(name, scale, bias):
    inputs = make_inputs(40, 16, scale, bias)
    assert_close_rel(
        loss_and_grads(ours(name, "naive"), inputs, torch.float32),
        loss_and_grads(ours(name, "chunked", 7), inputs, torch.float32),
        scale,
    )


@pytest.mark.parametrize("name,scale,bias", [SETTINGS[0], SETTINGS[3]])
def test_matches_open_clip(name, scale, bias):
    from open_clip.loss import ClipLoss, SigLipLoss

    img, txt, s, b = (t.float() if t is not None else None for t in make_inputs(77, 32, scale, bias))
    if name == "clip":
        want = ClipLoss()(img, txt, s)
        got = clip_loss(img, txt, s, impl="chunked", chunk_size=16)
    else:
        want = SigLipLoss()(img, txt, s, b)
        got = siglip_loss(img, txt, s, b, impl="chunked", chunk_size=16)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_bf16_features_give_bf16_grads_close_to_fp32():
    img, txt, s, _ = make_inputs(64, 32, 1 / 0.07, None)
    img16, txt16 = img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()
    loss = clip_loss(img16, txt16, s.float(), impl="chunked", chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and img16.grad.dtype == torch.bfloat16
    want = reference("clip", (img16.detach().double(), txt16.detach().double(), s, None))
    assert loss.item() == pytest.approx(want[0].item(), rel=1e-5)  # computed in fp32 from the bf16 values
    assert (img16.grad.double() - want[1]).abs().max() <= 1e-2 * want[1].abs().max()


def test_logits_out_of_range_raise():
    img, txt, _, _ = make_inputs(8, 16, 1.0, None)
    with pytest.raises(ValueError, match="normalize the features"):
        clip_loss(img.float() * 30, txt.float(), torch.tensor(30.0), impl="chunked")


def test_scale_without_grad_and_python_float_scale():
    img, txt, s, _ = make_inputs(9, 16, 20.0, None)
    img = img.float().requires_grad_()
    loss = clip_loss(img, txt.float(), 20.0, impl="chunked")
    loss.backward()
    assert loss.item() == pytest.approx(clip_loss_reference(img.double(), txt, s).item(), rel=1e-5)


@pytest.mark.parametrize(
    "field,value,match",
    [("name", "infonce", "loss.name"), ("impl", "cuda", "loss.impl"), ("chunk_size", 0, "loss.chunk_size")],
)
def test_loss_config_validate(field, value, match):
    LossConfig().validate("loss")
    with pytest.raises(ValueError, match=match):
        LossConfig(**{field: value}).validate("loss")


# ----------------------------------------------------------------------------- GradCache


def tiny_model(family, patch_dropout):
    from mmpretrain.model import ModelConfig, VisionConfig, build_model

    torch.manual_seed(0)
    vision = VisionConfig(patch_dropout=patch_dropout)
    if family == "clip":
        return build_model(ModelConfig(name="tiny", vision=vision)).train()
    # SigLIP away from its init (s = 10, b = -10, where negatives barely count) so that negatives matter.
    cfg = ModelConfig(name="siglip-tiny", vision=vision, init_logit_scale=math.log(3.0), init_logit_bias=-1.0)
    return build_model(cfg).train()


def micro_batches(k, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(k * b, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (k * b, 12), generator=g)
    return [(images[i * b : (i + 1) * b], tokens[i * b : (i + 1) * b]) for i in range(k)]


def param_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_grad_cache_equals_full_batch_step(family):
    model = tiny_model(family, patch_dropout=0.5)
    cfg = LossConfig(name=family, impl="chunked", chunk_size=5)
    mbs = micro_batches(k=3, b=4)
    forward = lambda mb: model(*mb)

    # One step at the full batch: the towers run micro-batch by micro-batch (so dropout draws the
    # same masks from the same RNG stream), one loss over all 12 pairs, one backward.
    torch.manual_seed(123)
    outs = [forward(mb) for mb in mbs]
    full = lambda attr: torch.cat([getattr(o, attr) for o in outs])
    out = outs[0]
    want_loss = compute_loss(
        cfg, type(out)(full("image_features"), full("text_features"), out.logit_scale, out.logit_bias)
    )
    want_loss.backward()
    want = param_grads(model)
    want_rng = torch.get_rng_state()

    torch.manual_seed(123)
    got_loss = grad_cache_step(forward, mbs, partial(compute_loss, cfg))
    got = param_grads(model)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert torch.equal(torch.get_rng_state(), want_rng)  # the stream continues as after one pass
    assert set(got) == set(want) and "logit_scale" in got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7 * want[n].abs().max().item(), msg=n)

    # Naive accumulation (each micro-batch its own negatives) gives other gradients.
    torch.manual_seed(123)
    for mb in mbs:
        (compute_loss(cfg, forward(mb)) / len(mbs)).backward()
    naive = param_grads(model)
    rel = max(((naive[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    assert rel > 0.05


def test_grad_cache_replays_patch_dropout():
    """Without the RNG replay the re-run would draw other patch-dropout masks: the features must match."""
    model = tiny_model("clip", patch_dropout=0.5)
    mbs = micro_batches(k=2, b=3)
    seen = []

    def forward(mb):
        out = model(*mb)
        seen.append(out.image_features.detach().clone())
        return out

    grad_cache_step(forward, mbs, partial(compute_loss, LossConfig(impl="chunked")))
    assert len(seen) == 4
    torch.testing.assert_close(seen[0], seen[2], rtol=0, atol=0)
    torch.testing.assert_close(seen[1], seen[3], rtol=0, atol=0)
    model.eval()  # and patch dropout is active: eval-mode features differ
    assert not torch.allclose(model(*mbs[0]).image_features, seen[0])


def test_grad_cache_calls_backward_fn_with_last_flag():
    model = tiny_model("clip", patch_dropout=0.0)
    calls = []

    def backward(surrogate, last):
        calls.append(last)
        surrogate.backward()

    grad_cache_step(lambda mb: model(*mb), micro_batches(k=3, b=2), partial(compute_loss, LossConfig()), backward)
    assert calls == [False, False, True]


# ----------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_inputs(B, D, scale, bias, dtype):
    img, txt, s, b = make_inputs(B, D, scale, bias)
    return [t.cuda() if t is None or t.ndim == 0 else t.cuda().to(dtype) for t in (img, txt, s, b) if t is not None]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name,scale,bias", [SETTINGS[0], SETTINGS[3]])
@pytest.mark.parametrize("B,D", [(1, 512), (333, 768), (4096, 512)])
def test_cuda_fp32_matches_float64_reference(name, scale, bias, B, D):
    inputs = cuda_inputs(B, D, scale, bias, torch.float64)
    got = loss_and_grads(ours(name, "triton"), inputs, torch.float32)
    assert_close_rel(got, reference(name, inputs), scale)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name,scale,bias", [SETTINGS[0], SETTINGS[3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_batch_matches_chunked(name, scale, bias, dtype):
    """B = 65536: Triton (fp32 or bf16 features) against the chunked path in fp32 on the same values."""
    inputs = cuda_inputs(65536, 512, scale, bias, dtype)
    got = loss_and_grads(ours(name, "triton"), inputs, dtype)
    want = loss_and_grads(ours(name, "chunked", 4096), [t.double() for t in inputs], torch.float32)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: tensor-core products and bf16 gradients
    assert_close_rel(got, want, scale, rtol=rtol)
    assert math.isfinite(got[0].item())
