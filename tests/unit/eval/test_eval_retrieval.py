"""mmpretrain.eval.retrieval: recall against a direct computation, the oracle, and ITM re-ranking through the
Reranker interface of the model's ITM head (against scoring every pair directly, and on 2 ranks)."""

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmpretrain.data import Tokenizer
from mmpretrain.data.pipeline import build_eval_loader, load_retrieval_set
from mmpretrain.data.transforms import normalize_images
from mmpretrain.eval.config import EvalConfig
from mmpretrain.eval.retrieval import Reranker, find_reranker, retrieval
from mmpretrain.eval.suite import evaluate_all, set_name
from mmpretrain.objectives.itm import match_score, text_valid_mask
from tests.distributed.harness import run_on_ranks
from tests.unit.eval.helpers import (
    CLASSNAMES,
    COLORS,
    SIZE,
    CharTokenizer,
    ColorOracle,
    RandomTwoTower,
    png,
    recall_reference,
    tiny_itm_model,
    transform,
)


def test_retrieval_matches_direct_computation(sets):
    _, rt, meta = sets
    model, tok = RandomTwoTower(seed=4), CharTokenizer()
    got = retrieval(model, tok, rt, image_size=SIZE, batch_size=4, recall_k=[1, 2, 5])
    keep = [i for i in range(len(meta["captions"])) if i != meta["broken"]]
    images = torch.stack([transform(Image.open(io.BytesIO(png(COLORS[CLASSNAMES[i % 7]], i)))) for i in keep])
    caps = [c for i in keep for c in meta["captions"][i]]
    txt_to_img = torch.tensor([j for j, i in enumerate(keep) for _ in meta["captions"][i]])
    ref = recall_reference(model.encode_image(images), model.encode_text(tok(caps)), txt_to_img, [1, 2, 5])
    assert {k: got[k] for k in ref} == pytest.approx(ref)
    assert (got["num_images"], got["num_texts"]) == (len(keep), len(caps))  # the broken image and its captions left


def test_retrieval_oracle_any_caption(sets):
    _, rt, meta = sets
    model = ColorOracle()
    got = retrieval(model, model.tokenizer, rt, image_size=SIZE, batch_size=5, recall_k=[1])
    # every caption names its image's color: ties among same-colored images count in the query's favour
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == 1.0


def test_the_itm_head_is_the_models_reranker():
    model, _ = tiny_itm_model()
    assert isinstance(model.heads["itm"], Reranker) and find_reranker(model) is model.heads["itm"]
    assert find_reranker(RandomTwoTower()) is None


def rerank_on_rank(rank, rt):
    """Re-ranked retrieval on one of 2 gloo ranks (tests/distributed/harness.py)."""
    model, cfg = tiny_itm_model()
    return retrieval(model, Tokenizer(cfg.model.text.context_length), rt, image_size=cfg.model.vision.image_size,
                     batch_size=3, recall_k=[1, 2, 4], itm_rerank_k=3)  # fmt: skip


def test_itm_rerank_matches_direct_scoring_and_two_ranks(sets):
    """Re-ranked recall equals scoring every (image, caption) pair with the head directly and reordering each
    query's top K by that score; plain retrieval is reported beside it, unchanged; 2 ranks give the same."""
    _, rt, _ = sets
    model, cfg = tiny_itm_model()
    tok, size, K = Tokenizer(cfg.model.text.context_length), cfg.model.vision.image_size, 3
    got = retrieval(model, tok, rt, image_size=size, batch_size=4, recall_k=[1, 2, 4], itm_rerank_k=K)
    plain = retrieval(model, tok, rt, image_size=size, batch_size=4, recall_k=[1, 2, 4])
    assert {k: v for k, v in got.items() if not k.startswith("itm_rerank/")} == pytest.approx(plain)

    loader = build_eval_loader(load_retrieval_set(rt, "test").urls, task="retrieval", image_size=size, batch_size=64,
                               rank=0, world_size=1, num_workers=0)  # fmt: skip
    batch = next(iter(loader))
    captions = [c for caps in batch["captions"] for c in caps]
    owner_T = torch.tensor([i for i, caps in enumerate(batch["captions"]) for _ in caps])
    with torch.no_grad():
        v = model.vision_model(normalize_images(batch["image"], torch.float32))
        img_NE, img_tok = F.normalize(v.embeds, dim=-1), v.last_hidden_state
        tokens = tok(captions)
        t = model.text_model(tokens)
        txt_TE, txt_tok = F.normalize(t.embeds, dim=-1), t.last_hidden_state
        N, T = len(img_NE), len(txt_TE)
        itm_NT = torch.stack([
            match_score(model.heads["itm"](img_tok[i].expand(T, -1, -1), txt_tok, text_valid_mask(tokens)))
            for i in range(N)
        ])  # fmt: skip
    sim_NT = img_NE @ txt_TE.T
    correct_NT = owner_T[None, :] == torch.arange(N)[:, None]

    def brute(sim_QC, itm_QC, correct_QC, ks):
        ranks = []
        for q in range(len(sim_QC)):
            order = sim_QC[q].argsort(descending=True).tolist()
            top = sorted(order[:K], key=lambda c: -itm_QC[q, c].item())
            ranks.append(next(i for i, c in enumerate(top + order[K:]) if correct_QC[q, c]))
        return {k: sum(r < k for r in ranks) / len(ranks) for k in ks}

    i2t, t2i = brute(sim_NT, itm_NT, correct_NT, [1, 2, 4]), brute(sim_NT.T, itm_NT.T, correct_NT.T, [1, 2, 4])
    for k in (1, 2, 4):
        assert got[f"itm_rerank/image_to_text_R@{k}"] == pytest.approx(i2t[k])
        assert got[f"itm_rerank/text_to_image_R@{k}"] == pytest.approx(t2i[k])
    assert got["itm_rerank/image_to_text_R@4"] == got["image_to_text_R@4"]  # K <= 4: only the top K move
    top_NK = sim_NT.topk(K, dim=1).indices
    assert (itm_NT.gather(1, top_NK).argsort(1, descending=True) != torch.arange(K)).any(), "the head reorders"

    for r in run_on_ranks(rerank_on_rank, rt):
        assert r == pytest.approx(got)


def test_evaluate_all_reports_rerank_beside_plain_and_zero_turns_it_off(sets):
    _, rt, _ = sets
    model, cfg = tiny_itm_model()
    cfg.data.eval.zeroshot, cfg.data.eval.retrieval, cfg.data.eval.batch_size = None, rt, 4
    tok, size = Tokenizer(cfg.model.text.context_length), cfg.model.vision.image_size
    on = evaluate_all(model, tok, cfg.data.eval, EvalConfig(num_workers=0, itm_rerank_k=2), image_size=size)
    off = evaluate_all(model, tok, cfg.data.eval, EvalConfig(num_workers=0, itm_rerank_k=0), image_size=size)
    name = set_name(rt)
    assert f"retrieval/{name}/itm_rerank/image_to_text_R@1" in on and f"retrieval/{name}/image_to_text_R@1" in on
    assert not any("itm_rerank" in k for k in off)
    assert {k: v for k, v in on.items() if "itm_rerank" not in k} == pytest.approx(off)
    with pytest.raises(ValueError, match=r"eval.itm_rerank_k"):
        EvalConfig(itm_rerank_k=-1).validate("eval")
