"""Fused attention (kernels/attention.py) against a float64 reference, forward and backward.

Three groups:
- test_interp_*: the Triton kernels on CPU under TRITON_INTERPRET=1, fp32 vs float64, tiny shapes.
  In a normal session they are skipped and `test_run_cpu_interpreter_suite` runs them in a child
  process (the variable must be set before the kernels are imported). To run them directly:
  `TRITON_INTERPRET=1 pytest tests/kernels/test_attention.py -k test_interp_`.
- CPU tests without the interpreter: input validation, the dispatcher, the SDPA path and the
  reference itself against SDPA in float64.
- CUDA tests (skipped without a GPU): fp16/bf16 at real shapes against an fp32 reference.
Shapes: B batch, H heads, M query length, N key length, D head dim.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from interpret_runner import INTERPRETING, needs_interpreter, run_under_interpreter, runner_only
from mmpretrain.kernels import PAD_SEGMENT_ID, attention
from mmpretrain.kernels.attention import attention_reference, flash_attention

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Tolerances of the fp32 interpreter runs against float64 (elementwise, values are O(1)).
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def make_qkv(B, H, M, N, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]


def make_kpm(B, N, seed=0, empty_row=False):
    """Random (B, N) keep-mask; with empty_row, batch 0 keeps no key at all."""
    g = torch.Generator().manual_seed(seed)
    kpm_BN = torch.rand(B, N, generator=g) > 0.3
    kpm_BN[:, 0] = True
    if empty_row:
        kpm_BN[0] = False
    return kpm_BN


def run_fwd_bwd(fn, q, k, v, do, **kw):
    """fn(q, k, v, **kw) and its gradients wrt q, k, v for the upstream gradient do."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check_against_float64(q, k, v, do, out_tol=OUT_TOL, grad_tol=GRAD_TOL, fp32_precision=None, **kw):
    """flash_attention on q, k, v (their dtype) against attention_reference in float64."""
    got = run_fwd_bwd(flash_attention, q, k, v, do, fp32_precision=fp32_precision, **kw)
    ref = run_fwd_bwd(attention_reference, q.double(), k.double(), v.double(), do.double(), **kw)
    for name, g, r, tol in zip(("out", "dq", "dk", "dv"), got, ref, (out_tol, grad_tol, grad_tol, grad_tol)):
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return got


def packed_segment_ids(lengths_per_row, N):
    """(B, N) int32 ids: row b holds images of the given lengths numbered 0, 1, ... in order, then padding."""
    seg_BN = torch.full((len(lengths_per_row), N), PAD_SEGMENT_ID, dtype=torch.int32)
    for b, lengths in enumerate(lengths_per_row):
        seg_BN[b, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return seg_BN


# Packed rows (B=2, N=48): three images of unequal lengths + 5 padding tokens; two images, no padding. With the
# interpreter's blocks (32/16, 16/32) images straddle block edges and some block pairs share no id (skipped).
PACKED_SEG_BN = packed_segment_ids([[10, 22, 11], [29, 19]], 48)
# Ids in no order (ids repeat apart, negative ones): correct too, only fewer blocks are skipped.
UNORDERED_SEG_BN = torch.tensor([[3] * 9 + [-5] * 14 + [3] * 10 + [0] * 15, [1] * 18 + [-1] * 30], dtype=torch.int32)


def per_image_attention(q, k, v, seg_BN, q_seg_BM=None, causal=False, scale=None):
    """Packed attention computed the slow way: each segment's tokens gathered and attended on their own
    (attention_reference without any segment mask), the outputs scattered back (B, H, M, D). Differentiable."""
    q_seg_BM = seg_BN if q_seg_BM is None else q_seg_BM
    out_BHMD = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for sid in seg_BN[b].unique().tolist():
            rows, cols = (q_seg_BM[b] == sid).nonzero()[:, 0], (seg_BN[b] == sid).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            o = attention_reference(
                q[b : b + 1, :, rows], k[b : b + 1, :, cols], v[b : b + 1, :, cols], causal, scale=scale
            )
            out_BHMD[b][:, rows] = o[0]  # (H, rows, D)
    return out_BHMD


def check_packed_against_per_image(
    fn, q, k, v, do, seg_BN, q_seg_BM=None, causal=False, out_tol=OUT_TOL, grad_tol=GRAD_TOL
):
    """fn(q, k, v, segment_ids=..., causal=...) on q, k, v's dtype against per_image_attention in float64."""
    kw = dict(segment_ids=seg_BN, q_segment_ids=q_seg_BM, causal=causal)
    got = run_fwd_bwd(fn, q, k, v, do, **kw)
    ref = run_fwd_bwd(
        per_image_attention,
        q.double(),
        k.double(),
        v.double(),
        do.double(),
        seg_BN=seg_BN,
        q_seg_BM=q_seg_BM,
        causal=causal,
    )
    for name, g, r, tol in zip(("out", "dq", "dk", "dv"), got, ref, (out_tol, grad_tol, grad_tol, grad_tol)):
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return got


def check_segments_do_not_mix(fn, seg_BN, causal):
    """Changing one segment's keys and values leaves every other segment's outputs and gradients exactly as they
    were; an upstream gradient on the padding rows alone gives exactly zero gradient to every image token."""
    B, H, N, D = seg_BN.shape[0], 2, seg_BN.shape[1], 16
    q, k, v, do = make_qkv(B, H, N, N, D, dtype=torch.float32, seed=7)
    kw = dict(segment_ids=seg_BN, causal=causal)
    base = run_fwd_bwd(fn, q, k, v, do, **kw)
    target_BN = seg_BN == 1
    k2, v2 = k.clone(), v.clone()
    k2[target_BN.nonzero(as_tuple=True)[0], :, target_BN.nonzero(as_tuple=True)[1]] *= -50.0
    v2[target_BN.nonzero(as_tuple=True)[0], :, target_BN.nonzero(as_tuple=True)[1]] += 1e3
    moved = run_fwd_bwd(fn, q, k2, v2, do, **kw)
    others = ~target_BN
    for name, a, b_ in zip(("out", "dq", "dk", "dv"), base, moved):
        torch.testing.assert_close(a.transpose(1, 2)[others], b_.transpose(1, 2)[others], rtol=0, atol=0, msg=name)
    assert (moved[0].transpose(1, 2)[target_BN] - base[0].transpose(1, 2)[target_BN]).abs().max() > 1.0
    pad_BN = seg_BN == PAD_SEGMENT_ID
    do_pad = do * pad_BN[:, None, :, None]
    out, dq, dk, dv = run_fwd_bwd(fn, q, k, v, do_pad, **kw)
    assert torch.isfinite(out).all()
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert g.transpose(1, 2)[~pad_BN].abs().max() == 0, name
        assert g.transpose(1, 2)[pad_BN].abs().max() > 0, name


# ----------------------------------------------------------------------------------------------
# Triton interpreter (CPU): fp32 against float64
# ----------------------------------------------------------------------------------------------

# (B, H, M, N, D, causal): lengths 1/17/77/130, both head dims, both masks, M != N both ways.
INTERP_CASES = [
    (1, 1, 1, 1, 32, False),
    (1, 1, 1, 1, 64, True),
    (2, 1, 17, 17, 64, False),
    (1, 2, 17, 17, 32, True),
    (1, 2, 77, 77, 64, False),
    (2, 1, 77, 77, 32, True),
    (1, 1, 130, 130, 32, False),
    (1, 1, 130, 130, 64, True),
    (1, 2, 17, 130, 64, True),  # causal, top-left: query i sees keys 0..i only
    (1, 2, 130, 17, 32, True),  # causal, rows past N see every key
    (2, 1, 1, 77, 64, False),  # one pooling query
    (1, 1, 77, 17, 64, False),
]


@needs_interpreter
@pytest.mark.parametrize("B,H,M,N,D,causal", INTERP_CASES)
def test_interp_matches_float64(B, H, M, N, D, causal):
    q, k, v, do = make_qkv(B, H, M, N, D, dtype=torch.float32)
    check_against_float64(q, k, v, do, causal=causal)


@needs_interpreter
@pytest.mark.parametrize("B,H,M,N,D,causal", [(2, 2, 77, 77, 64, True), (2, 1, 17, 130, 32, False)])
def test_interp_key_padding_mask(B, H, M, N, D, causal):
    """Masked keys get no weight; batch 0 keeps no key, so its output and gradients are 0 (as SDPA)."""
    q, k, v, do = make_qkv(B, H, M, N, D, dtype=torch.float32, seed=1)
    kpm_BN = make_kpm(B, N, empty_row=True)
    out, dq, dk, dv = check_against_float64(q, k, v, do, causal=causal, key_padding_mask=kpm_BN)
    assert out[0].abs().max() == 0 and dq[0].abs().max() == 0 and dk[0].abs().max() == 0
    assert dk[1][:, ~kpm_BN[1]].abs().max() == 0 and dv[1][:, ~kpm_BN[1]].abs().max() == 0


@needs_interpreter
@pytest.mark.parametrize("D", [80, 128])
def test_interp_padded_head_dims(D):
    """Head dims padded inside the tiles (80 -> 128) and the largest one."""
    q, k, v, do = make_qkv(1, 1, 50, 50, D, dtype=torch.float32, seed=2)
    check_against_float64(q, k, v, do, causal=D == 80)


@needs_interpreter
def test_interp_strided_inputs_and_scale():
    """q, k, v as views of one packed (B, N, 3, H, D) projection, with an explicit softmax scale."""
    B, N, H, D = 2, 33, 2, 32
    g = torch.Generator().manual_seed(3)
    qkv_BN3HD = torch.randn(B, N, 3, H, D, generator=g)
    q, k, v = qkv_BN3HD.permute(2, 0, 3, 1, 4)  # each (B, H, N, D), not contiguous
    assert not q.is_contiguous()
    do = torch.randn(B, H, N, D, generator=g).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided dO too
    check_against_float64(q, k, v, do, causal=True, scale=0.3)


@needs_interpreter
def test_interp_dispatcher_matches_sdpa():
    """attention(impl="triton") and attention(impl="sdpa") agree, masks and top-left causal included."""
    B, H, M, N, D = 2, 2, 17, 40, 32
    q, k, v, do = make_qkv(B, H, M, N, D, dtype=torch.float32, seed=4)
    kw = dict(causal=True, key_padding_mask=make_kpm(B, N))
    tri = run_fwd_bwd(lambda *a, **k_: attention(*a, impl="triton", **k_), q, k, v, do, **kw)
    sdpa = run_fwd_bwd(lambda *a, **k_: attention(*a, impl="sdpa", **k_), q, k, v, do, **kw)
    for t, s in zip(tri, sdpa):
        torch.testing.assert_close(t, s, **OUT_TOL)


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seg_BN", [PACKED_SEG_BN, UNORDERED_SEG_BN], ids=["packed", "unordered"])
def test_interp_segments_match_per_image(seg_BN, causal):
    """Packed images (segment ids, block-diagonal mask) == each image attended alone, in float64, fwd + bwd."""
    q, k, v, do = make_qkv(2, 2, 48, 48, 16, dtype=torch.float32, seed=8)
    check_packed_against_per_image(flash_attention, q, k, v, do, seg_BN, causal=causal)


@needs_interpreter
def test_interp_segments_pooling_queries_and_key_padding():
    """q_segment_ids: one query per image (M != N) sees only its image; with key_padding_mask as well, padding
    keys drop out, and a query of the padding segment sees no key at all (0, as SDPA)."""
    B, H, N, D = 2, 2, 48, 16
    q, k, v, do = make_qkv(B, H, 4, N, D, dtype=torch.float32, seed=9)
    q_seg_BM = torch.tensor([[0, 1, 2, PAD_SEGMENT_ID], [1, 0, 0, 1]], dtype=torch.int32)
    check_packed_against_per_image(flash_attention, q, k, v, do, PACKED_SEG_BN, q_seg_BM)
    kw = dict(segment_ids=PACKED_SEG_BN, q_segment_ids=q_seg_BM, key_padding_mask=PACKED_SEG_BN != PAD_SEGMENT_ID)
    out, dq, _, _ = check_against_float64(q, k, v, do, **kw)
    assert out[0, :, 3].abs().max() == 0 and dq[0, :, 3].abs().max() == 0


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_interp_segments_do_not_mix(causal):
    check_segments_do_not_mix(flash_attention, PACKED_SEG_BN, causal)


@needs_interpreter
def test_interp_custom_op_registrations():
    """Schema, fake (meta) and autograd registrations of both custom ops, checked by torch.library.opcheck."""
    q, k, v, do = make_qkv(1, 2, 17, 20, 32, dtype=torch.float32, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kpm = make_kpm(1, 20).to(torch.int8)
    qseg, kseg = packed_segment_ids([[7, 10]], 17), packed_segment_ids([[9, 11]], 20)
    scale = 1 / math.sqrt(32)
    torch.library.opcheck(torch.ops.mmpretrain.flash_attention_fwd, (q, k, v, kpm, None, None, True, scale, False))
    torch.library.opcheck(torch.ops.mmpretrain.flash_attention_fwd, (q, k, v, None, qseg, kseg, False, scale, False))
    out, lse = torch.ops.mmpretrain.flash_attention_fwd(q, k, v, None, qseg, kseg, False, scale, False)
    args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, qseg, kseg, False, scale, False)
    torch.library.opcheck(torch.ops.mmpretrain.flash_attention_bwd, args)


@needs_interpreter
def test_interp_torch_compile_traces_the_op():
    """torch.compile(fullgraph=True) traces forward and backward through the custom op (aot_eager: no codegen)."""
    q, k, v, do = make_qkv(1, 1, 17, 17, 32, dtype=torch.float32, seed=6)
    fn = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True) * 2.0, backend="aot_eager", fullgraph=True)
    compiled = run_fwd_bwd(fn, q, k, v, do)
    eager = run_fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=True) * 2.0, q, k, v, do)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@needs_interpreter
def test_interp_compiled_block_keeps_the_kernel_in_the_graph():
    """A transformer block compiled as engine.compile does (fullgraph: no break) holds the kernel as one custom op
    node, forward and backward, and gives the eager block's output and gradients."""
    from mmpretrain.model.layers import EncoderLayer

    torch.manual_seed(0)
    block = EncoderLayer(64, 2, 128, "gelu", 1e-5, causal=False, impl="triton")
    targets = []

    def recording_backend(gm, example_inputs):  # the graph dynamo hands to the compiler
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(block, backend=recording_backend, fullgraph=True)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = block(xe), compiled(xc)
    assert any("flash_attention" in t for t in targets), targets
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    ye.sum().backward()
    ge = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    yc.sum().backward()
    for a, b in zip([p.grad for p in block.parameters()], ge):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)


@runner_only
def test_run_cpu_interpreter_suite():
    num_tests = len(INTERP_CASES) + 2 + 2 + 5 + 4 + 1 + 2
    run_under_interpreter(__file__, min_passed=num_tests)


# ----------------------------------------------------------------------------------------------
# CPU without the interpreter: validation, dispatch, SDPA path, the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("M,N", [(7, 7), (5, 9), (9, 5)])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_reference_matches_sdpa_float64(M, N, causal, with_kpm):
    """The reference follows SDPA's conventions (top-left causal, bool mask True = keep)."""
    q, k, v, _ = make_qkv(2, 2, M, N, 16)
    kpm_BN = make_kpm(2, N) if with_kpm else None
    mask = None
    if with_kpm or causal:
        mask = torch.ones(M, N, dtype=torch.bool)
        mask = mask.tril() if causal else mask
        mask = mask & kpm_BN[:, None, None, :] if with_kpm else mask
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_reference(q, k, v, causal=causal, key_padding_mask=kpm_BN), want)
    if not with_kpm:
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=causal), want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("M,N", [(6, 6), (4, 11), (11, 4)])
def test_sdpa_path_matches_reference(M, N, causal):
    q, k, v, do = make_qkv(2, 2, M, N, 8)
    kw = dict(causal=causal, key_padding_mask=make_kpm(2, N, empty_row=True), scale=0.5)
    got = run_fwd_bwd(lambda *a, **k_: attention(*a, impl="sdpa", **k_), q, k, v, do, **kw)
    ref = run_fwd_bwd(attention_reference, q, k, v, do, **kw)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seg_BN", [PACKED_SEG_BN, UNORDERED_SEG_BN], ids=["packed", "unordered"])
def test_sdpa_segments_match_per_image(seg_BN, causal):
    """The SDPA path with segment ids == each image attended alone (float64, fwd + bwd), as the kernel's test."""
    q, k, v, do = make_qkv(2, 2, 48, 48, 16, seed=8)
    sdpa = lambda *a, **kw: attention(*a, impl="sdpa", **kw)
    check_packed_against_per_image(sdpa, q, k, v, do, seg_BN, causal=causal, out_tol={}, grad_tol={})
    check_packed_against_per_image(attention_reference, q, k, v, do, seg_BN, causal=causal, out_tol={}, grad_tol={})


def test_sdpa_segments_pooling_queries():
    q, k, v, do = make_qkv(2, 2, 4, 48, 16, seed=9)
    q_seg_BM = torch.tensor([[0, 1, 2, PAD_SEGMENT_ID], [1, 0, 0, 1]], dtype=torch.int32)
    sdpa = lambda *a, **kw: attention(*a, impl="sdpa", **kw)
    check_packed_against_per_image(sdpa, q, k, v, do, PACKED_SEG_BN, q_seg_BM, out_tol={}, grad_tol={})


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_segments_do_not_mix(causal):
    check_segments_do_not_mix(lambda *a, **kw: attention(*a, impl="sdpa", **kw), PACKED_SEG_BN, causal)


def test_auto_on_cpu_is_sdpa():
    q, k, v, _ = make_qkv(1, 2, 9, 9, 16, dtype=torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True), want, rtol=0, atol=0)


@pytest.mark.skipif(INTERPRETING, reason="checks the CPU refusal without the interpreter")
def test_triton_on_cpu_without_interpreter_is_refused():
    q, k, v, _ = make_qkv(1, 1, 4, 4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="model.attention=triton .* TRITON_INTERPRET=1"):
        attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


def _qkv(shape_q, shape_kv, dtype=torch.float32):
    return torch.zeros(shape_q, dtype=dtype), torch.zeros(shape_kv, dtype=dtype), torch.zeros(shape_kv, dtype=dtype)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (_qkv((1, 2, 4, 16), (1, 2, 5, 8)), {}, r"q \(1, 2, 4, 16\), k \(1, 2, 5, 8\)"),
        (_qkv((1, 2, 4, 16), (2, 2, 5, 16)), {}, r"k \(2, 2, 5, 16\)"),
        (_qkv((2, 4, 16), (2, 5, 16)), {}, r"4-D .* \(2, 4, 16\)"),
        (_qkv((1, 1, 4, 16), (1, 1, 4, 16), torch.int32), {}, "torch.int32"),
        (_qkv((1, 1, 4, 16), (1, 1, 4, 16)), {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, r"\(1, 4\)"),
        (_qkv((1, 1, 4, 16), (1, 1, 4, 16)), {"key_padding_mask": torch.ones(1, 4)}, "torch.float32"),
        (_qkv((1, 1, 4, 16), (1, 1, 4, 16)), {"impl": "flash"}, "model.attention"),
        (_qkv((1, 1, 4, 16), (1, 1, 4, 16)), {"segment_ids": torch.zeros(1, 4, dtype=torch.int64)}, "int32"),
        (_qkv((1, 1, 4, 16), (1, 1, 5, 16)), {"segment_ids": torch.zeros(1, 4, dtype=torch.int32)}, r"\(1, 5\)"),
        (_qkv((1, 1, 4, 16), (1, 1, 5, 16)), {"segment_ids": torch.zeros(1, 5, dtype=torch.int32)}, "q_segment_ids"),
        (
            _qkv((1, 1, 4, 16), (1, 1, 4, 16)),
            {"q_segment_ids": torch.zeros(1, 4, dtype=torch.int32)},
            "q_segment_ids needs segment_ids",
        ),
    ],
)
def test_bad_inputs_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention(*args, **kwargs)


@pytest.mark.parametrize(
    "q,kwargs,match",
    [
        (torch.zeros(1, 1, 4, 256), {}, r"head dim 256 > 128 \(q \(1, 1, 4, 256\)\)"),
        (torch.zeros(1, 1, 4, 16, dtype=torch.float64), {}, "torch.float64"),
        (torch.zeros(1, 1, 4, 16), {"fp32_precision": "tf64"}, "fp32_precision"),
    ],
)
def test_flash_attention_unsupported_inputs(q, kwargs, match):
    # Raised before any kernel launch, so this runs without the interpreter or a GPU.
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, **kwargs)


def _ptxas_available() -> bool:
    import os

    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available() or not _ptxas_available(), reason="CPU-only")
@pytest.mark.parametrize("has_seg", [False, True])
def test_kernels_compile_for_h100_without_a_gpu(has_seg):
    """The CUDA path, never run on CPU CI, compiles for sm_90a: bf16, padded head dim, causal, key padding mask,
    with and without segment ids (block skipping included).

    Small tiles keep ptxas fast; the GPU tests and the autotuner cover the real block sizes."""
    import sys

    import triton
    from mmpretrain.kernels.attention_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel_module = sys.modules["mmpretrain.kernels.attention"]  # the package attribute is the function
    consts = dict(HEAD_DIM=24, HEAD_DIM_PAD=32, IS_CAUSAL=True, HAS_KPM=True, HAS_SEG=has_seg, INPUT_PRECISION=None)
    pointers = dict(KPM="*i8", QSEG="*i32", KSEG="*i32", LSE="*fp32", DELTA="*fp32")
    for fn, blocks in (
        (kernel_module._attn_fwd_kernel.fn, dict(BLOCK_M=32, BLOCK_N=32)),
        (_attn_bwd_dq_kernel, dict(BLOCK_M=32, BLOCK_N=32)),
        (_attn_bwd_dkdv_kernel, dict(BLOCK_M=32, BLOCK_N=32)),
        (_attn_bwd_delta_kernel, dict(BLOCK_M=32)),
    ):
        fn_consts = {k: v for k, v in {**consts, **blocks}.items() if k in fn.arg_names}
        signature = {
            name: "constexpr" if name in fn_consts
            else pointers.get(name, "*bf16") if name.isupper()
            else "fp32" if "scale" in name
            else "i32"
            for name in fn.arg_names
        }  # fmt: skip
        compiled = triton.compile(ASTSource(fn, signature, fn_consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn.__name__


# ----------------------------------------------------------------------------------------------
# CUDA: real shapes, fp16/bf16 against an fp32 reference
# ----------------------------------------------------------------------------------------------

# (B, H, M, N, D, causal, with_kpm): the towers' shapes, odd head dims, a pooling query, a long one.
CUDA_CASES = [
    (8, 12, 197, 197, 64, False, False),
    (8, 8, 77, 77, 64, True, False),
    (8, 8, 77, 77, 64, True, True),
    (4, 16, 257, 257, 64, False, False),
    (2, 16, 577, 577, 80, False, False),
    (2, 16, 50, 50, 88, False, True),
    (2, 12, 197, 197, 72, False, False),
    (2, 12, 129, 129, 96, True, False),
    (1, 8, 1025, 1025, 128, True, False),
    (4, 16, 1, 257, 64, False, True),
    (2, 8, 100, 300, 32, True, False),
]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,M,N,D,causal,with_kpm", CUDA_CASES)
def test_cuda_low_precision_matches_fp32_reference(B, H, M, N, D, causal, with_kpm, dtype):
    q, k, v, do = make_qkv(B, H, M, N, D, dtype=dtype, device="cuda")
    kw = dict(causal=causal, key_padding_mask=make_kpm(B, N).cuda() if with_kpm else None)
    got = run_fwd_bwd(flash_attention, q, k, v, do, **kw)
    ref = run_fwd_bwd(attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == dtype
        # Gradients are compared at their own scale (atol relative to the largest entry).
        s = 1.0 if name == "out" else r.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g.float() / s, r / s, atol=5e-3, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}")


def check_packed_low_precision(lengths_per_row, N, H, D, causal, dtype, device):
    """flash_attention with segment ids in `dtype` against per_image_attention in fp32 (gradients at their scale)."""
    seg_BN = packed_segment_ids(lengths_per_row, N).to(device)
    q, k, v, do = make_qkv(len(lengths_per_row), H, N, N, D, dtype=dtype, device=device, seed=10)
    got = run_fwd_bwd(flash_attention, q, k, v, do, segment_ids=seg_BN, causal=causal)
    ref = run_fwd_bwd(per_image_attention, q.float(), k.float(), v.float(), do.float(), seg_BN=seg_BN, causal=causal)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        s = 1.0 if name == "out" else r.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g.float() / s, r / s, atol=5e-3, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_packed_segments_match_per_image(dtype, causal):
    """NaFlex-like packing at real sizes: images of 64 to 577 tokens in rows of 1024, padding at the end."""
    check_packed_low_precision([[197, 256, 100, 64, 300], [577, 40, 256], [1000]], 1024, 8, 64, causal, dtype, "cuda")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32", 5e-3)])
def test_cuda_fp32_precision(precision, tol):
    q, k, v, do = make_qkv(2, 4, 197, 197, 64, dtype=torch.float32, device="cuda")
    check_against_float64(q, k, v, do, out_tol=dict(rtol=tol, atol=tol), grad_tol=dict(rtol=10 * tol, atol=10 * tol),
                          fp32_precision=precision)  # fmt: skip


@requires_cuda
@pytest.mark.cuda
def test_cuda_auto_dispatches_to_triton_and_falls_back():
    q, k, v, _ = make_qkv(2, 4, 77, 77, 64, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(attention(q, k, v), flash_attention(q, k, v), rtol=0, atol=0)
    # causal goes to SDPA (the kernel's causal backward at N=77 was 2.46x flash-SDPA on an H100)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True), want, rtol=0, atol=0)
    q, k, v, _ = make_qkv(1, 2, 16, 16, 256, dtype=torch.bfloat16, device="cuda")  # head dim > 128: SDPA
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), want, rtol=0, atol=0)
