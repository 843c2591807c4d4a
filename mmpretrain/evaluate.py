"""Zero-shot classification and image<->text retrieval on clip_benchmark-layout WebDatasets.

    python -m mmpretrain.evaluate outputs/demo                   # the run's eval sets (data.eval)
    python -m mmpretrain.evaluate outputs/demo/checkpoints/step_500 --zeroshot data/shapes/zeroshot --output r.json
    torchrun --nproc_per_node=8 -m mmpretrain.evaluate RUN --retrieval /data/flickr30k
    python -m mmpretrain.evaluate RUN --imagenet /data/wds_imagenet1k --linear-probe /data/wds_cifar10

Dataset layout: clip_benchmark's WebDataset export, read by `mmpretrain.data` (load_zeroshot_set,
load_retrieval_set, build_eval_loader): `<root>/classnames.txt`,
`<root>/zeroshot_classification_templates.txt` (`{c}` marks the class name) and
`<root>/<split>/*.tar` of `<key>.webp|png|jpg` + `<key>.cls`; a retrieval set's samples carry
`<key>.txt` with one caption a line. The folder's name names the set in the results:
`zeroshot/<name>/top1`, `retrieval/<name>/image_to_text_R@1`.

Also: ImageNet-1k zero-shot (`imagenet_zeroshot`: class names and the 80 OpenAI templates from
open_clip, so the root needs only tars; keys `zeroshot/imagenet1k/top1`) and a linear probe
(`linear_probe`: L-BFGS logistic regression on frozen image features of `<root>/train`, top-1 on
`<root>/test`; keys `linear_probe/<name>/top1`).

ITM re-ranking (ALBEF): a model with an image-text matching head (`model.heads["itm"]`, trained by
`loss.terms.itm`) re-ranks each retrieval query's top `eval.itm_rerank_k` candidates by its match score;
keys `retrieval/<name>/itm_rerank/image_to_text_R@1` ... beside the plain ones. A run folder loads with its
objective heads (`load_model`).

Distributed. The train loop calls `evaluate_all` on every rank. Under ZeRO-3 each rank holds a
slice of the weights and every forward gathers them (a collective), so every rank must make the
same sequence of forward calls. The loader gives rank r the samples r, r + W, ... (broken ones
skipped), so ranks may hold different batch counts: the image loop runs in lockstep (one tiny
all-reduce per batch says whether any rank still has one) and a rank that has run out feeds a
one-image dummy batch; caption and prompt chunks are counted up front and padded the same way.
Counts are all-reduced; retrieval features are all-gathered, so every rank returns the same numbers.

Metric conventions: a query's rank is the number of candidates that score strictly higher
than its best correct candidate, and it is a hit at k when that rank is < k. This equals
`topk` membership when scores have no ties and is deterministic (independent of sharding and
sample order) when they do (duplicate captions embed identically).

Legend: N images, C classes, T texts (prompts or captions), E embedding width, L context
length, K number of k values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpretrain.data.transforms import normalize_images


@dataclass
class EvalConfig:
    """When to evaluate and what to report (the root config composes it as `eval`).

    The eval sets themselves (roots, split, per-rank batch size) are data: `data.eval.*`.
    """

    every_steps: int = 0
    """Evaluate every this many optimizer steps during training; 0 = only at the end."""
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    """Zero-shot accuracies reported, as `top<k>`."""
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Retrieval recalls reported, as `image_to_text_R@<k>` and `text_to_image_R@<k>`."""
    num_workers: int = 2
    """Image decoding worker processes per rank during eval (0 = decode in the main process)."""
    itm_rerank_k: int = 16
    """Models with an ITM head (loss.terms.itm): its match score re-ranks the top this many retrieval candidates of
    each query, reported as `retrieval/<set>/itm_rerank/...` beside plain retrieval; 0 = off."""

    def validate(self, prefix: str) -> None:
        if self.every_steps < 0:
            raise ValueError(f"{prefix}.every_steps must be >= 0 (got {self.every_steps})")
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers must be >= 0 (got {self.num_workers})")
        if self.itm_rerank_k < 0:
            raise ValueError(f"{prefix}.itm_rerank_k must be >= 0 (got {self.itm_rerank_k})")
        for name in ("top_k", "recall_k"):
            ks = getattr(self, name)
            if not ks or any(k <= 0 for k in ks):
                raise ValueError(f"{prefix}.{name} must be a non-empty list of positive ints (got {list(ks)})")


# ----------------------------------------------------------------------------- metric math (pure)


def topk_correct(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(K,) int64: how many rows have their label among the k best-scoring classes, for each k."""
    label_score_N1 = logits_NC.gather(1, labels_N[:, None])
    rank_N = (logits_NC > label_score_N1).sum(1)  # classes strictly better than the label
    return torch.stack([(rank_N < k).sum() for k in ks])


def topk_accuracy(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k best-scoring classes}."""
    correct_K = topk_correct(logits_NC, labels_N, ks)
    return {k: c.item() / len(labels_N) for k, c in zip(ks, correct_K)}


def retrieval_ranks(
    img_NE: torch.Tensor, txt_TE: torch.Tensor, txt_to_img_T: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's rank: ((N,) image->text, (T,) text->image), the number of candidates scoring strictly higher
    than the query's best correct candidate (see the metric convention). Chunks of `chunk` queries."""
    num_img, num_txt = len(img_NE), len(txt_TE)
    i2t, t2i = [], []
    for start in range(0, num_img, chunk):
        scores_nT = img_NE[start : start + chunk] @ txt_TE.T
        own_nT = txt_to_img_T[None, :] == torch.arange(start, start + len(scores_nT), device=img_NE.device)[:, None]
        best_own_n1 = scores_nT.masked_fill(~own_nT, -math.inf).amax(1, keepdim=True)
        i2t.append((scores_nT > best_own_n1).sum(1))
    for start in range(0, num_txt, chunk):
        scores_tN = txt_TE[start : start + chunk] @ img_NE.T
        own_t1 = scores_tN.gather(1, txt_to_img_T[start : start + chunk, None])
        t2i.append((scores_tN > own_t1).sum(1))
    empty = torch.zeros(0, dtype=torch.long, device=img_NE.device)
    return torch.cat(i2t) if i2t else empty, torch.cat(t2i) if t2i else empty


def recall_from_ranks(rank_i2t_N: torch.Tensor, rank_t2i_T: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """{"image_to_text_R@k": fraction of image queries with rank < k, ..., "text_to_image_R@k": ...}."""
    out = {}
    for direction, rank_Q in (("image_to_text", rank_i2t_N), ("text_to_image", rank_t2i_T)):
        for k in ks:
            out[f"{direction}_R@{k}"] = (rank_Q < k).sum().item() / len(rank_Q)
    return out


def retrieval_recall(
    img_NE: torch.Tensor,
    txt_TE: torch.Tensor,
    txt_to_img_T: torch.Tensor,
    ks: Sequence[int],
    chunk: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k over normalized features.

    txt_to_img_T[t] is the index of the image caption t belongs to. An image query is a hit
    when any of its captions ranks in the top k; a caption query when its own image does.
    Scores are computed in chunks of `chunk` queries, never a full N x T matrix at once.
    Returns {"image_to_text_R@k": ..., "text_to_image_R@k": ...}.
    """
    return recall_from_ranks(*retrieval_ranks(img_NE, txt_TE, txt_to_img_T, chunk), ks)


def top_candidates(query_QE: torch.Tensor, cand_CE: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(Q, min(k, C)) indices of each query's most similar candidates, best first."""
    k = min(k, len(cand_CE))
    parts = [(query_QE[s : s + chunk] @ cand_CE.T).topk(k, dim=1).indices for s in range(0, len(query_QE), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long, device=query_QE.device)


def reranked_ranks(score_QK: torch.Tensor, correct_QK: torch.Tensor, plain_rank_Q: torch.Tensor) -> torch.Tensor:
    """(Q,) ranks after re-ranking each query's top-K candidates by score_QK (the rest keep their order after them).

    A query with a correct candidate among its K: the number of its K candidates scoring strictly higher than
    its best-scoring correct one (< K). Otherwise its plain rank, at least K (it comes after the K re-ranked).
    """
    K = score_QK.shape[1]
    best_Q1 = score_QK.masked_fill(~correct_QK, -math.inf).amax(1, keepdim=True)
    rank_Q = (score_QK > best_Q1).sum(1)
    return torch.where(correct_QK.any(1), rank_Q, plain_rank_Q.clamp(min=K))


# ----------------------------------------------------------------------------- distributed plumbing


@dataclass
class _Ranks:
    """Who evaluates: this rank among `world_size` in `group` (collectives only when world_size > 1)."""

    rank: int
    world_size: int
    group: Optional[object]
    device: torch.device

    def deal(self, num_items: int) -> tuple[list[int], list[bool]]:
        """Round-robin share of range(num_items) for this rank, padded to ceil(N / W) entries.

        Returns (indices, real): padding repeats this rank's first index (or 0) with real=False.
        """
        per_rank = -(-num_items // self.world_size)
        own = list(range(self.rank, num_items, self.world_size))
        num_pad = per_rank - len(own)
        return own + [own[0] if own else 0] * num_pad, [True] * len(own) + [False] * num_pad

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)  # collective
        return t

    def max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        return int(self.all_reduce(t, dist.ReduceOp.MAX).item())

    def gather_rows(self, rows_nE: torch.Tensor, index_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' rows and their global indices, sorted by index: ((M, E), (M,)), M = sum of n."""
        index_n = index_n.to(self.device)
        if self.world_size > 1:
            n_max = self.max(len(rows_nE))  # all_gather needs equal shapes: pad to the longest share
            rows = F.pad(rows_nE, (0, 0, 0, n_max - len(rows_nE)))
            index = F.pad(index_n, (0, n_max - len(index_n)), value=-1)
            rows_parts = [torch.empty_like(rows) for _ in range(self.world_size)]
            index_parts = [torch.empty_like(index) for _ in range(self.world_size)]
            dist.all_gather(rows_parts, rows.contiguous(), group=self.group)  # collective
            dist.all_gather(index_parts, index.contiguous(), group=self.group)  # collective
            rows_nE, index_n = torch.cat(rows_parts), torch.cat(index_parts)
            keep = index_n >= 0
            rows_nE, index_n = rows_nE[keep], index_n[keep]
        order = index_n.argsort(stable=True)
        return rows_nE[order], index_n[order]


def _ranks(model, rank, world_size, group, device) -> _Ranks:
    """Explicit rank/world_size, else the group's (or the world's) when torch.distributed is up, else (0, 1)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        else:
            rank, world_size = 0, 1
    assert world_size == 1 or dist.is_initialized(), "world_size > 1 needs an initialized process group"
    assert 0 <= rank < world_size, (rank, world_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _Ranks(rank, world_size, group, device)


def _lockstep(batches: Iterable, ranks: _Ranks) -> Iterator[Optional[dict]]:
    """This rank's batches, then None until every rank has run out: all ranks loop the same number of times."""
    it = iter(batches)
    batch = next(it, None)
    while ranks.max(int(batch is not None)):  # collective, once per batch: does any rank go on?
        yield batch
        batch = next(it, None) if batch is not None else None  # never ask an exhausted loader again


# ----------------------------------------------------------------------------- running the model


def _unwrap(model):
    """The plain model inside a DeepSpeed engine or DDP wrapper (ZeRO-3's hooks live on its submodules)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def _inference(model, device: torch.device):
    """no_grad + eval mode (the previous mode is restored) + autocast to the model's dtype when half precision.

    Yields the dtype images must be cast to (the model's), so the first layer sees matching inputs.
    """
    was_training = model.training
    dtype = next(model.parameters()).dtype
    half = dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            yield dtype if half else torch.float32
    finally:
        model.train(was_training)


def _encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, ranks: _Ranks) -> torch.Tensor:
    """(T, E) float32 normalized features; every rank makes as many forward calls as the rank with most texts."""
    num_chunks = ranks.max(-(-len(texts) // batch_size))
    tokens_TL = tokenizer(list(texts)) if texts else None
    feats = []
    for c in range(num_chunks):
        if c * batch_size < len(texts):
            feats.append(model.encode_text(tokens_TL[c * batch_size : (c + 1) * batch_size].to(ranks.device)).float())
        else:  # this rank has run out: a dummy forward keeps ZeRO-3's collectives in step
            model.encode_text(tokenizer([""]).to(ranks.device))
    return torch.cat(feats) if feats else torch.zeros(0, 0, device=ranks.device)


def _dummy_images(image_size: int, dtype, device) -> torch.Tensor:
    return torch.zeros(1, 3, image_size, image_size, dtype=dtype, device=device)


def _encoded_batches(
    model, loader, ranks: _Ranks, image_size: int, dtype, tokens: bool = False
) -> Iterator[tuple[dict, torch.Tensor, Optional[torch.Tensor]]]:
    """(batch, image features (B, E) float32, image token states (B, N', Dv) or None) for this rank's batches,
    in lockstep with every rank; the token states (the vision tower's last_hidden_state) only with `tokens`.

    A rank that has run out still encodes a dummy image while others go on (ZeRO-3 gathers weights in
    collectives inside the forward); loader images (uint8) are normalized on the device here.
    """

    def encode(images):
        if not tokens:
            return model.encode_image(images).float(), None
        v = model.vision_model(images)
        return F.normalize(v.embeds.float(), dim=-1), v.last_hidden_state

    for batch in _lockstep(loader, ranks):
        if batch is None:
            encode(_dummy_images(image_size, dtype, ranks.device))
            continue
        yield batch, *encode(normalize_images(batch["image"].to(ranks.device), dtype))


# ----------------------------------------------------------------------------- zero-shot classification


def _prompt(template, classname: str) -> str:
    return template(classname) if callable(template) else template.replace("{c}", classname)


def build_zeroshot_classifier(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence,
    batch_size: int = 64,
    *,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> torch.Tensor:
    """(C, E) float32 class embeddings: per class, the mean of its normalized prompt embeddings, renormalized.

    Prompts are `template.replace("{c}", classname)`, or `template(classname)` for a callable template
    (open_clip's OpenAI ImageNet templates). Under torch.distributed the classes are dealt
    over the ranks (the same forward count on all) and all-reduced: every rank returns the whole classifier.
    """
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    class_ids, real = ranks.deal(len(classnames))
    prompts = [_prompt(t, classnames[c]) for c in class_ids for t in templates]
    with _inference(model, ranks.device):
        txt_TE = _encode_texts(model, tokenizer, prompts, batch_size, ranks)
    class_cE = F.normalize(txt_TE.view(len(class_ids), len(templates), -1).mean(1), dim=-1)
    classifier_CE = torch.zeros(len(classnames), class_cE.shape[-1], device=ranks.device)
    own = torch.tensor(real, device=ranks.device)
    classifier_CE[torch.tensor(class_ids, device=ranks.device)[own]] = class_cE[own]
    return ranks.all_reduce(classifier_CE)  # each class has one owner: the sum is a gather


def zeroshot_classification(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    image_size: int,
    split: str = "test",
    batch_size: int = 64,
    top_k: Sequence[int] = (1, 5),
    num_workers: int = 0,
    classnames: Optional[Sequence[str]] = None,
    templates: Optional[Sequence] = None,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Zero-shot accuracy on a clip_benchmark-layout set: {"top1": .., "top5": .., "num_samples": N}.

    Images go through the eval transform at `image_size`. Call it on every rank of `group`;
    rank/world_size default to the group's when torch.distributed is initialized.
    `classnames` and `templates` (strings with `{c}` or callables classname -> prompt), when both
    given, replace the root's classnames.txt and zeroshot_classification_templates.txt.
    """
    from mmpretrain.data import build_eval_loader, load_zeroshot_set
    from mmpretrain.data.pipeline import ZeroShotSet, eval_tar_urls

    if classnames is not None and templates is not None:
        zs = ZeroShotSet(list(classnames), list(templates), eval_tar_urls(root, split))
    else:
        zs = load_zeroshot_set(root, split)
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    classifier_CE = build_zeroshot_classifier(
        model, tokenizer, zs.classnames, zs.templates, batch_size, device=ranks.device, rank=ranks.rank,
        world_size=ranks.world_size, group=group,
    )  # fmt: skip
    loader = build_eval_loader(
        zs.urls, task="zeroshot", image_size=image_size, batch_size=batch_size, rank=ranks.rank,
        world_size=ranks.world_size, num_workers=num_workers,
    )  # fmt: skip
    counts_K2 = torch.zeros(len(top_k) + 2, dtype=torch.long, device=ranks.device)  # correct@k..., seen, bad label
    with _inference(model, ranks.device) as dtype:
        for batch, img_BE, _ in _encoded_batches(model, loader, ranks, image_size, dtype):
            logits_BC = img_BE @ classifier_CE.T
            labels_B = batch["label"].to(ranks.device)
            ok_B = (labels_B >= 0) & (labels_B < len(zs.classnames))  # a bad label fails below, on every rank
            counts_K2[:-2] += topk_correct(logits_BC[ok_B], labels_B[ok_B], top_k)
            counts_K2[-2] += ok_B.sum()
            counts_K2[-1] += (~ok_B).sum()
    counts = ranks.all_reduce(counts_K2).tolist()
    num_samples, num_bad = counts[-2], counts[-1]
    if num_bad:
        raise ValueError(f"zeroshot: '{root}': {num_bad} samples have a .cls outside [0, {len(zs.classnames)})")
    if num_samples == 0:
        raise ValueError(f"zeroshot: '{root}': no readable samples")
    out = {f"top{k}": c / num_samples for k, c in zip(top_k, counts[:-2])}
    out["num_samples"] = num_samples
    return out


def imagenet_classes_and_templates() -> tuple[list[str], list]:
    """open_clip's 1000 standard ImageNet-1k class names and the 80 OpenAI prompt templates (callables)."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    except ImportError as e:
        raise ValueError(
            f"imagenet: the ImageNet class names and templates come from the package open_clip_torch, "
            f"which is not importable ({e}); pip install open_clip_torch"
        ) from e
    return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)


def imagenet_zeroshot(model, tokenizer: Callable[[list[str]], torch.Tensor], root: str, **kwargs) -> dict[str, float]:
    """Zero-shot ImageNet-1k on a clip_benchmark-layout validation set (`<root>/<split>/*.tar`, `.cls` in [0, 1000)).

    Class names and the 80 OpenAI templates come from open_clip, so the root needs no classnames.txt
    or templates file. kwargs: as zeroshot_classification's (image_size, split, batch_size, ...).
    """
    classnames, templates = imagenet_classes_and_templates()
    return zeroshot_classification(model, tokenizer, root, classnames=classnames, templates=templates, **kwargs)


# ----------------------------------------------------------------------------- linear probe


def _image_features(model, root: str, split: str, *, image_size: int, batch_size: int, num_workers: int, ranks):
    """((N, E) float32 L2-normalized features, (N,) labels) of a whole split, in sample order, on every rank."""
    from mmpretrain.data import build_eval_loader
    from mmpretrain.data.pipeline import eval_tar_urls

    loader = build_eval_loader(
        eval_tar_urls(root, split), task="zeroshot", image_size=image_size, batch_size=batch_size,
        rank=ranks.rank, world_size=ranks.world_size, num_workers=num_workers,
    )  # fmt: skip
    feats, labels, index = [], [], []
    with _inference(model, ranks.device) as dtype:
        for batch, img_BE, _ in _encoded_batches(model, loader, ranks, image_size, dtype):
            feats.append(F.normalize(img_BE, dim=-1))
            labels.append(batch["label"])
            index.append(batch["index"])
    embed_dim = ranks.max(feats[0].shape[-1] if feats else 0)
    feat_nE = torch.cat(feats) if feats else torch.zeros(0, embed_dim, device=ranks.device)
    # labels travel as an extra feature column: one gather, sorted by the same index
    label_n = torch.cat(labels).to(ranks.device, torch.float32) if labels else torch.zeros(0, device=ranks.device)
    index_n = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    rows_NE1, _ = ranks.gather_rows(torch.cat([feat_nE, label_n[:, None]], 1), index_n)
    return rows_NE1[:, :-1], rows_NE1[:, -1].round().long()


def fit_logistic_regression(
    x_NE: torch.Tensor, y_N: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-4, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS in float64: (weight (E, C), bias (C,)).

    Minimizes mean cross-entropy + weight_decay * ||weight||^2 (the bias is not decayed), from zeros,
    so the result is deterministic: every rank fitting the same features gets the same classifier.
    """
    x_NE, y_N = x_NE.double(), y_N.to(x_NE.device)
    w_EC = torch.zeros(x_NE.shape[1], num_classes, dtype=torch.float64, device=x_NE.device, requires_grad=True)
    b_C = torch.zeros(num_classes, dtype=torch.float64, device=x_NE.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w_EC, b_C], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_NE @ w_EC + b_C, y_N) + weight_decay * w_EC.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # one step runs up to max_iter L-BFGS iterations
    return w_EC.detach(), b_C.detach()


def linear_probe(
    model,
    train_root: str,
    test_root: Optional[str] = None,
    *,
    image_size: int,
    split_train: str = "train",
    split_test: str = "test",
    batch_size: int = 64,
    num_workers: int = 0,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Linear-probe top-1: logistic regression on frozen image features of a labeled split, tested on another.

    Reads `<train_root>/<split_train>/*.tar` and `<test_root>/<split_test>/*.tar` (test_root defaults
    to train_root) in clip_benchmark layout; only `.cls` labels are used (no class names needed; C is
    the largest label + 1). Features are the L2-normalized `encode_image` outputs. Distributed: ranks
    encode their shares of the images (lockstep, as zero-shot) and all-gather the features; every rank
    then fits the same float64 L-BFGS problem and returns the same numbers.
    Returns {"top1": .., "num_train": N_train, "num_test": N_test}.
    """
    test_root = train_root if test_root is None else test_root
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    kw = dict(image_size=image_size, batch_size=batch_size, num_workers=num_workers, ranks=ranks)
    train_x_NE, train_y_N = _image_features(model, train_root, split_train, **kw)
    test_x_ME, test_y_M = _image_features(model, test_root, split_test, **kw)
    for where, y in ((f"{train_root}/{split_train}", train_y_N), (f"{test_root}/{split_test}", test_y_M)):
        if len(y) == 0:
            raise ValueError(f"linear_probe: '{where}': no readable samples")
        if y.min() < 0:
            raise ValueError(f"linear_probe: '{where}': negative .cls labels")
    num_classes = int(max(train_y_N.max(), test_y_M.max())) + 1
    w_EC, b_C = fit_logistic_regression(
        train_x_NE, train_y_N, num_classes, weight_decay=weight_decay, max_iter=max_iter
    )
    pred_M = (test_x_ME.double() @ w_EC + b_C).argmax(1)
    top1 = (pred_M == test_y_M).double().mean().item()
    return {"top1": top1, "num_train": len(train_y_N), "num_test": len(test_y_M)}


# ----------------------------------------------------------------------------- retrieval


def retrieval(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    image_size: int,
    split: str = "test",
    batch_size: int = 64,
    recall_k: Sequence[int] = (1, 5, 10),
    num_workers: int = 0,
    itm_rerank_k: int = 0,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Image<->text recall@k on a clip_benchmark-layout retrieval set.

    Returns {"image_to_text_R@k": .., "text_to_image_R@k": .., "num_images": N, "num_texts": T}.
    Each rank encodes its share of the images and of their captions; the features are all-gathered,
    so every rank returns the same numbers.

    With `itm_rerank_k` > 0 and an ITM head on the model (`model.heads["itm"]`, loss.terms.itm), the head's
    match score re-ranks each query's top `itm_rerank_k` candidates (ALBEF's protocol), added as
    "itm_rerank/image_to_text_R@k", ...: a query whose correct answer is among them gets its rank among them by
    match score, the others keep their plain rank. Each rank keeps its images' token states for this.
    """
    from mmpretrain.data import build_eval_loader, load_retrieval_set

    urls = load_retrieval_set(root, split).urls
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    rerank = itm_rerank_k > 0 and "itm" in getattr(model, "heads", {})
    loader = build_eval_loader(
        urls, task="retrieval", image_size=image_size, batch_size=batch_size, rank=ranks.rank,
        world_size=ranks.world_size, num_workers=num_workers,
    )  # fmt: skip
    img_feats, img_index, captions, caption_img_index, img_tokens = [], [], [], [], []
    with _inference(model, ranks.device) as dtype:
        for batch, img_BE, tokens_BND in _encoded_batches(model, loader, ranks, image_size, dtype, rerank):
            img_feats.append(img_BE)
            img_index.append(batch["index"])
            if rerank:
                img_tokens.append(tokens_BND)
            for index, caps in zip(batch["index"].tolist(), batch["captions"]):
                captions += caps
                caption_img_index += [index] * len(caps)
        txt_tE = _encode_texts(model, tokenizer, captions, batch_size, ranks)
    if ranks.max(len(captions)) == 0:
        raise ValueError(f"retrieval: '{root}': no readable samples with an image and a caption")
    embed_dim = ranks.max(txt_tE.shape[-1])  # a rank without captions knows E only from the others
    img_nE = torch.cat(img_feats) if img_feats else torch.zeros(0, embed_dim, device=ranks.device)
    txt_tE = txt_tE if len(txt_tE) else torch.zeros(0, embed_dim, device=ranks.device)
    img_index_n = torch.cat(img_index) if img_index else torch.zeros(0, dtype=torch.long)
    cap_tokens_tL = tokenizer(captions) if captions else tokenizer([""])[:0]  # (t, L) ids, for re-ranking

    img_NE, img_index_N = ranks.gather_rows(img_nE, img_index_n)
    txt_TE, txt_img_index_T = ranks.gather_rows(txt_tE, torch.tensor(caption_img_index, dtype=torch.long))
    txt_to_img_T = torch.searchsorted(img_index_N, txt_img_index_T)  # global image index -> row of img_NE
    rank_i2t_N, rank_t2i_T = retrieval_ranks(img_NE, txt_TE, txt_to_img_T)
    out = recall_from_ranks(rank_i2t_N, rank_t2i_T, recall_k)
    if rerank:
        own_rows_n = torch.searchsorted(img_index_N.to(ranks.device), img_index_n.to(ranks.device))
        # caption ids in txt_TE's row order (the same index, the same stable sort)
        cap_tokens_TL, _ = ranks.gather_rows(cap_tokens_tL.to(ranks.device), torch.tensor(caption_img_index))
        with _inference(model, ranks.device):
            i2t_NK, t2i_TK = _itm_rerank(model, img_NE, txt_TE, txt_to_img_T, own_rows_n, img_tokens, cap_tokens_TL,
                                         itm_rerank_k, batch_size, ranks)  # fmt: skip
        ranks_i2t = reranked_ranks(i2t_NK.score, i2t_NK.correct, rank_i2t_N)
        ranks_t2i = reranked_ranks(t2i_TK.score, t2i_TK.correct, rank_t2i_T)
        out.update({f"itm_rerank/{k}": v for k, v in recall_from_ranks(ranks_i2t, ranks_t2i, recall_k).items()})
    out["num_images"], out["num_texts"] = len(img_NE), len(txt_TE)
    return out


@dataclass
class _Candidates:
    index: torch.Tensor  # (Q, K) candidate rows, most similar first
    correct: torch.Tensor  # (Q, K) bool: the candidate is a correct answer of the query
    score: torch.Tensor  # (Q, K) float32 ITM match log-odds


def _itm_rerank(model, img_NE, txt_TE, txt_to_img_T, own_rows_n, img_tokens, cap_tokens_TL, k, batch_size, ranks):
    """ITM scores of each query's top-k candidates, both directions: (image->text, text->image) _Candidates.

    A pair is scored on the rank that holds its image's token states (the query's for image->text, the
    candidate's for text->image), once even when it is a candidate in both directions; the token states of the
    captions a rank pairs are recomputed from their ids, once each (the text tower is cheap; image token states
    never travel). Cost: up to (N + T) x k fusion-head pairs. Ranks make the same number of forward calls
    (dummy ones when out: ZeRO-3), and the score matrices, each entry computed on one rank, are all-reduced.
    """
    from mmpretrain.objectives.itm import match_score, text_valid_mask

    i2t = top_candidates(img_NE, txt_TE, k)  # (N, K)
    t2i = top_candidates(txt_TE, img_NE, k)  # (T, K')
    dev = ranks.device
    local_of_row = torch.full((len(img_NE),), -1, dtype=torch.long, device=dev)
    local_of_row[own_rows_n] = torch.arange(len(own_rows_n), device=dev)
    # pairs on this rank: (local image slot, caption row, flat slot in [i2t scores | t2i scores])
    q_n = own_rows_n[:, None].expand(-1, i2t.shape[1])
    pairs = [(local_of_row[q_n].reshape(-1), i2t[own_rows_n].reshape(-1), (q_n * i2t.shape[1] + torch.arange(
        i2t.shape[1], device=dev)).reshape(-1))]  # fmt: skip
    own_t2i = local_of_row[t2i] >= 0  # (T, K') candidate image held here
    t_p, j_p = own_t2i.nonzero(as_tuple=True)
    pairs.append((local_of_row[t2i[t_p, j_p]], t_p, i2t.numel() + t_p * t2i.shape[1] + j_p))
    slot_p, cap_p, out_p = (torch.cat(x) for x in zip(*pairs))
    # a pair among both an image's and a caption's candidates is scored once; each caption's states once
    num_txt = len(txt_TE)
    pair_u, pair_of_p = torch.unique(slot_p * num_txt + cap_p, return_inverse=True)
    slot_u, cap_u = pair_u // num_txt, pair_u % num_txt
    caps_c, cap_of_u = torch.unique(cap_u, return_inverse=True)
    head = model.heads["itm"]
    head_dtype = next(head.parameters()).dtype

    def chunks(n):  # (slice, real) over this rank's n items, as many as the rank with the most: ZeRO-3
        for c in range(ranks.max(-(-n // batch_size))):
            yield slice(c * batch_size, (c + 1) * batch_size), c * batch_size < n

    states = []  # text token states (c, L, Dt) of the captions this rank pairs, computed once each
    for sl, real in chunks(len(caps_c)):
        out = model.text_model(cap_tokens_TL[caps_c[sl]] if real else cap_tokens_TL[:1]).last_hidden_state
        if real:
            states.append(out)
    states_cLD = torch.cat(states) if states else None
    tokens_nND = torch.cat(img_tokens) if img_tokens else None
    scores_u = torch.zeros(len(pair_u), device=dev)
    for sl, real in chunks(len(pair_u)):
        if real:
            inputs = dict(image_tokens=tokens_nND[slot_u[sl]], text_tokens=states_cLD[cap_of_u[sl]],
                          text_valid=text_valid_mask(cap_tokens_TL[cap_u[sl]]))  # fmt: skip
        else:  # a dummy pair keeps ZeRO-3's collectives in step
            inputs = dict(image_tokens=torch.zeros(1, 1, head.image_width, dtype=head_dtype, device=dev),
                          text_tokens=torch.zeros(1, 1, head.text_width, dtype=head_dtype, device=dev),
                          text_valid=torch.ones(1, 1, dtype=torch.bool, device=dev))  # fmt: skip
        logits = model(head="itm", **inputs)
        if real:
            scores_u[sl] = match_score(logits)
    scores = torch.zeros(i2t.numel() + t2i.numel(), device=dev)
    scores[out_p] = scores_u[pair_of_p]
    scores = ranks.all_reduce(scores)  # each pair was scored by exactly one rank
    i2t_score, t2i_score = scores[: i2t.numel()].view(i2t.shape), scores[i2t.numel() :].view(t2i.shape)
    i2t_correct = txt_to_img_T[i2t] == torch.arange(len(img_NE), device=dev)[:, None]
    t2i_correct = t2i == txt_to_img_T[:, None]
    return _Candidates(i2t, i2t_correct, i2t_score), _Candidates(t2i, t2i_correct, t2i_score)


# ----------------------------------------------------------------------------- all configured sets


def set_name(root: str) -> str:
    """The name a set's results are keyed by: its folder's name."""
    return Path(root.rstrip("/")).name


def evaluate_all(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data_cfg,
    eval_cfg: EvalConfig,
    *,
    image_size: int,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Every set named in `data_cfg` (`data.eval`: zeroshot, retrieval, split, batch_size).

    Keys: "zeroshot/<folder>/top1", ..., "retrieval/<folder>/image_to_text_R@1", ...; {} when no
    set is configured. Call it on every rank; every rank returns the same dict.
    """
    common = dict(
        image_size=image_size, split=data_cfg.split, batch_size=data_cfg.batch_size,
        num_workers=eval_cfg.num_workers, device=device, rank=rank, world_size=world_size, group=group,
    )  # fmt: skip
    results: dict[str, float] = {}
    if data_cfg.zeroshot is not None:
        r = zeroshot_classification(model, tokenizer, data_cfg.zeroshot, top_k=eval_cfg.top_k, **common)
        results.update({f"zeroshot/{set_name(data_cfg.zeroshot)}/{k}": v for k, v in r.items()})
    if data_cfg.retrieval is not None:
        r = retrieval(model, tokenizer, data_cfg.retrieval, recall_k=eval_cfg.recall_k,
                      itm_rerank_k=eval_cfg.itm_rerank_k, **common)  # fmt: skip
        results.update({f"retrieval/{set_name(data_cfg.retrieval)}/{k}": v for k, v in r.items()})
    return results


# ----------------------------------------------------------------------------- CLI


def format_table(results: dict[str, float]) -> str:
    width = max([len(k) for k in results] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, value in results.items():
        lines.append(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return "\n".join(lines)


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.evaluate",
        description="Zero-shot classification and image-text retrieval of a trained run or checkpoint.",
    )
    p.add_argument(
        "checkpoint",
        help="run folder (uses checkpoints/latest), checkpoints/step_<N> folder, consolidated folder, "
        "Hugging Face CLIP/SigLIP folder or OpenCLIP folder",
    )
    p.add_argument("--zeroshot", help="zero-shot set root; replaces the run's data.eval sets")
    p.add_argument("--retrieval", help="retrieval set root; replaces the run's data.eval sets")
    p.add_argument(
        "--imagenet",
        help="ImageNet-1k validation set root (tars with .cls only): zero-shot with open_clip's class names "
        "and 80 OpenAI templates; replaces the run's data.eval sets",
    )
    p.add_argument(
        "--linear-probe",
        metavar="ROOT",
        help="labeled set with ROOT/train and ROOT/test: logistic-regression probe on frozen image features; "
        "replaces the run's data.eval sets",
    )
    p.add_argument("--split", help="shard folder under each root (default: data.eval.split of the run)")
    p.add_argument("--batch-size", type=int, help="images per forward pass per rank (default: data.eval.batch_size)")
    p.add_argument("--num-workers", type=int, help="image decoding workers per rank (default: eval.num_workers)")
    p.add_argument("--output", help="also write the results here as JSON")
    return p.parse_args(argv)


def load_model(path: str):
    """(fp32 model in eval mode, Config) from any source `mmpretrain.convert.load_any` reads; a run folder's
    model also gets its objective heads (`model.heads`, e.g. the ITM head that re-ranks retrieval), built from
    the run's config by mmpretrain.objectives and loaded strictly with the rest."""
    import mmpretrain.convert
    from mmpretrain.convert.common import check_state_dict
    from mmpretrain.convert.load import _is_run
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective

    if not _is_run(path):
        return mmpretrain.convert.load_any(path)  # HF / OpenCLIP / consolidated folders hold the towers alone
    sd, cfg = mmpretrain.convert.read_run(path)  # towers checked there; heads.* passed through
    model = build_model(cfg.model)
    Objective(cfg).attach_heads(model)
    check_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()}, path)  # the heads too
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


def _run(args) -> dict[str, float]:
    """Load, evaluate, return the results (on every rank); user errors raise ValueError."""
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint: no such folder '{args.checkpoint}'")
    from mmpretrain.data import Tokenizer
    from mmpretrain.distributed import env_rank_world, init_distributed

    model, cfg = load_model(args.checkpoint)
    data_cfg, eval_cfg = cfg.data.eval, cfg.eval
    named = (args.zeroshot, args.retrieval, args.imagenet, args.linear_probe)
    if any(r is not None for r in named):  # sets named here replace the run's
        data_cfg.zeroshot, data_cfg.retrieval = args.zeroshot, args.retrieval
    if args.split is not None:
        data_cfg.split = args.split
    if args.batch_size is not None:
        data_cfg.batch_size = args.batch_size
    if args.num_workers is not None:
        eval_cfg.num_workers = args.num_workers
    if all(r is None for r in (data_cfg.zeroshot, data_cfg.retrieval, args.imagenet, args.linear_probe)):
        raise ValueError(
            f"{args.checkpoint}: the run names no eval set (data.eval); "
            "pass --zeroshot, --retrieval, --imagenet or --linear-probe"
        )
    data_cfg.validate("data.eval")  # missing folders and files, named
    eval_cfg.validate("eval")
    for flag, root in (("--imagenet", args.imagenet), ("--linear-probe", args.linear_probe)):
        if root is not None and not Path(root).is_dir():
            raise ValueError(f"{flag}: no such folder '{root}'")
    if args.imagenet is not None:
        imagenet_classes_and_templates()  # fail early, before loading anything, when open_clip is missing

    if env_rank_world()[1] > 1:  # launched by torchrun / srun: shard the sets over the ranks
        device = init_distributed().device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer = Tokenizer(cfg.model.text.context_length)
    image_size = cfg.model.vision.image_size
    results = evaluate_all(model, tokenizer, data_cfg, eval_cfg, image_size=image_size, device=device)
    common = dict(
        image_size=image_size, batch_size=data_cfg.batch_size, num_workers=eval_cfg.num_workers, device=device
    )
    if args.imagenet is not None:  # --split applies to it (default data.eval.split); the probe reads train/test
        r = imagenet_zeroshot(model, tokenizer, args.imagenet, split=data_cfg.split, top_k=eval_cfg.top_k, **common)
        results.update({f"zeroshot/imagenet1k/{k}": v for k, v in r.items()})
    if args.linear_probe is not None:
        r = linear_probe(model, args.linear_probe, **common)
        results.update({f"linear_probe/{set_name(args.linear_probe)}/{k}": v for k, v in r.items()})
    return results


def main(argv=None) -> int:
    """`python -m mmpretrain.evaluate RUN [--zeroshot ROOT] [--retrieval ROOT] [--imagenet ROOT]
    [--linear-probe ROOT] [--output results.json]`."""
    from mmpretrain.distributed import env_rank_world

    args = _parse_args(argv)
    is_main = env_rank_world()[0] == 0
    try:
        results = _run(args)
    except ValueError as e:  # user errors: one line, exit code 2, no traceback
        if is_main:
            print(f"mmpretrain.evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if is_main:
        print(format_table(results), flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
            print(f"results written to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
