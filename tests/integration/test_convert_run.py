"""Real training checkpoints through `tools/convert_checkpoint.py`.

Two short 2-rank runs (torchrun, gloo) on the shapes data, same seed and data: ZeRO-0 (whole weights in
the module file) and ZeRO-3 (weights in shards). Consolidated, they hold the same weights; the
consolidated ZeRO-3 weights give the zero-shot / retrieval numbers the run itself logged; the CLI
chains consolidate -> to-hf -> from-hf bit-exactly and refuses broken inputs with one line and exit code 2.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmpretrain.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "integration", "tiny.yaml")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_cli():
    path = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(shapes_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_runs")
    outs = {}
    for name, stage in (("zero0", 0), ("zero3", 3)):
        out = str(root / name)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", "-m", "mmpretrain.train"]  # fmt: skip
        cmd = [*launcher, TINY, f"output_dir={out}", f"engine.zero_stage={stage}", "train.steps=2",
               f"data.train.urls={shapes_dataset.train_urls}", f"data.eval.zeroshot={shapes_dataset.zeroshot_root}",
               f"data.eval.retrieval={shapes_dataset.retrieval_root}"]  # fmt: skip
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        outs[name] = out
    return outs


@pytest.mark.slow
def test_zero3_consolidates_to_the_zero0_weights_and_evaluates_the_same(runs, shapes_dataset, tmp_path):
    from mmpretrain.config import Config
    from mmpretrain.convert import consolidate, load_consolidated, read_consolidated
    from mmpretrain.data import Tokenizer
    from mmpretrain.data.config import EvalDataConfig
    from mmpretrain.eval.suite import evaluate_all

    for name in runs:
        consolidate(runs[name], str(tmp_path / name))
        assert sorted(os.listdir(tmp_path / name)) == ["config.yaml", "model.safetensors"]
    zero0, _ = read_consolidated(str(tmp_path / "zero0"))
    zero3, cfg = read_consolidated(str(tmp_path / "zero3"))
    assert zero0.keys() == zero3.keys()
    assert cfg.data == Config().data  # the consolidated folder carries the model's config only
    for k in zero0:
        torch.testing.assert_close(zero3[k], zero0[k], rtol=1e-4, atol=1e-5, msg=k)

    model, cfg = load_consolidated(str(tmp_path / "zero3"))
    sets = EvalDataConfig(zeroshot=shapes_dataset.zeroshot_root, retrieval=shapes_dataset.retrieval_root)
    got = evaluate_all(model, Tokenizer(cfg.model.text.context_length), sets, cfg.eval,
                       image_size=cfg.model.vision.image_size)  # fmt: skip
    logged = json.load(open(os.path.join(runs["zero3"], "eval.json")))
    assert got and all(got[k] == pytest.approx(logged[k], abs=1e-6) for k in got), (got, logged)


@pytest.mark.slow
def modes(folder: str) -> set[tuple[str, int]]:
    """(kind, permission bits) of a folder and of everything in it."""
    out = set()
    for root, _, files in os.walk(folder):
        out.add(("dir", os.stat(root).st_mode & 0o777))
        out |= {("file", os.stat(os.path.join(root, f)).st_mode & 0o777) for f in files}
    return out


def test_cli_chain_and_one_line_errors(runs, tmp_path, capsys):
    cli = load_cli()
    run = runs["zero0"]
    old_umask = os.umask(0o022)  # a typical shared-filesystem umask: what is handed over is readable by others
    consolidated, hf, back = str(tmp_path / "c"), str(tmp_path / "hf"), str(tmp_path / "back")
    assert cli.main(["consolidate", run, consolidated, "--dtype", "bf16"]) == 0
    assert cli.main(["to-hf", consolidated, hf]) == 0
    assert cli.main(["from-hf", hf, back]) == 0
    from mmpretrain.convert import read_any, read_consolidated

    a, _ = read_consolidated(consolidated)
    b, cfg_b = read_consolidated(back)
    assert all(v.dtype == torch.bfloat16 and torch.equal(b[k], v) for k, v in a.items())
    assert cfg_b.model.vision.image_size == 32
    # OpenCLIP both ways, and an HF export resized for 48 px inputs
    oc, oc_back, hf48 = str(tmp_path / "oc"), str(tmp_path / "oc_back"), str(tmp_path / "hf48")
    assert cli.main(["to-openclip", consolidated, oc, "--name", "tiny-run"]) == 0
    assert sorted(os.listdir(oc)) == ["open_clip_model.safetensors", "tiny-run.json"]
    assert cli.main(["from-openclip", oc, oc_back]) == 0
    c, _ = read_consolidated(oc_back)
    assert all(torch.equal(c[k], v) for k, v in a.items())
    assert cli.main(["to-hf", run, hf48, "--image-size", "48"]) == 0
    os.umask(old_umask)
    # not the temporary folder's 0700 nor safetensors' 0600: the umask's modes, model.safetensors included
    for folder in (consolidated, hf, back, oc, oc_back, hf48):
        assert modes(folder) == {("dir", 0o755), ("file", 0o644)}, folder
    assert json.load(open(os.path.join(hf48, "config.json")))["vision_config"]["image_size"] == 48
    d, _ = read_any(hf48)
    assert d["vision_model.embeddings.position_embedding.weight"].shape == (1 + 6 * 6, 64)
    capsys.readouterr()

    def fails(argv, match):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and match in err, err

    fails(["to-hf", consolidated, hf], "exists and is not empty (pass --force")
    fails(["consolidate", str(tmp_path), str(tmp_path / "x")], "not a run folder")
    # a truncated module file (stage 0) is named, and nothing is written
    broken = str(tmp_path / "broken")
    shutil.copytree(run, broken)
    step = os.path.join(broken, "checkpoints", open(os.path.join(broken, "checkpoints", "latest")).read().strip())
    module_file = os.path.join(step, "mp_rank_00_model_states.pt")
    data = open(module_file, "rb").read()
    open(module_file, "wb").write(data[: len(data) // 3])
    fails(["consolidate", broken, str(tmp_path / "y")], "mp_rank_00_model_states.pt")
    # a config that does not match the weights: the key is named
    meta_path = os.path.join(step, "meta.json")
    shutil.copy(os.path.join(run, "checkpoints", os.path.basename(step), "mp_rank_00_model_states.pt"), module_file)
    meta = json.load(open(meta_path))
    meta["config"]["model"]["vision"]["width"] = 32
    json.dump(meta, open(meta_path, "w"))
    fails(["consolidate", broken, str(tmp_path / "y")], "shape mismatch: vision_model")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left behind
