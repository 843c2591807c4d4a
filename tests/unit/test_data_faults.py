"""Bad data never stops a run: every fault skipped and counted by reason, the tar counting rule, the
bad-fraction stop, streams that never run dry on uneven shard counts, config errors naming keys."""

import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
from faults import FAULTY_MAX_CAPTION_BYTES, FAULTY_MAX_MEMBER_BYTES, read_manifest, write_faulty_shards
from PIL import Image

from mmpretrain.data import DataConfig, Tokenizer, TrainDataConfig, build_train_loader
from mmpretrain.data.pipeline import (
    DATA_FAULT_REASONS,
    DataFaultError,
    FaultCounter,
    check_bad_fraction,
    empty_data_stats,
    merge_data_stats,
)
from mmpretrain.data.shards import read_tar_samples


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=16)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty")
    spec, expected = write_faulty_shards(out)
    return spec, expected, read_manifest(out)


def loader_cfg(urls: str, *, num_workers: int = 0, decode: str = "fast", max_image_pixels: int = 50_000_000, **train):
    cfg = DataConfig(num_workers=num_workers, decode=decode, max_image_pixels=max_image_pixels,
                     max_member_bytes=FAULTY_MAX_MEMBER_BYTES, max_caption_bytes=FAULTY_MAX_CAPTION_BYTES)  # fmt: skip
    cfg.train = TrainDataConfig(urls=urls, **train)
    return cfg


def batches_of(cfg, tokenizer, *, batch_size, num_epochs=None, n=None, rank=0, world_size=1, seed=0):
    loader = build_train_loader(
        cfg, tokenizer=tokenizer, image_size=8, batch_size=batch_size, rank=rank, world_size=world_size,
        seed=seed, num_epochs=num_epochs,
    )  # fmt: skip
    if num_epochs is not None:
        return list(loader)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def captions(batches, tokenizer) -> list[str]:
    # CLIP's BPE splits numbers into digits and decode() puts spaces between tokens: compare without spaces
    return ["".join(tokenizer.decode(row).split()) for b in batches for row in b["text"]]


def total_stats(batches) -> dict:
    total = {}
    for b in batches:
        total = merge_data_stats(total, b["data_stats"])
    return total


# ---------------------------------------------------------------- the loader over faulty shards


@pytest.mark.parametrize("num_workers,decode", [(0, "fast"), (0, "pil"), (2, "fast")])
def test_every_fault_counted_by_reason_and_good_samples_once_per_epoch(faulty, tokenizer, num_workers, decode):
    spec, expected, manifest = faulty
    cfg = loader_cfg(
        spec, num_workers=num_workers, decode=decode, max_image_pixels=manifest["max_image_pixels"], shuffle_buffer=50
    )
    good = manifest["good_captions"]
    for num_epochs in (1, 2):
        batches = batches_of(cfg, tokenizer, batch_size=4, num_epochs=num_epochs)
        assert Counter(captions(batches, tokenizer)) == {c: num_epochs for c in good}
        stats = total_stats(batches)
        assert stats["skipped"] == {r: num_epochs * expected[r] for r in DATA_FAULT_REASONS}
        assert stats["read"] == num_epochs * (len(good) + sum(expected.values()))
        assert stats["sources"] == {"source0": num_epochs * len(good)}
        by_shard = {os.path.basename(url): n for url, n in stats["bad_shards"].items()}
        assert by_shard == {name: num_epochs * sum(c.values()) for name, c in manifest["per_shard"].items()}
        for b in batches:
            assert b["num_skipped"] == sum(b["data_stats"]["skipped"].values())
            assert sum(b["data_stats"]["sources"].values()) == len(b["text"]) == len(b["image"])


def test_endless_stream_over_faulty_shards_gives_each_good_sample_once_per_epoch(faulty, tokenizer):
    spec, expected, manifest = faulty
    good = manifest["good_captions"]
    cfg = loader_cfg(spec, max_image_pixels=manifest["max_image_pixels"], shuffle_buffer=50)
    cfg.num_streams = 1
    batches = batches_of(cfg, tokenizer, batch_size=len(good), n=3)  # one stream: a batch is an epoch
    for b in batches:
        assert sorted(captions([b], tokenizer)) == sorted(good)
    # counts arrive with the batch read after them: all 3 epochs' tar-level faults are in (the decode
    # failures of the last epoch may trail its last good sample and come with the next batch)
    stats = total_stats(batches)
    for reason in DATA_FAULT_REASONS:
        if reason not in ("corrupt_image", "oversized_image"):
            assert stats["skipped"][reason] == 3 * expected[reason], reason
        else:
            assert 2 * expected[reason] <= stats["skipped"][reason] <= 3 * expected[reason], reason


def test_oversized_image_is_rejected_before_decoding_and_only_over_the_limit(faulty, tokenizer):
    spec, expected, manifest = faulty
    cfg = loader_cfg(spec, max_image_pixels=10**6, shuffle_buffer=50)  # the "oversized" image fits now
    stats = total_stats(batches_of(cfg, tokenizer, batch_size=4, num_epochs=1))
    assert stats["skipped"]["oversized_image"] == 0
    assert stats["sources"]["source0"] == len(manifest["good_captions"]) + expected["oversized_image"]


# ---------------------------------------------------------------- the truncated-tar counting rule


def _tar_bytes(samples: list[tuple[str, bytes, bytes]]) -> tuple[bytes, dict[str, tarfile.TarInfo]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, txt in samples:
            for ext, data in (("jpg", jpg), ("txt", txt)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    return data, members


def _read(path) -> tuple[list[dict], dict]:
    counter = FaultCounter("test")
    samples = list(read_tar_samples(str(path), counter.fault))
    stats = counter.take()
    return samples, {r: n for r, n in stats["skipped"].items() if n}


def test_truncated_tar_counting_rule(tmp_path):
    rng = np.random.default_rng(0)
    jpgs = [bytes(rng.integers(0, 256, size=700, dtype=np.uint8)) for _ in range(4)]  # bytes only: not decoded here
    data, members = _tar_bytes([(f"k{i}", jpgs[i], f"cap{i}".encode()) for i in range(4)])
    path = tmp_path / "t.tar"

    def cut_at(n: int):
        path.write_bytes(data[:n])
        return _read(path)

    samples, faults = cut_at(len(data))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2", "k3"] and faults == {}
    assert samples[2]["jpg"] == jpgs[2] and samples[2]["txt"] == b"cap2"
    # cut inside k2.jpg's data: k0 and k1 read, k2 lost with the tar, one fault
    samples, faults = cut_at(members["k2.jpg"].offset_data + 300)
    assert [s["__key__"] for s in samples] == ["k0", "k1"] and faults == {"truncated_tar": 1}
    # cut inside k2.txt's data: k2's whole jpg is lost with it (one fault, no second count as no_caption)
    samples, faults = cut_at(members["k2.txt"].offset_data + 2)
    assert [s["__key__"] for s in samples] == ["k0", "k1"] and faults == {"truncated_tar": 1}
    # cut inside k2.txt's header: k2 keeps its jpg (judged later: no_caption), one fault
    samples, faults = cut_at(members["k2.txt"].offset + 100)
    assert [(s["__key__"], sorted(s)) for s in samples][-1] == (
        "k2",
        ["__key__", "__next__", "__offset__", "__url__", "jpg"],
    )
    assert len(samples) == 3 and faults == {"truncated_tar": 1}
    # cut exactly at a member boundary, or only the end-of-archive blocks missing: tarfile alone would not notice
    samples, faults = cut_at(members["k3.jpg"].offset)
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"] and faults == {"truncated_tar": 1}
    end_of_k3 = members["k3.txt"].offset_data + 512
    samples, faults = cut_at(end_of_k3)
    assert len(samples) == 4 and faults == {"truncated_tar": 1}
    # a cut inside the padding after a member's data: the member is whole, the end is not
    samples, faults = cut_at(members["k3.jpg"].offset_data + 700 + 100)
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2", "k3"] and "txt" not in samples[-1]
    assert faults == {"truncated_tar": 1}
    # garbage in the middle (a garbled header after the first): a truncated tar, not a silent end
    garbled = bytearray(data)
    garbled[members["k1.jpg"].offset : members["k1.jpg"].offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(garbled))
    samples, faults = _read(path)
    assert [s["__key__"] for s in samples] == ["k0"] and faults == {"truncated_tar": 1}


@pytest.mark.parametrize("content", [None, b"", b"short", b"not a tar " * 200])
def test_unreadable_shards(tmp_path, content):
    path = tmp_path / "x.tar"
    if content is not None:  # None: missing file
        path.write_bytes(content)
    samples, faults = _read(path)
    assert samples == [] and faults == {"unreadable_shard": 1}


# ---------------------------------------------------------------- the bad-fraction stop


def test_check_bad_fraction_waits_for_min_samples_and_names_worst_shards():
    def stats(good: int, **faults_by_shard: dict) -> dict:
        s = empty_data_stats(["source0"])
        s["sources"]["source0"] = good
        s["read"] = good
        for url, reasons in faults_by_shard.items():
            for reason, n in reasons.items():
                s["skipped"][reason] += n
                s["bad_shards"][f"/x/{url}.tar"] = s["bad_shards"].get(f"/x/{url}.tar", 0) + n
                s["read"] += n
        return s

    # two ranks' counts, merged: 3845 good, 812 + 97 + 246 broken = 1155 of 5000 = 23.1%
    rank0 = stats(2000, a={"corrupt_image": 700}, b={"truncated_tar": 3})
    rank1 = stats(1845, a={"corrupt_image": 112}, b={"no_caption": 94}, c={"zero_byte": 246})
    total = merge_data_stats(merge_data_stats({}, rank0), rank1)
    assert total["read"] == 5000 and total["bad_shards"] == {"/x/a.tar": 812, "/x/b.tar": 97, "/x/c.tar": 246}
    with pytest.raises(DataFaultError) as err:
        check_bad_fraction(total, max_bad_fraction=0.1, min_samples=1000)
    msg = str(err.value)
    assert msg.startswith("data: 23.1% of 5000 samples read were broken (> data.max_bad_fraction=0.1)")
    assert "worst shards: /x/a.tar (812), /x/c.tar (246), /x/b.tar (97)" in msg
    assert "by reason: corrupt_image 812, zero_byte 246, no_caption 94, truncated_tar 3" in msg
    check_bad_fraction(total, max_bad_fraction=0.1, min_samples=5001)  # not judged before min_samples
    check_bad_fraction(total, max_bad_fraction=0.231, min_samples=1000)  # 1155 / 5000 = 0.231 is not above
    check_bad_fraction(total, max_bad_fraction=1.0, min_samples=1)
    check_bad_fraction({}, max_bad_fraction=0.0, min_samples=0)


def test_check_bad_fraction_on_loader_stats(faulty, tokenizer):
    spec, expected, manifest = faulty
    cfg = loader_cfg(spec, max_image_pixels=manifest["max_image_pixels"], shuffle_buffer=50)
    stats = total_stats(batches_of(cfg, tokenizer, batch_size=4, num_epochs=2))
    broken = 2 * sum(expected.values())  # 28 of 28 + 48 = 36.8%
    with pytest.raises(DataFaultError, match=r"36\.8% of 76 samples .* worst shards: \S*faulty-1\.tar \(14\), "):
        check_bad_fraction(stats, max_bad_fraction=0.3, min_samples=76)
    check_bad_fraction(stats, max_bad_fraction=0.3, min_samples=77)
    check_bad_fraction(stats, max_bad_fraction=broken / stats["read"], min_samples=1)


# ---------------------------------------------------------------- never hang, never stop


def test_uneven_shards_over_ranks_stream_forever(tmp_path, tokenizer):
    """3 shards on 2 ranks: rank 0 reads 2 shards an epoch, rank 1 one; both streams go on forever."""
    from mmpretrain.data.shards import ShardWriter, encode_image

    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, samples_per_shard=4) as w:
        for i in range(12):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            w.write({"__key__": f"{i:04d}", "jpg": encode_image(Image.fromarray(pixels)), "txt": f"item{i}"})
    cfg = loader_cfg(str(tmp_path / "shard-{000000..000002}.tar"), shuffle_buffer=8)
    per_rank = [
        captions(batches_of(cfg, tokenizer, batch_size=3, n=30, rank=rank, world_size=2), tokenizer) for rank in (0, 1)
    ]
    for seen in per_rank:
        assert len(seen) == 90 and set(seen) <= {f"item{i}" for i in range(12)}
    # 90 samples are many epochs for either rank (<= 8 samples an epoch), and the ranks never read alike
    assert per_rank[0] != per_rank[1]


def test_missing_shards_are_faults_not_config_errors(tmp_path, tokenizer, caplog):
    from mmpretrain.data.shards import ShardWriter, encode_image

    with ShardWriter(tmp_path, samples_per_shard=4) as w:
        for i in range(8):
            w.write({"__key__": f"{i:04d}", "jpg": encode_image(Image.new("RGB", (8, 8))), "txt": f"item{i}"})
    cfg = loader_cfg(str(tmp_path / "shard-{000000..000003}.tar"), shuffle_buffer=8)  # 2 of 4 missing
    with caplog.at_level("WARNING", logger="mmpretrain.data.config"):
        cfg.validate("data")
    assert "data.train.urls: 2 of 4 files" in caplog.text
    stats = total_stats(batches_of(cfg, tokenizer, batch_size=4, num_epochs=1))
    assert stats["skipped"]["unreadable_shard"] == 2 and stats["sources"]["source0"] == 8


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override,key",
    [
        (dict(max_bad_fraction=1.5), "max_bad_fraction"),
        (dict(max_bad_fraction=-0.1), "max_bad_fraction"),
        (dict(bad_min_samples=0), "bad_min_samples"),
        (dict(max_image_pixels=0), "max_image_pixels"),
        (dict(decode="turbo"), "decode"),
    ],
)
def test_config_errors_name_the_key(faulty, override, key):
    cfg = loader_cfg(faulty[0])
    cfg.validate("data")
    for name, value in override.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=rf"^data\.{key}: "):
        cfg.validate("data")


def test_config_defaults():
    cfg = DataConfig()
    assert (cfg.max_bad_fraction, cfg.bad_min_samples, cfg.max_image_pixels, cfg.decode) == (
        0.1, 1000, 50_000_000, "fast"
    )  # fmt: skip
