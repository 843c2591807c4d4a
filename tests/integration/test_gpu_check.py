"""tools/gpu_check.py --dry-run: every stage of the one-lease GPU script runs on the CPU at tiny shapes.

A lent GPU comes for minutes; this test makes sure the script it runs meets no typo there: each stage ends "ok"
with the fields its report reads, results.json and the combined log are written, and tools/gpu_report.py turns
them into the tables of docs/benchmarks.md. Compiled paths are traced by dynamo with the eager backend in the dry
run (MMPRETRAIN_COMPILE_BACKEND=eager), so the stage is seconds, not minutes. (~2-3 min: one process per stage.)
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(out), "--dry-run",
         "--budget-s", "1200"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    return out, proc


def test_every_stage_runs_on_the_cpu(dry_run):
    out, proc = dry_run
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    log = (out / "gpu_check.log").read_text()
    failed = {n: r.get("error") for n, r in stages.items() if r["status"] != "ok"}
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}\n{log[-6000:]}"
    assert proc.returncode == 0
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    assert list(stages) == module.STAGE_NAMES  # every stage ran, in the script's order


def test_stage_results_hold_what_the_report_reads(dry_run):
    out, _ = dry_run
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert stages["env"]["torch"] and stages["env"]["deepspeed"][0].isdigit()
    for name in ("train_compiled", "train_openclip", "train_eager", "vit_l14", "batch512"):
        rows = stages[name]["rows"]
        assert rows and all(r["samples_per_s"] > 0 and r["step_ms"] > 0 for r in rows.values()), name
    assert {"mmpretrain (DeepSpeed)", "torch (no DeepSpeed)", "mmpretrain +no_guard"} <= set(
        stages["train_compiled"]["rows"]
    )
    assert {"open_clip", "open_clip +compile"} <= set(stages["train_openclip"]["rows"])
    prof = stages["train_compiled"]["profile"]
    assert prof["wall_ms_per_step"] > 0 and prof["top_cpu_ops"]
    kernels = stages["kernels"]
    assert any("sdpa" in line for line in kernels["attention_table"])
    assert {r["impl"] for r in kernels["loss_rows"]} == {"ours", "naive"}
    tests = stages["tests"]
    assert tests["finished"] and tests["counts"].get("PASSED", 0) > 0 and not tests["failed"]
    data = stages["data"]
    assert data["loader_samples_per_s"] > 0 and data["loader_image_shape"][1:] == [3, 224, 224]
    assert 0 <= data["run_data_wait_frac"] <= 1 and len(data["run_windows"]) >= 2


def test_report_turns_results_into_tables(dry_run):
    out, _ = dry_run
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_report.py"), str(out / "results.json")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    md = proc.stdout
    assert "| stage | batch | impl | samples/s |" in md and "open_clip +compile" in md
    assert "**CUDA kernel tests**" in md and "**Data**" in md and "**Contrastive loss**" in md
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_report.py"), str(out / "nope.json")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "nope.json" in bad.stderr


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    # the stage hangs (GPU_CHECK_HANG, dry runs only): killed at its limit however fast the machine is
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out", str(tmp_path), "--dry-run",
         "--stages", "train_eager,env", "--budget-s", "12"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "GPU_CHECK_HANG": "train_eager"},
    )  # fmt: skip
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert stages["train_eager"]["status"] == "timeout" and stages["train_eager"]["wall_s"] < 20
    assert stages["env"]["status"] == "skipped"
    assert proc.returncode == 1
