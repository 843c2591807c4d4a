"""2 ranks == 1 rank: zero-shot, retrieval, the classifier and the linear probe give the same numbers when the
sets are dealt over 2 gloo ranks (uneven shares, padded), and every rank makes the same forward calls (ZeRO-3)."""

import pytest
import torch

from mmpretrain.eval.linear_probe import linear_probe
from mmpretrain.eval.retrieval import retrieval
from mmpretrain.eval.zeroshot import build_zeroshot_classifier, zeroshot_classification
from tests.distributed.harness import run_on_ranks
from tests.unit.eval.helpers import CLASSNAMES, SIZE, TEMPLATES, CharTokenizer, RandomTwoTower


def evaluate_on_rank(rank, zs, rt):
    """Every evaluation on one of 2 gloo ranks (tests/distributed/harness.py)."""
    model, tok = RandomTwoTower(seed=7), CharTokenizer()
    kwargs = dict(image_size=SIZE, batch_size=2)
    return {
        "zeroshot": zeroshot_classification(model, tok, zs, top_k=[1, 3], **kwargs),
        "retrieval": retrieval(model, tok, rt, recall_k=[1, 3], **kwargs),
        "classifier": build_zeroshot_classifier(model, tok, CLASSNAMES, TEMPLATES, 2).tolist(),
        "probe": linear_probe(model, zs, split_train="test", max_iter=50, **kwargs),
        "calls": [(kind, n) for kind, n, _, _ in model.calls],
    }


def test_two_ranks_equal_one_rank(sets):
    zs, rt, _ = sets  # 11 images, 7 classes, 1..3 captions each: every share needs padding on 2 ranks
    r0, r1 = run_on_ranks(evaluate_on_rank, zs, rt)

    model, tok = RandomTwoTower(seed=7), CharTokenizer()
    one = {
        "zeroshot": zeroshot_classification(model, tok, zs, image_size=SIZE, batch_size=2, top_k=[1, 3]),
        "retrieval": retrieval(model, tok, rt, image_size=SIZE, batch_size=2, recall_k=[1, 3]),
        "probe": linear_probe(model, zs, split_train="test", max_iter=50, image_size=SIZE, batch_size=2),
    }
    assert one["probe"]["num_train"] == one["probe"]["num_test"] == 10
    for r in (r0, r1):
        assert r["probe"] == pytest.approx(one["probe"])
        assert r["zeroshot"] == pytest.approx(one["zeroshot"])
        assert r["retrieval"] == pytest.approx(one["retrieval"])
        classifier = build_zeroshot_classifier(model, tok, CLASSNAMES, TEMPLATES, 2)
        torch.testing.assert_close(torch.tensor(r["classifier"]), classifier, atol=1e-6, rtol=0)
    # ZeRO-3 needs the same forward calls, batch shapes included, on every rank
    assert [kind for kind, _ in r0["calls"]] == [kind for kind, _ in r1["calls"]]
    assert r0["calls"] != r1["calls"], "uneven shares: rank 1 ran dummy batches"
    assert one["zeroshot"]["num_samples"] == 10 and one["zeroshot"]["top3"] > 0
