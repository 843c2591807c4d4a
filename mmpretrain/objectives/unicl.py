"""Florence/UniCL (Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space").

Image-label data (ImageNet-21k: ``<key>.cls`` + a class-name prompt as ``<key>.txt``) and image-text data
(web captions) train one contrastive space: pairs that share a label are all positives, in both directions.
Row i's target spreads evenly over its positives P_i (the pairs with its label):

    L = 1/2 [ mean_i ( lse_j l_ij - 1/|P_i| sum_{j in P_i} l_ij ) + the same over columns ]

With all-distinct labels this is CLIP's loss, bit for bit. The math runs in the tiled kernel
(``mmpretrain.kernels.contrastive_loss.tiled_unicl_loss``): labels travel as B int64 keys, never a B x B mask.

Labels (``loss.terms.unicl.label_source``):
    auto     ``<key>.cls`` where the sample has one (batch["label"] >= 0), else its caption's label
    cls      ``<key>.cls``; a sample without one is its own class (a plain CLIP pair, UniCL's image-text pairs)
    caption  identical normalized captions share a label (``.cls`` ignored)
A caption's label is its token row without punctuation tokens. Our CLIP tokenizer already normalizes (ftfy, HTML
unescape, lower case, whitespace collapsed and stripped) and splits punctuation into tokens of its own, so
"A  Red circle.", "a red circle" and "a red-circle!" share a label while "a red circles" does not; captions cut
at the context length compare by what the model sees. Why drop punctuation: captions whose token rows are
identical get identical text features from a deterministic text tower, and then averaging over them changes
nothing (sum_c Xsum_c . Ysum_c / n_c = sum_i x_i . y_i when every y of label c is the same y_c): such labels
give CLIP's loss and gradients again (measured: configs/recipes/unicl-tiny.yaml on the shapes data, whose
captions differ by words when they differ, trains exactly like clip-tiny). Labels only act where they group
different texts: class prompts of one .cls, or captions that differ in punctuation alone.
Each row is hashed to 62 bits (blake2b: the same in every process; a false match between two distinct captions
of a 32k batch has probability ~2^-33). Class ids (>= 0) and caption keys (< 0) never collide: a labelled sample
and a web caption that happen to read alike stay apart.

Across ranks the kernel all-gathers the keys (b int64 per rank); the gradient contract is CLIP's. Under GradCache
(train.accum_steps > 1) the term sees the whole per-rank batch, in the order its micro-batches' features are
concatenated, so the labels line up.
"""

from __future__ import annotations

import functools
import hashlib
import string

import numpy as np
import torch

from mmpretrain.data.tokenizer import clip_vocab_and_merges
from mmpretrain.distributed import world_rank
from mmpretrain.loss import unicl_loss
from mmpretrain.objectives.base import StepContext, Term, register
from mmpretrain.objectives.config import UniclTermConfig


@functools.cache
def punctuation_ids() -> np.ndarray:
    """(V,) bool over CLIP's BPE ids: True where the token is ASCII punctuation only (".", ",", "!", "...").

    Id 0 is "!", also the padding after the end token: dropping it drops the padding too."""
    vocab, _ = clip_vocab_and_merges()
    table_V = np.zeros(len(vocab), dtype=bool)
    for token, i in vocab.items():
        text = token.removesuffix("</w>")
        table_V[i] = bool(text) and all(c in string.punctuation for c in text)
    return table_V


def caption_keys(tokens_bL: torch.Tensor) -> torch.Tensor:
    """(b,) int64 keys in [-2^62, -1], equal for token rows equal but for punctuation (62-bit blake2b hash).

    CPU, ~5 us a row: it runs while the device computes the towers' forward (nothing here waits for it)."""
    rows_bL = tokens_bL.detach().to("cpu", torch.int32).numpy()
    table_V = punctuation_ids()
    keep_bL = ~table_V[np.clip(rows_bL, 0, len(table_V) - 1)] | (rows_bL >= len(table_V))
    digests = b"".join(
        hashlib.blake2b(np.ascontiguousarray(row[keep]).tobytes(), digest_size=8).digest()
        for row, keep in zip(rows_bL, keep_bL)
    )
    h_b = np.frombuffer(digests, dtype="<u8") >> np.uint64(2)
    return -1 - torch.from_numpy(h_b.astype(np.int64))


def label_keys(source: str, tokens_bL: torch.Tensor, cls_b: torch.Tensor | None, first_index: int) -> torch.Tensor:
    """(b,) int64 label keys of this rank's pairs (CPU); equal key = same label across the global batch.

    cls_b: the batch's "label" (-1 where a sample has no .cls) or None; first_index: global index of row 0
    (rank x b), for the singleton labels of the "cls" source.
    """
    if source == "caption":
        return caption_keys(tokens_bL)
    b = tokens_bL.shape[0]
    cls_b = torch.full((b,), -1, dtype=torch.int64) if cls_b is None else cls_b.cpu().to(torch.int64)
    has_cls_b = cls_b >= 0
    if has_cls_b.all():
        return cls_b
    if source == "auto":
        fallback_b = caption_keys(tokens_bL)
    else:  # "cls": a sample without .cls is its own label (a plain CLIP pair)
        fallback_b = -1 - torch.arange(first_index, first_index + b, dtype=torch.int64)
    return torch.where(has_cls_b, cls_b, fallback_b)


@register
class UniclTerm(Term):
    """CLIP over the global batch with label targets: same-label pairs are all positives (UniCL)."""

    name = "unicl"
    config_cls = UniclTermConfig

    def loss(self, ctx: StepContext) -> torch.Tensor:
        o, lc = ctx.out, ctx.loss_cfg
        tokens_bL = ctx.batch["text"] if "text" in ctx.batch else ctx.tokens  # the CPU copy: hashing needs no sync
        _, rank = world_rank(ctx.group)
        keys_b = label_keys(self.cfg.label_source, tokens_bL, ctx.batch.get("label"), rank * tokens_bL.shape[0])
        return unicl_loss(o.image_features, o.text_features, o.logit_scale, keys_b.to(o.image_features.device),
                          group=ctx.group, impl=lc.impl, chunk_size=lc.chunk_size)  # fmt: skip
