"""constraints.txt pins the whole dependency closure of ``mmpretrain-clip[dev]``, as installed here.

The closure is read from the installed distributions' metadata (the requirements of mmpretrain-clip with its
``dev`` extra, then theirs, markers evaluated for this interpreter and platform). A dependency that setup.py
gains, or that a new release of a dependency starts to require, fails here until constraints.txt pins it.
"""

import os
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        assert canonical(name) not in pins, f"constraints.txt pins {name} twice"
        pins[canonical(name)] = version
    return pins


def closure(dist_name: str, extras: tuple[str, ...] = ()) -> dict[str, str]:
    """{canonical name: installed version} of every distribution ``dist_name[extras]`` needs here."""
    found, seen, todo = {}, set(), [(dist_name, tuple(extras))]
    while todo:
        name, wanted = todo.pop()
        if (canonical(name), wanted) in seen:
            continue
        seen.add((canonical(name), wanted))
        dist = metadata.distribution(name)
        found[canonical(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                continue  # another platform's, or an extra nobody asked for
            todo.append((req.name, tuple(sorted(req.extras))))
    return found


def test_constraints_pin_every_dependency():
    try:
        needed = closure("mmpretrain-clip", ("dev",))
    except metadata.PackageNotFoundError as e:
        pytest.skip(f"mmpretrain-clip[dev] is not fully installed here ({e}): pip install -e '.[dev]'")
    needed.pop("mmpretrain-clip")
    pins = read_pins(os.path.join(ROOT, "constraints.txt"))
    assert {"torch", "deepspeed", "triton", "pytest", "open-clip-torch"} <= needed.keys()  # the walk went deep
    assert sorted(needed.keys() - pins.keys()) == [], "installed as a dependency but not pinned in constraints.txt"
    if os.environ.get("CI"):  # CI installed with -c constraints.txt, so every version must be the pinned one
        assert {k: v for k, v in needed.items() if pins[k] != v} == {}, "installed version != the pin"


def test_closure_follows_extras_and_markers(tmp_path):
    # a check of the walk itself on a distribution whose requirements are known: pytest needs pluggy and
    # iniconfig everywhere, colorama only on Windows
    needed = closure("pytest")
    assert {"pluggy", "iniconfig", "packaging"} <= needed.keys()
    assert "colorama" not in needed
    bad = tmp_path / "c.txt"
    bad.write_text("torch>=2\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        read_pins(str(bad))


def test_only_torch_pulls_cuda_wheels():
    # README's CPU-only install puts torch's CPU build in first; it holds only while nothing else of the closure
    # asks for an nvidia-* or cuda-* wheel itself (those are what make the GPU install 6 GB)
    try:
        needed = closure("mmpretrain-clip", ("dev",))
    except metadata.PackageNotFoundError as e:
        pytest.skip(f"mmpretrain-clip[dev] is not fully installed here ({e})")
    cuda = re.compile(r"^(nvidia|cuda)-")
    pulls = set()
    for name in needed:
        if cuda.match(name):
            continue
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if cuda.match(canonical(req.name)) and (req.marker is None or req.marker.evaluate({"extra": ""})):
                pulls.add(name)
    assert pulls <= {"torch"}, f"besides torch, {sorted(pulls - {'torch'})} require CUDA wheels"
