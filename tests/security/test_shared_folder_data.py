"""A folder being loaded never supplies data paths or `pipe:` commands (issue 15, finding 1).

The reproduction: a shared consolidated folder whose config.yaml names `pipe:` eval sets, handed to
`python -m mmpretrain.eval FOLDER`, ran them through a shell. Now the consolidated writer keeps only the model's
config, every reader ignores a folder's data section, and evaluation takes its sets from the command line or the
user's own --config. Checked for a consolidated folder and for a run folder (meta.json), with and without sets
named on the command line: the command that would create the marker file never runs.
"""

import dataclasses
import json
import os

import pytest
import torch
import yaml

from mmpretrain.config import Config
from mmpretrain.convert import read_any, write_folder
from mmpretrain.eval.cli import main as eval_main
from mmpretrain.model import ModelConfig, build_model, resolve_model_config


def hostile_data(marker) -> dict:
    """A data: section whose eval sets (and their classnames.txt) are shell commands writing ``marker``."""
    command = f"pipe:id > {marker}; echo #"
    return {"train": {"urls": command}, "eval": {"zeroshot": command, "retrieval": command}}


@pytest.fixture(scope="module")
def tiny():
    cfg = Config(model=resolve_model_config(ModelConfig(name="tiny")))
    torch.manual_seed(0)
    return build_model(cfg.model).state_dict(), cfg


def consolidated_folder(tiny, root, marker) -> str:
    sd, cfg = tiny
    folder = str(root / "shared-consolidated")
    cfg = Config(model=cfg.model)
    cfg.data.eval.zeroshot = f"pipe:id > {marker}; echo #"  # what a run's config held before
    write_folder(sd, cfg, folder)
    written = yaml.safe_load(open(os.path.join(folder, "config.yaml")))
    assert set(written) == {"model"}, written  # the writer keeps the model's config only
    written["data"] = hostile_data(marker)  # an attacker edits the file by hand
    yaml.safe_dump(written, open(os.path.join(folder, "config.yaml"), "w"))
    return folder


def run_folder(tiny, root, marker) -> str:
    """A stage-0 checkpoint folder (meta.json + mp_rank_00_model_states.pt) whose config names the hostile sets."""
    sd, cfg = tiny
    folder = root / "shared-run" / "checkpoints" / "step_2"
    folder.mkdir(parents=True)
    config = {"model": dataclasses.asdict(cfg.model), "engine": {"zero_stage": 0}, "data": hostile_data(marker)}
    (folder / "meta.json").write_text(json.dumps({"step": 2, "config": config}))
    torch.save({"module": sd}, folder / "mp_rank_00_model_states.pt")
    (folder.parent / "latest").write_text("step_2")
    return str(folder.parent.parent)


@pytest.mark.parametrize("make", [consolidated_folder, run_folder], ids=["consolidated", "run"])
def test_eval_never_takes_data_from_the_folder(make, tiny, tmp_path, shapes_dataset, capsys):
    marker = tmp_path / "pwned"
    folder = make(tiny, tmp_path, marker)
    _, cfg = read_any(folder)
    assert cfg.data == Config().data  # every reader: the folder's data section is ignored

    # no set named: refused, one line saying where sets come from
    assert eval_main([folder, "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "no eval set named" in err and "--config" in err, err
    assert not marker.exists()

    # a set named on the command line: evaluated; the folder's other set is not added
    out = tmp_path / "r.json"
    args = ["--zeroshot", shapes_dataset.zeroshot_root, "--num-workers", "0", "--output", str(out)]
    assert eval_main([folder, *args]) == 0
    assert not marker.exists()
    assert all(k.startswith("zeroshot/") for k in json.loads(out.read_text()))
