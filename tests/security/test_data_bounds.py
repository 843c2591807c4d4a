"""No input can exhaust a data worker (issue: trust what users hand each other, findings 4-6).

- a gzip stream named .tar is refused (counted compressed_tar) unless data.allow_compressed_tars; allowed, a
  member inflating to 200 MB that the loader does not use is passed over unread: the reading process's peak
  memory stays far below the member's size;
- a caption of 8 MB is skipped and counted (oversized_caption) before any cleaning or tokenizing;
- a shard of 12,000 broken samples in a row is given up after ABANDON_SHARD_AFTER (one abandoned_shard) and the
  stream goes on with the next shard's good samples; only max_bad_fraction decides whether a run stops.
Memory is measured in a child process (its own peak RSS, getrusage), so the test process's history does not count.
"""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmpretrain.data import DataConfig, Tokenizer, TrainDataConfig, build_train_loader
from mmpretrain.data.pipeline import ABANDON_SHARD_AFTER, merge_data_stats

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (faults.py)

from faults import write_broken_run_shard  # noqa: E402


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int | None = None, stream=None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else stream)


class Zeros(io.RawIOBase):
    """n zero bytes, produced as read (a large member without holding it)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def gzip_bomb(path: str, member_bytes: int) -> None:
    """A gzip-compressed tar (named .tar): two good samples around one with a huge unused .json member."""
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        add(tar, "a.jpg", jpeg(0))
        add(tar, "a.txt", b"a good caption")
        add(tar, "b.jpg", jpeg(1))
        add(tar, "b.txt", b"a caption with a huge json beside it")
        add(tar, "b.json", size=member_bytes, stream=Zeros(member_bytes))
        add(tar, "c.jpg", jpeg(2))
        add(tar, "c.txt", b"another good caption")


CHILD = """
import json, resource, sys
from mmpretrain.data import DataConfig, Tokenizer, TrainDataConfig, build_train_loader
from mmpretrain.data.pipeline import merge_data_stats
cfg = DataConfig(num_workers=0, allow_compressed_tars=sys.argv[2] == "allow")
cfg.train = TrainDataConfig(urls=sys.argv[1], shuffle_buffer=4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loader = build_train_loader(cfg, tokenizer=Tokenizer(context_length=16), image_size=8, batch_size=1, rank=0,
                            world_size=1, seed=0, num_epochs=1)
stats, texts = {}, 0
for batch in loader:
    stats = merge_data_stats(stats, batch["data_stats"])
    texts += len(batch["text"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"skipped": stats["skipped"], "good": texts, "peak_growth_mb": (peak - before) / 1024}))
"""


def read_in_child(url: str, allow: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, url, "allow" if allow else "refuse"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bomb") / "bomb.tar")
    gzip_bomb(path, member_bytes=200 * 2**20)
    assert os.path.getsize(path) < 2 * 2**20  # a small file on disk
    return path


def test_a_compressed_stream_is_refused_and_counted_by_default(bomb):
    got = read_in_child(bomb, allow=False)
    assert got["skipped"]["compressed_tar"] == 1 and got["good"] == 0
    assert got["peak_growth_mb"] < 100


def test_allowed_compressed_stream_passes_over_the_unused_member_unread(bomb):
    got = read_in_child(bomb, allow=True)
    # b.json is not a member the loader uses: never read, so sample b is good; 200 MB never sit in memory
    assert got["good"] == 3 and sum(got["skipped"].values()) == 0
    assert got["peak_growth_mb"] < 100, got


def test_an_oversized_used_member_is_skipped_unread_and_counted(tmp_path):
    path = str(tmp_path / "big.tar")
    with tarfile.open(path, "w") as tar:
        add(tar, "a.jpg", size=100 * 2**20, stream=Zeros(100 * 2**20))  # 100 MB "image": over the 64 MiB default
        add(tar, "a.txt", b"a caption")
        add(tar, "b.jpg", jpeg(0))
        add(tar, "b.txt", b"good")
    got = read_in_child(path, allow=False)
    assert got["skipped"]["oversized_member"] == 1 and got["good"] == 1
    assert got["peak_growth_mb"] < 60, got


def test_an_8_mb_caption_is_skipped_and_counted_before_tokenizing(tmp_path):
    path = str(tmp_path / "caption.tar")
    with tarfile.open(path, "w") as tar:
        add(tar, "a.jpg", jpeg(0))
        add(tar, "a.txt", ("word " * (8 * 2**20 // 5)).encode())
        add(tar, "b.jpg", jpeg(1))
        add(tar, "b.txt", b"a short caption")
    cfg = DataConfig(num_workers=0)
    cfg.train = TrainDataConfig(urls=path, shuffle_buffer=2)
    tokenizer = Tokenizer(context_length=16)
    seen = []
    tokenizer_call = tokenizer.__call__
    tokenizer.__class__ = type("Spy", (Tokenizer,), {"__call__": lambda self, texts: seen.extend(texts) or
                                                     tokenizer_call(texts)})  # fmt: skip
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=8, batch_size=1, rank=0, world_size=1, seed=0,
                                num_epochs=1)  # fmt: skip
    stats = {}
    for batch in loader:
        stats = merge_data_stats(stats, batch["data_stats"])
    assert stats["skipped"]["oversized_caption"] == 1 and stats["read"] == 2
    assert seen == ["a short caption"]  # the long one never reached the tokenizer


def test_a_long_run_of_broken_samples_gives_the_shard_up_and_the_stream_goes_on(tmp_path):
    write_broken_run_shard(tmp_path / "broken.tar", broken=12_000, good=3)
    good = []
    with tarfile.open(str(tmp_path / "fine.tar"), "w") as tar:
        for i in range(6):
            add(tar, f"f{i}.jpg", jpeg(i))
            add(tar, f"f{i}.txt", f"fine caption {i}".encode())
            good.append(f"fine caption {i}")
    cfg = DataConfig(num_workers=0, max_bad_fraction=1.0)
    cfg.train = TrainDataConfig(urls=f"{tmp_path}/{{broken,fine}}.tar", shuffle_buffer=4)
    tokenizer = Tokenizer(context_length=16)
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=8, batch_size=2, rank=0, world_size=1, seed=0,
                                num_epochs=1)  # fmt: skip
    stats, texts = {}, []
    for batch in loader:
        stats = merge_data_stats(stats, batch["data_stats"])
        texts += ["".join(tokenizer.decode(row).split()) for row in batch["text"]]
    assert stats["skipped"]["no_image"] == ABANDON_SHARD_AFTER and stats["skipped"]["abandoned_shard"] == 1
    assert sorted(texts) == sorted(c.replace(" ", "") for c in good)  # the broken shard's late good ones unread
