"""Backward kernels of the fused attention in ``attention.py`` (FlashAttention-2 recipe).

With S = scale * Q Kᵀ (masked), P = softmax(S), OUT = P V and the saved row log-sum-exp L:

    delta_i = sum_d dO_id * O_id                 (one pass, ``_attn_bwd_delta_kernel``)
    P_ij    = exp(S_ij - L_i)                    (recomputed, never stored)
    dV      = Pᵀ dO
    dS_ij   = P_ij * ((dO Vᵀ)_ij - delta_i)
    dQ      = scale * dS K,   dK = scale * dSᵀ Q

dQ and dK/dV are two kernels: one program per query block (loops over key blocks, like the
forward) and one per key block (loops over query blocks). Every program owns the rows it
writes, so there are no atomics and no zero-initialised buffers, and autotuning may rerun
a launch freely. Scores run in base 2 (``qk_scale = scale * log2(e)``, L in log2 units).

Masking mirrors the forward: the causal mask is top-left aligned (query i sees keys j <= i,
as SDPA's ``is_causal``), key padding mask True = keep, segment ids block-diagonal (query i
sees key j only when their ids are equal; block pairs whose id ranges do not overlap are
skipped), a query row with no visible key has L = +inf so that its P row is 0 (its output
and gradients are 0, as SDPA's).
Shapes: B batch, H heads, M query length, N key length, D head dim (Dp padded to a power of 2).
"""

import triton
import triton.language as tl


@triton.jit
def _segment_range(SEG, offs, n):
    # Segment ids (int32) at positions offs, 0 past n, and their min and max over the positions < n. Two
    # blocks whose [min, max] ranges do not overlap share no segment: the kernels skip such pairs.
    valid = offs < n
    seg = tl.load(SEG + offs, mask=valid, other=0)
    lo = tl.min(tl.where(valid, seg, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, seg, -2147483647), axis=0)
    return seg, lo, hi


@triton.jit
def _attn_bwd_delta_kernel(
    OUT,
    DO,
    DELTA,
    stride_dob,
    stride_doh,
    stride_don,
    num_heads,
    seq_q,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_BHM = rowsum(dO * OUT) in fp32; OUT is ours (contiguous), dO may be strided.
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is limited to 65535 programs
    pid_m = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = OUT + pid_bh.to(tl.int64) * seq_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do_ptrs = (
        DO
        + off_b.to(tl.int64) * stride_dob
        + off_h.to(tl.int64) * stride_doh
        + offs_m[:, None] * stride_don
        + offs_d[None, :]
    )
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_dq_block(
    dq,
    q,
    do,
    lse,
    delta,
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
    # One key block [start_n, start_n + BLOCK_N) into dq (BLOCK_M, Dp).
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kv_mask = (offs_n[None, :] < seq_k) & (offs_d[:, None] < HEAD_DIM)
    kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)  # (Dp, BLOCK_N)
    vT = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)  # (Dp, BLOCK_N)
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
        s = tl.where(qseg[:, None] == kseg[None, :], s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_step(
    dq, q, do, lse, delta, qseg, q_lo, q_hi, K, V, KPM, KSEG, stride_kn, stride_vn, offs_m, start_n, seq_k,
    qk_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # As the forward's step: a key block with no segment in common with the query block is skipped.
    if HAS_SEG:
        kseg, k_lo, k_hi = _segment_range(KSEG, start_n + tl.arange(0, BLOCK_N), seq_k)
        if (k_lo <= q_hi) & (k_hi >= q_lo):
            dq = _attn_bwd_dq_block(dq, q, do, lse, delta, K, V, KPM, qseg, kseg, stride_kn, stride_vn, offs_m,
                                    start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM, HAS_SEG,
                                    MASKED, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    else:
        dq = _attn_bwd_dq_block(dq, q, do, lse, delta, K, V, KPM, qseg, qseg, stride_kn, stride_vn, offs_m,
                                start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM, HAS_SEG,
                                MASKED, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, KPM, QSEG, KSEG, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_kpm_b, stride_qseg_b, stride_kseg_b,
    num_heads, seq_q, seq_k, scale, qk_scale, n_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program per (query block, batch*head); grid flattened to 1-D (B*H may exceed 65535).
    num_m = tl.cdiv(seq_q, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    KPM += off_b * stride_kpm_b
    KSEG += off_b * stride_kseg_b
    row0 = pid_bh.to(tl.int64) * seq_q
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    qseg = tl.zeros([BLOCK_M], dtype=tl.int32)  # unused without segments
    q_lo = 0
    q_hi = 0
    if HAS_SEG:
        qseg, q_lo, q_hi = _segment_range(QSEG + off_b * stride_qseg_b, offs_m, seq_q)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_mask = offs_m < seq_q
    qd_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qd_mask, other=0.0)  # (BLOCK_M, Dp)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + row0 + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(DELTA + row0 + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Same split as the forward: blocks every row sees in full, then the boundary blocks.
    n_end = seq_k
    n_full = seq_k
    if IS_CAUSAL:
        n_end = tl.minimum(seq_k, start_m + BLOCK_M)
        n_full = tl.minimum(seq_k, start_m + 1)
    n_full = (n_full // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attn_bwd_dq_step(dq, q, do, lse, delta, qseg, q_lo, q_hi, K, V, KPM, KSEG, stride_kn, stride_vn,
                               offs_m, start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM, HAS_SEG,
                               False, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    for start_n in range(n_full, n_end, BLOCK_N):
        dq = _attn_bwd_dq_step(dq, q, do, lse, delta, qseg, q_lo, q_hi, K, V, KPM, KSEG, stride_kn, stride_vn,
                               offs_m, start_n, seq_k, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL, HAS_KPM, HAS_SEG,
                               True, INPUT_PRECISION, BLOCK_N)  # fmt: skip
    dq_ptrs = DQ + row0 * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attn_bwd_dkdv_block(
    dk,
    dv,
    k,
    v,
    kp,
    kseg,
    qseg,
    Q,
    DO,
    LSE,
    DELTA,
    stride_qn,
    stride_don,
    offs_n,
    start_m,
    seq_q,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    MASKED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # One query block [start_m, start_m + BLOCK_M) into dk, dv (BLOCK_N, Dp); scores transposed (BLOCK_N, BLOCK_M).
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_mask = offs_m < seq_q
    qd_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=qd_mask, other=0.0)  # (BLOCK_M, Dp)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :], mask=qd_mask, other=0.0)
    # Rows past the end get L = +inf, so their P column is exactly 0.
    lse = tl.load(LSE + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=row_mask, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    if MASKED:
        if IS_CAUSAL:
            sT = tl.where(offs_n[:, None] <= offs_m[None, :], sT, float("-inf"))
    if HAS_KPM:
        sT = tl.where(kp[:, None] != 0, sT, float("-inf"))
    if HAS_SEG:
        sT = tl.where(kseg[:, None] == qseg[None, :], sT, float("-inf"))
    pT = tl.math.exp2(sT - lse[None, :])
    dv += tl.dot(pT.to(do.dtype), do, input_precision=INPUT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_step(
    dk, dv, k, v, kp, kseg, k_lo, k_hi, Q, DO, LSE, DELTA, QSEG, stride_qn, stride_don, offs_n, start_m, seq_q,
    qk_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # A query block with no segment in common with this key block is skipped.
    if HAS_SEG:
        qseg, q_lo, q_hi = _segment_range(QSEG, start_m + tl.arange(0, BLOCK_M), seq_q)
        if (k_lo <= q_hi) & (k_hi >= q_lo):
            dk, dv = _attn_bwd_dkdv_block(dk, dv, k, v, kp, kseg, qseg, Q, DO, LSE, DELTA, stride_qn, stride_don,
                                          offs_n, start_m, seq_q, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL,
                                          HAS_KPM, HAS_SEG, MASKED, INPUT_PRECISION, BLOCK_M)  # fmt: skip
    else:
        dk, dv = _attn_bwd_dkdv_block(dk, dv, k, v, kp, kseg, kseg, Q, DO, LSE, DELTA, stride_qn, stride_don,
                                      offs_n, start_m, seq_q, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL,
                                      HAS_KPM, HAS_SEG, MASKED, INPUT_PRECISION, BLOCK_M)  # fmt: skip
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, KPM, QSEG, KSEG, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_kpm_b, stride_qseg_b, stride_kseg_b,
    num_heads, seq_q, seq_k, scale, qk_scale, n_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program per (key block, batch*head), looping over the query blocks that see it.
    num_n = tl.cdiv(seq_k, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    pid_bh = tl.program_id(0) // num_n
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += pid_bh.to(tl.int64) * seq_q
    DELTA += pid_bh.to(tl.int64) * seq_q
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    col_mask = offs_n < seq_k
    kd_mask = col_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kd_mask, other=0.0)  # (BLOCK_N, Dp)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kd_mask, other=0.0)
    # Keys past the end only feed rows of dk/dv that are never stored; masking them is not needed.
    kp = tl.full([BLOCK_N], 1, dtype=tl.int8)
    if HAS_KPM:
        kp = tl.load(KPM + off_b * stride_kpm_b + offs_n, mask=col_mask, other=0)
    QSEG += off_b * stride_qseg_b
    kseg = tl.zeros([BLOCK_N], dtype=tl.int32)  # (BLOCK_N,) segment ids of the keys; unused without segments
    k_lo = 0
    k_hi = 0
    if HAS_SEG:
        kseg, k_lo, k_hi = _segment_range(KSEG + off_b * stride_kseg_b, offs_n, seq_k)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

    # Causal: query blocks before this key block see none of it; those from m_full on see it all.
    m_begin = 0
    m_full = 0
    if IS_CAUSAL:
        m_begin = (start_n // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
        m_full = tl.maximum(m_full, m_begin)
    for start_m in range(m_begin, m_full, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_step(dk, dv, k, v, kp, kseg, k_lo, k_hi, Q, DO, LSE, DELTA, QSEG, stride_qn,
                                     stride_don, offs_n, start_m, seq_q, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL,
                                     HAS_KPM, HAS_SEG, True, INPUT_PRECISION, BLOCK_M)  # fmt: skip
    for start_m in range(m_full, seq_q, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_step(dk, dv, k, v, kp, kseg, k_lo, k_hi, Q, DO, LSE, DELTA, QSEG, stride_qn,
                                     stride_don, offs_n, start_m, seq_q, qk_scale, HEAD_DIM, HEAD_DIM_PAD, IS_CAUSAL,
                                     HAS_KPM, HAS_SEG, False, INPUT_PRECISION, BLOCK_M)  # fmt: skip
    out_off = pid_bh.to(tl.int64) * seq_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kd_mask)
