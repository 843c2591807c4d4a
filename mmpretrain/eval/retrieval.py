"""Image<->text retrieval on a clip_benchmark-layout set, and its re-ranking by a matching head (ALBEF's ITM).

A set: `<root>/<split>/*.tar` of `<key>.webp|png|jpg` + `<key>.txt` with one caption a line (read by
mmpretrain.data). Each rank encodes its share of the images and of their captions; the features are
all-gathered (mmpretrain.distributed.gather_rows), so every rank returns the same recalls
(mmpretrain.eval.metrics: ranks by strict comparison, hits at k).

Re-ranking. A model whose objective heads include one that scores (image, caption) pairs, i.e. implements
`Reranker` (the ITM head of loss.terms.itm does), re-ranks each query's top `itm_rerank_k` candidates by its
match score; the recalls after it are reported as `itm_rerank/image_to_text_R@k` ... beside the plain ones.
This package never imports an objective: it asks the model's heads for the interface.

Legend: N images, T captions, E embedding width, L context length, N' image tokens, Dv / Dt vision / text
widths, Q queries, K candidates kept per query; lower-case n / t: this rank's share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

from mmpretrain.data.config import DataConfig
from mmpretrain.data.pipeline import build_eval_loader, load_retrieval_set
from mmpretrain.eval.metrics import recall_from_ranks, reranked_ranks, retrieval_ranks, top_candidates
from mmpretrain.eval.runner import Ranks, chunks, encode_texts, encoded_batches, inference, unwrap


@runtime_checkable
class Reranker(Protocol):
    """Scores (image, caption) pairs from the towers' token states: what re-ranking needs from a matching head.

    Implemented by mmpretrain.objectives.itm.ITMHead; found among the model's heads (`find_reranker`).
    """

    def match_scores(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_ids: torch.Tensor):
        """(n,) float32 match scores (higher: a better match) of n pairs: image token states (n, N', Dv), caption
        token states (n, L, Dt) and the caption's token ids (n, L)."""
        ...

    def dummy_forward(self, device: torch.device) -> None:
        """One forward on a dummy pair, for a rank that has run out of pairs (ZeRO-3: every rank makes the same
        calls)."""
        ...


def find_reranker(model) -> Optional[Reranker]:
    """The first of the model's objective heads (`model.heads`) that implements Reranker; None without one."""
    heads = getattr(unwrap(model), "heads", {})
    return next((head for head in heads.values() if isinstance(head, Reranker)), None)


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
    max_image_pixels: Optional[int] = DataConfig.max_image_pixels,
    itm_rerank_k: int = 0,
    reranker: Optional[Reranker] = None,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Image<->text recall@k on a clip_benchmark-layout retrieval set.

    Returns {"image_to_text_R@k": .., "text_to_image_R@k": .., "num_images": N, "num_texts": T}.
    Each rank encodes its share of the images and of their captions; the features are all-gathered,
    so every rank returns the same numbers.

    With `itm_rerank_k` > 0 and a reranker (default: the model's, `find_reranker`; e.g. the ITM head of
    loss.terms.itm), its match score re-ranks each query's top `itm_rerank_k` candidates (ALBEF's protocol),
    added as "itm_rerank/image_to_text_R@k", ...: a query whose correct answer is among them gets its rank among
    them by match score, the others keep their plain rank. Each rank keeps its images' token states for this.
    """
    urls = load_retrieval_set(root, split).urls
    model = unwrap(model)
    ranks = Ranks.of(model, rank, world_size, group, device)
    reranker = reranker if reranker is not None else find_reranker(model)
    rerank = itm_rerank_k > 0 and reranker is not None
    loader = build_eval_loader(
        urls, task="retrieval", image_size=image_size, batch_size=batch_size, rank=ranks.rank,
        world_size=ranks.world_size, num_workers=num_workers, max_image_pixels=max_image_pixels,
    )  # fmt: skip
    img_feats, img_index, captions, caption_img_index, img_tokens = [], [], [], [], []
    with inference(model, ranks.device) as dtype:
        for batch, img_BE, tokens_BND in encoded_batches(model, loader, ranks, image_size, dtype, rerank):
            img_feats.append(img_BE)
            img_index.append(batch["index"])
            if rerank:
                img_tokens.append(tokens_BND)
            for index, caps in zip(batch["index"].tolist(), batch["captions"]):
                captions += caps
                caption_img_index += [index] * len(caps)
        txt_tE = encode_texts(model, tokenizer, captions, batch_size, ranks)
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
        with inference(model, ranks.device):
            i2t_NK, t2i_TK = _rerank_scores(model, reranker, img_NE, txt_TE, txt_to_img_T, own_rows_n, img_tokens,
                                            cap_tokens_TL, itm_rerank_k, batch_size, ranks)  # fmt: skip
        ranks_i2t = reranked_ranks(i2t_NK.score, i2t_NK.correct, rank_i2t_N)
        ranks_t2i = reranked_ranks(t2i_TK.score, t2i_TK.correct, rank_t2i_T)
        out.update({f"itm_rerank/{k}": v for k, v in recall_from_ranks(ranks_i2t, ranks_t2i, recall_k).items()})
    out["num_images"], out["num_texts"] = len(img_NE), len(txt_TE)
    return out


@dataclass
class _Candidates:
    index: torch.Tensor  # (Q, K) candidate rows, most similar first
    correct: torch.Tensor  # (Q, K) bool: the candidate is a correct answer of the query
    score: torch.Tensor  # (Q, K) float32 match scores


def _rerank_scores(
    model, reranker: Reranker, img_NE, txt_TE, txt_to_img_T, own_rows_n, img_tokens, cap_tokens_TL, k, batch_size,
    ranks: Ranks,
):  # fmt: skip
    """Match scores of each query's top-k candidates, both directions: (image->text, text->image) _Candidates.

    A pair is scored on the rank that holds its image's token states (the query's for image->text, the
    candidate's for text->image), once even when it is a candidate in both directions; the token states of the
    captions a rank pairs are recomputed from their ids, once each (the text tower is cheap; image token states
    never travel). Cost: up to (N + T) x k scored pairs. Ranks make the same number of forward calls
    (dummy ones when out: ZeRO-3), and the score matrices, each entry computed on one rank, are all-reduced.
    """
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

    states = []  # text token states (c, L, Dt) of the captions this rank pairs, computed once each
    for sl, real in chunks(len(caps_c), batch_size, ranks):
        out = model.text_model(cap_tokens_TL[caps_c[sl]] if real else cap_tokens_TL[:1]).last_hidden_state
        if real:
            states.append(out)
    states_cLD = torch.cat(states) if states else None
    tokens_nND = torch.cat(img_tokens) if img_tokens else None
    scores_u = torch.zeros(len(pair_u), device=dev)
    for sl, real in chunks(len(pair_u), batch_size, ranks):
        if real:
            scores_u[sl] = reranker.match_scores(tokens_nND[slot_u[sl]], states_cLD[cap_of_u[sl]],
                                                 cap_tokens_TL[cap_u[sl]])  # fmt: skip
        else:  # a dummy pair keeps ZeRO-3's collectives in step
            reranker.dummy_forward(dev)
    scores = torch.zeros(i2t.numel() + t2i.numel(), device=dev)
    scores[out_p] = scores_u[pair_of_p]
    scores = ranks.sum(scores)  # each pair was scored by exactly one rank
    i2t_score, t2i_score = scores[: i2t.numel()].view(i2t.shape), scores[i2t.numel() :].view(t2i.shape)
    i2t_correct = txt_to_img_T[i2t] == torch.arange(len(img_NE), device=dev)[:, None]
    t2i_correct = t2i == txt_to_img_T[:, None]
    return _Candidates(i2t, i2t_correct, i2t_score), _Candidates(t2i, t2i_correct, t2i_score)
