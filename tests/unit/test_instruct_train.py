"""`python -m mmpretrain.instruct`'s pieces that need no engine: the restart check, where a step falls among the
stages, the global batch of a step, the per-rank loss sum (issue 19; the launches: tests/distributed/
test_instruct_distributed.py)."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmpretrain.instruct.template import IGNORE_INDEX
from mmpretrain.instruct.train import (
    InstructError,
    check_restart,
    global_batch_indices,
    load_instruct_config,
    stage_of,
    token_loss_sum,
)

STAGES = "stages=[{name: a, data: captions, steps: 3, train: [projector]}, {name: b, steps: 4}]"


def test_restart_with_other_settings_is_refused_naming_them(tmp_path):
    cfg = load_instruct_config(None, [f"output_dir={tmp_path}", STAGES])
    assert check_restart(cfg)  # a fresh folder: write config.yaml
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    assert not check_restart(load_instruct_config(None, [f"output_dir={tmp_path}", STAGES, "logging.log_every=1"]))
    other = load_instruct_config(None, [f"output_dir={tmp_path}", STAGES, "batch_size=8", "stages.1.lr=0.5"])
    assert check_restart(other)  # nothing trained there yet (a start that failed, e.g. on a data path): replaced
    (tmp_path / "metrics.jsonl").write_text("")  # a run trained there
    with pytest.raises(InstructError, match=r"config\.yaml: batch_size: 32 -> 8.*stages") as e:
        check_restart(other)
    assert str(tmp_path) in str(e.value)
    assert OmegaConf.load(tmp_path / "config.yaml").batch_size == 32  # kept


def test_stage_of_step():
    cfg = load_instruct_config(None, [STAGES])
    # (stage, its steps done) after N steps of the run; a stage's last step stays in that stage
    assert [stage_of(cfg, n) for n in range(8)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4)]


def test_global_batch_is_a_function_of_seed_stage_step():
    batch = global_batch_indices(0, 1, 5, num_items=100, batch_size=8)
    assert batch == global_batch_indices(0, 1, 5, num_items=100, batch_size=8)
    assert all(0 <= i < 100 for i in batch)
    others = [global_batch_indices(*key, num_items=100, batch_size=8) for key in ((1, 1, 5), (0, 0, 5), (0, 1, 6))]
    assert all(o != batch for o in others)


def test_token_loss_sum_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    total, count = token_loss_sum(logits, labels)
    want, n = torch.zeros((), dtype=torch.float64), 0
    for b in range(3):
        for t in range(5):  # position t predicts label t + 1
            if labels[b, t + 1] != IGNORE_INDEX:
                want -= F.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]]
                n += 1
    assert count == n == 2 + 5 + 0  # row 0: labels 4 and 5; row 1: labels 1-5; row 2: none
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_lm_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """lm.gradient_checkpointing (the real-scale configs turn it on): transformers recomputes each LM layer in
    backward; the loss and every gradient equal the plain model's."""
    from mmpretrain.instruct.template import ChatTemplate
    from mmpretrain.instruct.train import build, load_tokenizer

    grads, losses = [], []
    for ckpt in (False, True):
        cfg = load_instruct_config(None, [f"lm.gradient_checkpointing={ckpt}", "lm.layers=3"])
        tok = load_tokenizer(cfg, ChatTemplate(system=""))
        model = build(cfg, tok).train()
        assert model.language_model.is_gradient_checkpointing == ckpt
        g = torch.Generator().manual_seed(0)
        n = model.num_image_tokens
        ids = torch.cat([torch.full((2, n), model.image_token_id), torch.randint(5, len(tok), (2, 12), generator=g)], 1)
        labels = ids.clone()
        labels[:, : n + 4] = IGNORE_INDEX
        out = model(ids, torch.randn(2, 3, 32, 32, generator=g), labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
