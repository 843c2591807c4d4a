"""Writing outputs so that a failure never leaves half of one, and never loses the previous one.

    write_atomic(path, text)      a text file: readers see the old or the new content, never a partial one
    atomic_folder(out_dir, force) a folder written under a temporary sibling, renamed into place on success
    apply_umask(path)             what we hand over gets the modes the user's umask gives new files

Every command that writes a user's output goes through these (the converters, export, adapt, make-shards,
eval.json, the metrics.jsonl rewrite on resume, the run folder's `latest` and meta.json). Plain files only:
nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def write_atomic(path: str, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def apply_umask(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the user's umask gives new files: a
    temporary folder is 0700 and safetensors writes 0600, but what we hand over is meant to be read by others on
    a shared filesystem as far as the umask allows."""
    mask = os.umask(0o022)  # the only way to read the umask
    os.umask(mask)
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~mask)
        return
    for folder, _, files in os.walk(path):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def check_out_dir(out_dir: str, force: bool, flag: str = "--force") -> None:
    """Refuse a file, or a non-empty folder unless ``force`` (the command's flag is named in the error)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ValueError(f"{out_dir}: exists and is not empty (pass {flag} to replace it)")


@contextlib.contextmanager
def atomic_folder(out_dir: str, force: bool = False, flag: str = "--force") -> Iterator[str]:
    """Yield a temporary folder next to out_dir; on success it replaces out_dir, on failure it is removed.

    An existing non-empty out_dir is refused unless force (then it is replaced only once the new one is complete).
    """
    out_dir = os.path.abspath(out_dir)
    check_out_dir(out_dir, force, flag)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    apply_umask(tmp)  # mkdtemp made it 0700
    swap_in(tmp, out_dir)


def swap_in(tmp: str, out_dir: str) -> None:
    """Put the complete folder ``tmp`` (a sibling of out_dir) in out_dir's place; the old out_dir is removed
    only after the rename."""
    parent = os.path.dirname(out_dir)
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old", dir=parent)
        os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
