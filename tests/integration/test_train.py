"""End-to-end runs of ``python -m mmpretrain.train`` on the synthetic shapes shards.

One uninterrupted run and one stopped-and-restarted run are shared by several assertions:
same losses and weights after a restart, a metrics file that reads as one run, the wandb run
id kept across the restart, and the first losses of the tiny config pinned under a fixed seed.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmpretrain.checkpoint import find_step_dir, load_state_dict

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 6

# First losses of the tiny CLIP on the session's shapes shards (seed 0, batch 16, fp32).
# A refactor that changes them changed the math or the data order: update only on purpose.
# (Changed with the global sample order over data.num_streams streams: every batch draws from all 4 streams.)
PINNED_LOSSES = [3.2477381229400635, 3.063812494277954, 2.7373199462890625]


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "integration", "tiny.yaml")  # not configs/demo.yaml: tuning the demo moves nothing


def base_overrides(ds, out):
    return [
        TINY,
        f"output_dir={out}",
        f"data.train.urls={ds.train_urls}",
        f"data.eval.zeroshot={ds.zeroshot_root}",
        f"data.eval.retrieval={ds.retrieval_root}",
    ]


def train_cli(args, env=ENV, check=True):
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.train", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_metrics(out, train_only=True):
    """metrics.jsonl lines; train lines carry a loss, eval lines (same step) carry eval keys."""
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [m for m in lines if "loss" in m] if train_only else lines


@pytest.fixture(scope="module")
def runs(shapes_dataset, tmp_path_factory):
    """An uninterrupted run (no wandb) and a run stopped after 3 steps then restarted (wandb offline)."""
    root = tmp_path_factory.mktemp("train")
    full, resumed = str(root / "full"), str(root / "resumed")
    train_cli([*base_overrides(shapes_dataset, full), "logging.wandb=disabled"])
    args = [*base_overrides(shapes_dataset, resumed), "logging.wandb=offline"]
    first = train_cli(["--stop-after-steps", "3", *args])
    second = train_cli(args)
    return {"full": full, "resumed": resumed, "first": first, "second": second}


@pytest.mark.slow
def test_restart_continues_to_same_losses_and_weights(runs):
    full, resumed = read_metrics(runs["full"]), read_metrics(runs["resumed"])
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1)), "metrics.jsonl must read as one run"
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
        assert b["samples_seen"] == a["samples_seen"]
    sd_full = load_state_dict(find_step_dir(runs["full"]))
    sd_resumed = load_state_dict(find_step_dir(runs["resumed"]))
    assert sd_full.keys() == sd_resumed.keys()
    for k in sd_full:
        torch.testing.assert_close(sd_resumed[k], sd_full[k], rtol=1e-6, atol=1e-6, msg=k)
    # the run did train: weights moved away from the step-3 checkpoint
    assert "stopped at step 3/6" in runs["first"].stdout and "resumed from" in runs["second"].stdout
    assert "data: each of the 4 streams continues at its recorded position" in runs["second"].stdout


@pytest.mark.slow
def test_run_folder_explains_itself(runs):
    out = runs["resumed"]
    meta = json.load(open(os.path.join(find_step_dir(out), "meta.json")))
    assert meta["step"] == STEPS and meta["samples_seen"] == STEPS * 16 and meta["world_size"] == 1
    # the data position as state: the 4 streams of the 4 shards (data.num_streams=null), each with its position
    assert meta["data"]["num_streams"] == 4 and sorted(meta["data"]["streams"]) == ["0", "1", "2", "3"]
    assert all(s["position"] == STEPS * 16 // 4 for s in meta["data"]["streams"].values())
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == f"step_{STEPS}"
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_3", "step_6"]
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    last = read_metrics(out)[-1]
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac", "grad_norm", "skipped_samples"):
        assert key in last, key
    assert any("zeroshot/shapes/top1" in m for m in read_metrics(out, train_only=False)), "final eval must be logged"
    evals = json.load(open(os.path.join(out, "eval.json")))
    assert 0 <= evals["zeroshot/shapes/top1"] <= 1
    # wandb: one offline folder per invocation, both with the run id kept in the checkpoint
    runs_dirs = [d for d in os.listdir(os.path.join(out, "wandb")) if d.startswith("offline-run-")]
    assert len(runs_dirs) == 2 and all(d.endswith(meta["wandb_run_id"]) for d in runs_dirs), runs_dirs


@pytest.mark.slow
def test_first_losses_are_pinned(runs):
    losses = [m["loss"] for m in read_metrics(runs["full"])][:3]
    assert all(l == l and l > 0 for l in losses)  # noqa: E741
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4)


@pytest.mark.slow
def test_restart_with_other_settings_is_refused(runs, shapes_dataset):
    out = runs["full"]
    before = open(os.path.join(out, "config.yaml")).read()
    proc = train_cli([*base_overrides(shapes_dataset, out), "optim.lr=0.1"], check=False)
    assert proc.returncode == 2
    assert "optim.lr: 0.001 -> 0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert open(os.path.join(out, "config.yaml")).read() == before


@pytest.mark.slow
def test_siglip_bf16_with_grad_cache_trains(shapes_dataset, tmp_path):
    """The other family, mixed precision and GradCache accumulation through the same CLI."""
    out = str(tmp_path / "siglip")
    args = [*base_overrides(shapes_dataset, out), "model.name=siglip-tiny", "loss.name=siglip", "engine.precision=bf16"]
    args += ["train.accum_steps=2", "train.steps=4", "model.vision.patch_dropout=0.25"]
    proc = train_cli(args)
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in lines)
    # at init (scale 10, bias -10, features nearly orthogonal) each positive pair costs about
    # -log sigmoid(-10) = 10 nats and each negative about 0, so the loss per sample starts near 10
    assert 8 < lines[0]["loss"] < 12, lines[0]["loss"]
    assert "finished at step 4/4" in proc.stdout


@pytest.mark.slow
def test_evaluate_cli_on_the_run_folder_reproduces_the_final_eval(runs, tmp_path):
    """python -m mmpretrain.eval RUN --config (the config it was trained with) loads the last checkpoint (stage 0:
    weights-only, no --trust-pickles) and gets the numbers training logged."""
    out_json = tmp_path / "results.json"
    own = os.path.join(runs["full"], "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.eval", runs["full"], "--config", own, "--output",
                           str(out_json)], env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out_json.read_text())
    logged = json.load(open(os.path.join(runs["full"], "eval.json")))
    for key in ("zeroshot/shapes/top1", "zeroshot/shapes/top5", "retrieval/shapes/image_to_text_R@1"):
        assert got[key] == pytest.approx(logged[key], abs=1e-9), key
    assert "zeroshot/shapes/top1" in proc.stdout  # the printed table


@pytest.mark.slow
def test_init_from_hf_export_continues_from_those_weights(runs, shapes_dataset, tmp_path):
    """Export the trained run to a Hugging Face folder, start a new run from it: step 1 sees those weights."""
    hf_dir = str(tmp_path / "hf")
    conv = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "to-hf", runs["full"], hf_dir], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-2000:]
    out = str(tmp_path / "from_hf")
    train_cli([*base_overrides(shapes_dataset, out), f"model.init_from={hf_dir}", "train.steps=1", "optim.lr=1e-9"])
    # with a vanishing LR the new run's only step leaves the imported weights as they were
    sd_new, sd_src = load_state_dict(find_step_dir(out)), load_state_dict(find_step_dir(runs["full"]))
    for k in sd_src:
        torch.testing.assert_close(sd_new[k], sd_src[k], rtol=0, atol=1e-6, msg=k)
    bad = train_cli([*base_overrides(shapes_dataset, str(tmp_path / "bad")), f"model.init_from={hf_dir}",
                     "model.name=siglip-tiny", "loss.name=siglip"], check=False)  # fmt: skip
    assert bad.returncode == 2 and "model.init_from:" in bad.stderr and "Traceback" not in bad.stderr
