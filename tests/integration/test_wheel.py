"""The built wheel works without the checkout, as a `pip install mmpretrain-clip` user gets it.

The wheel is built from a copy of the source (no stale build/ output can slip in) without build isolation, and
installed with `pip install --no-deps --target SITE` (the dependencies are the ones this environment has). Every
command then runs from a folder outside the checkout, with SITE first on the path and the checkout unreachable: a
sitecustomize hook drops an editable install's finder and any path into the checkout, so a module left out of
the wheel fails with ModuleNotFoundError as it would for a pip user (mmpretrain.objectives once did).

Checked: the wheel holds every module and data file of the source and nothing else; every module imports from it;
the bundled demo trains 2 steps (`mmpretrain-train demo`, small synthetic data) and evaluates; the converter, the
shard tools and the plot run on that run's outputs; every console script answers --help with exit code 0.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Top-level entries of a checkout that are not source: run outputs, data, builds, caches, the tests themselves.
NOT_SOURCE = {".git", "build", "dist", "outputs", "data", "wandb", ".venv", "tests", ".pytest_cache", ".ruff_cache"}
HOOK = """\
# Written by tests/integration/test_wheel.py: the checkout must be unreachable from here.
import os, sys

CHECKOUT = os.path.realpath({root!r})
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if not (os.path.realpath(p or ".") + os.sep).startswith(CHECKOUT + os.sep)]
"""
# Imports every module named in argv[1] (a JSON list); prints where each loaded mmpretrain module came from.
IMPORT_ALL = """\
import importlib, json, sys

for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps({n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "mmpretrain"}))
"""


class Installed:
    def __init__(self, wheel: str, site: str, run_dir: str, env: dict):
        self.wheel, self.site, self.run_dir, self.env = wheel, site, run_dir, env

    def run(self, *cmd: str, timeout=300) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.run_dir, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{cmd[0]}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc


def _ignore(folder, names):
    skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    return skip | (NOT_SOURCE & set(names) if os.path.samefile(folder, ROOT) else set())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site, hook, run_dir = (str(tmp / d) for d in ("src", "dist", "site", "hook", "run"))
    shutil.copytree(ROOT, src, ignore=_ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", src, "-w", dist], cwd=src, check=True,
                   timeout=300)  # fmt: skip
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], cwd=str(tmp), check=True, timeout=300)
    os.makedirs(hook)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write(HOOK.format(root=ROOT))
    os.makedirs(run_dir)
    # A fresh user's environment: no Python path, and no launcher variables an in-process test may have left.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "TORCHELASTIC_", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", *launcher))}
    env.update(PYTHONPATH=os.pathsep.join([hook, site]), PATH=os.pathsep.join([os.path.join(site, "bin"), env["PATH"]]))
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return Installed(wheel, site, run_dir, env)


def wheel_names(wheel: str) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}


def source_names() -> set[str]:
    """What the wheel must hold: every file of mmpretrain/ and kernels/ (as mmpretrain/kernels/), every YAML of
    configs/ (as mmpretrain/configs/)."""
    names = set()
    for folder, prefix, pattern in (("mmpretrain", "mmpretrain", "*"), ("kernels", "mmpretrain/kernels", "*"),
                                    ("configs", "mmpretrain/configs", "*.yaml")):  # fmt: skip
        base = os.path.join(ROOT, folder)
        for path in glob.glob(os.path.join(base, "**", pattern), recursive=True):
            rel = os.path.relpath(path, base)
            if os.path.isfile(path) and "__pycache__" not in rel.split(os.sep) and not rel.endswith(".pyc"):
                names.add(f"{prefix}/{rel.replace(os.sep, '/')}")
    return names


@pytest.mark.slow
def test_wheel_holds_every_module_and_data_file_of_the_source(installed):
    names = wheel_names(installed.wheel)
    assert names == source_names(), {"missing": source_names() - names, "extra": names - source_names()}
    for needed in ("objectives/__init__.py", "kernels/__init__.py", "tools/__init__.py", "configs/demo.yaml",
                   "data/bpe_simple_vocab_16e6.txt.gz"):  # fmt: skip
        assert f"mmpretrain/{needed}" in names


@pytest.mark.slow
def test_every_module_imports_from_the_installed_wheel(installed):
    modules = sorted(
        n[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for n in wheel_names(installed.wheel)
        if n.endswith(".py") and not n.endswith("__main__.py")
    )
    assert {"mmpretrain.objectives", "mmpretrain.kernels", "mmpretrain.convert.cli", "mmpretrain.tools"} <= set(modules)
    proc = installed.run(sys.executable, "-c", IMPORT_ALL, json.dumps(modules))
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(files)
    elsewhere = {n: f for n, f in files.items() if f is None or not f.startswith(installed.site + os.sep)}
    assert not elsewhere, elsewhere  # all from the wheel, none from the checkout


@pytest.fixture(scope="module")
def demo_run(installed) -> str:
    """`mmpretrain-train demo` for 2 steps on a small synthetic set, in the run folder: outputs/demo, data/shapes."""
    installed.run("mmpretrain-train", "demo", "train.steps=2", "train.batch_size=32", "data.synthetic.num_train=256",
                  "data.synthetic.samples_per_shard=128", "data.synthetic.num_eval=64", "logging.wandb=disabled",
                  "logging.log_every=1", "logging.progress=false")  # fmt: skip
    return os.path.join(installed.run_dir, "outputs", "demo")


@pytest.mark.slow
def test_bundled_demo_trains_two_steps_and_evaluates(installed, demo_run):
    with open(os.path.join(demo_run, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == [1, 2]
    with open(os.path.join(demo_run, "eval.json")) as f:
        top1 = [v for k, v in json.load(f).items() if k.startswith("zeroshot/") and k.endswith("/top1")]
    assert len(top1) == 1 and 0 <= top1[0] <= 1  # zero-shot prompts went through the wheel's tokenizer vocabulary
    assert os.path.isdir(os.path.join(installed.run_dir, "data", "shapes", "train"))


@pytest.mark.slow
def test_converter_shard_tools_and_plot_run_from_the_wheel(installed, demo_run, tmp_path):
    out = installed.run("mmpretrain-convert", "consolidate", demo_run, str(tmp_path / "consolidated")).stdout
    assert "wrote" in out and os.path.isfile(tmp_path / "consolidated" / "model.safetensors")

    installed.run("mmpretrain-plot", demo_run, "--out", str(tmp_path / "metrics.png"))
    assert os.path.getsize(tmp_path / "metrics.png") > 0

    shards = os.path.join(installed.run_dir, "data", "shapes", "train")
    installed.run("mmpretrain-inspect-shards", shards, "--length", "chars", "--out", str(tmp_path / "report"))
    with open(tmp_path / "report" / "inspect.json") as f:
        report = json.load(f)
    assert (report["num_samples"], report["num_broken"]) == (256, 0)

    for i, cls in enumerate(["cat", "cat", "dog", "dog"]):
        path = tmp_path / "photos" / cls / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48, 3), 60 * i, dtype=np.uint8)).save(path)
    out = installed.run("mmpretrain-make-shards", "folder", str(tmp_path / "photos"), str(tmp_path / "pets"),
                        "--templates", "a photo of a {c}.").stdout  # fmt: skip
    assert out.strip().splitlines()[-1].startswith("data.train.urls=")
    with open(tmp_path / "pets" / "_stats.json") as f:
        assert json.load(f)["num_samples"] == 4


@pytest.mark.slow
def test_every_console_script_answers_help(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        lines = z.read(entry_points).decode().splitlines()
    section = lines[lines.index("[console_scripts]") + 1 :]
    section = section[: next((i for i, line in enumerate(section) if line.startswith("[")), len(section))]
    scripts = [line.split("=")[0].strip() for line in section if "=" in line]
    assert {"mmpretrain-train", "mmpretrain-convert", "mmpretrain-make-shards", "mmpretrain-inspect-shards",
            "mmpretrain-plot"} <= set(scripts)  # fmt: skip
    for script in scripts:
        assert os.path.isfile(os.path.join(installed.site, "bin", script)), script
    with ThreadPoolExecutor(2) as pool:  # two at a time: each imports torch
        outputs = list(pool.map(lambda s: installed.run(s, "--help", timeout=120).stdout, scripts))
    for script, out in zip(scripts, outputs):
        assert out.startswith("usage:"), (script, out[:200])
