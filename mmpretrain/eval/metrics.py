"""Evaluation metrics as pure functions of features and scores: no I/O, no ranks, no model.

    topk_correct / topk_accuracy            zero-shot classification
    retrieval_ranks / recall_from_ranks     image<->text retrieval (retrieval_recall: both at once)
    top_candidates / reranked_ranks         re-ranking each query's top candidates by another score (ITM)
    fit_logistic_regression                 the linear probe's classifier

Convention: a query's rank is the number of candidates that score strictly higher than its best correct
candidate, and it is a hit at k when that rank is < k. This equals `topk` membership when scores have no ties
and is deterministic (independent of sharding and sample order) when they do (duplicate captions embed
identically).

Legend: N images, C classes, T texts (prompts or captions), E embedding width, Q queries, K candidates kept
(or the number of k values).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
