"""Triton kernels of the tiled contrastive loss (math, memory and the distributed scheme:
``contrastive_loss.py``). Every kernel works on a strip: rows a_MD against columns b_ND.

- ``_clip_fwd_kernel``: one program per (row tile, column split) walks its column tiles once;
  from each logits tile it updates the online row log-sum-exp and adds the tile's column sums
  sum_i exp(l_ij) to a float64 vector with an atomic add (no shift: exact for |l| < ~700). Row
  sums of the splits meet the same way, so both directions come out of one pass.
- ``_siglip_fwd_kernel``: same walk; per-row sums of softplus(l + b) and sigmoid(l + b).
- ``_bwd_kernel``: da = s * G @ b with G recomputed per tile (CLIP: P + Q from the saved
  log-sum-exps; SigLIP: sigmoid(l + b)). The gradient of b uses the same kernel with a and b
  swapped (l^T has the same form). The accumulator is BLOCK_M x BLOCK_DO, so for wide features
  the program's D range is split over the grid (logits recomputed once per D group).

Extra memory is O(M + N) (fp64 sums) plus the fp32 gradients. fp32 inputs use IEEE dots (on CUDA
the default would be TF32); bf16 inputs use the tensor cores with fp32 accumulation, and all
exp/log math is fp32. Under TRITON_INTERPRET=1 (CPU tests) autotuning is off and fixed small
blocks are used; the variable must be set before this module is imported.
"""

import functools

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)  # read from TRITON_INTERPRET when kernels are decorated
# Fixed blocks under the interpreter: small, so that tests at B = 33, 130 and D = 32 cover partial
# tiles, several K steps, several D groups and several column splits.
INTERPRET_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, BLOCK_DO=16)
INTERPRET_SPLITS = 2


def _autotune(configs, key, reset_to_zero):
    def wrap(fn):
        if INTERPRET:  # autotune needs a driver
            return fn
        return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(fn)

    return wrap


_FWD_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64), num_warps=w, num_stages=st)
    for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
]
_BWD_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, BLOCK_DO=do), num_warps=w, num_stages=st)
    for bm, bn, do, w, st in [(64, 64, 256, 8, 2), (128, 64, 128, 8, 2), (64, 128, 128, 4, 3), (64, 64, 512, 8, 1)]
]


@triton.jit
def _logits_tile(
    a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """scale * a[offs_m] @ b[offs_n]^T as a (BLOCK_M, BLOCK_N) fp32 tile; masked rows/columns read zeros."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a_mask, bt_mask = mask_m[:, None] & mask_d[None, :], mask_n[None, :] & mask_d[:, None]
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + offs_d[None, :], mask=a_mask, other=0.0)  # (M, D) tile
        bt = tl.load(b_ptr + offs_n[None, :] * stride_b + offs_d[:, None], mask=bt_mask, other=0.0)  # (D, N) tile
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc * scale


@triton.jit
def _exp_f64(x):
    """exp(x) as float64 for fp32 x, |x| < ~700, from fp64 arithmetic and one fp32 exp2 (no fp64 transcendental,
    which not every backend lowers): exp(x) = 2^k * 2^f, k = trunc(x log2 e), 2^k built from exponent bits."""
    y = x.to(tl.float64) * 1.4426950408889634
    k = y.to(tl.int32)
    f = (y - k.to(tl.float64)).to(tl.float32)  # in (-1, 1)
    two_k = ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return two_k * tl.exp2(f).to(tl.float64)


@_autotune(_FWD_CONFIGS, key=["M", "N", "D"], reset_to_zero=["row_sumexp_ptr", "col_sumexp_ptr"])
@triton.jit
def _clip_fwd_kernel(
    a_ptr, b_ptr, scale_ptr, row_sumexp_ptr, col_sumexp_ptr, M, N, D, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, split, num_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    scale = tl.load(scale_ptr).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # online row max
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # online row sum of exp(l - m_i)
    for nb in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        logits = _logits_tile(
            a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b, scale,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        lr = tl.where(mask_n[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(lr, 1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lr - m_new[:, None]), 1)
        m_i = m_new
        # Column direction from the same tile: sum over this tile's valid rows, then into fp64.
        lc = tl.where(mask_m[:, None], logits, float("-inf"))
        c_max = tl.max(lc, 0)
        c_sum = tl.sum(tl.exp(lc - c_max[None, :]), 0)
        tl.atomic_add(col_sumexp_ptr + offs_n, c_sum.to(tl.float64) * _exp_f64(c_max), mask=mask_n)
    tl.atomic_add(row_sumexp_ptr + offs_m, s_i.to(tl.float64) * _exp_f64(m_i), mask=mask_m)


@_autotune(_FWD_CONFIGS, key=["M", "N", "D"], reset_to_zero=["row_softplus_ptr", "row_sigmoid_ptr"])
@triton.jit
def _siglip_fwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, row_softplus_ptr, row_sigmoid_ptr, M, N, D, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, split, num_splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    sp_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    sg_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for nb in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        logits = _logits_tile(
            a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b, scale,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
        ) + bias  # fmt: skip
        e = tl.exp(-tl.abs(logits))  # in (0, 1]: no overflow
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))  # accurate log1p(e) (Goldberg's trick)
        softplus = tl.maximum(logits, 0.0) + log1p_e
        sigmoid = tl.where(logits >= 0, 1.0 / u, e / u)
        sp_i += tl.sum(tl.where(mask_n[None, :], softplus, 0.0), 1)
        sg_i += tl.sum(tl.where(mask_n[None, :], sigmoid, 0.0), 1)
    tl.atomic_add(row_softplus_ptr + offs_m, sp_i, mask=mask_m)
    tl.atomic_add(row_sigmoid_ptr + offs_m, sg_i, mask=mask_m)


@_autotune(_BWD_CONFIGS, key=["M", "N", "D"], reset_to_zero=["da_ptr"])
@triton.jit
def _bwd_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, lse_a_ptr, lse_b_ptr, da_ptr, M, N, D, stride_a, stride_b, stride_da,
    SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """da[rows, D group] += scale * G @ b[:, D group], G = P + Q (CLIP) or sigmoid(l + bias) (SigLIP)."""
    pid_m, pid_do = tl.program_id(0), tl.program_id(1)
    split, num_splits = tl.program_id(2), tl.num_programs(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    scale = tl.load(scale_ptr).to(tl.float32)
    if SIGLIP:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        lse_a = tl.load(lse_a_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for nb in range(split, tl.cdiv(N, BLOCK_N), num_splits):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        logits = _logits_tile(
            a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_a, stride_b, scale,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        if SIGLIP:
            g = tl.sigmoid(logits + bias)
        else:
            lse_b = tl.load(lse_b_ptr + offs_n, mask=mask_n, other=0.0)
            g = tl.exp(logits - lse_a[:, None]) + tl.exp(logits - lse_b[None, :])
        g = tl.where(mask_n[None, :], g, 0.0)
        b_mask = mask_n[:, None] & mask_do[None, :]
        b = tl.load(b_ptr + offs_n[:, None] * stride_b + offs_do[None, :], mask=b_mask, other=0.0)  # (N, DO) tile
        acc = tl.dot(g.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    da_ptrs = da_ptr + offs_m[:, None] * stride_da + offs_do[None, :]
    tl.atomic_add(da_ptrs, acc * scale, mask=mask_m[:, None] & mask_do[None, :])


# ----------------------------------------------------------------------------- launchers


def _prep(a_MD, b_ND, *scalars):
    if a_MD.dtype != b_ND.dtype:
        b_ND = b_ND.to(a_MD.dtype)
    scalars = [x.reshape(1).float().contiguous() for x in scalars]
    return a_MD.contiguous(), b_ND.contiguous(), scalars, "ieee" if a_MD.dtype == torch.float32 else "tf32"


@functools.lru_cache
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(device, programs, num_col_blocks):
    """Column splits so that the grid fills the GPU when a strip has few row tiles (a small local batch)."""
    if INTERPRET:
        return min(INTERPRET_SPLITS, num_col_blocks)
    target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(num_col_blocks, triton.cdiv(target, programs)))


def _meta():
    return INTERPRET_META if INTERPRET else {}


def _grid2(a_MD, M, N):
    def grid(meta):
        rows = triton.cdiv(M, meta["BLOCK_M"])
        return rows, _num_splits(a_MD.device, rows, triton.cdiv(N, meta["BLOCK_N"]))

    return grid


def _fwd_meta():
    return {k: v for k, v in _meta().items() if k != "BLOCK_DO"}


def clip_forward(a_MD, b_ND, scale, chunk_size=None):
    """Row log-sum-exps (M,) fp32 and column sums of exp(l) over these rows (N,) fp64."""
    a_MD, b_ND, (scale,), prec = _prep(a_MD, b_ND, scale)
    (M, D), N = a_MD.shape, b_ND.shape[0]
    row_sumexp = torch.zeros(M, device=a_MD.device, dtype=torch.float64)
    col_sumexp = torch.zeros(N, device=a_MD.device, dtype=torch.float64)
    _clip_fwd_kernel[_grid2(a_MD, M, N)](
        a_MD, b_ND, scale, row_sumexp, col_sumexp, M, N, D, a_MD.stride(0), b_ND.stride(0),
        DOT_PRECISION=prec, **_fwd_meta(),
    )  # fmt: skip
    return row_sumexp.log().float(), col_sumexp


def siglip_forward(a_MD, b_ND, scale, bias, chunk_size=None):
    """sum_ij softplus(l + b) and sum_ij sigmoid(l + b) over the strip (fp64 scalars)."""
    a_MD, b_ND, (scale, bias), prec = _prep(a_MD, b_ND, scale, bias)
    (M, D), N = a_MD.shape, b_ND.shape[0]
    row_softplus = torch.zeros(M, device=a_MD.device)
    row_sigmoid = torch.zeros(M, device=a_MD.device)
    _siglip_fwd_kernel[_grid2(a_MD, M, N)](
        a_MD, b_ND, scale, bias, row_softplus, row_sigmoid, M, N, D, a_MD.stride(0), b_ND.stride(0),
        DOT_PRECISION=prec, **_fwd_meta(),
    )  # fmt: skip
    return row_softplus.sum(dtype=torch.float64), row_sigmoid.sum(dtype=torch.float64)


def _grad_rows(a_MD, b_ND, scale, bias, lse_a, lse_b, siglip, prec):
    """scale * G @ b for the rows of a (fp32)."""
    (M, D), N = a_MD.shape, b_ND.shape[0]
    da_MD = torch.zeros(M, D, device=a_MD.device)

    def grid(meta):
        rows, groups = triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_DO"])
        return rows, groups, _num_splits(a_MD.device, rows * groups, triton.cdiv(N, meta["BLOCK_N"]))

    _bwd_kernel[grid](
        a_MD, b_ND, scale, bias, lse_a, lse_b, da_MD, M, N, D, a_MD.stride(0), b_ND.stride(0), da_MD.stride(0),
        SIGLIP=siglip, DOT_PRECISION=prec, **_meta(),
    )  # fmt: skip
    return da_MD


def clip_backward(a_MD, b_ND, scale, row_lse_M, col_lse_N, chunk_size=None):
    """da = s (P + Q) @ b, db = s (P + Q)^T @ a (fp32, diagonal terms excluded): two launches, roles swapped."""
    a_MD, b_ND, (scale,), prec = _prep(a_MD, b_ND, scale)
    row_lse_M, col_lse_N = row_lse_M.float().contiguous(), col_lse_N.float().contiguous()
    da = _grad_rows(a_MD, b_ND, scale, scale, row_lse_M, col_lse_N, False, prec)
    db = _grad_rows(b_ND, a_MD, scale, scale, col_lse_N, row_lse_M, False, prec)
    return da, db


def siglip_backward(a_MD, b_ND, scale, bias, chunk_size=None):
    """da = s sigmoid(l + b) @ b, db = s sigmoid(l + b)^T @ a (fp32, diagonal terms excluded)."""
    a_MD, b_ND, (scale, bias), prec = _prep(a_MD, b_ND, scale, bias)
    da = _grad_rows(a_MD, b_ND, scale, bias, scale, scale, True, prec)
    db = _grad_rows(b_ND, a_MD, scale, bias, scale, scale, True, prec)
    return da, db


class TritonOps:
    clip_forward = staticmethod(clip_forward)
    clip_backward = staticmethod(clip_backward)
    siglip_forward = staticmethod(siglip_forward)
    siglip_backward = staticmethod(siglip_backward)
