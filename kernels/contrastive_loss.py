"""Tiled CLIP and SigLIP losses: the B x B similarity matrix is never stored, forward or backward.

Math (l_ij = s * x_i . y_j, x = image features, y = text features, s = logit scale, b = bias):

    CLIP    L = 1/(2B) * sum_i [ lse_j(l_ij) - l_ii ]  +  1/(2B) * sum_j [ lse_i(l_ij) - l_jj ]
            dL/dl_ij = (P_ij + Q_ij - 2 [i=j]) / (2B),  P = row softmax, Q = column softmax
    SigLIP  L = -1/B * sum_ij log sigmoid(z_ij (l_ij + b)),  z = +1 on the diagonal, -1 elsewhere
              =  1/B * [ sum_ij softplus(l_ij + b) - sum_i (l_ii + b) ]
            dL/dl_ij = (sigmoid(l_ij + b) - [i=j]) / B

    With G = dL/dl: dx_i = s * sum_j G_ij y_j, dy_j = s * sum_i G_ij x_i, ds = sum_ij G_ij x_i . y_j
    = sum_i x_i . dx_i / s (so ds costs O(B*D), not another pass), db = sum_ij G_ij.

How. Rows of the matrix are visited in chunks (torch, the CPU path) or tiles (Triton, the GPU
path). One pass reads each tile once and produces both CLIP directions: the exact row
log-sum-exp, and per column a partial sum of exp(l_ij) over the rows seen, accumulated in float64
with no shift. That is exact for |l_ij| < ~700 (float64 exp range); normalized features and
s <= 100 (CLIP clamps its scale there) give |l| <= 100. Outside that range the loss is inf or nan,
never silently wrong (the CPU path raises a ValueError first). Columns need no second pass, and
ranks combine their partial column sums with one all-reduce. The backward recomputes each tile
from the features and the saved log-sum-exps (the FlashAttention recipe).
Matrix products: forward 1, backward 3 on the chunked path (recompute, dx, dy) against 6 for
the full-matrix loss (two logits products, four in backward). The Triton backward recomputes the
tiles in each of its two launches (dx by rows, dy by columns: no atomics on wide rows), 5 in all.

Memory: O(B*D) saved for backward (the gathered text features and two log-sum-exp vectors);
O(chunk*B) transient on the chunked path (one chunk x B fp32 logits buffer, 4*chunk*B bytes, plus a
chunk x 2048 temporary), O(B*D) on the Triton path.

Distributed (b local rows, the same b on every rank, B = b * world, rank r holds rows
r*b ... r*b+b-1; the positive of local row i is global column r*b + i). Text features are
all-gathered (B x D); each rank computes the strip of local image rows x all text columns, so it
owns the complete row terms of its images and a partial sum of every column; one all-reduce of
B + 1 float64 numbers completes the column log-sum-exps and the loss, identical on every rank.
Backward: each rank's strip gives the full gradient of its images and a partial gradient of all
texts, which a reduce-scatter sums onto the owner. The collectives are kernels/collectives.py (group None:
no communication; mmpretrain.loss passes the world's group when torch.distributed is up).
Why all-gather and not a ring (big_vision's chunked SigLIP, Inf-CL's ring): the gathered texts
cost B*D (65536 x 768 in bf16 is 96 MB), small next to the towers' activations, and the
all-gather + reduce-scatter move the same bytes as N-1 ring steps in two bandwidth-optimal
collectives with no per-step synchronization, and the strip layout completes CLIP's column
log-sum-exps with a single all-reduce (a ring needs the partial column sums to travel too).
A ring only wins once B*D itself does not fit on a rank.

Gradient contract with the engine: DeepSpeed (and DDP) AVERAGE parameter gradients over the N
ranks. The loss is one number over the global batch, so the right parameter gradient is the SUM
over ranks of each rank's contribution. Backward therefore returns N x (this rank's share of the
true gradient) for every input: N x dL/dx_local, N x dL/dy_local (the reduce-scatter sums the
partial text gradients of all ranks), N x the scale/bias contribution of this rank's tiles. The
engine's 1/N averaging then gives exactly the one-rank gradient of the whole batch (tested in
tests/distributed/test_loss_distributed.py). The naive path (all-gather with gradient, full
matrix on every rank) meets the same contract: its gather's backward sums the identical gradients
of all ranks (N x), and each rank's scale gradient is already the full one.

Shapes: b local batch, B global batch, M / N rows / columns of a strip, D feature dim.
"""

import torch
import torch.nn.functional as F

from .collectives import all_gather, all_reduce_sum, gather_with_grad, reduce_scatter_sum, world_rank

# Decorated on import, like kernels/attention.py: TRITON_INTERPRET must be set before mmpretrain.kernels is imported.
from .contrastive_loss_triton import TritonOps

IMPLS = ("triton", "chunked", "naive")
MAX_ABS_LOGIT = 700.0  # float64 exp range; see the module docstring
COL_BLOCK = 2048  # columns per elementwise temporary on the chunked path (chunk x COL_BLOCK fp32)


# ----------------------------------------------------------------------------- references


def clip_loss_reference(img_BD, txt_BD, logit_scale):
    """Full-matrix symmetric CLIP loss (the open_clip formula); plain autograd, O(B^2) memory."""
    logits_BB = logit_scale * img_BD @ txt_BD.T
    labels_B = torch.arange(img_BD.shape[0], device=img_BD.device)
    return 0.5 * (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B))


def siglip_loss_reference(img_BD, txt_BD, logit_scale, logit_bias):
    """Full-matrix SigLIP loss: -sum_ij log sigmoid(z_ij * logit_ij) / B; plain autograd, O(B^2) memory."""
    logits_BB = logit_scale * img_BD @ txt_BD.T + logit_bias
    z_BB = 2 * torch.eye(img_BD.shape[0], device=img_BD.device, dtype=logits_BB.dtype) - 1
    return -F.logsigmoid(z_BB * logits_BB).sum() / img_BD.shape[0]


# ----------------------------------------------------------------------------- chunked torch path
# Each function takes a strip: a_MD (rows) against b_ND (all columns), features in any float dtype
# (computed in fp32), scale / bias as 0-dim tensors. They return fp32 (fp64 for column sums).


def chunked_clip_forward(a_MD, b_ND, scale, chunk_size):
    """Row log-sum-exps (M,) fp32 and per-column sum_i exp(l_ij) over these rows (N,) fp64."""
    M, N = a_MD.shape[0], b_ND.shape[0]
    bT_DN = b_ND.float().T
    row_lse_M = torch.empty(M, device=a_MD.device)
    col_sumexp_N = torch.zeros(N, device=a_MD.device, dtype=torch.float64)
    logits_buf, tmp = _Buffer(M, N, chunk_size, a_MD.device), _Buffer(M, COL_BLOCK, chunk_size, a_MD.device)
    for r0 in range(0, M, chunk_size):
        r1 = min(r0 + chunk_size, M)
        logits_cN = torch.mm(a_MD[r0:r1].float() * scale, bT_DN, out=logits_buf.get(r1 - r0, N))
        rmax_c = logits_cN.amax(1)
        rsum_c = torch.zeros_like(rmax_c)
        for c0 in range(0, N, COL_BLOCK):  # exp temporaries a column block at a time
            c1 = min(c0 + COL_BLOCK, N)
            logits_cw = logits_cN[:, c0:c1]
            rsum_c += torch.sub(logits_cw, rmax_c[:, None], out=tmp.get(r1 - r0, c1 - c0)).exp_().sum(1)
            cmax_w = logits_cw.amax(0)
            e_cw = torch.sub(logits_cw, cmax_w[None, :], out=tmp.get(r1 - r0, c1 - c0)).exp_()
            col_sumexp_N[c0:c1] += e_cw.sum(0).double() * cmax_w.double().exp()
        row_lse_M[r0:r1] = rsum_c.log_().add_(rmax_c)
    return row_lse_M, col_sumexp_N


def chunked_clip_backward(a_MD, b_ND, scale, row_lse_M, col_lse_N, chunk_size):
    """da = s * (P + Q) @ b and db = s * (P + Q)^T @ a for this strip (fp32, diagonal terms excluded)."""
    M, N = a_MD.shape[0], b_ND.shape[0]
    b_ND = b_ND.float()
    da_MD = torch.empty(M, b_ND.shape[1], device=a_MD.device)
    db_ND = torch.zeros_like(b_ND)
    g_buf, tmp = _Buffer(M, N, chunk_size, a_MD.device), _Buffer(M, COL_BLOCK, chunk_size, a_MD.device)
    for r0 in range(0, M, chunk_size):
        r1 = min(r0 + chunk_size, M)
        sa_cD = a_MD[r0:r1].float() * scale
        g_cN = torch.mm(sa_cD, b_ND.T, out=g_buf.get(r1 - r0, N))  # logits, then G = P + Q in place
        for c0 in range(0, N, COL_BLOCK):
            c1 = min(c0 + COL_BLOCK, N)
            p_cw = torch.sub(g_cN[:, c0:c1], row_lse_M[r0:r1, None], out=tmp.get(r1 - r0, c1 - c0)).exp_()
            g_cN[:, c0:c1].sub_(col_lse_N[None, c0:c1]).exp_().add_(p_cw)
        torch.mm(g_cN, b_ND, out=da_MD[r0:r1]).mul_(scale)
        db_ND.addmm_(g_cN.T, sa_cD)
    return da_MD, db_ND


def chunked_siglip_forward(a_MD, b_ND, scale, bias, chunk_size):
    """sum_ij softplus(l_ij + b) and sum_ij sigmoid(l_ij + b) over this strip (fp64 scalars)."""
    M, N = a_MD.shape[0], b_ND.shape[0]
    bT_DN = b_ND.float().T
    softplus_sum = torch.zeros((), device=a_MD.device, dtype=torch.float64)
    sigmoid_sum = torch.zeros((), device=a_MD.device, dtype=torch.float64)
    logits_buf, tmp = _Buffer(M, N, chunk_size, a_MD.device), _Buffer(M, COL_BLOCK, chunk_size, a_MD.device)
    for r0 in range(0, M, chunk_size):
        r1 = min(r0 + chunk_size, M)
        logits_cN = torch.mm(a_MD[r0:r1].float() * scale, bT_DN, out=logits_buf.get(r1 - r0, N)).add_(bias)
        for c0 in range(0, N, COL_BLOCK):
            c1 = min(c0 + COL_BLOCK, N)
            sp_cw = torch._C._nn.softplus(logits_cN[:, c0:c1], 1.0, 20.0, out=tmp.get(r1 - r0, c1 - c0))
            softplus_sum += sp_cw.sum(dtype=torch.float64)
        sigmoid_sum += logits_cN.sigmoid_().sum(dtype=torch.float64)
    return softplus_sum, sigmoid_sum


def chunked_siglip_backward(a_MD, b_ND, scale, bias, chunk_size):
    """da = s * sigmoid(l + b) @ b and db = s * sigmoid(l + b)^T @ a for this strip (diagonal excluded)."""
    M, N = a_MD.shape[0], b_ND.shape[0]
    b_ND = b_ND.float()
    da_MD = torch.empty(M, b_ND.shape[1], device=a_MD.device)
    db_ND = torch.zeros_like(b_ND)
    g_buf = _Buffer(M, N, chunk_size, a_MD.device)
    for r0 in range(0, M, chunk_size):
        r1 = min(r0 + chunk_size, M)
        sa_cD = a_MD[r0:r1].float() * scale
        g_cN = torch.mm(sa_cD, b_ND.T, out=g_buf.get(r1 - r0, N)).add_(bias).sigmoid_()
        torch.mm(g_cN, b_ND, out=da_MD[r0:r1]).mul_(scale)
        db_ND.addmm_(g_cN.T, sa_cD)
    return da_MD, db_ND


class _Buffer:
    """One preallocated fp32 work buffer of min(chunk, M) x cols, handed out as contiguous (rows, cols) views.

    Reused by every chunk: a fresh tensor per chunk would keep the previous chunk's alive while the
    next is computed (one buffer more at the peak)."""

    def __init__(self, M, cols, chunk_size, device):
        self.flat = torch.empty(min(chunk_size, M) * cols, device=device)

    def get(self, rows, cols):
        return self.flat[: rows * cols].view(rows, cols)


class _ChunkedOps:
    clip_forward = staticmethod(chunked_clip_forward)
    clip_backward = staticmethod(chunked_clip_backward)
    siglip_forward = staticmethod(chunked_siglip_forward)
    siglip_backward = staticmethod(chunked_siglip_backward)


def _ops(impl):
    if impl == "chunked":
        return _ChunkedOps
    if impl == "triton":
        return TritonOps
    raise ValueError(f"loss.impl must be one of {IMPLS} (got {impl!r})")


def _rowdot(x_bD, y_bD):
    """(b,) fp32 row-wise dot products without a (b, D) temporary."""
    return torch.bmm(x_bD.float()[:, None, :], y_bD.float()[:, :, None]).flatten()


def _check_logit_range(img_bD, txt_BD, scale):
    """Raise if |logits| may leave the float64 accumulator's range (CPU only: on CUDA this would sync; and not
    while torch.compile traces, where reading the bound would break the graph)."""
    if img_bD.is_cuda or torch.compiler.is_compiling():
        return
    bound = float(scale) * img_bD.float().norm(dim=-1).max() * txt_BD.float().norm(dim=-1).max()
    if bound > MAX_ABS_LOGIT:
        raise ValueError(
            f"loss: logits may reach {float(bound):.0f} (logit_scale {float(scale):.3g} x feature norms); the tiled "
            f"loss needs |logit| < {MAX_ABS_LOGIT:.0f}: normalize the features and clamp logit_scale (CLIP: <= 100)"
        )


# ----------------------------------------------------------------------------- autograd functions


class _ClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_bD, txt_bD, scale, group, impl, chunk_size):
        world, rank = world_rank(group)
        b = img_bD.shape[0]
        B, off = b * world, rank * b
        ops = _ops(impl)
        txt_BD = all_gather(txt_bD, group)  # collective: all-gather the texts (B, D)
        _check_logit_range(img_bD, txt_BD, scale)
        s = scale.detach().float()
        row_lse_b, col_sumexp_B = ops.clip_forward(img_bD, txt_BD, s, chunk_size)
        pos_b = s * _rowdot(img_bD, txt_BD[off : off + b])  # l_ii of the local pairs
        # Row terms of the local images (each positive counted in both directions) ride with the column sums.
        stats = torch.cat([col_sumexp_B, (row_lse_b.double() - 2 * pos_b.double()).sum()[None]])
        all_reduce_sum(stats, group)  # collective: complete column sums + loss (B + 1 fp64 numbers)
        col_lse_B = stats[:B].log()
        loss = (stats[B] + col_lse_B.sum()) / (2 * B)
        ctx.save_for_backward(img_bD, txt_BD, scale, row_lse_b, col_lse_B.float())
        ctx.group, ctx.impl, ctx.chunk_size = group, impl, chunk_size
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        img_bD, txt_BD, scale, row_lse_b, col_lse_B = ctx.saved_tensors
        world, rank = world_rank(ctx.group)
        b = img_bD.shape[0]
        B, off = b * world, rank * b
        s = scale.detach().float()
        dimg_bD, dtxt_BD = _ops(ctx.impl).clip_backward(img_bD, txt_BD, s, row_lse_b, col_lse_B, ctx.chunk_size)
        # Diagonal: -2 [i=j] in (P + Q - 2 [i=j]) / (2B).
        dimg_bD.addcmul_(txt_BD[off : off + b], -2 * s)  # in place: no (b, D) temporaries
        dtxt_BD[off : off + b].addcmul_(img_bD, -2 * s)
        coef = grad_loss.float() * world / (2 * B)  # x world: the engine averages over ranks (docstring)
        dscale = torch.dot(img_bD.float().flatten(), dimg_bD.flatten()) / s * coef
        dimg_bD.mul_(coef)
        dtxt_bD = reduce_scatter_sum(dtxt_BD.mul_(coef), ctx.group)  # collective: sum text grads onto owners
        return dimg_bD.to(img_bD.dtype), dtxt_bD.to(txt_BD.dtype), dscale.to(scale.dtype), None, None, None


class _SiglipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_bD, txt_bD, scale, bias, group, impl, chunk_size):
        world, rank = world_rank(group)
        b = img_bD.shape[0]
        B, off = b * world, rank * b
        txt_BD = all_gather(txt_bD, group)  # collective: all-gather the texts (B, D)
        s, bb = scale.detach().float(), bias.detach().float()
        softplus_sum, sigmoid_sum = _ops(impl).siglip_forward(img_bD, txt_BD, s, bb, chunk_size)
        pos_b = s * _rowdot(img_bD, txt_BD[off : off + b]) + bb  # l_ii + b of the local pairs
        stats = torch.stack([softplus_sum - pos_b.double().sum(), sigmoid_sum])
        all_reduce_sum(stats[:1], group)  # collective: the loss (the sigmoid sum stays local, for db)
        ctx.save_for_backward(img_bD, txt_BD, scale, bias, stats[1])
        ctx.group, ctx.impl, ctx.chunk_size = group, impl, chunk_size
        return (stats[0] / B).float()

    @staticmethod
    def backward(ctx, grad_loss):
        img_bD, txt_BD, scale, bias, sigmoid_sum = ctx.saved_tensors
        world, rank = world_rank(ctx.group)
        b = img_bD.shape[0]
        B, off = b * world, rank * b
        s, bb = scale.detach().float(), bias.detach().float()
        dimg_bD, dtxt_BD = _ops(ctx.impl).siglip_backward(img_bD, txt_BD, s, bb, ctx.chunk_size)
        dimg_bD.addcmul_(txt_BD[off : off + b], -s)  # diagonal: -[i=j] in (sigmoid - [i=j]) / B
        dtxt_BD[off : off + b].addcmul_(img_bD, -s)
        coef = grad_loss.float() * world / B  # x world: the engine averages over ranks (docstring)
        dscale = torch.dot(img_bD.float().flatten(), dimg_bD.flatten()) / s * coef
        dbias = (sigmoid_sum - b).float() * coef
        dimg_bD.mul_(coef)
        dtxt_bD = reduce_scatter_sum(dtxt_BD.mul_(coef), ctx.group)  # collective: sum text grads onto owners
        grads = dimg_bD.to(img_bD.dtype), dtxt_bD.to(txt_BD.dtype), dscale.to(scale.dtype), dbias.to(bias.dtype)
        return *grads, None, None, None


# ----------------------------------------------------------------------------- entry points


def _as_tensor(x, like):
    return x if torch.is_tensor(x) else torch.tensor(float(x), device=like.device)


def tiled_clip_loss(img_bD, txt_bD, logit_scale, group=None, impl="chunked", chunk_size=1024):
    """CLIP loss over the global batch from local normalized features; impl: triton | chunked | naive.

    group: a process group (None = no communication). Returns a 0-dim fp32 tensor, equal on all ranks.
    """
    logit_scale = _as_tensor(logit_scale, img_bD)
    if impl == "naive":
        img_BD, txt_BD = (gather_with_grad(x, group) for x in (img_bD, txt_bD))
        return clip_loss_reference(img_BD.float(), txt_BD.float(), logit_scale.float())
    return _ClipLoss.apply(img_bD, txt_bD, logit_scale, group, impl, chunk_size)


def tiled_siglip_loss(img_bD, txt_bD, logit_scale, logit_bias, group=None, impl="chunked", chunk_size=1024):
    """SigLIP loss over the global batch (sum over all pairs / B); same conventions as tiled_clip_loss."""
    logit_scale, logit_bias = _as_tensor(logit_scale, img_bD), _as_tensor(logit_bias, img_bD)
    if impl == "naive":
        img_BD, txt_BD = (gather_with_grad(x, group) for x in (img_bD, txt_bD))
        return siglip_loss_reference(img_BD.float(), txt_BD.float(), logit_scale.float(), logit_bias.float())
    return _SiglipLoss.apply(img_bD, txt_bD, logit_scale, logit_bias, group, impl, chunk_size)


# ----------------------------------------------------------------------------- UniCL: CLIP with label targets
# UniCL (Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space"): samples sharing a label
# are all positives, in both directions. With c_i the label of pair i, n_c the number of pairs labelled c in the
# global batch and T_ij = [c_i = c_j] / n_{c_i} (each row and column of T sums to 1; T is symmetric):
#
#     L = 1/(2B) * sum_i [ lse_j(l_ij) - sum_j T_ij l_ij ]  +  1/(2B) * sum_j [ lse_i(l_ij) - sum_i T_ij l_ij ]
#     dL/dl_ij = (P_ij + Q_ij - 2 T_ij) / (2B)
#
# The log-sum-exps are CLIP's (same tiled kernels). T never exists as a matrix: with per-label sums
# Ysum_c = sum_{j: c_j = c} y_j and Xsum_c (index_add, U <= B rows),
#     sum_j T_ij l_ij = s x_i . Ysum_{c_i} / n_{c_i}        (row i's positive term; summed over rows
#     sum_i T_ij l_ij = s y_j . Xsum_{c_j} / n_{c_j}         both equal s sum_c Xsum_c . Ysum_c / n_c)
# so the loss needs one (b, D) "mean positive text" per local image, and the T part of the gradient is
# dx_i = s Ysum_{c_i} / n_{c_i}, dy_j = s Xsum_{c_j} / n_{c_j}. All-distinct labels give T = I, Ysum_{c_i} = y_i
# exactly (one addend into zeros), and this is CLIP's loss bit for bit.
# Labels are int64 keys (any values; equal = same label). They are all-gathered (B int64) and mapped to slots
# without a host sync: slot of key k = its position in the sorted keys' first occurrence (searchsorted), in [0, B).
# Distributed: rank r sums its own images per label into a (B, D) buffer; each text j gets that partial
# Xsum_{c_j} / n_{c_j} added to its strip gradient, and the existing reduce-scatter sums the ranks' parts.
# Memory: O(B*D) (the per-label sums), like the gathered texts.


def unicl_loss_reference(img_BD, txt_BD, logit_scale, labels_B):
    """Full-matrix UniCL loss (soft targets T = same-label mask / row count); plain autograd, O(B^2) memory."""
    logits_BB = logit_scale * img_BD @ txt_BD.T
    same_BB = (labels_B[:, None] == labels_B[None, :]).to(logits_BB.dtype)
    target_BB = same_BB / same_BB.sum(1, keepdim=True)  # symmetric: same-label rows have the same count
    return 0.5 * (F.cross_entropy(logits_BB, target_BB) + F.cross_entropy(logits_BB.T, target_BB))


def label_slots(labels_B):
    """(B,) int64 keys -> (slots (B,) in [0, B), count_B fp32: pairs per slot); no host sync.

    A label's slot is the sorted position of its first occurrence, so equal keys share a slot; slots that
    no label uses have count 0 (never read)."""
    sorted_B, _ = labels_B.sort()
    slots_B = torch.searchsorted(sorted_B, labels_B)
    count_B = torch.zeros(labels_B.shape[0], device=labels_B.device).index_add_(
        0, slots_B, torch.ones(labels_B.shape[0], device=labels_B.device)
    )
    return slots_B, count_B


def _label_mean(x_ND, slots_N, count_B, B):
    """(B, D) fp32: per slot, the sum of the rows x_ND with that slot divided by the slot's global count."""
    sum_BD = torch.zeros(B, x_ND.shape[1], device=x_ND.device).index_add_(0, slots_N, x_ND.float())
    return sum_BD.div_(count_B.clamp(min=1)[:, None])


class _UniclLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_bD, txt_bD, scale, labels_b, group, impl, chunk_size):
        world, rank = world_rank(group)
        b = img_bD.shape[0]
        B, off = b * world, rank * b
        ops = _ops(impl)
        txt_BD = all_gather(txt_bD, group)  # collective: all-gather the texts (B, D)
        labels_B = all_gather(labels_b.to(device=img_bD.device, dtype=torch.int64), group)  # collective: (B,)
        slots_B, count_B = label_slots(labels_B)
        _check_logit_range(img_bD, txt_BD, scale)
        s = scale.detach().float()
        row_lse_b, col_sumexp_B = ops.clip_forward(img_bD, txt_BD, s, chunk_size)
        # Mean of the positive texts of each local image: Ysum_{c_i} / n_{c_i} (b, D).
        pos_txt_bD = _label_mean(txt_BD, slots_B, count_B, B)[slots_B[off : off + b]]
        pos_b = s * _rowdot(img_bD, pos_txt_bD)  # sum_j T_ij l_ij of the local rows (= the columns' total)
        stats = torch.cat([col_sumexp_B, (row_lse_b.double() - 2 * pos_b.double()).sum()[None]])
        all_reduce_sum(stats, group)  # collective: complete column sums + loss (B + 1 fp64 numbers)
        col_lse_B = stats[:B].log()
        loss = (stats[B] + col_lse_B.sum()) / (2 * B)
        ctx.save_for_backward(img_bD, txt_BD, scale, row_lse_b, col_lse_B.float(), pos_txt_bD, slots_B, count_B)
        ctx.group, ctx.impl, ctx.chunk_size = group, impl, chunk_size
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        img_bD, txt_BD, scale, row_lse_b, col_lse_B, pos_txt_bD, slots_B, count_B = ctx.saved_tensors
        world, rank = world_rank(ctx.group)
        b = img_bD.shape[0]
        B, off = b * world, rank * b
        s = scale.detach().float()
        dimg_bD, dtxt_BD = _ops(ctx.impl).clip_backward(img_bD, txt_BD, s, row_lse_b, col_lse_B, ctx.chunk_size)
        # Targets: -2 T_ij in (P + Q - 2 T) / (2B); texts get this rank's images' share (summed by the scatter).
        dimg_bD.addcmul_(pos_txt_bD, -2 * s)
        pos_img_BD = _label_mean(img_bD, slots_B[off : off + b], count_B, B)[slots_B]  # (B, D), 0 off this rank
        dtxt_BD.addcmul_(pos_img_BD, -2 * s)
        del pos_img_BD
        coef = grad_loss.float() * world / (2 * B)  # x world: the engine averages over ranks (docstring)
        dscale = torch.dot(img_bD.float().flatten(), dimg_bD.flatten()) / s * coef
        dimg_bD.mul_(coef)
        dtxt_bD = reduce_scatter_sum(dtxt_BD.mul_(coef), ctx.group)  # collective: sum text grads onto owners
        return dimg_bD.to(img_bD.dtype), dtxt_bD.to(txt_BD.dtype), dscale.to(scale.dtype), None, None, None, None


def tiled_unicl_loss(img_bD, txt_bD, logit_scale, labels_b, group=None, impl="chunked", chunk_size=1024):
    """UniCL loss over the global batch: pairs with equal labels are all positives (see the section comment).

    labels_b: (b,) int64 label keys of this rank's pairs (equal keys = same label; any values). All-distinct
    labels give exactly tiled_clip_loss. Same conventions (group, impl, gradient contract) as tiled_clip_loss.
    """
    logit_scale = _as_tensor(logit_scale, img_bD)
    if labels_b.shape != (img_bD.shape[0],):
        raise ValueError(f"unicl: labels must have shape ({img_bD.shape[0]},) (got {tuple(labels_b.shape)})")
    if impl == "naive":
        img_BD, txt_BD = (gather_with_grad(x, group) for x in (img_bD, txt_bD))
        labels_B = all_gather(labels_b.to(device=img_bD.device, dtype=torch.int64), group)
        return unicl_loss_reference(img_BD.float(), txt_BD.float(), logit_scale.float(), labels_B)
    return _UniclLoss.apply(img_bD, txt_bD, logit_scale, labels_b, group, impl, chunk_size)
