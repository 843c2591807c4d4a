"""Data package: config errors, transforms, synthetic shapes, train loader (determinism, rank split,
exact resume, broken samples), eval sets split over ranks."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from loader_helpers import assert_same_batches, captions, take
from PIL import Image

from mmpretrain.data import DataConfig, Tokenizer
from mmpretrain.data.config import EvalDataConfig, TrainDataConfig
from mmpretrain.data.pipeline import build_eval_loader, load_retrieval_set, load_zeroshot_set, worker_skip_batches
from mmpretrain.data.shards import ShardWriter, encode_image
from mmpretrain.data.synthetic import CLASSNAMES, COLORS, SHAPES, write_shapes_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=16)


def make_cfg(urls: str, num_workers: int = 0, **train) -> DataConfig:
    cfg = DataConfig(num_workers=num_workers)
    cfg.train = TrainDataConfig(urls=urls, **train)
    return cfg


def write_items(out_dir, num_shards, per_shard, start=0) -> str:
    """Shards of tiny images whose captions are unique ("item7"), so a batch tells which samples it holds."""
    rng = np.random.default_rng(start)
    i = start
    with ShardWriter(out_dir, samples_per_shard=per_shard) as w:
        for _ in range(num_shards * per_shard):
            pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            w.write({"__key__": f"{i:06d}", "jpg": encode_image(Image.fromarray(pixels)), "txt": f"item{i}"})
            i += 1
    return os.path.join(out_dir, f"shard-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """4 shards x 12 samples with unique captions "item0" .. "item47"."""
    return write_items(tmp_path_factory.mktemp("items"), 4, 12)


# ---------------------------------------------------------------- config


def test_config_validation_names_keys(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"^data\.train\.urls: required"):
        DataConfig().validate("data")
    cfg = DataConfig()
    cfg.synthetic.root = str(tmp_path / "synth")
    cfg.validate("data")  # synthetic data stands in for the train urls
    spec = str(tmp_path / "x" / "{0..3}.tar")
    with pytest.raises(ValueError, match=r"^data\.train\.urls: no file matches '.*x/\{0\.\.3\}\.tar'"):
        make_cfg(spec).validate("data")
    (tmp_path / "a.tar").write_bytes(b"")
    # some files missing: a warning only (a missing shard is a data fault counted at read time)
    with caplog.at_level("WARNING", logger="mmpretrain.data.config"):
        make_cfg(str(tmp_path / "{a,b}.tar")).validate("data")
    assert "data.train.urls: 1 of 2 files of" in caplog.text and "b.tar" in caplog.text
    make_cfg("pipe:curl -s http://host/{0..9}.tar::https://host/x.tar").validate("data")  # remote: not checked
    with pytest.raises(ValueError, match=r"^data\.train\.samples_per_epoch: required"):
        make_cfg(str(tmp_path / "a.tar"), resampled=True).validate("data")
    with pytest.raises(ValueError, match=r"^data\.train\.source_weights"):
        make_cfg(str(tmp_path / "a.tar"), resampled=True, samples_per_epoch=10, source_weights=[1, 2]).validate("data")
    with pytest.raises(ValueError, match=r"^data\.train\.crop_scale"):
        make_cfg(str(tmp_path / "a.tar"), crop_scale=[0.9, 1.5]).validate("data")
    with pytest.raises(ValueError, match=r"^data\.num_workers"):
        make_cfg(str(tmp_path / "a.tar"), num_workers=-1).validate("data")
    with pytest.raises(ValueError, match=r"^data\.eval\.zeroshot: no such directory"):
        EvalDataConfig(zeroshot=str(tmp_path / "nope")).validate("data.eval")
    with pytest.raises(ValueError, match=r"^data\.eval\.retrieval: no file matches"):
        EvalDataConfig(retrieval=str(tmp_path)).validate("data.eval")


def test_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["train.crop_scale=[0.5,1.0]"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.train.crop_scale == [0.5, 1.0]


# ---------------------------------------------------------------- synthetic data


def test_synthetic_layout(shapes_dataset):
    root = shapes_dataset.root
    train = sorted(os.listdir(os.path.join(root, "train")))
    assert train == ["_stats.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    stats = json.load(open(os.path.join(root, "train", "_stats.json")))
    assert stats["num_samples"] == 512 and stats["num_shards"] == 4

    zs = load_zeroshot_set(shapes_dataset.zeroshot_root)
    assert len(zs.classnames) >= 24 and zs.classnames == CLASSNAMES and len(set(zs.classnames)) == len(zs.classnames)
    assert all("{c}" in t for t in zs.templates)
    assert [os.path.basename(u) for u in zs.urls] == ["0.tar", "1.tar"]
    with tarfile.open(zs.urls[0]) as tar:
        names = tar.getnames()
        label = int(tar.extractfile(next(n for n in names if n.endswith(".cls"))).read())
    assert 0 <= label < len(zs.classnames) and any(n.endswith(".jpg") for n in names)

    rt = load_retrieval_set(shapes_dataset.retrieval_root)
    assert open(os.path.join(shapes_dataset.retrieval_root, "dataset_type.txt")).read().strip() == "retrieval"
    with tarfile.open(rt.urls[0]) as tar:
        text = tar.extractfile(next(n for n in tar.getnames() if n.endswith(".txt"))).read().decode()
    lines = text.splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3


def test_synthetic_captions_name_color_and_shape(shapes_dataset):
    with tarfile.open(shapes_dataset.train_urls.replace("{000000..000003}", "000000")) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in members})
    assert len(keys) == 128
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        color, shape = meta["classname"].split()
        caption = members[f"{key}.txt"].decode()
        assert f"{color} {shape}" in caption and meta["background"] != color
        assert shape in SHAPES and color in COLORS
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert img.size == (32, 32) and img.format == "JPEG"
    labels = {json.loads(v)["label"] for k, v in members.items() if k.endswith(".json")}
    assert len(labels) >= 24  # 128 samples cover nearly all 32 classes


def test_synthetic_is_deterministic_idempotent_and_safe(tmp_path):
    kwargs = dict(num_train=40, samples_per_shard=16, num_eval=8, image_size=16)
    a = write_shapes_dataset(tmp_path / "a", seed=5, **kwargs)
    b = write_shapes_dataset(tmp_path / "b", seed=5, **kwargs)
    c = write_shapes_dataset(tmp_path / "c", seed=6, **kwargs)
    shard = "train/shard-000002.tar"  # the last, partial shard
    read = lambda p: open(os.path.join(p.root, shard), "rb").read()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    marker = os.path.join(a.root, "_DONE")
    mtime = os.stat(marker).st_mtime_ns
    assert write_shapes_dataset(tmp_path / "a", seed=5, **kwargs) == a and os.stat(marker).st_mtime_ns == mtime
    user = tmp_path / "user_data"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        write_shapes_dataset(user, **kwargs)
    assert (user / "precious.txt").read_text() == "keep me"
    # train and eval are drawn from different seed streams: no eval image repeats a train image
    train_imgs, eval_imgs = set(), set()
    for url in [os.path.join(a.root, f"train/shard-{i:06d}.tar") for i in range(3)]:
        with tarfile.open(url) as tar:
            train_imgs |= {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    for url in load_zeroshot_set(a.zeroshot_root).urls:
        with tarfile.open(url) as tar:
            eval_imgs |= {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    assert len(train_imgs) == 40 and len(eval_imgs) == 8 and not train_imgs & eval_imgs


# ---------------------------------------------------------------- train loader


def test_batches_shapes_and_determinism(shapes_dataset, tokenizer):
    cfg = make_cfg(shapes_dataset.train_urls, shuffle_buffer=64)
    a = take(cfg, tokenizer, 4, image_size=24)
    assert a[0]["image"].shape == (8, 3, 24, 24) and a[0]["image"].dtype in (torch.float32, torch.uint8)
    assert a[0]["text"].shape == (8, 16) and a[0]["text"].dtype == torch.long
    assert a[0]["num_skipped"] == 0
    assert_same_batches(a, take(cfg, tokenizer, 4, image_size=24))  # same args: same batches
    other = take(cfg, tokenizer, 4, image_size=24, seed=1)
    assert not torch.equal(torch.stack([b["text"] for b in a]), torch.stack([b["text"] for b in other]))


def test_epoch_mode_ranks_cover_disjoint_halves_and_epochs_reshuffle(items, tokenizer):
    cfg = make_cfg(items, shuffle_buffer=100)
    per_rank = [take(cfg, tokenizer, 3, rank=r, world_size=2) for r in range(2)]  # 3 x 8 = 24 = one epoch a rank
    seen = [captions(b, tokenizer) for b in per_rank]
    assert all(len(set(s)) == 24 for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"item{i}" for i in range(48)}
    # one rank alone: epoch 2 is the same set of 48 in another order
    two_epochs = captions(take(cfg, tokenizer, 12), tokenizer)  # 12 x 8 = 2 x 48
    assert sorted(two_epochs[:48]) == sorted(two_epochs[48:]) and two_epochs[:48] != two_epochs[48:]


def test_resampled_mode_is_seeded_and_weighted(tmp_path, items, tokenizer):
    other = write_items(tmp_path / "other", 1, 12, start=1000)
    cfg = make_cfg(f"{items}::{other}", resampled=True, samples_per_epoch=100, source_weights=[1.0, 0.0])
    a = take(cfg, tokenizer, 8)
    assert_same_batches(a, take(cfg, tokenizer, 8))
    assert all(int(c[4:]) < 48 for c in captions(a, tokenizer))  # weight 0: never drawn
    # resampling draws with replacement: ranks overlap (unlike epoch mode) but differ
    r1 = take(cfg, tokenizer, 8, rank=1, world_size=2)
    assert captions(a, tokenizer) != captions(r1, tokenizer)


def test_worker_skip_batches_matches_round_robin():
    for num_workers in (1, 2, 3):
        for start in range(8):
            produced = [sum(1 for i in range(start) if i % num_workers == w) for w in range(num_workers)]
            assert [worker_skip_batches(start, w, num_workers) for w in range(num_workers)] == produced


def test_exact_resume_without_workers(shapes_dataset, tokenizer):
    cfg = make_cfg(shapes_dataset.train_urls, shuffle_buffer=64)
    full = take(cfg, tokenizer, 18, batch_size=32)  # 576 samples: crosses the epoch boundary (512)
    for start in (5, 15):
        assert_same_batches(take(cfg, tokenizer, 3, batch_size=32, start_batch=start), full[start : start + 3])


def test_exact_resume_with_two_workers(items, tokenizer):
    cfg = make_cfg(items, num_workers=2, shuffle_buffer=100)
    full = take(cfg, tokenizer, 12, batch_size=4)
    # each worker reads 2 of the 4 shards: the first 12 batches are one epoch, every sample once
    assert sorted(captions(full, tokenizer)) == sorted(f"item{i}" for i in range(48))
    assert_same_batches(take(cfg, tokenizer, 4, batch_size=4, start_batch=5), full[5:9])  # odd start: stream 1 first


def write_broken_shards(out_dir) -> tuple[str, set[str], int]:
    """Shard 0: 6 good + corrupt jpg + no txt + empty caption; shard 1: truncated in its 4th sample's jpg;
    shard 2: not a tar at all. Returns (spec, good captions, broken count)."""
    os.makedirs(out_dir)
    rng = np.random.default_rng(0)

    def jpg():
        return encode_image(Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)))

    good = set()
    with ShardWriter(out_dir, samples_per_shard=100) as w:
        for i in range(6):
            w.write({"__key__": f"a{i}", "jpg": jpg(), "txt": f"good{i}"})
            good.add(f"good{i}")
        w.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": "corrupt"})
        w.write({"__key__": "notext", "jpg": jpg()})
        w.write({"__key__": "emptytext", "jpg": jpg(), "txt": "   "})
    os.rename(os.path.join(out_dir, "shard-000000.tar"), os.path.join(out_dir, "part-0.tar"))
    with ShardWriter(out_dir, samples_per_shard=100) as w:
        for i in range(6):
            w.write({"__key__": f"b{i}", "jpg": jpg(), "txt": f"tail{i}"})
    path = os.path.join(out_dir, "shard-000000.tar")
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "b3.jpg").offset_data + 100
    data = open(path, "rb").read()
    open(os.path.join(out_dir, "part-1.tar"), "wb").write(data[:cut])
    good |= {f"tail{i}" for i in range(3)}
    open(os.path.join(out_dir, "part-2.tar"), "wb").write(b"garbage, not a tar file" * 50)
    # counted: corrupt jpg, missing txt, empty caption, unreadable tar, and the truncated tar once (the sample
    # whose member is cut is lost with it; how many samples the lost tail held is unknowable)
    return os.path.join(out_dir, "part-{0..2}.tar"), good, 5


def test_broken_samples_are_skipped_and_counted(tmp_path, tokenizer):
    spec, good, num_broken = write_broken_shards(tmp_path / "broken")
    cfg = make_cfg(spec, shuffle_buffer=100)
    batches = take(cfg, tokenizer, 9, batch_size=3)  # 9 good samples an epoch: 3 batches an epoch
    for epoch in range(3):
        chunk = batches[3 * epoch : 3 * epoch + 3]
        assert sorted(captions(chunk, tokenizer)) == sorted(good)
        assert sum(b["num_skipped"] for b in chunk) == num_broken
        stats = [b["data_stats"] for b in chunk]
        assert [sum(st["skipped"].values()) for st in stats] == [b["num_skipped"] for b in chunk]
        assert sum(st["read"] for st in stats) == len(good) + num_broken


def test_all_broken_shards_fail_loudly_instead_of_hanging(tmp_path, tokenizer):
    with ShardWriter(tmp_path, samples_per_shard=10) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "txt": "caption without an image"})
    with pytest.raises(RuntimeError, match="no usable sample"):
        take(make_cfg(str(tmp_path / "shard-000000.tar")), tokenizer, 1)


def test_too_few_shards_for_ranks_and_workers(items, tokenizer):
    legacy = make_cfg(items, num_workers=3)
    legacy.num_streams = 0  # the per-rank loader: a worker needs a shard
    with pytest.raises(ValueError, match=r"^data\.train\.urls: 4 shards cannot feed 2 ranks x 3 workers"):
        take(legacy, tokenizer, 1, world_size=2)
    # the global order: 2 ranks x 3 workers need 6 streams (or 12 ...), 4 shards cannot feed them
    with pytest.raises(ValueError, match=r"^data\.train\.urls: 4 shards cannot feed data\.num_streams=6 .*null took 6"):
        take(make_cfg(items, num_workers=3), tokenizer, 1, world_size=2)


# ---------------------------------------------------------------- eval sets


@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_eval_loader_splits_samples_over_ranks(shapes_dataset, task):
    root = shapes_dataset.zeroshot_root if task == "zeroshot" else shapes_dataset.retrieval_root
    urls = load_zeroshot_set(root).urls if task == "zeroshot" else load_retrieval_set(root).urls
    kw = dict(task=task, image_size=24, batch_size=10)
    whole = list(build_eval_loader(urls, **kw))
    assert [len(b["index"]) for b in whole] == [10] * 6 + [4]  # the last batch is short, never dropped
    assert torch.cat([b["index"] for b in whole]).tolist() == list(range(shapes_dataset.num_eval))
    assert whole[0]["image"].shape == (10, 3, 24, 24)
    per_rank = [list(build_eval_loader(urls, rank=r, world_size=3, **kw)) for r in range(3)]
    for r, batches in enumerate(per_rank):
        idx = torch.cat([b["index"] for b in batches])
        assert (idx % 3 == r).all()
        for b in batches:  # same sample, same tensors, whichever rank reads it
            ref = torch.cat([w["image"] for w in whole])[b["index"]]
            torch.testing.assert_close(b["image"], ref, rtol=0, atol=0)
    assert sorted(torch.cat([b["index"] for bs in per_rank for b in bs]).tolist()) == list(range(64))
    if task == "zeroshot":
        labels = torch.cat([b["label"] for b in whole])
        assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < len(CLASSNAMES)
    else:
        assert all(len(caps) == 3 for b in whole for caps in b["captions"])
