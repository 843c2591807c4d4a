"""mmpretrain.step.TrainStep and compiled training: the hot path's contracts, checked on the CPU.

- One host-device sync per step where the trainer clips (ZeRO 0, fp32 / amp_bf16 weights): the flags' tolist.
  Counted by wrapping every Tensor method that copies a value to the host (item, tolist, __float__, __int__,
  __bool__, cpu, numpy) for the duration of a step; no per-parameter gradient hook is registered there.
- A non-finite gradient is caught by the norm (no hooks): the step is skipped and the weights do not move.
- Compiled blocks (engine.compile) give the eager losses and gradients (fp32, <= 1e-5), and the forward of a
  train step (both towers + the objective's loss) traces with 0 graph breaks. On the CPU the compiled path is
  traced with dynamo + AOTAutograd (backend "aot_eager"); inductor's code generation is exercised on a GPU by
  tools/gpu_check.py (minutes of C++ compilation on 2 cores).
"""

import collections
import copy
import traceback

import mmpretrain.kernels.contrastive_loss as contrastive_loss
import pytest
import torch

from mmpretrain.config import ConfigError, load_config
from mmpretrain.distributed import init_distributed
from mmpretrain.engine import build_engine
from mmpretrain.faults import Injector
from mmpretrain.model import build_model, compile_blocks
from mmpretrain.objectives import Objective, StepContext
from mmpretrain.step import TrainStep

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def tiny_cfg(*overrides):
    return load_config("configs/demo.yaml", ["train.batch_size=8", "optim.warmup_steps=1", *overrides])


def batch_for(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, L, vocab = cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size
    tokens = torch.randint(1, vocab - 2, (8, L), generator=g)
    tokens[:, 0], tokens[:, 6], tokens[:, 7:] = vocab - 2, vocab - 1, 0
    return {"image": torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=g), "text": tokens}


def build_step(cfg, injector=None):
    info = init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=8, total_steps=10)
    step = TrainStep(engine, Objective(cfg), cfg.engine, grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss,
                     device=info.device, injector=injector)  # fmt: skip
    return engine, step


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_one_host_sync_per_step_where_the_step_clips(precision, monkeypatch):
    cfg = tiny_cfg(f"engine.precision={precision}")
    engine, step = build_step(cfg)
    assert step.guard is None and step.norm_here
    assert all(not p._backward_hooks for p in engine.module.parameters()), "no per-parameter gradient hooks"
    step(batch_for(cfg), 1)  # warm-up: optimizer state
    # the loss's logit-range check reads a bound on the CPU only (skipped for CUDA tensors, where it would sync)
    monkeypatch.setattr(contrastive_loss, "_check_logit_range", lambda *args: None)
    calls = collections.Counter()
    for name in SYNC_METHODS:
        method = getattr(torch.Tensor, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            frame = traceback.extract_stack()[-2]
            calls[f"{_name} at {frame.filename}:{frame.lineno}"] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    res = step(batch_for(cfg, seed=1), 2)
    monkeypatch.undo()
    assert not res.skipped and res.grad_norm > 0
    assert sum(calls.values()) == 1 and next(iter(calls)).startswith("tolist at"), dict(calls)


def test_a_nan_gradient_is_caught_by_the_norm_and_skipped():
    cfg = tiny_cfg()
    engine, step = build_step(cfg, injector=Injector("nan_grad@2", rank=0))
    step.injector.begin_step(1)
    assert not step(batch_for(cfg), 1).skipped
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    step.injector.begin_step(2)
    res = step(batch_for(cfg, seed=1), 2)
    assert res.skipped and res.grad_norm is None
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None or not p.grad.abs().sum(), n  # discarded
    step.injector.begin_step(3)
    res = step(batch_for(cfg, seed=2), 3)
    assert not res.skipped and torch.isfinite(torch.tensor(res.grad_norm))


def test_the_logged_norm_is_the_norm_before_clipping():
    cfg = tiny_cfg("optim.grad_clip=0.5")
    engine, step = build_step(cfg)
    grads = {}
    plain = step._norm_and_clip

    def spy():
        grads.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return plain()

    step._norm_and_clip = spy
    res = step(batch_for(cfg), 1)
    want = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()])).item()
    assert res.grad_norm == pytest.approx(want, rel=1e-5) and want > 0.5  # it was clipped: norm above the limit


def test_engine_compile_settings():
    assert tiny_cfg("engine.compile=on").engine.compile == "true"
    assert tiny_cfg("engine.compile=off").engine.compile == "false"
    assert tiny_cfg().engine.compile == "auto"
    with pytest.raises(ConfigError, match="engine.compile"):
        tiny_cfg("engine.compile=sometimes")
    with pytest.raises(ConfigError, match="engine.compile=true does not work with engine.zero_stage=3"):
        tiny_cfg("engine.compile=true", "engine.zero_stage=3")


FAMILIES = [("tiny", "clip"), ("siglip-tiny", "siglip")]


def _model_and_objective(name, loss):
    cfg = tiny_cfg(f"model.name={name}", f"loss.name={loss}")
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), Objective(cfg)


def _loss_and_grads(model, objective, cfg, batch):
    images = batch["image"].float() / 255
    out = model(images, batch["text"])
    loss, _ = objective(StepContext(out, images, batch["text"], batch, model, None, cfg.loss, 1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,loss", FAMILIES)
def test_compiled_blocks_match_eager(name, loss):
    cfg, eager, objective = _model_and_objective(name, loss)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == cfg.model.vision.layers + cfg.model.text.layers
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their names
    batch = batch_for(cfg)
    want_loss, want = _loss_and_grads(eager, objective, cfg, batch)
    got_loss, got = _loss_and_grads(compiled, objective, cfg, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name,loss", FAMILIES)
def test_a_train_step_forward_has_no_graph_breaks(name, loss):
    cfg, model, objective = _model_and_objective(name, loss)
    batch = batch_for(cfg)

    def forward_and_loss(images, tokens):
        out = model(images, tokens)
        return objective(StepContext(out, images, tokens, batch, model, None, cfg.loss, 1))[0]

    explain = torch._dynamo.explain(forward_and_loss)(batch["image"].float() / 255, batch["text"])
    assert explain.graph_break_count == 0, [str(r.reason)[:300] for r in explain.break_reasons]
    assert explain.graph_count == 1
