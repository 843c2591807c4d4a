"""Worker for test_zero_equivalence.py: a few train steps on fixed global batches.

Every rank builds the same global batch for each step and keeps its own slice, so N ranks see
exactly the batch one rank sees. Writes per-step loss and gradient norm (rank 0) as JSON.

    torchrun --nproc_per_node=2 tests/distributed/zero_equivalence_worker.py OUT.json engine.zero_stage=3
"""

import json
import sys

import torch

from mmpretrain.config import load_config
from mmpretrain.distributed import destroy, init_distributed
from mmpretrain.engine import build_engine, release_engine
from mmpretrain.model import build_model
from mmpretrain.objectives import Objective
from mmpretrain.step import TrainStep

NUM_STEPS = 4


def main(out_path, overrides):
    # no data is read: batches are made here (data.synthetic.root only satisfies validation)
    base = ["model.name=tiny", "train.batch_size=8", "optim.warmup_steps=1", "data.synthetic.root=unused"]
    cfg = load_config(None, [*base, *overrides])
    info = init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)  # before the engine, as the train loop does: ZeRO shards the heads too
    per_rank = cfg.train.batch_size // info.world_size
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=per_rank, total_steps=NUM_STEPS)
    # as the train loop runs it (the non-finite check: gradient hooks, or the norm where the step clips)
    train_step = TrainStep(engine, objective, cfg.engine, grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss,
                           device=info.device)  # fmt: skip
    size, ctx, vocab = cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size
    losses, norms, terms = [], [], []
    for step in range(NUM_STEPS):
        g = torch.Generator().manual_seed(100 + step)
        images = torch.randn(cfg.train.batch_size, 3, size, size, generator=g)  # the global batch
        tokens = torch.randint(1, vocab - 2, (cfg.train.batch_size, ctx), generator=g)
        tokens[:, 0] = vocab - 2  # start of text
        lengths = torch.randint(3, ctx, (cfg.train.batch_size,), generator=g)
        tokens[torch.arange(cfg.train.batch_size), lengths] = vocab - 1  # end of text
        tokens[torch.arange(ctx)[None, :] > lengths[:, None]] = 0
        mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        batch = {"image": images[mine], "text": tokens[mine]}
        if cfg.data.train.regions.enabled:  # region tasks: a prompt of 0 .. length - 2 tokens, the rest predicted
            task = torch.randint(0, 3, (cfg.train.batch_size,), generator=g)
            prompt = (torch.rand(cfg.train.batch_size, generator=g) * (lengths - 1)).long() * (task > 0)
            batch.update(decoder_text=tokens[mine], decoder_prompt=prompt[mine], decoder_task=task[mine])
        res = train_step(batch, step + 1)
        assert not res.skipped and not res.stop
        losses.append(res.loss.item())
        norms.append(res.grad_norm)
        terms.append(res.terms)
    if info.rank == 0:
        json.dump({"loss": losses, "grad_norm": norms, "terms": terms}, open(out_path, "w"))
    release_engine(engine)
    destroy()  # as mmpretrain.train does: leaving it to interpreter exit aborted in C++ teardown, 1 run in 5


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
