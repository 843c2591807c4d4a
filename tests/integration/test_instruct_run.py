"""`python -m mmpretrain.instruct` end to end on a few steps: both stages run on the engine (the second with LoRA on
the LM), the loss falls, the outputs are written and the (merged) LLaVA export loads with its tokenizer (issue 19;
the full twin's numbers: docs/instruct.md). The run is stopped by its STOP file after step 1 (exit 75, a checkpoint)
and relaunched: ZeRO-0's resume path (exactness is tests/distributed/test_instruct_distributed.py's, under ZeRO-3)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_instruct_command_two_stages(tmp_path, capsys):
    out = tmp_path / "run"
    stages = ("stages=[{name: captions, data: captions, steps: 5, lr: 1e-3, train: [projector]},"
              "{name: instruct, data: vqa, steps: 40, lr: 2e-3, train: [projector, lm, vision],"
              " lora_rank: 4}]")  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    sizes = ["data.num_caption_images=64", "data.num_train_images=200", "data.num_eval_images=10"]
    cmd = [sys.executable, "-m", "mmpretrain.instruct", "configs/instruct/tiny.yaml", f"output_dir={out}", stages,
           *sizes, "optim.warmup_steps=5"]  # fmt: skip
    # a stop request (the STOP file, as a signal would) before the first step: exit 75 after step 1 with a checkpoint
    out.mkdir()
    (out / "STOP").write_text("")
    future = time.time() + 3600  # written "after" the process starts, so not a stale file of an earlier run
    os.utime(out / "STOP", (future, future))
    first = subprocess.run(cmd, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
    assert first.returncode == 75, first.stderr[-3000:]
    assert not (out / "STOP").exists()
    assert open(out / "checkpoints" / "latest").read().strip() == "step_1"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)  # resumes at step 2, to the end
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["stage"] for r in rows][0] == "captions" and rows[-1]["stage"] == "instruct" and rows[-1]["step"] == 45
    inst = [r["loss"] for r in rows if r["stage"] == "instruct"]
    assert inst[-1] < inst[0]
    result = json.load(open(out / "eval.json"))
    for phrasing in ("train", "held_out"):
        ev = result[f"eval_{phrasing}_phrasings"]
        assert ev["count"] == {"color": 2, "shape": 2, "background": 2, "size": 2, "position": 2}
        assert all(0 <= a <= 1 for a in ev["accuracy"].values())
    assert result["skipped"] == {}
    # the export, loaded by transformers, against our model on held-out images: logits and greedy answers
    parity = result["hf_parity"]
    assert parity["items"] == 10 and parity["max_abs_logit_diff"] <= 1e-4 and parity["same_answers"] == 10, parity

    # the chat command from the run folder (our model, its checkpoint, LoRA merged) and from its export
    from mmpretrain.data.synthetic import make_shape_sample
    from mmpretrain.instruct.chat import main as chat

    make_shape_sample(np.random.default_rng(5), 32).image.save(tmp_path / "shape.png")
    said = []
    for folder in (out, out / "llava"):
        chat([str(folder), "--image", str(tmp_path / "shape.png"), "--prompt", "what shape is it ?"])
        said.append(capsys.readouterr().out)
    assert said[0] == said[1] and said[0].strip()

    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(out / "llava")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "llava"))
    assert tok.convert_tokens_to_ids("<image>") == hf.config.image_token_id
    ids = tok("<image> " * hf.config.image_seq_length + "what shape is it ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32)).logits
    assert torch.isfinite(logits).all()
