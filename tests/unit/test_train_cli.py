"""``python -m mmpretrain.train --help``: every config key and section, the outputs and the exit codes, answered
without importing torch (mmpretrain/train.py is the command line only); ``launch/torchrun.sh --help``."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from mmpretrain import train as train_cli
from mmpretrain.config import Config
from mmpretrain.faults import EXIT_STOPPED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def section_texts(help_text: str) -> dict[str, str]:
    """{section: its lines} from the help's config table (a section starts at two spaces of indent)."""
    block = help_text.split("config (")[1].split("\n\n")[0]
    sections, name = {}, None
    for line in block.splitlines()[1:]:
        m = re.match(r"^  (\w+)\s", line)
        if m:
            name = m.group(1)
        sections[name] = sections.get(name, "") + line + "\n"
    return sections


def leaf_keys(node, prefix: str) -> list[tuple[str, str]]:
    """(dotted parent, key) for every field under a config dataclass."""
    out = []
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            out.append((prefix, f.name))  # the sub-section's own name, e.g. data.train
            out += leaf_keys(child, f"{prefix}.{f.name}")
        else:
            out.append((prefix, f.name))
    return out


def test_help_names_every_config_key():
    help_text = train_cli.build_parser().format_help()
    sections = section_texts(help_text)
    cfg = Config()
    top = [f.name for f in dataclasses.fields(Config)]
    assert sorted(sections) == sorted(top)
    missing = []
    for name in top:
        value = getattr(cfg, name)
        if not dataclasses.is_dataclass(value):
            continue
        for parent, key in leaf_keys(value, name):
            if key == "terms" or "terms." in parent:
                continue
            if not re.search(rf"\b{re.escape(key)}\b", sections[name]):
                missing.append(f"{parent}.{key}")
    assert missing == [], "config keys the --help text does not name (mmpretrain/train.py SECTIONS)"


def test_help_exit_codes_match_the_code():
    codes = re.findall(r"^  (\d+)\s", train_cli.EXIT_CODES, flags=re.M)
    assert codes == ["0", "1", "2", "75", "130"]
    assert EXIT_STOPPED == 75


def test_help_answers_without_importing_torch():
    # -X importtime lists every module the interpreter imported: --help must not reach torch (seconds)
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mmpretrain.train", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for heading in ("config (", "outputs (all in output_dir):", "exit codes:", "checkpoints/step_N/", "130"):
        assert heading in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "mmpretrain" in imported  # the package; mmpretrain.train itself runs as __main__
    assert not {m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "omegaconf", "numpy")}


@pytest.mark.parametrize("argv", [["--stop-after-steps", "x", "demo"], ["demo", "--nope"]])
def test_bad_arguments_exit_2_before_any_import(argv):
    r = subprocess.run([sys.executable, "-m", "mmpretrain.train", *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("python -m mmpretrain.train: error:")


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["-h"], 0), ([], 2)])
def test_torchrun_sh_help_starts_nothing(argv, code):
    # PYTHON=false: had the script gone on to start torchrun (or ask torch for the GPU count), it would exit 1
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "torchrun.sh"), *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": "false"}, timeout=60)  # fmt: skip
    assert r.returncode == code
    shown = r.stdout if code == 0 else r.stderr
    assert shown.startswith("One node, N processes: launch/torchrun.sh CONFIG")
    assert "NPROC" in shown and "SAVE_TIMEOUT" in shown and "python -m mmpretrain.train --help" in shown
