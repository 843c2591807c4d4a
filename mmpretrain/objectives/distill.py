"""Distillation from a larger frozen teacher: KL between the teacher's and the student's in-batch similarity
distributions over the global batch, both directions, plus optional feature regression (CLIP-KD style).

    loss:
      terms:
        clip: {weight: 1.0}
        distill: {weight: 1.0, teacher: /ckpt/ViT-L-14-hf, precision: bf16, feature_weight: 0.0}

Math (x / y student image / text features, u / v the teacher's, all L2-normalized; a the student's scale,
c the teacher's; B the global batch):

    s_ij = a x_i.y_j          t_ij = c u_i.v_j
    KL_i  = sum_j P_ij (log P_ij - log Q_ij),   P = row softmax of t, Q = row softmax of s   (image -> text)
    KL'_j = sum_i P'_ij (log P'_ij - log Q'_ij), P', Q' column softmaxes                    (text -> image)
    L = (sum_i KL_i + sum_j KL'_j) / (2B)
    dL/ds_ij = (Q_ij - P_ij + Q'_ij - P'_ij) / (2B)
    dx_i = a sum_j G_ij y_j,  dy_j = a sum_i G_ij x_i,  da = sum_ij G_ij x_i.y_j  (G = dL/ds)

Per row, with the row's log-sum-exps, KL_i = sum_j P_ij (t_ij - s_ij) - lse_j(t_ij) + lse_j(s_ij): one pass over a
row gives it, so a chunk of rows x all B columns is the largest block ever built (a few chunk x B fp32 buffers,
forward and backward; backward recomputes each chunk from the features and the saved log-sum-exps).

Temperatures: by default the teacher's distribution uses the teacher's own (exp'd) logit scale and the student's
uses the student's learnable one (which this term then also trains); ``temperature: T`` puts both at 1/T (fixed: the
student's scale gets no gradient from this term). A SigLIP teacher's scale is used as is (its bias shifts every
logit of a row equally, so the softmax ignores it). No T^2 factor (Hinton's): the scale is learned or chosen.

Distributed (b rows per rank, B = b * world). Student and teacher features of both modalities are all-gathered
(4 x B x D, small next to the towers); each rank computes the complete rows of its own images (x all texts) and of
its own texts (x all images), so every KL row is finished locally and one all-reduce of a number completes the loss.
Columns are thus recomputed as rows on the rank that owns them: twice the matrix products of a one-strip scheme,
but no cross-rank partial column sums of two distributions and of the P'(t - s) term. Backward: each rank's rows
give the full gradient of its own queries and partial gradients of every key, which a reduce-scatter sums onto the
owner; all of it times N (the engine averages over ranks: see mmpretrain.objectives.base).

The teacher: built once in ``setup`` from any folder ``mmpretrain.eval`` can load (run, step, consolidated,
HF CLIP/SigLIP, OpenCLIP; mmpretrain.convert.read_any), outside the DeepSpeed engine (never sharded, never in the
optimizer), in eval mode with requires_grad off, run under no_grad in ``precision`` (bf16 by default; its logit
scale and bias stay fp32). bf16 measured 1.2x faster than fp32 for the teacher's forward on this project's CPUs
(avx512_bf16; tiny at batch 128 and ViT-B-32 at batch 16, features within cosine 0.9999), and ~2x less memory.
Every rank loads the whole teacher: prefer a consolidated or HF folder over a DeepSpeed run for a big teacher.
- Images: the student's normalized batch, resized to the teacher's image_size (bicubic, antialiased) when the
  sizes differ. Resizing is linear, so it commutes with the per-channel normalization; every model here takes
  CLIP-normalized images (mmpretrain.data.transforms.normalize_images, as in mmpretrain.eval), so no re-normalization.
- Text: the student's token ids (our CLIP BPE tokenizer). A teacher whose vocabulary differs is refused (ids would
  mean other tokens; re-tokenizing would need the raw captions, which the batch does not carry). A different
  context length is handled exactly as the tokenizer would at the teacher's length: shorter rows are padded with 0,
  longer rows are cut with EOT kept in the last position (captions longer than the student's context lose the
  same tokens they lost for the student).

Feature regression (feature_weight > 0): each student feature (image and text) is compared with the teacher's,
through a learned linear projection (head ``distill``, trained with the student) when the widths differ; cosine:
1 - cos, mse: squared distance summed over dims; the mean over samples of both modalities (a local term).

Shapes: b local batch, B global batch, D student width, E teacher width, m / n rows / columns of a strip.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain import convert
from mmpretrain.convert.common import drop_heads
from mmpretrain.data.tokenizer import EOT_ID, PAD_ID, VOCAB_SIZE
from mmpretrain.distributed import all_gather, all_reduce, global_mean, reduce_scatter, world_rank
from mmpretrain.model import build_model, resolve_model_config
from mmpretrain.objectives.base import StepContext, Term, register
from mmpretrain.objectives.config import DistillTermConfig

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}  # DistillTermConfig.precision -> the teacher's dtype


# ----------------------------------------------------------------------------- the KL over the global batch


def _rows_forward(q_mD, k_nD, a, tq_mE, tk_nE, c, chunk_size):
    """KL rows of queries q against all keys k: (sum of KL_i in fp64, student row lse (m,), teacher row lse (m,))."""
    m = q_mD.shape[0]
    lse_s_m = torch.empty(m, device=q_mD.device)
    lse_t_m = torch.empty(m, device=q_mD.device)
    total = torch.zeros((), dtype=torch.float64, device=q_mD.device)
    for r0 in range(0, m, chunk_size):
        r1 = min(r0 + chunk_size, m)
        s_cn = (q_mD[r0:r1] @ k_nD.T).mul_(a)
        t_cn = (tq_mE[r0:r1] @ tk_nE.T).mul_(c)
        lse_s_m[r0:r1], lse_t_m[r0:r1] = s_cn.logsumexp(1), t_cn.logsumexp(1)
        p_cn = (t_cn - lse_t_m[r0:r1, None]).exp_()
        kl_c = (p_cn * t_cn.sub_(s_cn)).sum(1) - lse_t_m[r0:r1] + lse_s_m[r0:r1]
        total += kl_c.double().sum()
    return total, lse_s_m, lse_t_m


def _rows_backward(q_mD, k_nD, a, tq_mE, tk_nE, c, lse_s_m, lse_t_m, chunk_size):
    """Gradients of sum_i KL_i w.r.t. q (m, D), k (n, D) and the student scale a (unscaled by 1/(2B))."""
    dq_mD, dk_nD = torch.empty_like(q_mD), torch.zeros_like(k_nD)
    da = torch.zeros((), dtype=torch.float64, device=q_mD.device)
    for r0 in range(0, q_mD.shape[0], chunk_size):
        r1 = min(r0 + chunk_size, q_mD.shape[0])
        raw_cn = q_mD[r0:r1] @ k_nD.T  # x_i.y_j, recomputed
        g_cn = (raw_cn * a - lse_s_m[r0:r1, None]).exp_()  # Q
        g_cn -= ((tq_mE[r0:r1] @ tk_nE.T).mul_(c) - lse_t_m[r0:r1, None]).exp_()  # G = Q - P
        da += (g_cn * raw_cn).sum().double()
        torch.mm(g_cn, k_nD, out=dq_mD[r0:r1]).mul_(a)
        dk_nD.addmm_(g_cn.T, q_mD[r0:r1])
    return dq_mD, dk_nD.mul_(a), da


class _DistillKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img_bD, txt_bD, scale, t_img_bE, t_txt_bE, t_scale, group, chunk_size):
        world, rank = world_rank(group)
        b = img_bD.shape[0]
        B = b * world
        ctx.dtypes = img_bD.dtype, txt_bD.dtype, scale.dtype
        img_bD, txt_bD = img_bD.float(), txt_bD.float()
        t_img_bE, t_txt_bE = t_img_bE.float(), t_txt_bE.float()
        # collectives: student and teacher features of both modalities (B, D) / (B, E)
        img_BD, txt_BD = all_gather(img_bD, group), all_gather(txt_bD, group)
        t_img_BE, t_txt_BE = all_gather(t_img_bE, group), all_gather(t_txt_bE, group)
        a, c = scale.detach().float(), t_scale.detach().float()
        kl_i, lse_si, lse_ti = _rows_forward(img_bD, txt_BD, a, t_img_bE, t_txt_BE, c, chunk_size)  # image rows
        kl_t, lse_st, lse_tt = _rows_forward(txt_bD, img_BD, a, t_txt_bE, t_img_BE, c, chunk_size)  # text rows
        total = all_reduce((kl_i + kl_t)[None], group=group)  # collective: every row of the global batch
        ctx.save_for_backward(img_BD, txt_BD, t_img_BE, t_txt_BE, a, c, lse_si, lse_ti, lse_st, lse_tt)
        ctx.group, ctx.chunk_size, ctx.b = group, chunk_size, b
        return (total[0] / (2 * B)).float()

    @staticmethod
    def backward(ctx, grad_loss):
        img_BD, txt_BD, t_img_BE, t_txt_BE, a, c, lse_si, lse_ti, lse_st, lse_tt = ctx.saved_tensors
        world, rank = world_rank(ctx.group)
        b, chunk = ctx.b, ctx.chunk_size
        B, own = b * world, slice(rank * b, (rank + 1) * b)
        dimg_bD, dtxt_BD, da_i = _rows_backward(img_BD[own], txt_BD, a, t_img_BE[own], t_txt_BE, c, lse_si, lse_ti,
                                                chunk)  # fmt: skip
        dtxt_bD, dimg_BD, da_t = _rows_backward(txt_BD[own], img_BD, a, t_txt_BE[own], t_img_BE, c, lse_st, lse_tt,
                                                chunk)  # fmt: skip
        dimg_BD[own] += dimg_bD
        dtxt_BD[own] += dtxt_bD
        coef = grad_loss.float() * world / (2 * B)  # x world: the engine averages over ranks
        dimg_bD = reduce_scatter(dimg_BD.mul_(coef), ctx.group)  # collective: sum key grads onto owners
        dtxt_bD = reduce_scatter(dtxt_BD.mul_(coef), ctx.group)  # collective
        dscale = ((da_i + da_t).float() * coef) if ctx.needs_input_grad[2] else None
        di, dt, ds = ctx.dtypes
        return dimg_bD.to(di), dtxt_bD.to(dt), None if dscale is None else dscale.to(ds), None, None, None, None, None


def distill_kl(img_bD, txt_bD, scale, t_img_bE, t_txt_bE, t_scale, group=None, chunk_size=1024) -> torch.Tensor:
    """Symmetric in-batch KL(teacher || student) over the global batch (module docstring); 0-dim fp32, the same on
    every rank; gradients (student features, student scale) N x this rank's share. group: None = the world's when
    torch.distributed is initialized, else no communication (mmpretrain.distributed).
    Teacher inputs get no gradient."""
    scale = scale if torch.is_tensor(scale) else torch.tensor(float(scale), device=img_bD.device)
    t_scale = t_scale if torch.is_tensor(t_scale) else torch.tensor(float(t_scale), device=img_bD.device)
    return _DistillKL.apply(img_bD, txt_bD, scale, t_img_bE.detach(), t_txt_bE.detach(), t_scale.detach(), group,
                            chunk_size)  # fmt: skip


# ----------------------------------------------------------------------------- teacher inputs


def fit_context(tokens_bL: torch.Tensor, context_length: int) -> torch.Tensor:
    """Token rows (our tokenizer's layout: SOT body EOT, 0-padded) at another context length, exactly as the
    tokenizer lays them out there: padded with 0, or cut with EOT (the largest id) kept in the last position."""
    L = tokens_bL.shape[1]
    if L == context_length:
        return tokens_bL
    if L < context_length:
        return F.pad(tokens_bL, (0, context_length - L), value=PAD_ID)
    out_bL = tokens_bL[:, :context_length].clone()
    cut_b = tokens_bL.argmax(-1) >= context_length  # EOT fell off: the caption is longer than the teacher's context
    out_bL[cut_b, -1] = EOT_ID
    return out_bL


def fit_images(images_bCHW: torch.Tensor, image_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalized images at the teacher's side (bicubic, antialiased when shrinking), in dtype."""
    if images_bCHW.shape[-1] != image_size or images_bCHW.shape[-2] != image_size:
        images_bCHW = F.interpolate(images_bCHW.float(), size=(image_size, image_size), mode="bicubic",
                                    align_corners=False, antialias=True)  # fmt: skip
    return images_bCHW.to(dtype)


class FeatureProjection(nn.Module):
    """Student features -> the teacher's width (one bias-free linear per modality), for feature regression."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.image = nn.Linear(student_dim, teacher_dim, bias=False)
        self.text = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, image_bD: torch.Tensor, text_bD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image (b, E), text (b, E)) in the input's dtype."""
        return self.image(image_bD.to(self.image.weight.dtype)), self.text(text_bD.to(self.text.weight.dtype))


def feature_regression(student_bE: torch.Tensor, teacher_bE: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss (b,) between (projected) student and teacher features, fp32."""
    s, t = student_bE.float(), teacher_bE.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).sum(-1)


# ----------------------------------------------------------------------------- the term


@register
class DistillTerm(Term):
    """KL between teacher and student in-batch similarity distributions (both directions) + feature regression."""

    name = "distill"
    config_cls = DistillTermConfig

    def __init__(self, cfg: DistillTermConfig, run_cfg):
        super().__init__(cfg, run_cfg)
        self.teacher: Optional[nn.Module] = None
        self.teacher_cfg = None  # the teacher's resolved ModelConfig
        self._source = None  # (state dict, Config) between build_head and setup

    def _prefix(self) -> str:
        return f"loss.terms.{self.name}"

    def _read_teacher(self):
        """(fp32 state dict, Config), read once (build_head may need the teacher's width before setup)."""
        if self._source is None:
            try:
                # through the module: tests swap convert.read_any; cast in setup (the logit scale stays fp32)
                sd, cfg = convert.read_any(self.cfg.teacher, torch.float32, trust_pickles=self.cfg.trust_pickles)
            except ValueError as e:
                raise ValueError(f"{self._prefix()}.teacher: {e}") from None
            self._source = drop_heads(sd, self.cfg.teacher)  # a run's training-only objective heads (heads.<term>.*)
            self.teacher_cfg = resolve_model_config(cfg.model)
            self._check_text(self.teacher_cfg)
        return self._source

    def _check_text(self, t_cfg) -> None:
        """The teacher's text tower must take our token ids (the student's tokenizer)."""
        s_vocab = self.run_cfg.model.text.vocab_size
        if t_cfg.text.vocab_size != VOCAB_SIZE or (s_vocab is not None and s_vocab != t_cfg.text.vocab_size):
            raise ValueError(
                f"{self._prefix()}.teacher: its text tower has vocab_size {t_cfg.text.vocab_size}, but the student's "
                f"tokens come from our CLIP BPE tokenizer ({VOCAB_SIZE} ids; student vocab_size {s_vocab}); "
                "distillation needs a teacher with the same tokenizer (re-tokenization is not implemented)"
            )

    def _student_dim(self) -> int:
        return resolve_model_config(self.run_cfg.model).embed_dim

    def build_head(self, model: nn.Module) -> nn.Module | None:
        if self.cfg.feature_weight == 0:
            return None
        self._read_teacher()
        d, e = self._student_dim(), self.teacher_cfg.embed_dim
        return FeatureProjection(d, e) if d != e else None

    def setup(self, device: torch.device) -> None:
        sd = self._read_teacher()
        with torch.device("meta"):  # no init (and no draw from the run's RNG stream); the weights replace it
            teacher = build_model(self.teacher_cfg)
        try:
            teacher.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{self._prefix()}.teacher: {str(e).splitlines()[0]}") from None
        teacher = teacher.to(device=device, dtype=PRECISIONS[self.cfg.precision]).eval().requires_grad_(False)
        for name in ("logit_scale", "logit_bias"):  # stay fp32: bf16 would move a scale of 100 by ~1%
            if isinstance(getattr(teacher, name, None), nn.Parameter):
                getattr(teacher, name).data = sd[name].to(device=device, dtype=torch.float32)
        self.teacher, self._source = teacher, None

    @torch.no_grad()
    def teacher_forward(self, images_bCHW: torch.Tensor, tokens_bL: torch.Tensor):
        """The teacher's ModelOutput on the student's batch (resized images, tokens at its context length)."""
        assert self.teacher is not None, "DistillTerm.setup(device) must run before the loss"
        v, t = self.teacher_cfg.vision, self.teacher_cfg.text
        images = fit_images(images_bCHW, v.image_size, PRECISIONS[self.cfg.precision])
        return self.teacher(images, fit_context(tokens_bL, t.context_length))

    def loss(self, ctx: StepContext) -> torch.Tensor:
        o = ctx.out
        t = self.teacher_forward(ctx.images, ctx.tokens)
        if self.cfg.temperature is not None:
            scale = t_scale = torch.tensor(1.0 / self.cfg.temperature, device=o.image_features.device)
        else:
            scale, t_scale = o.logit_scale, t.logit_scale
        group = ctx.group
        chunk = self.cfg.chunk_size or ctx.loss_cfg.chunk_size
        loss = distill_kl(o.image_features, o.text_features, scale, t.image_features, t.text_features, t_scale,
                          group=group, chunk_size=chunk)  # fmt: skip
        if self.cfg.feature_weight:
            img_bE, txt_bE = o.image_features, o.text_features
            if self._student_dim() != self.teacher_cfg.embed_dim:
                img_bE, txt_bE = ctx.model(head=self.name, image_bD=img_bE, text_bD=txt_bE)
            per_sample = torch.cat([feature_regression(img_bE, t.image_features, self.cfg.feature_loss),
                                    feature_regression(txt_bE, t.text_features, self.cfg.feature_loss)])  # fmt: skip
            loss = loss + self.cfg.feature_weight * global_mean(per_sample.mean(), group)  # local term
        return loss
