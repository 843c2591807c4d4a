"""mmpretrain.eval.cli (`python -m mmpretrain.eval`, and the older `python -m mmpretrain.evaluate`): one-line
errors, the table and the JSON, ImageNet and its missing open_clip, a run's ITM head loaded and re-ranking."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

import mmpretrain.checkpoint
import mmpretrain.eval.zeroshot
from mmpretrain.eval.cli import main
from mmpretrain.eval.suite import set_name
from tests.unit.eval.helpers import png, write_tar

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_cli_missing_checkpoint_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "nope") in err


def test_cli_bad_eval_sets(tiny_run, tmp_path, sets, monkeypatch, capsys):
    zs, rt, _ = sets
    monkeypatch.setattr(mmpretrain.checkpoint, "load_model", lambda path, **kw: copy.deepcopy(tiny_run))
    no_classnames = tmp_path / "no_classnames"
    shutil.copytree(os.path.join(zs, "test"), no_classnames / "test")
    for args, named in [
        (["--zeroshot", str(tmp_path / "missing")], str(tmp_path / "missing")),
        (["--zeroshot", str(no_classnames)], str(no_classnames / "classnames.txt")),
        (["--retrieval", rt, "--split", "val"], os.path.join(rt, "val", "*.tar")),
    ]:
        assert main([str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and named in err, err


@pytest.mark.parametrize("module", ["mmpretrain.eval", "mmpretrain.evaluate"])  # the older spelling too
def test_cli_error_is_one_line_without_traceback(tmp_path, module):
    proc = subprocess.run(
        [sys.executable, "-m", module, str(tmp_path / "missing_run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "missing_run") in proc.stderr


def test_cli_prints_table_and_writes_json(tiny_run, shapes_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mmpretrain.checkpoint, "load_model", lambda path, **kw: copy.deepcopy(tiny_run))
    out = tmp_path / "out" / "results.json"
    # the sets come from the user's own config (the loaded folder's never are: tests/security)
    own = tmp_path / "own.yaml"
    own.write_text(
        f"data:\n  eval: {{zeroshot: {shapes_dataset.zeroshot_root}, retrieval: {shapes_dataset.retrieval_root}}}\n"
    )
    args = ["--config", str(own), "--batch-size", "16", "--num-workers", "0", "--output", str(out)]
    assert main([str(tmp_path), *args]) == 0
    results = json.loads(out.read_text())
    zs = set_name(shapes_dataset.zeroshot_root)
    printed = capsys.readouterr().out
    assert f"zeroshot/{zs}/top1" in printed and f"{results[f'zeroshot/{zs}/top1']:.4f}" in printed
    assert len(results) == 3 + 8  # the config's two sets: top1/top5/num_samples + 6 recalls and 2 counts

    # sets named on the command line replace the config's
    assert (
        main([str(tmp_path), "--config", str(own), "--zeroshot", shapes_dataset.zeroshot_root, "--output", str(out)])
        == 0
    )
    assert sorted(json.loads(out.read_text())) == sorted(k for k in results if k.startswith("zeroshot/"))


def test_imagenet_cli_keys(tiny_run, tmp_path, monkeypatch):
    """The CLI path with the real tiny model; a 3-class stand-in for open_clip's lists keeps it fast."""
    monkeypatch.setattr(mmpretrain.checkpoint, "load_model", lambda path, **kw: copy.deepcopy(tiny_run))
    monkeypatch.setattr(
        mmpretrain.eval.zeroshot,
        "imagenet_classes_and_templates",
        lambda: (["tench", "goldfish", "shark"], [str, "a {c}."]),
    )
    samples = [(f"v{i}", {"png": png((80 * i, 90, 30), i), "cls": str(i % 3).encode()}) for i in range(4)]
    write_tar(str(tmp_path / "imagenet" / "test" / "0.tar"), samples)
    out = tmp_path / "r.json"
    args = ["--imagenet", str(tmp_path / "imagenet"), "--num-workers", "0", "--output", str(out)]
    assert main([str(tmp_path), *args]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {f"zeroshot/imagenet1k/{k}" for k in ("top1", "top5", "num_samples")}
    assert results["zeroshot/imagenet1k/num_samples"] == 4 and results["zeroshot/imagenet1k/top5"] == 1.0


def test_imagenet_without_open_clip_is_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mmpretrain.checkpoint, "load_model", lambda path, **kw: copy.deepcopy(tiny_run))
    monkeypatch.setitem(sys.modules, "open_clip.zero_shot_metadata", None)  # import fails as if not installed
    (tmp_path / "imagenet").mkdir()
    assert main([str(tmp_path), "--imagenet", str(tmp_path / "imagenet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "open_clip_torch" in err, err


def test_cli_loads_a_runs_itm_head_and_reranks(shapes_dataset, tmp_path):
    """A run trained with loss.terms.itm: `python -m mmpretrain.eval RUN` builds the head from the run's config,
    loads it strictly with the towers and reports the re-ranked recalls, equal to the trainer's final eval."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    ds, out = shapes_dataset, tmp_path / "run"
    # a world of one on its own port: no launcher variables an earlier in-process test may have left behind
    clean_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run(
        [sys.executable, "-m", "mmpretrain.train", os.path.join(repo, "configs", "recipes", "itm-tiny.yaml"),
         f"output_dir={out}", f"data.train.urls={ds.train_urls}", f"data.eval.zeroshot={ds.zeroshot_root}",
         f"data.eval.retrieval={ds.retrieval_root}", "train.steps=2", "train.batch_size=8", "data.num_workers=0",
         "checkpoint.every_steps=0", "logging.wandb=disabled", "logging.progress=false", "eval.num_workers=0"],
        env={**clean_env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trained = json.load(open(out / "eval.json"))
    # the recipe's eval settings (eval.itm_rerank_k) from its YAML, the sets from the command line
    recipe = os.path.join(repo, "configs", "recipes", "itm-tiny.yaml")
    sets = ["--config", recipe, "--zeroshot", ds.zeroshot_root, "--retrieval", ds.retrieval_root]
    assert main([str(out), *sets, "--num-workers", "0", "--output", str(tmp_path / "r.json")]) == 0
    got = json.load(open(tmp_path / "r.json"))
    name = set_name(ds.retrieval_root)
    assert f"retrieval/{name}/itm_rerank/image_to_text_R@1" in got
    assert {k: v for k, v in got.items()} == pytest.approx({k: v for k, v in trained.items() if k != "step"})
