"""A finished run lets go of its engine (mmpretrain.engine.release_engine, then mmpretrain.distributed.destroy).

Without it, DeepSpeed's hooks and ZeRO-3's module-level references kept the engine alive past
destroy_process_group, and with it the process groups it cloned: their gloo threads were still running at
interpreter exit, where a rank now and then aborted after all its work was done ("terminate called without an
active exception", exit -6; seen in CI on 2-rank ZeRO-3 runs). Checked in a fresh process for ZeRO 0, 2 and 3:
after the release the engine is collected and no gloo thread is left.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                         "MASTER_ADDR", "MMPRETRAIN_INJECT")}  # fmt: skip
ENV.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")

SCRIPT = r"""
import json, os, sys, weakref
import torch
from mmpretrain.config import load_config
from mmpretrain.distributed import destroy, init_distributed
from mmpretrain.engine import build_engine, release_engine
from mmpretrain.model import build_model
from mmpretrain.objectives import Objective
from mmpretrain.step import TrainStep

def gloo_threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
        except OSError:
            pass
    return sum("gloo" in n for n in names)

out = {}
for stage in (0, 2, 3):
    cfg = load_config(sys.argv[1], ["train.batch_size=8", "data.synthetic.root=unused", f"engine.zero_stage={stage}"])
    info = init_distributed()
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model), cfg.optim, cfg.engine, micro_batch_size=8, total_steps=10)
    step = TrainStep(engine, Objective(cfg), cfg.engine, grad_clip=1.0, loss_cfg=cfg.loss, device=info.device)
    L, vocab, size = cfg.model.text.context_length, cfg.model.text.vocab_size, cfg.model.vision.image_size
    tokens = torch.randint(1, vocab - 2, (8, L))
    tokens[:, -1] = vocab - 1
    for i in (1, 2):  # ZeRO-3 records its trace in the first step and fills its caches from the second
        step({"image": torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8), "text": tokens}, i)
    during = gloo_threads()
    ref = weakref.ref(engine)
    release_engine(engine)
    del engine, step
    destroy()
    out[stage] = {"threads_during": during, "engine_alive": ref() is not None, "threads_after": gloo_threads()}
print("RESULT " + json.dumps(out))
"""


def test_a_released_engine_is_collected_and_its_process_groups_threads_end():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, TINY], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:]
    for stage, r in json.loads(line[0][len("RESULT ") :]).items():
        assert r["threads_during"] > 0, f"ZeRO-{stage}: no gloo thread while the group lives: the check sees nothing"
        assert not r["engine_alive"], f"ZeRO-{stage}: the engine outlived release_engine + destroy"
        assert r["threads_after"] == 0, f"ZeRO-{stage}: {r['threads_after']} gloo threads left after destroy"


HANG = r"""
import sys, time
import torch.distributed as dist
from mmpretrain import distributed
distributed.init_distributed()
deepspeed = sys.modules.get("deepspeed")
dist.destroy_process_group = lambda *a, **k: time.sleep(120)  # a teardown that hangs
if deepspeed is not None:
    deepspeed.comm.destroy_process_group = dist.destroy_process_group
distributed.destroy(exit_code=7, timeout_s=2)
print("not reached")
"""


def test_a_hung_teardown_ends_with_the_commands_code_and_the_stacks():
    proc = subprocess.run([sys.executable, "-c", HANG], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-2000:])
    assert "tearing down the process groups took over 2 s" in proc.stderr
    assert "in <lambda>" in proc.stderr and "not reached" not in proc.stdout  # the stack names where it hung
