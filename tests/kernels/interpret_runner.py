"""Run a test file's Triton tests on CPU in a child pytest with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when ``mmpretrain.kernels`` is
imported, so it cannot be switched on inside a running test session. A test file names its
interpreter tests ``test_interp_*`` and marks them ``needs_interpreter`` (skipped in the parent
session), and adds one test that calls ``run_under_interpreter(__file__, ...)``: the child
process sets the variable before anything is imported and runs exactly those tests.
"""

import os
import re
import subprocess
import sys

import pytest
import triton

INTERPRETING = bool(triton.knobs.runtime.interpret)

needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton interpreter test: run in a child process with TRITON_INTERPRET=1"
)
# The runner test itself must not recurse inside the child.
runner_only = pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter process")


def run_under_interpreter(path: str, min_passed: int, timeout_s: float = 300.0) -> str:
    """Run the test_interp_* tests of `path` in a child pytest; fail with its output unless all pass."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_", path]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter tests failed ({' '.join(cmd)}):\n{out[-8000:]}"
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= min_passed, f"expected >= {min_passed} passed tests:\n{out[-4000:]}"
    assert not re.search(r"\d+ skipped", out), f"interpreter tests skipped in the child process:\n{out[-4000:]}"
    return out
