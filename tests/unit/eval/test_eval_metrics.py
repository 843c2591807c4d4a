"""mmpretrain.eval.metrics (and EvalConfig): the metric math against brute force.

Legend: N images, C classes, T texts, E embedding width, Q queries, K candidates kept.
"""

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.eval.config import EvalConfig
from mmpretrain.eval.metrics import fit_logistic_regression, reranked_ranks, retrieval_recall, topk_accuracy
from tests.unit.eval.helpers import recall_reference, topk_reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_accuracy_matches_sorting(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 9, (200,), generator=g)
    logits = torch.randn(200, 9, generator=g, dtype=torch.float64) + F.one_hot(labels, 9)  # better than chance
    ks = [1, 2, 5, 9]
    got = topk_accuracy(logits, labels, ks)
    assert got == pytest.approx(topk_reference(logits, labels, ks))
    assert got[9] == 1.0 and 0 < got[1] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_recall_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_img = 13
    caps_per_img = torch.randint(1, 4, (num_img,), generator=g)
    txt_to_img = torch.repeat_interleave(torch.arange(num_img), caps_per_img)
    txt_to_img = txt_to_img[torch.randperm(len(txt_to_img), generator=g)]  # captions in any order
    img = F.normalize(torch.randn(num_img, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(len(txt_to_img), 5, generator=g, dtype=torch.float64), dim=-1)
    ks = [1, 5, 10]
    got = retrieval_recall(img, txt, txt_to_img, ks, chunk=4)  # chunks smaller than N and T
    assert got == pytest.approx(recall_reference(img, txt, txt_to_img, ks))
    assert 0 < got["image_to_text_R@1"] < got["image_to_text_R@10"] <= 1


def test_retrieval_recall_perfect_and_any_caption_counts():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0], [0.6, 0.8, 0]])
    txt_to_img = torch.tensor([0, 2, 1, 0])  # caption 3 of image 0 is nearer image 1: one miss at R@1
    got = retrieval_recall(img, txt, txt_to_img, [1, 2])
    assert got["image_to_text_R@1"] == 1.0  # image 0's best caption (0) ranks first; others are exact
    assert got["text_to_image_R@1"] == 0.75 and got["text_to_image_R@2"] == 1.0


def test_reranked_ranks_match_brute_force_reordering():
    g = torch.Generator().manual_seed(0)
    Q, C, K = 40, 12, 4
    sim_QC, itm_QC = torch.randn(Q, C, generator=g), torch.randn(Q, C, generator=g)
    correct_QC = torch.rand(Q, C, generator=g) < 0.15
    correct_QC[torch.arange(Q), torch.randint(0, C, (Q,), generator=g)] = True  # every query has an answer
    want = []
    for q in range(Q):
        order = sim_QC[q].argsort(descending=True).tolist()
        top = sorted(order[:K], key=lambda c: -itm_QC[q, c].item())  # top K by match score, then the rest
        want.append(next(i for i, c in enumerate(top + order[K:]) if correct_QC[q, c]))
    plain_Q = torch.tensor([(sim_QC[q] > sim_QC[q][correct_QC[q]].max()).sum() for q in range(Q)])
    cand_QK = sim_QC.topk(K, dim=1).indices
    got = reranked_ranks(itm_QC.gather(1, cand_QK), correct_QC.gather(1, cand_QK), plain_Q)
    assert got.tolist() == want


def test_logistic_regression_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers_CE = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1) * 3
    y_N = torch.randint(0, 5, (300,), generator=g)
    x_NE = centers_CE[y_N] + 0.3 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    assert (x_NE @ centers_CE.T).argmax(1).eq(y_N).all(), "the synthetic set is linearly separable"
    w_EC, b_C = fit_logistic_regression(x_NE.float(), y_N, 5, weight_decay=1e-4, max_iter=200)
    assert (x_NE @ w_EC + b_C).argmax(1).eq(y_N).all()  # 100% train accuracy
    # the L-BFGS optimum has zero gradient of the regularized loss
    w, b = w_EC.clone().requires_grad_(), b_C.clone().requires_grad_()
    (F.cross_entropy(x_NE @ w + b, y_N) + 1e-4 * w.square().sum()).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5


def test_eval_config_validate():
    EvalConfig().validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.top_k"):
        EvalConfig(top_k=[0, 5]).validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.every_steps"):
        EvalConfig(every_steps=-1).validate("eval")
