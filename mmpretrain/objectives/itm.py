"""Image-text matching (ALBEF / BLIP): a fusion encoder scores (image, text) pairs as match / no match.

    loss:
      terms:
        clip: {weight: 1.0}
        itm: {weight: 1.0, layers: 2}

The head (``model.heads["itm"]``, ITMHead): ``layers`` pre-LN blocks over the text token states, each
self-attention over the caption's tokens (bidirectional, padding masked), cross-attention to the image tokens
(LayerNorm'd and projected to the text width when the widths differ), and an MLP; then a final LayerNorm and a
2-way linear head on the FIRST text position (SOT: in the causal CLIP tower it has seen nothing, here its
bidirectional self-attention reads the whole caption, as ALBEF's [CLS]). Match score = logit[1] - logit[0]; at
evaluation the head re-ranks retrieval candidates by it (it implements mmpretrain.eval.retrieval.Reranker).

Per step, each rank scores 3b pairs of its b samples: (image i, text i) match; (image i, a hard negative text)
and (a hard negative image, text i) no match; loss = mean 2-way cross-entropy over the 3b pairs.

Hard negatives: from the contrastive similarities of the GLOBAL batch (features all-gathered without
gradient), one negative text per image with P(j) = softmax_j(scale * img_i . txt_j) over the texts that are
not a caption of i (j = i, every j whose caption is identical to i's and, when the data has class labels,
every j of i's class: exclude_same_label), likewise one image per text. The
draw is inverse-CDF with uniforms u (2, G) drawn from a generator seeded by (train.seed, step), the same on
every rank; each rank draws its own rows. So the chosen negatives depend only on the global features, the seed
and the step: N ranks choose what one rank holding the whole batch chooses.

Exchange: each rank then fetches ONLY the chosen rows' token states from the ranks owning them
(mmpretrain.distributed.fetch_rows: an all_to_all of the requested rows; every rank's token states are never
gathered); the backward sends the gradients of those rows back to their owners, who add them to their own.
Gradient contract: each rank returns the mean over its 3b pairs (a local term); the fetched rows carry the other
ranks' gradients home, so a rank's token states get N x their share of the global mean's gradient, and
DeepSpeed's average over ranks is exact.

Legend: b samples on this rank, G global batch (N ranks x b), E embedding width, L text length, N' image
tokens, Dv / Dt vision / text widths, F a flattened row, m rows fetched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.distributed import all_gather, fetch_rows, world_rank
from mmpretrain.kernels import attention
from mmpretrain.model.layers import MLP, LayerNorm
from mmpretrain.objectives.base import StepContext, Term, register, step_generator
from mmpretrain.objectives.config import ITMTermConfig

# ----------------------------------------------------------------------------- the fusion head


def text_valid_mask(tokens_BL: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True up to the last non-padding token (padding = trailing 0s, tokenizer PAD_ID)."""
    L = tokens_BL.shape[1]
    pos_L = torch.arange(L, device=tokens_BL.device)
    last_B = ((tokens_BL != 0) * pos_L).amax(1)  # SOT at 0 is never padding
    return pos_L[None, :] <= last_B[:, None]


def text_lengths(tokens_BL: torch.Tensor) -> torch.Tensor:
    """(B,) int64 number of valid positions (see text_valid_mask)."""
    return text_valid_mask(tokens_BL).sum(1)


def caption_hash(tokens_BL: torch.Tensor) -> torch.Tensor:
    """(B,) int64: equal for identical token rows (a fixed random linear hash; a collision is ~2^-40 rare)."""
    g = torch.Generator().manual_seed(1234567)
    coef_L = torch.randint(1, 2**31 - 1, (tokens_BL.shape[1],), generator=g).to(tokens_BL.device)
    return (tokens_BL.long() * coef_L).sum(1)  # ids < 2^17, coef < 2^31, L <= 2^15: no int64 overflow


class FusionBlock(nn.Module):
    """x + self_attn(ln(x)) (padding masked; causal for a decoder), x + cross_attn(ln(x), image), x + mlp(ln(x)):
    (B, L, D). ITM's fusion encoder and the caption decoder (objectives/caption.py) are stacks of it."""

    def __init__(self, width: int, heads: int, mlp_dim: int, impl: str, causal: bool = False):
        super().__init__()
        self.heads, self.impl, self.causal = heads, impl, causal
        self.ln_self = LayerNorm(width)
        self.self_qkv = nn.Linear(width, 3 * width)
        self.self_out = nn.Linear(width, width)
        self.ln_cross = LayerNorm(width)
        self.cross_q = nn.Linear(width, width)
        self.cross_kv = nn.Linear(width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.ln_mlp = LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, "gelu")

    def _split(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        return x_BND.view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def _merge(self, x_BHND: torch.Tensor) -> torch.Tensor:
        B, H, N, Dh = x_BHND.shape
        return x_BHND.transpose(1, 2).reshape(B, N, H * Dh)

    def forward(self, x_BLD, valid_BL, img_BND):
        q, k, v = self.self_qkv(self.ln_self(x_BLD)).chunk(3, dim=-1)
        a = attention(self._split(q), self._split(k), self._split(v), causal=self.causal, key_padding_mask=valid_BL,
                      impl=self.impl)  # fmt: skip
        x_BLD = x_BLD + self.self_out(self._merge(a))
        q = self.cross_q(self.ln_cross(x_BLD))
        k, v = self.cross_kv(img_BND).chunk(2, dim=-1)
        a = attention(self._split(q), self._split(k), self._split(v), impl=self.impl)
        x_BLD = x_BLD + self.cross_out(self._merge(a))
        return x_BLD + self.mlp(self.ln_mlp(x_BLD))


class ITMHead(nn.Module):
    """Fusion encoder + match head: (image tokens (B, N', Dv), text tokens (B, L, Dt), valid (B, L)) -> (B, 2)."""

    def __init__(self, image_width: int, text_width: int, layers: int, heads: int, mlp_dim: int, impl: str = "auto"):
        super().__init__()
        self.image_width, self.text_width = image_width, text_width
        # CLIP's image tokens are the encoder output before post_layernorm: normalize them here (for SigLIP's,
        # already normalized, it is one more affine LayerNorm)
        self.image_ln = LayerNorm(image_width)
        self.image_proj = nn.Linear(image_width, text_width) if image_width != text_width else nn.Identity()
        self.blocks = nn.ModuleList(FusionBlock(text_width, heads, mlp_dim, impl) for _ in range(layers))
        self.ln = LayerNorm(text_width)
        self.match = nn.Linear(text_width, 2)  # logits (no match, match)

    def forward(self, image_tokens, text_tokens, text_valid):
        img_BND = self.image_proj(self.image_ln(image_tokens))
        x_BLD = text_tokens
        for block in self.blocks:
            x_BLD = block(x_BLD, text_valid, img_BND)
        return self.match(self.ln(x_BLD[:, 0]))  # first text position (see the module docstring)

    # Re-ranking at evaluation: this head implements mmpretrain.eval.retrieval.Reranker.

    def match_scores(self, image_tokens, text_tokens, text_ids) -> torch.Tensor:
        """(B,) float32 match log-odds of B pairs: image token states, caption token states and the caption's ids."""
        return match_score(self(image_tokens, text_tokens, text_valid_mask(text_ids)))

    def dummy_forward(self, device) -> None:
        """One forward on a one-token dummy pair: keeps ZeRO-3's collectives in step on a rank out of pairs."""
        dtype = next(self.parameters()).dtype
        self(torch.zeros(1, 1, self.image_width, dtype=dtype, device=device),
             torch.zeros(1, 1, self.text_width, dtype=dtype, device=device),
             torch.ones(1, 1, dtype=torch.bool, device=device))  # fmt: skip


def match_score(logits_B2: torch.Tensor) -> torch.Tensor:
    """(B,) float32 log-odds of a match, the re-ranking score."""
    logits_B2 = logits_B2.float()
    return logits_B2[:, 1] - logits_B2[:, 0]


# ----------------------------------------------------------------------------- hard negative sampling


def step_uniforms(seed: int, step: int, num_global: int) -> torch.Tensor:
    """(2, G) float64 uniforms in [0, 1), the same on every rank: row 0 draws texts for images, row 1 images."""
    return torch.rand(2, num_global, generator=step_generator(seed, step), dtype=torch.float64)


@torch.no_grad()
def sample_hard_negatives(
    img_GE: torch.Tensor,
    txt_GE: torch.Tensor,
    scale: float,
    hash_G: torch.Tensor,
    rows_b: torch.Tensor,
    u_2b: torch.Tensor,
    chunk: int = 256,
    label_G: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices (b,), (b,): a negative text for each image of `rows_b`, a negative image for each text.

    Row i's candidates are the columns whose caption differs from i's (hash_G; this excludes i itself) and, with
    label_G, whose class label differs where both are labeled (>= 0); their
    probabilities are softmax(scale * similarity); inverse CDF at the row's uniform (u_2b[0] for the image->text
    draw, u_2b[1] for text->image) picks one. A row whose every other caption is the same falls back to
    uniform over j != i. Only (chunk, G) scores exist at a time.
    """
    out = []
    for direction, (query_GE, cand_GE) in enumerate(((img_GE, txt_GE), (txt_GE, img_GE))):
        picks = []
        for start in range(0, len(rows_b), chunk):
            r_c = rows_b[start : start + chunk]
            logits_cG = (query_GE[r_c].double() @ cand_GE.double().T) * scale
            cand_cG = hash_G[r_c, None] != hash_G[None, :]  # same caption (and i itself): a positive
            if label_G is not None:
                same_label_cG = (label_G[r_c, None] == label_G[None, :]) & (label_G[None, :] >= 0)
                cand_cG &= ~same_label_cG
            lonely_c1 = ~cand_cG.any(1, keepdim=True)
            not_self_cG = torch.arange(len(hash_G), device=r_c.device)[None, :] != r_c[:, None]
            cand_cG = torch.where(lonely_c1, not_self_cG, cand_cG)
            p_cG = torch.softmax(logits_cG.masked_fill(~cand_cG, -torch.inf), dim=1)
            cdf_cG = p_cG.cumsum(1)
            u_c1 = u_2b[direction, start : start + chunk].to(cdf_cG.device)[:, None]
            v_c1 = u_c1 * cdf_cG[:, -1:]  # < the total: u < 1 in float64
            # first column whose cdf exceeds v: its probability is > 0, so never a positive
            picks.append(torch.searchsorted(cdf_cG, v_c1, right=True)[:, 0].clamp(max=len(hash_G) - 1))
        out.append(torch.cat(picks))
    return out[0], out[1]


# ----------------------------------------------------------------------------- the loss


def itm_loss(model, img_tok_bND, txt_tok_bLD, valid_bL, neg_img_tok_bND, neg_txt_tok_bLD, neg_valid_bL, name="itm"):
    """Mean 2-way cross-entropy over [(i, t_i) match, (i, negative text) and (negative image, t_i) no match]."""
    b = img_tok_bND.shape[0]
    logits = model(
        head=name,
        image_tokens=torch.cat([img_tok_bND, img_tok_bND, neg_img_tok_bND]),
        text_tokens=torch.cat([txt_tok_bLD, neg_txt_tok_bLD, txt_tok_bLD]),
        text_valid=torch.cat([valid_bL, neg_valid_bL, valid_bL]),
    )  # (3b, 2)
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)  # fp32 at least


@register
class ITMTerm(Term):
    """ALBEF/BLIP image-text matching with hard negatives from the global batch (see the module docstring)."""

    name = "itm"
    config_cls = ITMTermConfig
    needs = ("image_tokens", "text_tokens")

    def build_head(self, model: nn.Module) -> nn.Module:
        m = self.run_cfg.model
        width, heads = m.text.width, m.text.heads
        if width is None:  # model.text.kind=hf: the sizes live in the transformers config
            width, heads = model.text_model.hf.config.hidden_size, model.text_model.hf.config.num_attention_heads
        heads = self.cfg.heads or heads
        if width % heads:
            raise ValueError(f"loss.terms.itm.heads must divide the text width (got {heads} and {width})")
        mlp_dim = int(round(self.cfg.mlp_ratio * width))
        return ITMHead(m.vision.width, width, self.cfg.layers, heads, mlp_dim, m.attention)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        o, group = ctx.out, ctx.group
        b = o.image_features.shape[0]
        _, rank = world_rank(group)
        tokens_bL = ctx.tokens.to(o.text_tokens.device)
        valid_bL = text_valid_mask(tokens_bL)
        with torch.no_grad():
            feats_GE2 = all_gather(torch.cat([o.image_features, o.text_features], 1).float(), group)  # collective
            label_b = ctx.batch.get("label") if isinstance(ctx.batch, dict) else None
            if label_b is None or len(label_b) != b or not self.cfg.exclude_same_label:
                label_b = torch.full((b,), -1, dtype=torch.long)
            ints_b3 = torch.stack([caption_hash(tokens_bL), valid_bL.sum(1), label_b.to(tokens_bL.device)], 1)
            ints_G3 = all_gather(ints_b3, group)  # collective
            img_GE, txt_GE = feats_GE2.chunk(2, dim=1)
            G = feats_GE2.shape[0]
            u_2G = step_uniforms(self.run_cfg.train.seed, ctx.step, G)
            rows_b = torch.arange(rank * b, (rank + 1) * b, device=img_GE.device)
            neg_txt_b, neg_img_b = sample_hard_negatives(
                img_GE,
                txt_GE,
                float(o.logit_scale),
                ints_G3[:, 0],
                rows_b,
                u_2G[:, rank * b : (rank + 1) * b],
                label_G=ints_G3[:, 2],
            )
        neg_txt_bLD, neg_img_bND = fetch_rows([o.text_tokens, o.image_tokens], [neg_txt_b, neg_img_b], group)
        L = valid_bL.shape[1]
        neg_valid_bL = torch.arange(L, device=valid_bL.device)[None, :] < ints_G3[neg_txt_b, 1, None]
        return itm_loss(ctx.model, o.image_tokens, o.text_tokens, valid_bL, neg_img_bND, neg_txt_bLD, neg_valid_bL)
