"""Every recipe's tiny twin (configs/recipes/*-tiny.yaml) trains through the CLI and lowers its loss.

One short run per recipe on the session's shapes shards: every objective term it sums is logged as
loss/<term>, the total and each term fall from the first steps to the last, and the final evaluation is
written. The recipes' full-length numbers on the demo data are in docs/recipes.md.
"""

import glob
import json
import os

import pytest
from omegaconf import OmegaConf

from mmpretrain.checkpoint import find_step_dir
from mmpretrain.engine import CpuThreadTuner, cpu_thread_choices
from mmpretrain.engine_config import EngineConfig
from tests.integration.test_train import ENV, REPO, read_metrics, train_cli

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "recipes", "*-tiny.yaml")))
STEPS = 40
WINDOW = 8  # steps averaged at each end of the run


def recipe_overrides(ds, out):
    return [
        f"output_dir={out}",
        f"data.train.urls={ds.train_urls}",
        f"data.eval.zeroshot={ds.zeroshot_root}",
        f"data.eval.retrieval={ds.retrieval_root}",
        f"train.steps={STEPS}",
        "train.batch_size=32",
        "optim.warmup_steps=4",
        "checkpoint.every_steps=0",
        "eval.every_steps=0",
        "logging.wandb=disabled",
        "logging.log_every=1",
        "logging.progress=false",
    ]


@pytest.fixture(scope="module")
def teacher_run(shapes_dataset, tmp_path_factory):
    """The CLIP twin trained STEPS steps on the session's shards: the teacher of recipes with a distill term."""
    out = str(tmp_path_factory.mktemp("teacher") / "run")
    train_cli([os.path.join(REPO, "configs", "recipes", "clip-tiny.yaml"), *recipe_overrides(shapes_dataset, out)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", RECIPES, ids=[os.path.basename(p)[: -len("-tiny.yaml")] for p in RECIPES])
def test_recipe_tiny_twin_lowers_its_loss(config, shapes_dataset, tmp_path, request):
    full = config.replace("-tiny.yaml", ".yaml")
    assert os.path.isfile(full), f"{config} is the tiny twin of a recipe, but {full} is missing"
    out = str(tmp_path / "run")
    extra = []
    if OmegaConf.select(OmegaConf.load(config), "loss.terms.distill") is not None:
        extra = [f"loss.terms.distill.teacher={request.getfixturevalue('teacher_run')}"]
    proc = train_cli([config, *recipe_overrides(shapes_dataset, out), *extra], env=ENV)
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1)), proc.stdout[-2000:]
    terms = sorted(k for k in lines[0] if k.startswith("loss/"))
    assert terms, "a recipe logs each of its terms as loss/<term>"
    # a term that starts late (self_distill's start_fraction) logs 0 until then: compare from where all are on
    on = next(i for i, m in enumerate(lines) if all(m[k] != 0 for k in terms))
    assert len(lines) - on >= 2 * WINDOW, f"every term is on for only {len(lines) - on} of the {STEPS} steps"
    for key in ["loss", *terms]:
        first = sum(m[key] for m in lines[on : on + WINDOW]) / WINDOW
        last = sum(m[key] for m in lines[-WINDOW:]) / WINDOW
        assert last < first, f"{key}: mean of the first {WINDOW} steps {first:.4f}, of the last {last:.4f}"
    evals = json.load(open(os.path.join(out, "eval.json")))
    assert 0 <= evals["zeroshot/shapes/top1"] <= 1
    assert any(k.startswith("retrieval/") for k in evals), sorted(evals)
    if OmegaConf.select(OmegaConf.load(config), "data.train.regions") is not None:  # region tasks: read back
        assert evals["grounding/shapes/num_regions"] == shapes_dataset.num_eval, sorted(evals)
        assert 0 <= evals["grounding/shapes/ref_acc@0.5"] <= 1 and 0 <= evals["grounding/shapes/gcap_exact"] <= 1


@pytest.mark.slow
def test_cpu_threads_are_chosen_by_timing_and_saved(teacher_run):
    """engine.cpu_threads=0 with one data worker: the run times its own steps on cores-1 and on all cores per
    rank, logs the choice once (metrics.jsonl and a line) and saves it in meta.json for a resume."""
    choices = cpu_thread_choices(EngineConfig(), ranks_on_node=1, data_workers=1)
    lines = [m for m in read_metrics(teacher_run, train_only=False) if "cpu_threads" in m]
    if len(choices) == 1:
        pytest.skip("one core: nothing to choose")
    assert [m["step"] for m in lines] == [CpuThreadTuner.WARM + 2 * CpuThreadTuner.N + 1]
    assert lines[0]["cpu_threads"] in choices and all(f"cpu_threads/step_s_{n}" in lines[0] for n in choices)
    faster = min(choices, key=lambda n: lines[0][f"cpu_threads/step_s_{n}"])
    assert lines[0]["cpu_threads"] == faster or lines[0]["cpu_threads"] == choices[0]  # more threads win by 5%
    meta = json.load(open(os.path.join(find_step_dir(teacher_run), "meta.json")))
    assert meta["cpu_threads"] == lines[0]["cpu_threads"]
