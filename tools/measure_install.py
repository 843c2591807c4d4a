"""Measure README's two install paths in fresh venvs: download size, size on disk and wall time.

    python tools/measure_install.py                       # both paths, as README gives them
    python tools/measure_install.py --cpu-torch "torch==2.13.0+cpu" --cpu-index ""  # a CPU build pip finds itself

GPU path: ``pip install -c constraints.txt -e ".[dev]"`` (torch's CUDA build and its nvidia-* wheels from PyPI).
CPU path: torch's CPU build from ``--cpu-index`` first, then the same command. Every pip runs with --no-cache-dir,
so the time includes downloading (or copying from a local wheel folder: pip's find-links). Downloaded = the wheel
files of everything installed (fetched again with ``pip download`` into a temporary folder to weigh them).

``--cpu-rest-no-deps``: where PyPI's CPU index cannot be reached, a stand-in CPU build of another torch version
cannot satisfy constraints.txt's ``torch==``; this installs the constraints' other pins (all but torch,
torchvision, nvidia-* and cuda-*) with --no-deps instead, the same files the README command would install.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_OR_TORCH = re.compile(r"^(torch|torchvision|nvidia-.*|cuda-.*)==", re.I)


def du_mb(path: str) -> float:
    out = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def pip(venv: str, *args: str) -> float:
    """Run the venv's pip; returns the wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([os.path.join(venv, "bin", "pip"), "--no-cache-dir", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def downloaded_mb(venv: str, work: str) -> float:
    """The wheel (or sdist) files of everything installed in the venv but the project itself, in MB."""
    freeze = subprocess.run([os.path.join(venv, "bin", "pip"), "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    reqs = os.path.join(work, "installed.txt")
    with open(reqs, "w") as f:
        f.write("\n".join(r for r in freeze if "==" in r and not r.startswith("pip==")) + "\n")
    dest = os.path.join(work, "files")
    pip(venv, "download", "--no-deps", "-d", dest, "-r", reqs)
    return du_mb(dest)


def measure(name: str, steps: list[list[str]], work: str) -> dict:
    venv = os.path.join(work, "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    empty = du_mb(venv)
    seconds = sum(pip(venv, *step) for step in steps)
    row = {"path": name, "seconds": seconds, "venv_mb": du_mb(venv) - empty, "download_mb": downloaded_mb(venv, work)}
    print(f"{name}: {row['download_mb']:.0f} MB downloaded, {row['venv_mb']:.0f} MB in the venv, {seconds:.0f} s",
          flush=True)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--paths", nargs="+", choices=["cpu", "gpu"], default=["cpu", "gpu"])
    p.add_argument("--cpu-torch", default="torch==2.14.1 torchvision==0.29.1", help="the CPU build's requirements")
    p.add_argument("--cpu-index", default="https://download.pytorch.org/whl/cpu", help='"" = pip\'s own indexes')
    p.add_argument("--cpu-rest-no-deps", action="store_true", help="see below")
    args = p.parse_args(argv)
    project = ["-c", "constraints.txt", "-e", ".[dev]"]
    for path in args.paths:
        with tempfile.TemporaryDirectory(prefix=f"measure-{path}-") as work:
            if path == "gpu":
                measure("gpu: " + " ".join(["pip install", *project]), [["install", *project]], work)
                continue
            first = ["install", *(["--index-url", args.cpu_index] if args.cpu_index else []), *args.cpu_torch.split()]
            second = ["install", *project]
            if args.cpu_rest_no_deps:
                rest = os.path.join(work, "rest.txt")
                with open(os.path.join(ROOT, "constraints.txt")) as src, open(rest, "w") as dst:
                    dst.writelines(line for line in src if "==" in line and not CUDA_OR_TORCH.match(line))
                second = ["install", "--no-deps", "-r", rest, "-e", ".[dev]"]
            measure(f"cpu: pip {' '.join(first)}; pip {' '.join(second)}", [first, second], work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
