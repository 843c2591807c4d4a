"""Run every shell block of the documentation as written, in order, in a fresh clone: README as a tested script.

    python tools/run_docs.py               # clone HEAD into outputs/docs-run/clone, run the blocks (CI: .ci/run)
    python tools/run_docs.py --list        # every block: where it is, and whether it runs or why not
    python tools/run_docs.py --from README.md:120   # start at a block (after a failure; reuses the clone)

The pages are README.md, then docs/*.md, launch/README.md and CONTRIBUTING.md, and the blocks run in that order
in one clone, so a later block may use what an earlier one wrote (the demo run, shards) and no two blocks may write
the same folder. Each block runs with ``bash -e -o pipefail`` in the clone's root; the first failing block fails
the whole run (exit 1), naming its page and line. So does a file the blocks leave where git does not ignore it:
examples write under outputs/ (or data/), never into the repository's own folders.

Every fenced block must name its language. A ```bash / ```sh / ```shell block runs unless an HTML comment on the
line just above its fence (invisible on GitHub) exempts it, with the reason printed each time:

    <!-- docs-run: skip REASON -->       not run, for REASON (a SLURM cluster, GPUs, an hour of training ...)
    <!-- docs-run: runs-elsewhere -->    not run here: each of its commands runs in .ci/run (the install, the
                                         tests) or in another block that runs (checked: each line is there)
    <!-- docs-run: setup NAME -->        runs, after the runner made NAME openly (SETUPS below; printed)

The code that runs is the installed package (CI installed the checkout under test): PYTHONSAFEPATH=1 keeps
``python -m`` in the clone from mixing the clone's ``mmpretrain`` with the installed ``mmpretrain.kernels``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELLS = ("bash", "sh", "shell")
MARKER = re.compile(r"^<!--\s*docs-run:\s*(skip|runs-elsewhere|setup)\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([^\s`]*)")


@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str = "run"  # run | skip | runs-elsewhere | setup
    arg: str = ""  # the reason, or the setup's name

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELLS

    def commands(self) -> list[str]:
        """The block's command lines: comments dropped, backslash continuations joined."""
        out, current = [], ""
        for raw in self.text.splitlines():
            line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if not line.strip() and not current:
                continue
            current += line.strip()
            if current.endswith("\\"):
                current = current[:-1].rstrip() + " "
                continue
            out.append(current)
            current = ""
        return out + ([current] if current else [])


def pages(root: str = ROOT) -> list[str]:
    """The documentation pages, in the order their blocks run."""
    docs = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    return ["README.md", *docs, "launch/README.md", "CONTRIBUTING.md"]


def parse(page: str, root: str = ROOT) -> list[Block]:
    """Every fenced block of a page with its marker; ValueError for a fence without a language or a bad marker."""
    lines = open(os.path.join(root, page), encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        if not lang:
            raise ValueError(f"{page}:{i + 1}: a fence without a language: name it (```bash, ```text, ```python ...)")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: the block is not closed")
        block = Block(page, i + 1, lang, "\n".join(lines[i + 1 : end]))
        above = lines[i - 1].strip() if i else ""
        if above.startswith("<!--") and "docs-run" in above:
            marker = MARKER.match(above)
            if marker is None:
                raise ValueError(f"{page}:{i}: unknown docs-run marker {above!r}")
            block.kind, block.arg = marker.group(1), marker.group(2)
            if not block.is_shell:
                raise ValueError(f"{page}:{i}: a docs-run marker on a {lang} block (only shell blocks run)")
            if block.kind != "runs-elsewhere" and not block.arg:
                needs = "reason" if block.kind == "skip" else "name"
                raise ValueError(f"{page}:{i}: docs-run: {block.kind} needs a {needs}")
        blocks.append(block)
        i = end + 1
    return blocks


def all_blocks(root: str = ROOT) -> list[Block]:
    return [b for page in pages(root) for b in parse(page, root)]


# ----------------------------------------------------------------------------- setups: what a user brings along


def _save_jpeg(path: str, rgb: tuple, size: tuple[int, int], seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels.astype("uint8")).save(path, quality=90)


COLORS = {"red_apple": (200, 30, 30), "green_pear": (60, 170, 60), "blue_ball": (40, 60, 220)}


def setup_own_data(cwd: str) -> None:
    """photos/<class>/ (3 classes x 16 JPEGs), photos_val/<class>/ (3 x 8) and web/captions.csv (48 rows of
    web/images/*.jpg, columns filepath,title): the made-up data the 'your own data' commands read."""
    for split, per_class in (("photos", 16), ("photos_val", 8)):
        for c, (name, rgb) in enumerate(COLORS.items()):
            for i in range(per_class):
                _save_jpeg(os.path.join(cwd, split, name, f"{i:03d}.jpg"), rgb, (64, 48), seed=1000 * c + i)
    os.makedirs(os.path.join(cwd, "web", "images"), exist_ok=True)
    with open(os.path.join(cwd, "web", "captions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(48):
            name, rgb = list(COLORS.items())[i % 3]
            _save_jpeg(os.path.join(cwd, "web", "images", f"{i:04d}.jpg"), rgb, (48, 64), seed=5000 + i)
            writer.writerow([f"images/{i:04d}.jpg", f"a {name.replace('_', ' ')} on a plain background"])
    print("made photos/ (3 classes x 16 JPEGs), photos_val/ (3 x 8), web/captions.csv + web/images/ (48 rows)")


# name -> (the function that makes it in the clone, the top-level folders it makes: the user's own files)
SETUPS = {"own-data": (setup_own_data, ["photos", "photos_val", "web"])}


# ----------------------------------------------------------------------------- checks of the exemptions


def where_each_runs(blocks: list[Block], root: str = ROOT) -> dict[str, str]:
    """{command line: where it runs}: .ci/run's own commands, then those of every block that runs."""
    ci = Block(".ci/run", 0, "bash", open(os.path.join(root, ".ci", "run"), encoding="utf-8").read())
    found = {cmd: ".ci/run" for cmd in ci.commands()}
    for b in blocks:
        if b.is_shell and b.kind in ("run", "setup"):
            found.update({cmd: b.where for cmd in b.commands() if cmd not in found})
    return found


def runs_at(cmd: str, found: dict[str, str]) -> str | None:
    """Where ``cmd`` runs: as written, or as the start of a longer command there (``python -m pytest -q`` in CI's
    ``python -m pytest -q -p no:cacheprovider``)."""
    return next((where for line, where in found.items() if line == cmd or line.startswith(cmd + " ")), None)


def check_exemptions(blocks: list[Block], root: str = ROOT) -> list[str]:
    """What is wrong with the markers: a runs-elsewhere line that runs nowhere, an unknown setup. Empty when every
    exemption holds."""
    found, problems = where_each_runs(blocks, root), []
    for b in blocks:
        if b.kind == "runs-elsewhere":
            problems += [f"{b.where}: docs-run: runs-elsewhere, but neither .ci/run nor a block that runs holds "
                         f"{cmd!r}" for cmd in b.commands() if runs_at(cmd, found) is None]  # fmt: skip
        elif b.kind == "setup" and b.arg not in SETUPS:
            problems.append(f"{b.where}: docs-run: setup {b.arg}: no such setup ({', '.join(SETUPS)})")
    return problems


# ----------------------------------------------------------------------------- running


def fresh_clone(dest: str) -> str:
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", ROOT, dest], check=True)
    head = subprocess.run(["git", "-C", dest, "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout  # fmt: skip
    print(f"docs-run: fresh clone of {head.strip()[:100]} in {dest}", flush=True)
    if dirty.strip():
        print("docs-run: note: the checkout has uncommitted changes; the clone holds the last commit", flush=True)
    return dest


def stray_files(cwd: str, made: list[str]) -> list[str]:
    """Files in the clone that git neither tracks nor ignores, but for what the setups made."""
    out = subprocess.run(["git", "-C", cwd, "status", "--porcelain", "--untracked-files=all"], capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    paths = [line[3:] for line in out]
    return [p for p in paths if p.split("/")[0] not in made]


def run_blocks(blocks: list[Block], cwd: str, start: str | None = None) -> int:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    found = where_each_runs(blocks, cwd)  # the clone holds the same .ci/run
    made = [path for b in blocks if b.kind == "setup" for path in SETUPS[b.arg][1]]  # the user's own files
    started = start is None
    ran = skipped = 0
    t_all = time.perf_counter()
    for n, b in enumerate(blocks, 1):
        started = started or b.where == start
        if not b.is_shell or not started:
            continue
        if b.kind in ("skip", "runs-elsewhere"):
            why = b.arg if b.kind == "skip" else "; ".join(f"{c!r} runs in {runs_at(c, found)}" for c in b.commands())
            print(f"\n=== {b.where}  not run here: {why}", flush=True)
            skipped += 1
            continue
        if b.kind == "setup":
            print(f"\n=== {b.where}  setup {b.arg}: ", end="", flush=True)
            SETUPS[b.arg][0](cwd)
        print(f"\n=== {b.where}  ({n}/{len(blocks)})\n" + "\n".join(f"$ {line}" for line in b.text.splitlines()),
              flush=True)  # fmt: skip
        t0 = time.perf_counter()
        code = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.text], cwd=cwd, env=env).returncode
        print(f"=== {b.where}  exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
        if code:
            print(f"\ndocs-run: FAILED: the block at {b.where} exited {code} (rerun from it: python tools/run_docs.py "
                  f"--from {b.where})", flush=True)  # fmt: skip
            return 1
        ran += 1
    stray = stray_files(cwd, made)
    if stray:
        print(f"\ndocs-run: FAILED: the blocks wrote where git does not ignore (examples write under outputs/): "
              f"{', '.join(stray[:10])}", flush=True)  # fmt: skip
        return 1
    print(f"\ndocs-run: {ran} blocks ran, {skipped} exempt, all passed in {time.perf_counter() - t_all:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--list", action="store_true", help="list every block and what happens to it; run nothing")
    p.add_argument("--workdir", default=os.path.join(ROOT, "outputs", "docs-run"), help="where the clone goes")
    p.add_argument("--from", dest="start", metavar="PAGE:LINE", help="start at this block, in the existing clone")
    args = p.parse_args(argv)
    try:
        blocks = all_blocks()
    except ValueError as e:
        print(f"docs-run: error: {e}", file=sys.stderr)
        return 2
    problems = check_exemptions(blocks)
    if args.list:
        for b in blocks:
            what = f"{b.kind} {b.arg}".strip() if b.is_shell else "not a command"
            print(f"{b.where:28s} {b.lang:7s} {what}")
    if problems:
        print("\n".join(f"docs-run: error: {p}" for p in problems), file=sys.stderr)
        return 2
    if args.list:
        return 0
    clone = os.path.join(args.workdir, "clone")
    if args.start is None:
        fresh_clone(clone)
    elif not os.path.isdir(clone):
        print(f"docs-run: error: --from needs the clone of an earlier run in {clone}", file=sys.stderr)
        return 2
    elif not any(b.where == args.start and b.is_shell for b in blocks):
        print(f"docs-run: error: no shell block at {args.start} (see --list)", file=sys.stderr)
        return 2
    return run_blocks(blocks, clone, args.start)


if __name__ == "__main__":
    sys.exit(main())
