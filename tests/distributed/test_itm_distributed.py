"""ITM over 2 gloo ranks equals one process holding the whole batch, and only the chosen token rows travel.

The parent runs the itm term on the whole batch (no process group): the hard negatives it samples, its loss,
the head's parameter gradients and the token-state gradients are the reference. Each rank then runs the same
term on its half (float64 inputs and head; its LayerNorms compute in float32, hence the 1e-5 tolerances): the
mean of the ranks' losses must equal the reference (a local term), the ranks' parameter gradients averaged (as
DeepSpeed does) must equal the reference's, and each rank's token-state gradients must be world x the reference
rows (the gradient contract; tests/distributed/harness.py). The exchange function is wrapped: the rows each
rank sends in the forward are exactly its rows that some rank chose as negatives (each once per requester),
never its whole token states.
"""

from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmpretrain.distributed
from mmpretrain.objectives import StepContext, itm
from tests.distributed.harness import Case, Step, assert_n_ranks_equal_one
from tests.unit.test_itm import Holder

WORLD, B_LOCAL, N, L, DV, DT, E, SEED, STEP = 2, 6, 5, 7, 12, 8, 8, 3, 5
G = WORLD * B_LOCAL


def make_case():
    g = torch.Generator().manual_seed(0)
    img_f = F.normalize(torch.randn(G, E, generator=g, dtype=torch.float64), dim=-1)
    txt_f = F.normalize(img_f + 0.5 * torch.randn(G, E, generator=g, dtype=torch.float64), dim=-1)
    tokens = torch.zeros(G, L, dtype=torch.long)
    for i in range(G):
        n = 2 + i % (L - 2)
        tokens[i, :n] = torch.randint(1, 100, (n,), generator=g)
    tokens[7] = tokens[2]  # the same caption on both ranks: never each other's negative
    torch.manual_seed(1)
    head = itm.ITMHead(DV, DT, 2, 2, 16, impl="sdpa").double()
    img_tok = torch.randn(G, N, DV, generator=g, dtype=torch.float64)
    txt_tok = torch.randn(G, L, DT, generator=g, dtype=torch.float64)
    return dict(img_f=img_f, txt_f=txt_f, tokens=tokens, state=head.state_dict(), img_tok=img_tok, txt_tok=txt_tok)


SENT = []  # (input rows, input splits) of each exchange on this process
FORWARD_SENT = []  # those of the last step's forward
REAL_ALL_TO_ALL = mmpretrain.distributed.all_to_all


def recording(out, inp, out_splits, in_splits, group=None):
    SENT.append((inp.clone(), list(in_splits)))
    REAL_ALL_TO_ALL(out, inp, out_splits, in_splits, group)


def run_term(case, rows):
    """The itm term on rows of the case, forward and backward; its exchanges are recorded."""
    if dist.is_initialized():  # on a rank: fetch_rows sends its rows through this name
        mmpretrain.distributed.all_to_all = recording
    head = itm.ITMHead(DV, DT, 2, 2, 16, impl="sdpa").double()
    head.load_state_dict(case["state"])
    img_tok = case["img_tok"][rows].clone().requires_grad_()
    txt_tok = case["txt_tok"][rows].clone().requires_grad_()
    out = SimpleNamespace(
        image_features=case["img_f"][rows], text_features=case["txt_f"][rows],
        logit_scale=torch.tensor(10.0, dtype=torch.float64), image_tokens=img_tok, text_tokens=txt_tok,
    )  # fmt: skip
    run_cfg = SimpleNamespace(train=SimpleNamespace(seed=SEED))
    term = itm.ITMTerm(itm.ITMTermConfig(), run_cfg)
    SENT.clear()
    loss = term.loss(StepContext(out, None, case["tokens"][rows], {}, Holder(head), None, None, step=STEP))
    FORWARD_SENT[:] = SENT  # the backward's exchanges (gradients going home) come after
    loss.backward()
    return Step(loss, head, {"image_tokens": img_tok, "text_tokens": txt_tok})


def chosen_negatives(case):
    """The reference's picks: (negative text per image, negative image per text), global indices (G,)."""
    u = itm.step_uniforms(SEED, STEP, G)
    feats = torch.cat([case["img_f"], case["txt_f"]], 1).float()  # as gathered by the term
    img, txt = feats.chunk(2, dim=1)
    return itm.sample_hard_negatives(img, txt, 10.0, itm.caption_hash(case["tokens"]), torch.arange(G), u)


def only_chosen_rows_left(case, rank):
    """For each requester s, the forward sent my rows among s's distinct picks, and nothing else."""
    neg_txt, neg_img = chosen_negatives(case)
    assert len(FORWARD_SENT) == 2, len(FORWARD_SENT)  # one exchange of text rows, one of image rows
    for (inp, splits), picks, local in zip(FORWARD_SENT, (neg_txt, neg_img), (case["txt_tok"], case["img_tok"])):
        want_rows, want_splits = [], []
        for s in range(dist.get_world_size()):
            mine = [j for j in sorted(set(picks[s * B_LOCAL : (s + 1) * B_LOCAL].tolist())) if j // B_LOCAL == rank]
            want_rows += mine
            want_splits.append(len(mine))
        assert splits == want_splits, (rank, splits, want_splits)
        assert torch.equal(inp, local[want_rows].reshape(len(want_rows), -1)), rank


def grads_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=what)


def loss_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=what)


def test_two_ranks_equal_one_rank_and_only_chosen_rows_travel():
    case = make_case()
    neg_txt, neg_img = chosen_negatives(case)
    assert neg_txt[2] != 7 and neg_txt[7] != 2 and neg_img[2] != 7 and neg_img[7] != 2
    crossing = sum(int(neg_txt[i] // B_LOCAL != i // B_LOCAL) for i in range(G))
    assert 0 < crossing < G  # the case exercises both local and remote negatives
    case_itm = Case("itm", partial(run_term, case), check=partial(only_chosen_rows_left, case))
    assert_n_ranks_equal_one([case_itm], rows_per_rank=B_LOCAL, local=True, close=grads_close, loss_close=loss_close)
