"""Config: defaults <- YAML <- overrides; bad input fails before any work with the dotted key named."""

import glob
import os
import re
import subprocess
import sys

import pytest

from mmpretrain import kernels
from mmpretrain.config import (
    ConfigError,
    bundled_config_names,
    diff_configs,
    find_config,
    from_yaml_file,
    load_config,
    to_dict,
    to_yaml,
)
from mmpretrain.distributed import free_port
from mmpretrain.model import config as model_config
from mmpretrain.train import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "configs", "demo.yaml")


def test_merge_order_and_resolution(tmp_path):
    cfg = load_config(DEMO, ["train.steps=7", "model.vision.patch_dropout=0.5"])
    assert cfg.train.steps == 7 and cfg.model.vision.patch_dropout == 0.5
    assert cfg.train.batch_size == 128  # from the YAML
    assert cfg.optim.beta2 == 0.98  # a default
    assert cfg.model.vision.width is not None and cfg.model.family == "clip"  # size table filled in
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert to_dict(from_yaml_file(str(path))) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "train.stepz: unknown key"),
        (["train.steps=abc"], "train.steps:"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["model.name=ViT-Q-99"], "model.name: unknown size 'ViT-Q-99'"),
        (["engine.zero_stage=4"], "engine.zero_stage must be 0, 1, 2 or 3"),
        (["loss.name=siglip"], "loss.name: the 'siglip' term needs a siglip model; model.name='tiny' is clip"),
        (["data.synthetic.root=null"], "data.train.urls: required"),
        (["data.train.urls=/nonexistent/shard-{000..003}.tar"], "data.train.urls"),
        (["train.steps"], "must look like key=value"),
        (["train.accum_steps=2", "engine.zero_stage=2"], "use engine.zero_stage=1 or 3"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_batch_must_divide_world_size():
    with pytest.raises(ConfigError, match=r"train.batch_size must be divisible by the world size \(got 10 on 4"):
        load_config(DEMO, ["train.batch_size=10"], world_size=4)


def test_cli_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([DEMO, "train.stepz=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmpretrain.train: error: train.stepz: unknown key"


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("train:\n  steps: 10\n   batch_size: 4\n", ":3:14:", "mapping values are not allowed in this context"),
        ("train: {steps: 10\nmodel: tiny\n", ":2:6:", "did not find expected ',' or '}' (while parsing a flow mapping"),
        ("train:\n\tsteps: 3\n", ":2:1:", "cannot start any token (a tab: YAML indents with spaces)"),
        ("- a\n- b\n", ":", "a config is a mapping of sections"),
    ],
)
def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, capsys, text, where, problem):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main([str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mmpretrain.train: error: {path}{where}") and problem in err
    # a run folder's config.yaml read back on a restart says the same
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}{where}")):
        from_yaml_file(str(path))


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit):
        main(["no/such.yaml"])
    err = capsys.readouterr().err
    assert "config file not found: no/such.yaml" in err and "bundled config" in err and "recipes/clip-tiny" in err


def test_bundled_config_by_name(tmp_path, monkeypatch):
    """`mmpretrain-train demo` from any folder: a name finds configs/ (mmpretrain/configs in a wheel, see
    test_wheel.py); a file of that name in the working folder wins."""
    monkeypatch.chdir(tmp_path)
    for name in ("demo", "demo.yaml"):
        assert os.path.samefile(find_config(name), DEMO)
    assert os.path.samefile(find_config("recipes/clip-tiny"), os.path.join(REPO, "configs/recipes/clip-tiny.yaml"))
    assert "demo" in bundled_config_names() and "recipes/mim-tiny" in bundled_config_names()
    assert load_config("demo", ["train.steps=3"]).train.steps == 3
    (tmp_path / "demo.yaml").write_text(open(DEMO).read().replace("steps: 1000", "steps: 5"))
    assert find_config("demo.yaml") == "demo.yaml" and load_config("demo.yaml").train.steps == 5
    with pytest.raises(ConfigError, match="config file not found: /no/demo.yaml"):
        find_config("/no/demo.yaml")


@pytest.mark.slow
def test_torchrun_bad_batch_fails_fast_on_every_rank(tmp_path):
    """Two ranks, a batch that does not split: both exit before any collective, nothing hangs."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "mmpretrain.train", DEMO, "train.batch_size=7", f"output_dir={tmp_path}/out"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train.batch_size must be divisible by the world size (got 7 on 2 ranks)" in proc.stderr
    assert proc.stderr.count("mmpretrain.train: error:") == 1  # rank 0 speaks for all
    assert "Traceback (most recent call last)" not in proc.stderr.split("mmpretrain.train: error:")[0]
    assert not os.path.exists(f"{tmp_path}/out")


def test_diff_configs_lists_dotted_keys():
    assert diff_configs({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: 2 -> 3"]


def test_the_model_config_knows_the_kernels_attention_impls():
    """model/config.py keeps its own copy (a config module imports no project code): it must match."""
    assert model_config.ATTENTION_IMPLS == kernels.ATTENTION_IMPLS


def test_oc_env_values_are_written_back_as_written_and_a_restart_matches(tmp_path, monkeypatch):
    """`${oc.env:VAR}` is resolved for the run but dumped as written; reading the dump resolves nothing, so a restart
    with the same settings (and the variable still set) finds no difference."""
    monkeypatch.setenv("MMP_UNIT_TOKEN", "tok-123456")
    cfg = load_config(None, ["data.train.urls=pipe:curl -u u:${oc.env:MMP_UNIT_TOKEN} https://h/0.tar"])
    assert cfg.data.train.urls == "pipe:curl -u u:tok-123456 https://h/0.tar"
    text = to_yaml(cfg)
    assert "tok-123456" not in text and "u:${oc.env:MMP_UNIT_TOKEN}" in text
    (tmp_path / "config.yaml").write_text(text)
    monkeypatch.delenv("MMP_UNIT_TOKEN")  # a reader without the variable: nothing to resolve, nothing fails
    back = from_yaml_file(str(tmp_path / "config.yaml"))
    assert back.data.train.urls == "pipe:curl -u u:${oc.env:MMP_UNIT_TOKEN} https://h/0.tar"
    assert diff_configs(to_dict(back), to_dict(cfg)) == []


@pytest.mark.parametrize(
    "path",
    sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)),
    ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs")),
)
def test_every_bundled_config_loads(path):
    """Each config under configs/ is valid YAML (no duplicate keys) and valid for its command: every key known and
    every value checked, up to the paths a user points at their own data (full recipes) or runs (a teacher)."""
    if os.sep + "instruct" + os.sep in path:
        from mmpretrain.instruct.train import load_instruct_config

        load_instruct_config(path, [])
        return
    try:
        load_config(path, [])
    except ConfigError as e:
        assert re.search(r"no file matches|no such folder", str(e)), f"{path}: {e}"
