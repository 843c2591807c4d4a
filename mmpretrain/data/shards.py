"""Write and read WebDataset tar shards: ``<key>.jpg`` (+ ``.txt``, ``.json``, ``.cls`` ...) grouped by key.

Writing is used by the synthetic data generator and by mmpretrain-make-shards. Each shard is written under a
temporary name and renamed when complete, so a crashed writer never leaves a truncated tar that
looks finished; ``close()`` writes ``_stats.json`` (sample and shard counts) next to the shards.

Reading (``read_tar_samples``, used by the loaders) tells the ways a shard can be broken apart:
unreadable (cannot be opened, not a tar) or truncated (the stream breaks after its start). A truncated
tar counts once: every sample whose members all lie before the cut is read normally; the sample whose
member data is cut is lost with it; a cut between two members of one sample (at a header) leaves that
sample with the members before the cut. A tar lacking its end-of-archive blocks is truncated: that is
what a tar cut exactly at a member boundary looks like, and tarfile alone ends such a stream silently.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

STATS_FILE = "_stats.json"


def natural_key(path: str) -> list:
    """Sort key that puts shard-2 before shard-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def local_tar_urls(specs: list[str], subfolders: tuple[str, ...] = ("",)) -> list[str]:
    """Tar paths of folders, brace specs and globs, in the order given (the tools' shard arguments).

    A folder gives its ``*.tar`` in natural order, from the first of ``subfolders`` that has any
    (e.g. ``("", "test")`` also finds a clip_benchmark eval set). ValueError names what matched nothing.
    """

    urls: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            for sub in subfolders:
                found = sorted(glob.glob(os.path.join(spec, sub, "*.tar")), key=natural_key)
                if found:
                    break
            if not found:
                where = " nor in ".join(os.path.join(spec, sub) for sub in subfolders[1:])
                raise ValueError(f"{spec}: no *.tar in this folder" + (f" (nor in {where})" if where else ""))
            urls += found
            continue
        for part in braceexpand.braceexpand(spec):
            found = sorted(glob.glob(part), key=natural_key) if glob.has_magic(part) else [part]
            missing = [u for u in found if not os.path.isfile(u)]
            if not found or missing:
                raise ValueError(f"{spec}: no such file {missing[0] if missing else part!r}")
            urls += found
    return urls


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    """PIL image -> encoded bytes (JPEG at ``quality``, or PNG/WEBP)."""
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r} (jpg, png, webp)")
    return buf.getvalue()


class ShardWriter:
    """Write samples into ``<out_dir>/<name_format.format(i)>``, ``samples_per_shard`` samples per shard.

    A sample is a dict with ``"__key__"`` (unique, no dots) and one entry per extension:
    bytes are stored as is, ``str`` as UTF-8, ``int`` as its decimal text, ``dict``/``list`` as
    JSON, a PIL image is encoded by its extension (jpg quality 90).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        samples_per_shard: int = 10000,
        name_format: str = "shard-{:06d}.tar",
        image_quality: int = 90,
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1 (got {samples_per_shard})")
        self.out_dir = str(out_dir)
        self.samples_per_shard = samples_per_shard
        self.name_format = name_format
        self.image_quality = image_quality
        os.makedirs(self.out_dir, exist_ok=True)
        self.shards: list[dict[str, Any]] = []  # one {"name", "num_samples", "num_bytes"} per finished shard
        self._tar: wds.TarWriter | None = None
        self._tmp_path = self._path = ""
        self._count = self._bytes = 0

    def _encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ext, value in sample.items():
            if ext == "__key__":
                if not isinstance(value, str) or "." in value or not value:
                    raise ValueError(f"sample key must be a non-empty string without dots (got {value!r})")
                out[ext] = value
            elif isinstance(value, (bytes, bytearray, memoryview)):
                out[ext] = bytes(value)
            elif isinstance(value, str):
                out[ext] = value.encode("utf-8")
            elif isinstance(value, bool):
                raise ValueError(f"{ext}: bool values are ambiguous; store an int or str")
            elif isinstance(value, int):
                out[ext] = str(value).encode("ascii")
            elif isinstance(value, (dict, list)):
                out[ext] = json.dumps(value).encode("utf-8")
            elif isinstance(value, Image.Image):
                out[ext] = encode_image(value, ext.lower(), self.image_quality)
            else:
                raise ValueError(f"{ext}: cannot store a {type(value).__name__}")
        if "__key__" not in out:
            raise ValueError("sample needs a '__key__'")
        return out

    def write(self, sample: dict[str, Any]) -> None:
        encoded = self._encode(sample)
        if self._tar is None:
            self._open_next()
        self._bytes += self._tar.write(encoded)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish_shard()

    def _open_next(self) -> None:
        name = self.name_format.format(len(self.shards))
        self._path = os.path.join(self.out_dir, name)
        self._tmp_path = self._path + ".tmp"
        # fixed integer mtime: the same samples give byte-identical tars (a float mtime costs a PAX header per member)
        self._tar = wds.TarWriter(self._tmp_path, encoder=False, mtime=0)
        self._count = self._bytes = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        os.replace(self._tmp_path, self._path)
        self.shards.append({"name": os.path.basename(self._path), "num_samples": self._count, "num_bytes": self._bytes})
        self._tar = None

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards) + (self._count if self._tar is not None else 0)

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write ``_stats.json``; returns the stats."""
        if self._tar is not None:
            self._finish_shard()
        stats = {
            "num_samples": sum(s["num_samples"] for s in self.shards),
            "num_shards": len(self.shards),
            "shards": self.shards,
        }
        with open(os.path.join(self.out_dir, STATS_FILE), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        return stats

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            os.remove(self._tmp_path)
            self._tar = None


# ---------------------------------------------------------------- reading


class _BrokenTarStream(Exception):
    """The tar stream ended or broke somewhere tarfile would silently call an end."""


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly at an empty, cut or garbled header after the first one; a complete tar
    ends with zero blocks (EOFHeaderError, passed on), so anything else there means the tar is truncated."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tar.offset == 0:
                raise  # the first header: tarfile says "not a tar" itself
            raise _BrokenTarStream(f"no valid header at byte {tar.offset} ({e}): the tar is cut or garbled") from None


_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/key.ext.gz" -> ("dir/key", "ext.gz")


COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_READER_KEYS = 3  # __key__, __url__, __offset__: a sample with nothing else has no member
OVERSIZED = "__oversized__"  # key of a sample that had a member over its limit: (extension, bytes, limit)


class _Prefixed(io.RawIOBase):
    """A read-only stream that gives ``head`` first, then the rest of ``stream`` (the sniffed bytes put back)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.head:
            n = min(len(buf), len(self.head))
            buf[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def count_samples(urls: list[str], stop_at: int) -> int | None:
    """Distinct samples (member keys) in local tar shards, from the tar headers alone (no member data is read),
    counting no further than ``stop_at``. None when that cannot be told: a remote shard (a pipe or a URL) or one
    that is not a plain tar (a compressed one is not decompressed here); a missing shard counts 0, a cut one what
    could be read (a run skips them the same way)."""
    from .config import is_remote

    keys: set[tuple[str, str]] = set()
    for url in urls:
        if is_remote(url):
            return None
        try:
            tar = tarfile.open(url.removeprefix("file://"), mode="r:")
        except FileNotFoundError:
            continue  # a run counts it as unreadable_shard
        except (OSError, tarfile.TarError):
            return None  # compressed (not decompressed here), unreadable or not a tar: cannot tell
        with tar:
            try:
                for info in tar:
                    match = _MEMBER_NAME.match(info.name)
                    if info.isreg() and match is not None and not os.path.basename(info.name).startswith("__"):
                        keys.add((url, match.group(1)))
                        if len(keys) >= stop_at:
                            return len(keys)
            except (OSError, tarfile.TarError):
                pass  # cut short: the samples before the cut count
    return len(keys)


def read_tar_samples(
    url: str,
    on_fault: Callable[[str, str, str], None],
    *,
    keep: set[str] | None = None,
    max_member_bytes: int | None = None,
    member_limits: dict[str, int] | None = None,
    allow_compressed: bool = False,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: ``{"__key__", "__url__", "__offset__", "__next__", <ext>: bytes ...}``; members
    with one key in a row. ``__offset__`` is the byte offset of the sample's first tar header, ``__next__`` that of
    the next sample (-1 after the shard's last one); ``start`` (such an offset) begins reading there: a local,
    uncompressed shard is seeked, any other is read from its start with the samples before ``start`` passed over.

    Shard-level faults go to ``on_fault(reason, url, detail)``: "unreadable_shard" when the shard cannot be
    opened or is not a tar from its first block on, "truncated_tar" once when the stream breaks later (the
    counting rule is in the module docstring), "compressed_tar" for a gzip/bzip2/xz/zstd stream unless
    ``allow_compressed`` (a compressed member cannot be sized before it is inflated). Our own reader rather than
    wds.tarfile_to_samples: the fault must be classified where it happens, and tarfile alone does not notice a
    tar cut at a header.

    Bounded: members whose extension is not in ``keep`` (None: all) are passed over unread; a member larger
    than its limit (``member_limits[ext]``, else ``max_member_bytes``; None: no limit), as its tar header
    declares, is not read either, and its sample comes out marked ``sample[OVERSIZED] = (ext, size, limit)``
    (the caller counts it and drops the sample). Keys starting with ``__`` are the reader's, never members.
    """
    try:
        stream = wds.gopen(url, "rb")  # local paths, file:, pipe: and http(s) alike
    except Exception as exn:  # noqa: BLE001 -- missing file, permission denied, failing pipe ...
        on_fault("unreadable_shard", url, f"{type(exn).__name__}: {exn}")
        return
    try:
        try:
            head = stream.read(6)
        except Exception as exn:  # noqa: BLE001
            on_fault("unreadable_shard", url, f"{type(exn).__name__}: {exn}")
            return
        kind = next((k for magic, k in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
        if kind is not None and (not allow_compressed or kind == "zstd"):
            on_fault("compressed_tar", url, f"a {kind}-compressed stream (set data.allow_compressed_tars=true to "
                     "read gzip/bzip2/xz; the per-member limits still hold)")  # fmt: skip
            return
        base = 0  # the stream's byte offset in the shard
        if start > 0 and kind is None and getattr(stream, "seekable", lambda: False)():  # a pipe cannot
            stream.seek(start)
            head, base = b"", start
        reader = io.BufferedReader(_Prefixed(head, stream), buffer_size=1 << 16)
        try:
            mode = "r|*" if allow_compressed else "r|"
            tar = tarfile.open(fileobj=reader, mode=mode, tarinfo=_StrictTarInfo)  # reads the first header
        except Exception as exn:  # noqa: BLE001 -- not a tar (or empty, or unreadable) from its first block
            on_fault("unreadable_shard", url, f"not a tar: {type(exn).__name__}: {exn}")
            return
        limits = member_limits or {}
        sample: dict[str, Any] | None = None
        in_data = False  # reading a member's bytes: a failure there loses the sample that member belongs to
        try:
            for info in tar:
                tar.members = []  # stream mode would keep every TarInfo of the shard
                match = _MEMBER_NAME.match(info.name)
                if not info.isreg() or match is None or os.path.basename(info.name).startswith("__"):
                    continue  # directories, links, webdataset's __meta__ members
                if base + info.offset < start:
                    continue  # before the resume point (a stream that cannot seek)
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None and len(sample) > _READER_KEYS:
                        sample["__next__"] = base + info.offset
                        yield sample
                    sample = {"__key__": key, "__url__": url, "__offset__": base + info.offset}
                if keep is not None and ext not in keep:
                    sample.setdefault("__unread__", True)  # still a sample: judged (and counted) by the caller
                    continue  # tarfile passes over the member's data in blocks: nothing is kept
                limit = limits.get(ext, max_member_bytes)
                if limit is not None and info.size > limit:
                    sample.setdefault(OVERSIZED, (ext, info.size, limit))
                    continue
                in_data = True
                data = tar.extractfile(info).read()
                in_data = False
                sample.setdefault(ext, data)  # a duplicated member keeps its first copy
        except Exception as exn:  # noqa: BLE001 -- cut, garbled, or a read error inside the stream
            on_fault("truncated_tar", url, f"{type(exn).__name__}: {exn}")
            if in_data:
                sample = None
        if sample is not None and len(sample) > _READER_KEYS:  # more than __key__, __url__ and __offset__
            sample["__next__"] = -1
            yield sample
    finally:
        try:
            stream.close()
        except Exception as exn:  # noqa: BLE001 -- e.g. a pipe's exit status; its stream was judged above
            log.debug("%s: closing: %s", url, exn)
