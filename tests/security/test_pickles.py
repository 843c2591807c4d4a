"""No pickle is unpickled without the trust flag (issue 15, finding 2).

The reproduction: an HF-looking folder plus a `meta.json` and a crafted `mp_rank_00_model_states.pt` ran code
through `export` (and `evaluate`, `adapt`, `to-hf`, `model.init_from`, a distillation teacher took the same path).
Here the crafted file's `__reduce__` would create a marker file: through every public entry point it must not run,
and the error names the file and `--trust-pickles`. With the flag (and only then) the folder's pickles are read as
DeepSpeed does. A legitimate stage-0 run, a real one-process ZeRO-1 run and a consolidated folder load without the
flag; the ZeRO-1 run with its optimizer shard swapped for a crafted one is refused, naming it.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from mmpretrain.adapt import main as adapt_main
from mmpretrain.config import Config, ConfigError
from mmpretrain.convert import consolidate, load_any, read_any
from mmpretrain.convert.cli import main as convert_main
from mmpretrain.eval.cli import main as eval_main
from mmpretrain.export import main as export_main
from mmpretrain.loop import init_weights
from mmpretrain.model import ModelConfig, build_model, resolve_model_config
from mmpretrain.objectives import Objective
from mmpretrain.objectives.config import ClipTermConfig, DistillTermConfig, TermsConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "integration", "tiny.yaml")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Payload:
    """Unpickling this creates the marker file (what a real attack would make a shell command)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model_cfg():
    return resolve_model_config(ModelConfig(name="tiny"))


def hostile_folder(root, marker, model_cfg, zero_stage: int) -> str:
    """An HF-looking folder (config.json, model.safetensors) that also holds a meta.json and crafted pickles."""
    folder = root / f"looks-like-hf-zero{zero_stage}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (folder / "model.safetensors").write_bytes(b"")
    config = {"model": dataclasses.asdict(model_cfg), "engine": {"zero_stage": zero_stage}}
    (folder / "meta.json").write_text(json.dumps({"step": 1, "config": config}))
    torch.save({"module": Payload(str(marker))}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Payload(str(marker))}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return str(folder)


def refused(err: str, name: str) -> bool:
    return name in err and "--trust-pickles" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_crafted_pickle_runs_nothing_without_the_flag(zero_stage, model_cfg, tmp_path, shapes_dataset, capsys):
    marker = tmp_path / "pwned"
    folder = hostile_folder(tmp_path, marker, model_cfg, zero_stage)
    named = "mp_rank_00_model_states.pt"  # ZeRO 3: every *_states.pt is checked weights-only first, this one first
    zs = shapes_dataset.zeroshot_root

    commands = [
        lambda: eval_main([folder, "--zeroshot", zs, "--num-workers", "0"]),
        lambda: export_main([folder, "--output", str(tmp_path / "export"), "--torch-export"]),
        lambda: adapt_main([folder, "--train", zs, "--test", zs, "--output", str(tmp_path / "adapt")]),
        lambda: convert_main(["to-hf", folder, str(tmp_path / "hf")]),
        lambda: convert_main(["to-openclip", folder, str(tmp_path / "oc")]),
    ]
    for command in commands:
        assert command() == 2
        err = capsys.readouterr().err
        assert refused(err, named), err
        assert not marker.exists()

    # model.init_from and a distillation teacher: a config error naming the file and the flag
    with pytest.raises(ConfigError, match="--trust-pickles") as e:
        init_weights(build_model(model_cfg), folder)
    assert named in str(e.value)
    cfg = Config(model=model_cfg)
    cfg.loss.terms = TermsConfig(clip=ClipTermConfig(), distill=DistillTermConfig(teacher=folder, feature_weight=1.0))
    with pytest.raises(ValueError, match="--trust-pickles") as e:
        Objective(cfg).setup(torch.device("cpu"))
    assert "loss.terms.distill.teacher" in str(e.value) and named in str(e.value)
    assert not marker.exists()

    # the flag is the only gate: with it the folder is trusted like code, and the payload runs
    with pytest.raises(ValueError):
        read_any(folder, trust_pickles=True)
    assert marker.exists() or zero_stage != 0  # ZeRO 3: DeepSpeed refuses the fake shards before it unpickles them


def test_a_folder_cannot_declare_itself_trusted(model_cfg, tmp_path, shapes_dataset, capsys):
    """A run folder (a loadable stage-0 checkpoint) whose meta.json names a crafted teacher with trust_pickles=true:
    evaluating it builds the distill head from that config, but the folder's trust keys are switched off."""
    marker = tmp_path / "pwned"
    teacher = hostile_folder(tmp_path, marker, model_cfg, zero_stage=0)
    step = tmp_path / "run" / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    distill = {"teacher": teacher, "feature_weight": 1.0, "trust_pickles": True}
    config = {"model": {**dataclasses.asdict(model_cfg), "trust_pickles": True}, "engine": {"zero_stage": 0},
              "loss": {"terms": {"clip": {}, "distill": distill}}}  # fmt: skip
    (step / "meta.json").write_text(json.dumps({"step": 1, "config": config}))
    torch.save({"module": build_model(model_cfg).state_dict()}, step / "mp_rank_00_model_states.pt")
    (step.parent / "latest").write_text("step_1")
    assert eval_main([str(tmp_path / "run"), "--zeroshot", shapes_dataset.zeroshot_root, "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "loss.terms.distill.teacher" in err and refused(err, "mp_rank_00_model_states.pt"), err
    assert not marker.exists()


def test_a_real_stage0_run_and_its_consolidated_folder_load_without_the_flag(model_cfg, tmp_path):
    """What DeepSpeed writes at stage 0 (tensors, numbers, strings, containers) passes weights_only; consolidating
    one's own run needs no flag, and its output is safetensors + the model's config."""
    torch.manual_seed(0)
    sd = build_model(model_cfg).state_dict()
    step = tmp_path / "run" / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    config = {"model": dataclasses.asdict(model_cfg), "engine": {"zero_stage": 0}}
    (step / "meta.json").write_text(json.dumps({"step": 1, "config": config}))
    states = {"module": sd, "buffer_names": [], "optimizer": {"state": {}}, "ds_config": {"train_batch_size": 8},
              "ds_version": "0.0", "global_steps": 1, "param_shapes": None}  # fmt: skip
    torch.save(states, step / "mp_rank_00_model_states.pt")
    (step.parent / "latest").write_text("step_1")
    run = str(tmp_path / "run")
    model, _ = load_any(run)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    out = consolidate(run, str(tmp_path / "consolidated"))
    model, _ = load_any(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)


def test_a_real_zero1_run_loads_without_the_flag_and_a_tampered_shard_is_refused(shapes_dataset, tmp_path, capsys):
    """A one-process ZeRO-1 run: every file passes the weights-only check, so evaluation needs no flag; with its
    optimizer shard swapped for a crafted one, the command stops naming that file and nothing runs."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmpretrain.train", TINY, f"output_dir={run}", "engine.zero_stage=1",
           f"data.train.urls={shapes_dataset.train_urls}", "train.steps=1", "checkpoint.every_steps=1",
           "data.num_workers=0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sets = ["--zeroshot", shapes_dataset.zeroshot_root, "--num-workers", "0"]
    assert eval_main([str(run), *sets]) == 0
    capsys.readouterr()

    marker = tmp_path / "pwned"
    shard = run / "checkpoints" / "step_1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(str(marker))}, shard)
    assert eval_main([str(run), *sets]) == 2
    err = capsys.readouterr().err
    assert refused(err, shard.name), err
    assert not marker.exists()
