"""Fused multi-head attention in Triton (FlashAttention-2 style), forward and backward.

Computes O = softmax(scale * Q Kᵀ + mask) V for q (B, H, M, D), k and v (B, H, N, D), with
an optional causal mask (top-left aligned, as SDPA's ``is_causal``: query i sees keys j <= i,
also when M != N), an optional key padding mask (B, N) bool, True = keep, and optional
segment ids for sequence packing: (B, N) int32 for the keys and (B, M) for the queries (the
keys' own when M == N); query i sees key j only when their ids are equal, a block-diagonal
mask when each image's tokens are contiguous. Padding tokens take an id of their own,
``PAD_SEGMENT_ID`` = 2**31 - 1 by convention (after the images 0, 1, 2 ..., so ids never
decrease along a row). Key blocks whose id range does not overlap the query block's are skipped
(in the backward, both ways): with non-decreasing ids a packed sequence costs about the sum of
its images' squares. A query row that sees no key returns 0 with zero gradients (as SDPA).

Memory: the forward walks key blocks with an online softmax and never forms the (M, N)
score matrix; it keeps O and one fp32 log-sum-exp per query row (B, H, M) -- O(M) extra.
The backward recomputes the scores block by block from that LSE, plus one fp32
``delta = rowsum(dO * O)`` per row. Accumulation is fp32 for fp16/bf16/fp32 inputs; fp32
inputs use IEEE dot products on CUDA when ``torch.get_float32_matmul_precision()`` is
"highest" (the default) and TF32 otherwise, or as ``fp32_precision`` says.

Why it exists: the towers spend most of their FLOPs in attention at short, odd lengths
(text 77 causal; images 50, 197, 257, 577) with head dims 64/80/88/128 that fused kernels
often skip; this one covers them all and keeps the model's attention one code path that we
own, test on CPU (Triton interpreter) and benchmark. Head dims that are not a power of two
are padded to the next one inside the tiles (tl.arange needs it) and masked on load/store.

Entry points: ``flash_attention`` (the Triton path, a ``torch.library`` custom op with fake
and autograd registrations, so torch.compile traces it) and ``attention_reference`` (plain
torch, materialises the scores). ``mmpretrain.kernels.attention`` dispatches between this
and SDPA. ``TRITON_INTERPRET=1`` must be set before this module is imported to run it on CPU.
Shapes: B batch, H heads, M query length, N key length, D head dim, Dp = D padded.
"""

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _segment_range

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRET = bool(triton.knobs.runtime.interpret)
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP32_PRECISIONS = ("ieee", "tf32")
LOG2E = 1.4426950408889634
# Segment id of padding in a packed sequence, by convention: the largest int32, after every image's id.
PAD_SEGMENT_ID = 2**31 - 1

# Fixed blocks under the interpreter (no driver to autotune against). BLOCK_M != BLOCK_N on
# purpose, so that the tests exercise blocks that do not line up.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}


def _configs(pairs):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for (m, n, w, s) in pairs
    ]  # fmt: skip


# Small lists (BLOCK_M, BLOCK_N, warps, stages); configs that run out of shared memory are dropped by Triton.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                         (128, 128, 8, 2)])  # fmt: skip
_DQ_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 3), (128, 32, 4, 2)])
_DKDV_CONFIGS = _configs([(64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 2), (32, 128, 4, 2), (64, 32, 4, 3)])
# Key: head dim, causal, segments (they skip blocks) and the bucketed key length (77 and 4096 want different
# blocks); Triton adds the dtypes.
_TUNE_KEY = ["HEAD_DIM_PAD", "IS_CAUSAL", "HAS_SEG", "n_bucket"]


def _autotune(configs):
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=_TUNE_KEY)


@triton.jit
def _attn_fwd_block(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    KPM,
    qseg,
    kseg,
    stride_kn,
    stride_vn,
    offs_m,
    start_n,
    seq_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    MASKED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One key block [start_n, start_n + BLOCK_N): online-softmax update of acc (BLOCK_M, Dp), l_i, m_i (BLOCK_M,).
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kT = tl.load(
        K + offs_n[None, :] * stride_kn + offs_d[:, None],
        mask=(offs_n[None, :] < seq_k) & (offs_d[:, None] < HEAD_DIM),
        other=0.0,
    )  # (Dp, BLOCK_N)
    v = tl.load(
        V + offs_n[:, None] * stride_vn + offs_d[None, :],
        mask=(offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )  # (BLOCK_N, Dp)
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        keep = offs_n[None, :] < seq_k
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        kp = tl.load(KPM + offs_n, mask=offs_n < seq_k, other=0)
        s = tl.where(kp[None, :] != 0, s, float("-inf"))
    if HAS_SEG:
        s = tl.where(qseg[:, None] == kseg[None, :], s, float("-inf"))  # block-diagonal: same segment only
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no visible key so far keeps m = -inf; subtract 0 instead so that exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_step(
    acc, l_i, m_i, q, qseg, q_lo, q_hi, K, V, KPM, KSEG, stride_kn, stride_vn, offs_m, start_n, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # With segments, a key block whose id range misses the query block's range is skipped (nothing to see).
    if HAS_SEG:
        kseg, k_lo, k_hi = _segment_range(KSEG, start_n + tl.arange(0, BLOCK_N), seq_k)
        if (k_lo <= q_hi) & (k_hi >= q_lo):
            acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, K, V, KPM, qseg, kseg, stride_kn, stride_vn, offs_m,
                                            start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM,
                                            HAS_SEG, MASKED, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    else:
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, K, V, KPM, qseg, qseg, stride_kn, stride_vn, offs_m,
                                        start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM,
                                        HAS_SEG, MASKED, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    return acc, l_i, m_i


@_autotune(_FWD_CONFIGS)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KPM, QSEG, KSEG, OUT, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpm_b, stride_qseg_b, stride_kseg_b,
    num_heads, seq_q, seq_k, qk_scale, n_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program per (query block, batch*head); the grid is flattened to 1-D (B*H may exceed 65535)
    # with the query blocks of one head adjacent, so they share its K/V in L2.
    num_m = tl.cdiv(seq_q, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    KPM += off_b * stride_kpm_b
    KSEG += off_b * stride_kseg_b
    row0 = pid_bh.to(tl.int64) * seq_q  # first row of this head in OUT (B*H*M, D) and LSE (B*H*M,)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    qseg = tl.zeros([BLOCK_M], dtype=tl.int32)  # (BLOCK_M,) segment ids of the rows; unused without segments
    q_lo = 0
    q_hi = 0
    if HAS_SEG:
        qseg, q_lo, q_hi = _segment_range(QSEG + off_b * stride_qseg_b, offs_m, seq_q)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    qd_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qd_mask, other=0.0)  # (BLOCK_M, Dp)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Key blocks [0, n_full) are seen in full by every row of this block (no causal or length mask);
    # [n_full, n_end) straddle the diagonal or the end of the keys. Causal rows stop at their diagonal.
    n_end = seq_k
    n_full = seq_k
    if IS_CAUSAL:
        n_end = tl.minimum(seq_k, start_m + BLOCK_M)
        n_full = tl.minimum(seq_k, start_m + 1)
    n_full = (n_full // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, qseg, q_lo, q_hi, K, V, KPM, KSEG, stride_kn, stride_vn,
                                       offs_m, start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM,
                                       HAS_SEG, False, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    for start_n in range(n_full, n_end, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, qseg, q_lo, q_hi, K, V, KPM, KSEG, stride_kn, stride_vn,
                                       offs_m, start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM,
                                       HAS_SEG, True, INPUT_PRECISION, BLOCK_N)  # fmt: skip

    # Rows with no visible key: l = 0, acc = 0 -> O = 0, and LSE = +inf so the backward's P row is 0.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(OUT + (row0 + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=qd_mask)
    tl.store(LSE + row0 + offs_m, lse, mask=offs_m < seq_q)


_attn_bwd_dq = _autotune(_DQ_CONFIGS)(_attn_bwd_dq_kernel)
_attn_bwd_dkdv = _autotune(_DKDV_CONFIGS)(_attn_bwd_dkdv_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers and the custom op
# ---------------------------------------------------------------------------------------------


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any (B, H, N) strides but need the head dim packed.
    return x if x.stride(-1) == 1 else x.contiguous()


def _n_bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(n), 64), 4096)


def _launch_args(q, k, v, kpm, qseg, kseg, causal, tf32):
    """Arguments shared by the three main kernels: the mask pointers, strides, sizes and constexprs."""
    B, H, M, D = q.shape
    N = k.shape[2]
    has_seg = kseg is not None
    # Stand-ins are never read: HAS_KPM / HAS_SEG is False then.
    masks = (kpm if kpm is not None else q, qseg if has_seg else q, kseg if has_seg else q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    mask_strides = tuple(x.stride(0) for x in masks)
    consts = dict(
        HEAD_DIM=D,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)),  # tl.dot needs K >= 16
        IS_CAUSAL=causal,
        HAS_KPM=kpm is not None,
        HAS_SEG=has_seg,
        # fp32: exact ("ieee") or TF32 tensor cores; fp16/bf16: None = the backend's default (tensor cores).
        INPUT_PRECISION=("tf32" if tf32 else "ieee") if q.dtype == torch.float32 else None,
    )
    return B, H, M, N, masks, strides, mask_strides, consts


def _device_guard(x: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _blocks(name):
    if not INTERPRET:
        return {}
    m, n = INTERPRET_BLOCKS[name]
    return {"BLOCK_M": m, "BLOCK_N": n}


@torch.library.custom_op("mmpretrain::flash_attention_fwd", mutates_args=())
def _flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: Optional[torch.Tensor], qseg: Optional[torch.Tensor],
    kseg: Optional[torch.Tensor], causal: bool, scale: float, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns out (B, H, M, D) in q's dtype and lse (B, H, M) fp32 in log2 units.

    kpm (B, N) int8 (nonzero = keep); qseg (B, M) and kseg (B, N) int32, both or neither."""
    B, H, M, N, masks, strides, mask_strides, consts = _launch_args(q, k, v, kpm, qseg, kseg, causal, tf32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, M), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * B * H,)
    with _device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, *masks, out, lse, *strides, *mask_strides,
            H, M, N, scale * LOG2E, _n_bucket(N), **consts, **_blocks("fwd"),
        )  # fmt: skip
    return out, lse


@_flash_fwd.register_fake
def _(q, k, v, kpm, qseg, kseg, causal, scale, tf32):
    B, H, M, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, M), dtype=torch.float32)


@torch.library.custom_op("mmpretrain::flash_attention_bwd", mutates_args=())
def _flash_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kpm: Optional[torch.Tensor], qseg: Optional[torch.Tensor], kseg: Optional[torch.Tensor], causal: bool,
    scale: float, tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns dq, dk, dv, contiguous, in the dtypes of q, k, v."""
    B, H, M, N, masks, strides, mask_strides, consts = _launch_args(q, k, v, kpm, qseg, kseg, causal, tf32)
    do = _last_dim_contiguous(do)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, M), dtype=torch.float32, device=q.device)
    delta_block = 16 if INTERPRET else 64
    args = (q, k, v, *masks, do, lse, delta)
    sizes = (*strides, *do.stride()[:3], *mask_strides, H, M, N, scale, scale * LOG2E, _n_bucket(N))
    with _device_guard(q):
        _attn_bwd_delta_kernel[(B * H, triton.cdiv(M, delta_block))](
            out, do, delta, *do.stride()[:3], H, M,
            HEAD_DIM=consts["HEAD_DIM"], HEAD_DIM_PAD=consts["HEAD_DIM_PAD"], BLOCK_M=delta_block,
        )  # fmt: skip
        _attn_bwd_dq[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * B * H,)](
            *args, dq, *sizes, **consts, **_blocks("dq")
        )  # fmt: skip
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * B * H,)](
            *args, dk, dv, *sizes, **consts, **_blocks("dkdv")
        )  # fmt: skip
    return dq, dk, dv


@_flash_bwd.register_fake
def _(do, q, k, v, out, lse, kpm, qseg, kseg, causal, scale, tf32):
    fake = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)
    return fake(q), fake(k), fake(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, qseg, kseg, causal, scale, tf32 = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, qseg, kseg)
    ctx.causal, ctx.scale, ctx.tf32 = causal, scale, tf32


def _backward(ctx, do, _dlse):
    # lse is an internal output: its gradient is ignored (nothing outside this module uses it).
    q, k, v, out, lse, kpm, qseg, kseg = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(do, q, k, v, out, lse, kpm, qseg, kseg, ctx.causal, ctx.scale, ctx.tf32)
    return dq, dk, dv, None, None, None, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _default_fp32_precision() -> str:
    # Read outside the traced graph: dynamo cannot trace this getter (a compiled graph keeps the value it saw).
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def check_attention_inputs(q, k, v, key_padding_mask=None, segment_ids=None, q_segment_ids=None) -> None:
    """Raise ValueError unless q (B, H, M, D), k and v (B, H, N, D), key_padding_mask (B, N) bool,
    segment_ids (B, N) int32 and q_segment_ids (B, M) int32 fit together (see ``segment_ids_for``)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"attention: {name} must be a 4-D (B, H, N, D) tensor (got {shape})")
        if not x.is_floating_point():
            raise ValueError(f"attention: {name} must be a floating-point tensor (got dtype {x.dtype})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "attention: expected q (B, H, M, D) and k, v (B, H, N, D) "
            f"(got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
        )
    B, M, N = k.shape[0], q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, N):
            raise ValueError(
                f"attention: key_padding_mask must be a bool (B, N) = ({B}, {N}) tensor, True = keep "
                f"(got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)})"
            )
    if segment_ids is None and q_segment_ids is not None:
        raise ValueError("attention: q_segment_ids needs segment_ids (the keys' segment ids)")
    for name, ids, rows in (("segment_ids", segment_ids, N), ("q_segment_ids", q_segment_ids, M)):
        if ids is not None and (ids.dtype != torch.int32 or tuple(ids.shape) != (B, rows)):
            raise ValueError(
                f"attention: {name} must be an int32 (B, {'N' if rows == N else 'M'}) = ({B}, {rows}) tensor "
                f"(got {ids.dtype} {tuple(ids.shape)})"
            )
    if segment_ids is not None and q_segment_ids is None and M != N:
        raise ValueError(
            f"attention: segment_ids alone needs as many queries as keys (got M={M}, N={N}); "
            "pass q_segment_ids (B, M) for the queries"
        )


def segment_ids_for(segment_ids, q_segment_ids):
    """(queries' ids (B, M), keys' ids (B, N)), or (None, None): the queries share the keys' ids unless given."""
    if segment_ids is None:
        return None, None
    return (segment_ids if q_segment_ids is None else q_segment_ids), segment_ids


def triton_unsupported_reason(q: torch.Tensor) -> Optional[str]:
    """Why the Triton kernel cannot take these (already checked) inputs, or None when it can."""
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} (q {tuple(q.shape)})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    return None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    fp32_precision: Optional[str] = None,
    segment_ids: Optional[torch.Tensor] = None,
    q_segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The Triton path: softmax(scale * q kᵀ + masks) v for q (B, H, M, D), k, v (B, H, N, D); returns (B, H, M, D).

    causal: top-left aligned, query i sees keys j <= i. key_padding_mask: (B, N) bool, True = keep.
    segment_ids: (B, N) int32, for sequence packing: query i sees key j only when their segment ids are
    equal (a block-diagonal mask when each image's tokens are contiguous; any int32 values, in any order).
    The queries share the keys' ids (M == N) unless q_segment_ids (B, M) int32 gives theirs (one pooling
    query per packed image, say). Padding takes an id of its own, PAD_SEGMENT_ID by convention (the largest,
    so that ids never decrease along a row and the kernel skips every block pair with no common id): it
    then attends only among itself (finite outputs, no gradient into any image); add key_padding_mask=False
    there to make its outputs 0 instead. All masks combine (logical and).
    scale: defaults to 1/sqrt(D). fp32_precision: "ieee" or "tf32" for fp32 inputs on CUDA;
    None follows torch.get_float32_matmul_precision() ("highest" -> ieee). Differentiable in q, k, v.
    """
    check_attention_inputs(q, k, v, key_padding_mask, segment_ids, q_segment_ids)
    reason = triton_unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"attention: the Triton kernel does not support {reason}; use impl='sdpa'")
    if fp32_precision is None:
        fp32_precision = _default_fp32_precision()
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"attention: fp32_precision must be one of {FP32_PRECISIONS} (got {fp32_precision!r})")
    if not q.is_cuda and not INTERPRET:
        raise ValueError(
            f"attention: the Triton kernel needs CUDA tensors (got device {q.device}); set TRITON_INTERPRET=1 "
            "before importing mmpretrain.kernels to run it on CPU in the (slow) Triton interpreter"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8)
    qseg, kseg = (None if x is None else x.contiguous() for x in segment_ids_for(segment_ids, q_segment_ids))
    out, _ = _flash_fwd(q, k, v, kpm, qseg, kseg, bool(causal), scale, fp32_precision == "tf32")
    return out


def attention_keep_mask(q, k, causal=False, key_padding_mask=None, segment_ids=None, q_segment_ids=None):
    """The bool mask of (query, key) pairs that may attend, True = keep, broadcastable to (B, H, M, N), or None
    when every pair may (the masks of flash_attention, materialised: the reference and SDPA paths use it)."""
    M, N = q.shape[-2], k.shape[-2]
    keep = None
    if causal:
        keep = torch.ones(M, N, dtype=torch.bool, device=q.device).tril()  # (M, N), top-left aligned
    if key_padding_mask is not None:
        kpm_B11N = key_padding_mask[:, None, None, :]
        keep = kpm_B11N if keep is None else keep & kpm_B11N
    qseg_BM, kseg_BN = segment_ids_for(segment_ids, q_segment_ids)
    if kseg_BN is not None:
        same_B1MN = qseg_BM[:, None, :, None] == kseg_BN[:, None, None, :]
        keep = same_B1MN if keep is None else keep & same_B1MN
    return keep


def attention_reference(
    q, k, v, causal=False, key_padding_mask=None, scale=None, segment_ids=None, q_segment_ids=None
) -> torch.Tensor:
    """Plain torch attention (materialises the (M, N) scores); fp32 math for half inputs, float64 stays float64.

    Same conventions as flash_attention: top-left causal mask, key_padding_mask True = keep, segment ids
    (block-diagonal), a row that sees no key gives 0.
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s_BHMN = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    keep = attention_keep_mask(q, k, causal, key_padding_mask, segment_ids, q_segment_ids)
    keep = torch.ones_like(s_BHMN, dtype=torch.bool) if keep is None else keep.expand(s_BHMN.shape)
    any_key = keep.any(-1, keepdim=True)
    # Rows with no visible key: softmax over zeros (finite), then zeroed.
    s_BHMN = s_BHMN.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0)
    p_BHMN = torch.softmax(s_BHMN, dim=-1) * any_key
    return (p_BHMN @ v.to(compute)).to(q.dtype)
