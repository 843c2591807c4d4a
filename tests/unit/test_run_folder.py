"""The run folder's readers: latest tag, step folders, meta.json, the run's config (plain files, no engine)."""

import json

import pytest

from mmpretrain import run_folder
from mmpretrain.config import Config, to_dict, to_yaml


def make_run(root, steps=(2, 4), latest=4, config=None):
    ckpt = root / "checkpoints"
    for s in steps:
        (ckpt / f"step_{s}").mkdir(parents=True)
        (ckpt / f"step_{s}" / "meta.json").write_text(json.dumps({"step": s, "config": config or {}}))
    (ckpt / "step_9").mkdir()  # a save killed before meta.json: never resumed from
    if latest is not None:
        (ckpt / "latest").write_text(f"step_{latest}\n")
    return root


def test_latest_and_step_folders(tmp_path):
    run = make_run(tmp_path)
    assert run_folder.is_run(str(run)) and run_folder.is_run(str(run / "checkpoints" / "step_2"))
    assert not run_folder.is_run(str(run / "checkpoints"))
    assert run_folder.latest_tag(str(run)) == "step_4"
    assert run_folder.find_step_dir(str(run)) == str(run / "checkpoints" / "step_4")
    assert run_folder.find_step_dir(str(run / "checkpoints" / "step_2")) == str(run / "checkpoints" / "step_2")
    assert run_folder.step_numbers(str(run)) == [2, 4, 9]
    assert run_folder.read_meta(str(run / "checkpoints" / "step_2"))["step"] == 2


def test_fresh_and_damaged_runs(tmp_path):
    assert run_folder.latest_tag(str(make_run(tmp_path / "fresh", latest=None))) is None
    with pytest.raises(ValueError, match="not a run folder with checkpoints/latest"):
        run_folder.find_step_dir(str(tmp_path / "fresh"))
    damaged = make_run(tmp_path / "damaged", latest=9)
    with pytest.raises(ValueError, match="names 'step_9', but step_9/meta.json is missing"):
        run_folder.latest_tag(str(damaged))
    (damaged / "checkpoints" / "step_2" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="step_2/meta.json: unreadable"):
        run_folder.read_meta(str(damaged / "checkpoints" / "step_2"))


def test_the_configs_a_run_recorded(tmp_path):
    cfg = Config(output_dir=str(tmp_path))
    cfg.train.steps = 7
    run = make_run(tmp_path, config=to_dict(cfg))
    assert to_dict(run_folder.meta_config(str(run / "checkpoints" / "step_4"))) == to_dict(cfg)
    assert run_folder.run_config(str(run)) is None
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert run_folder.run_config(str(run)).train.steps == 7
    bad = make_run(tmp_path / "bad", config={"train": {"stepz": 1}})
    with pytest.raises(ValueError, match=r"step_4/meta.json: invalid config \(.*stepz"):
        run_folder.meta_config(str(bad / "checkpoints" / "step_4"))
