"""`python -m mmpretrain.instruct` on 2 gloo ranks under ZeRO-3 == 1 rank; a stopped and relaunched run == one
uninterrupted run; a stage reading LLaVA JSON (issue 19).

Five short launches of the same two-stage config, shared by the tests of this module (module fixture):

    one       1 rank, uninterrupted                                       the reference
    two       torchrun --nproc_per_node=2, ZeRO-3 (same config)           == one within float tolerance
    resumed   1 rank, stopped after step 3 (the stage boundary), then     == one within 1e-6
              after step 5 (mid stage 2, LoRA adapters, frozen vision), then to the end

Stage 1 trains the projector and the vision tower on the twin's captions; stage 2 trains LoRA adapters and the
projector (vision frozen) on a LLaVA JSON written here: multi-turn conversations of different lengths (the ranks'
label-token counts differ, so a per-rank token mean would not match one rank) and a few bad records, skipped and
counted. Every launch runs ZeRO-3 (1 rank too: its checkpoints hold frozen parameters as fragments, which the
resume must restore). About 40 s on 2 cores.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from mmpretrain.data.synthetic import make_shape_sample
from mmpretrain.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
STEPS = (3, 4)  # stage 1 (captions), stage 2 (LLaVA JSON)
BAD = {"missing_image": 2, "no_assistant_turn": 1, "unreadable_image": 1, "bad_record": 1}


def write_llava_json(root) -> tuple[str, str]:
    """A LLaVA JSON of 12 good records (1-3 turns, some with two images) and the bad ones of BAD, in the twin's
    words, with its image folder."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        make_shape_sample(rng, 32).image.save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not an image")
    qa = [("what color is the shape ?", "red"), ("what shape is it ?", "circle"), ("where is the shape ?", "left"),
          ("how big is the shape ?", "small"), ("what is the background color ?", "blue")]  # fmt: skip
    records = []
    for i in range(12):
        turns = []
        for t in range(1 + i % 3):
            q, a = qa[(i + t) % len(qa)]
            turns += [{"from": "human", "value": ("<image> " if t == 0 else "") + q}, {"from": "gpt", "value": a}]
        if i % 4 == 0:  # two images
            turns[0]["value"] = "<image> <image> " + qa[i % len(qa)][0]
            records.append({"image": [f"{i % 6}.png", f"{(i + 1) % 6}.png"], "conversations": turns})
        else:
            records.append({"image": f"{i % 6}.png", "conversations": turns})
    one_turn = [{"from": "human", "value": "<image> what shape is it ?"}, {"from": "gpt", "value": "square"}]
    records += [
        {"image": "nope.png", "conversations": one_turn},
        {"image": "../outside.png", "conversations": one_turn},
        {"image": "0.png", "conversations": one_turn[:1]},
        {"image": "broken.png", "conversations": one_turn},
        "not a record",
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


def launch(out, args, nproc=1, stop_after=0):
    module = ["-m", "mmpretrain.instruct", "configs/instruct/tiny.yaml", f"output_dir={out}", *args]
    if stop_after:
        module += ["--stop-after-steps", str(stop_after)]
    runner = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [sys.executable, *(runner if nproc > 1 else []), *module]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{cmd} failed:\n{proc.stderr[-4000:]}")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct_ranks")
    llava_json, image_folder = write_llava_json(root)
    stages = (f"stages=[{{name: captions, data: captions, steps: {STEPS[0]}, lr: 3e-3, train: [projector, vision]}},"
              f" {{name: instruct, data: llava, llava_json: '{llava_json}', image_folder: '{image_folder}',"
              f" steps: {STEPS[1]}, lr: 3e-3, train: [projector, lm], lora_rank: 4}}]")  # fmt: skip
    args = [stages, "batch_size=6", "engine.zero_stage=3", "optim.warmup_steps=1", "checkpoint.every_steps=2",
            "logging.log_every=1", "logging.progress=false", "logging.wandb=disabled", "data.num_caption_images=24",
            "data.num_eval_images=0"]  # fmt: skip
    out = {name: str(root / name) for name in ("one", "two", "resumed")}
    launch(out["one"], args)
    launch(out["two"], args, nproc=2)
    launch(out["resumed"], args, stop_after=STEPS[0])  # stops at the end of stage 1
    launch(out["resumed"], args, stop_after=2)  # resumes at the boundary, stops mid stage 2
    launch(out["resumed"], args)  # resumes mid stage 2, to the end
    return out


def weights(out) -> dict:
    return load_file(os.path.join(out, "llava", "model.safetensors"))


@pytest.mark.slow
def test_two_ranks_zero3_equal_one_rank(runs):
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, sum(STEPS) + 1))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"loss differs at step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"grad norm differs at step {a['step']}"
    assert len({round(r["loss"], 4) for r in one}) == len(one)  # the steps moved the weights
    # the parameters after the last step (the export, LoRA merged): every tensor within float tolerance
    w1, w2 = weights(runs["one"]), weights(runs["two"])
    assert w1.keys() == w2.keys()
    for k in w1:
        err = (w1[k] - w2[k]).abs().max().item()
        assert err <= 1e-5 * max(w1[k].abs().max().item(), 1.0), f"{k}: 2 ranks differ from 1 by {err:.3g}"


@pytest.mark.slow
def test_resume_across_a_stage_boundary_is_exact(runs):
    one, resumed = metrics(runs["one"]), metrics(runs["resumed"])
    assert [r["step"] for r in resumed] == [r["step"] for r in one]  # metrics.jsonl reads as one run
    for a, b in zip(one, resumed):
        assert b["stage"] == a["stage"]
        assert abs(b["loss"] - a["loss"]) <= 1e-6, f"step {a['step']}: {a['loss']} vs {b['loss']}"
    w1, w3 = weights(runs["one"]), weights(runs["resumed"])
    assert max((w1[k] - w3[k]).abs().max().item() for k in w1) <= 1e-6
    ckpt = os.path.join(runs["resumed"], "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == f"step_{sum(STEPS)}"
    meta = json.load(open(os.path.join(ckpt, f"step_{sum(STEPS)}", "meta.json")))
    assert (meta["stage"], meta["stage_name"], meta["stage_step"]) == (1, "instruct", STEPS[1])


@pytest.mark.slow
def test_llava_json_stage_counts_bad_records(runs):
    result = json.load(open(os.path.join(runs["two"], "eval.json")))
    assert result["skipped"] == BAD
    last = metrics(runs["two"])[-1]
    assert last["skipped_samples"] == sum(BAD.values())
    assert {k: v for k, v in last.items() if k.startswith("data/skipped/")} == {
        f"data/skipped/{k}": v for k, v in BAD.items()
    }


@pytest.mark.slow
def test_chat_from_a_zero3_run_folder_answers_like_its_export(runs, tmp_path):
    """`python -m mmpretrain.instruct.chat RUN`'s model (ours, from the 2-rank ZeRO-3 checkpoint, weights read
    weights-only, the last stage's LoRA adapters merged) gives the logits of the run's transformers export on a
    chat prompt, and the same greedy tokens as the chat command on the export."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mmpretrain.data.transforms import normalize_images
    from mmpretrain.instruct.chat import answer, load_run
    from mmpretrain.instruct.template import ConversationEncoder, HFTokenizer
    from mmpretrain.instruct.vqa import image_tensor

    model, tok, template = load_run(runs["two"])
    hf = LlavaForConditionalGeneration.from_pretrained(os.path.join(runs["two"], "llava")).eval()
    enc = ConversationEncoder(HFTokenizer(tok), model.image_token_id, model.num_image_tokens, template)
    for seed in range(3):
        sample = make_shape_sample(np.random.default_rng(seed), 32)
        sample.image.save(tmp_path / f"{seed}.png")
        ids = torch.tensor([enc.encode_prompt([("user", "<image> what shape is it ?")])])
        pixels = normalize_images(image_tensor(sample.image))
        with torch.no_grad():
            ours, theirs = model(ids, pixels).logits, hf(input_ids=ids, pixel_values=pixels).logits
            other = model(ids, torch.randn_like(pixels)).logits
        assert (ours - theirs).abs().max() <= 1e-4
        assert (ours - other).abs().max() > 1e-4  # the image reaches the logits: the parity is not vacuous
        png = [str(tmp_path / f"{seed}.png")]
        prompt = "what shape is it ?"
        assert answer(runs["two"], png, prompt, 5) == answer(os.path.join(runs["two"], "llava"), png, prompt, 5)
