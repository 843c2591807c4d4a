"""The global sample order (mmpretrain/data/streams.py): batches that do not depend on the launch, and a data
position that is state, so a restart reads the shards in flight and not the run so far.

Ranks are simulated in-process: the loader of rank r of world w is built and read by itself (num_workers=0), which
is exactly what each rank of a launch does.
"""

import os

import numpy as np
import pytest
from PIL import Image

import mmpretrain.data.shards as shards_module
import mmpretrain.data.streams as streams_module
from mmpretrain.data import DataConfig, SourceConfig, Tokenizer, TrainDataConfig, build_train_loader
from mmpretrain.data.shards import ShardWriter, encode_image, read_tar_samples
from mmpretrain.data.streams import auto_num_streams


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=8)


def write_items(out_dir, num_shards, per_shard) -> str:
    rng = np.random.default_rng(0)
    with ShardWriter(str(out_dir), samples_per_shard=per_shard) as w:
        for i in range(num_shards * per_shard):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            w.write({"__key__": f"{i:06d}", "jpg": encode_image(Image.fromarray(pixels)), "txt": f"item{i}"})
    return os.path.join(str(out_dir), f"shard-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """16 shards x 6 samples: with 4 streams of 4 shards, a stream's epoch is 24 samples."""
    return write_items(tmp_path_factory.mktemp("streams"), 16, 6)


def make_cfg(urls, num_workers=0, num_streams=4, **train) -> DataConfig:
    cfg = DataConfig(num_workers=num_workers, num_streams=num_streams)
    cfg.train = TrainDataConfig(urls=urls, shuffle_buffer=train.pop("shuffle_buffer", 5), **train)
    return cfg


def loader(cfg, tokenizer, *, global_batch=8, rank=0, world_size=1, data_state=None, start_batch=0):
    return build_train_loader(cfg, tokenizer=tokenizer, image_size=8, batch_size=global_batch // world_size,
                              rank=rank, world_size=world_size, seed=3, data_state=data_state,
                              start_batch=start_batch)  # fmt: skip


def run_world(cfg, tokenizer, world_size, steps, data_state=None, global_batch=8):
    """Global batches (as sorted lists of keys) of ``steps`` steps on ``world_size`` simulated ranks, and the data state
    after them gathered over ranks (as the train loop saves it)."""
    per_rank = []
    for rank in range(world_size):
        it = iter(loader(cfg, tokenizer, global_batch=global_batch, rank=rank, world_size=world_size,
                         data_state=data_state))  # fmt: skip
        per_rank.append([next(it) for _ in range(steps)])
    # a global batch as a multiset of keys (sorted): resampled shards and small sources may repeat a sample
    batches = [sorted(k for r in per_rank for k in r[s]["keys"]) for s in range(steps)]
    for s in range(steps):  # ranks take slices of equal size
        assert all(len(r[s]["keys"]) == global_batch // world_size for r in per_rank)
    state = {"num_streams": per_rank[0][-1]["data_state"]["num_streams"], "streams": {}}
    for r in per_rank:
        state["streams"].update(r[-1]["data_state"]["streams"])
    return batches, state


def test_tar_offsets_seek_to_a_sample(items):
    url = items.replace("{000000..000015}", "000003")
    samples = list(read_tar_samples(url, lambda *a: pytest.fail(str(a))))
    assert [s["__next__"] for s in samples[:-1]] == [s["__offset__"] for s in samples[1:]] and samples[-1][
        "__next__"
    ] == -1
    rest = list(read_tar_samples(url, lambda *a: pytest.fail(str(a)), start=samples[2]["__offset__"]))
    assert [s["__key__"] for s in rest] == [s["__key__"] for s in samples[2:]]
    assert rest[0]["txt"] == samples[2]["txt"]


def test_global_batches_are_the_same_on_1_2_4_ranks_and_an_epoch_has_every_sample_once(items, tokenizer):
    cfg = make_cfg(items)
    steps = 12  # 4 streams x 24 samples = 96 = 12 global batches of 8: one epoch
    one, _ = run_world(cfg, tokenizer, 1, steps)
    for world in (2, 4):
        assert run_world(cfg, tokenizer, world, steps)[0] == one, f"world {world}"
    keys = [k for batch in one for k in batch]
    assert len(keys) == len(set(keys)) == 96
    # the next epoch: every sample once more, in another order
    two, _ = run_world(cfg, tokenizer, 1, 2 * steps)
    assert two[:steps] == one and {k for b in two[steps:] for k in b} == set(keys) and two[steps:] != one


def test_workers_own_whole_streams_without_changing_the_batches(items, tokenizer):
    cfg = make_cfg(items)
    one, _ = run_world(cfg, tokenizer, 1, 5)
    assert run_world(make_cfg(items, num_workers=2), tokenizer, 2, 5)[0] == one  # 2 ranks x 2 workers


def test_resume_2_to_1_to_2_ranks_sees_the_uninterrupted_batches(items, tokenizer):
    cfg = make_cfg(items)
    full, _ = run_world(cfg, tokenizer, 1, 30)  # over 2 epochs
    a, state = run_world(cfg, tokenizer, 2, 7)
    # data.num_streams=null (8 here) defers to the checkpoint's number, chosen at the run's first launch
    b, state = run_world(make_cfg(items, num_streams=None), tokenizer, 1, 11, data_state=state)
    c, _ = run_world(cfg, tokenizer, 2, 12, data_state=state)
    assert a + b + c == full


def test_resume_from_state_equals_replay_and_images_match(items, tokenizer):
    cfg = make_cfg(items, num_workers=0)
    it = iter(loader(cfg, tokenizer))
    full = [next(it) for _ in range(9)]
    resumed = iter(loader(cfg, tokenizer, data_state=full[4]["data_state"]))
    replayed = iter(loader(cfg, tokenizer, start_batch=5))
    for want in full[5:]:
        for got in (next(resumed), next(replayed)):
            assert got["keys"] == want["keys"]
            assert (got["image"] == want["image"]).all() and (got["text"] == want["text"]).all()  # same crops


@pytest.mark.parametrize("mode", ["sources", "resampled"])
def test_mixtures_and_resampled_shards_resume_on_another_world_size(items, tmp_path, tokenizer, mode):
    """Two weighted sources (each stream draws its source per sample), or shards drawn with replacement: the same
    global batches on 1 and 2 ranks, and across a 2 -> 1 resume from the state."""
    cfg = DataConfig(num_workers=0, num_streams=4)
    if mode == "sources":
        other = write_items(tmp_path, 4, 5)
        cfg.train = TrainDataConfig(sources=[SourceConfig(items, weight=2.0), SourceConfig(other, name="b")],
                                    shuffle_buffer=3)  # fmt: skip
    else:
        cfg.train = TrainDataConfig(urls=items, resampled=True, samples_per_epoch=96, shuffle_buffer=3)
    full, _ = run_world(cfg, tokenizer, 1, 14)
    a, state = run_world(cfg, tokenizer, 2, 6)
    b, _ = run_world(cfg, tokenizer, 1, 8, data_state=state)
    assert a + b == full


def test_remote_shards_resume_reading_each_shard_in_flight_once(items, tokenizer, monkeypatch):
    """pipe: shards cannot seek: the buffered samples of a shard are read back in one pass over it."""
    cfg = make_cfg("pipe:cat " + items, shuffle_buffer=6)
    it = iter(loader(cfg, tokenizer))
    full = [next(it) for _ in range(8)]
    reads = count_reads(monkeypatch)
    resumed = iter(loader(cfg, tokenizer, data_state=full[3]["data_state"]))
    assert [next(resumed)["keys"] for _ in range(4)] == [b["keys"] for b in full[4:]]
    assert reads[0] <= 4 * 2 * 6 + 8 * 4  # at most 2 shards of 6 samples a stream read back, then 4 batches' reads


def count_reads(monkeypatch) -> list:
    """Samples the train loader reads from tars (every sample a tar reader yields), counted in-process."""
    reads = [0]

    def counting(*args, **kwargs):
        for sample in read_tar_samples(*args, **kwargs):
            reads[0] += 1
            yield sample

    monkeypatch.setattr(streams_module, "read_tar_samples", counting)
    return reads


def count_headers(monkeypatch) -> list:
    """Tar headers the readers parse (every member, kept or passed over), counted in-process."""
    headers = [0]

    class Counting(shards_module._StrictTarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            headers[0] += 1
            return super().fromtarfile(tar)

    monkeypatch.setattr(shards_module, "_StrictTarInfo", Counting)
    return headers


def test_resume_cost_is_flat(tmp_path, tokenizer, monkeypatch):
    """Samples read before the first resumed batch: the same at step 50 and step 1000 (the buffers and one batch),
    while a replay reads the run so far. Each read-back seeks to its sample's header: the tar headers parsed are at
    most the sample's 2 members and the next header, not the members before it in the shard."""
    cfg = make_cfg(write_items(tmp_path, 8, 9), num_streams=4, shuffle_buffer=4)  # a stream's epoch: 18 samples
    it = iter(loader(cfg, tokenizer))
    states = {}
    for step in range(1, 1001):
        batch = next(it)
        if step in (
            50,
            1000,
        ):  # 100 and 2000 samples a stream: 10 and 2 into an epoch, buffers full but for the last pick
            states[step] = batch["data_state"]
            assert all(len(s["sources"][0]["buffer"]) == 3 for s in batch["data_state"]["streams"].values())
    reads, headers = count_reads(monkeypatch), count_headers(monkeypatch)
    cost, parsed = {}, {}
    for step, state in states.items():
        reads[0] = headers[0] = 0
        next(iter(loader(cfg, tokenizer, data_state=state)))
        cost[step], parsed[step] = reads[0], headers[0]
    assert cost[50] == cost[1000] <= 4 * (4 + 2 + 1)  # buffers + at most one batch's refills + a next sample
    for step in parsed:  # 3 headers a sample read back (jpg, txt, the next), 2 a sample read on + 1 a shard opened
        assert parsed[step] <= 3 * cost[step] + 2 * 4, (step, parsed, cost)
    reads[0] = 0
    next(iter(loader(cfg, tokenizer, start_batch=1000)))
    assert reads[0] >= 1000 * 8  # the replay reference reads every sample of the run so far


def test_num_streams_errors_name_the_key(items, tokenizer):
    with pytest.raises(ValueError, match=r"data\.num_streams=4 must be a multiple of ranks x data workers \(1 x 3"):
        loader(make_cfg(items, num_workers=3), tokenizer)
    with pytest.raises(ValueError, match=r"data\.num_streams=3 must divide train\.batch_size=8"):
        loader(make_cfg(items, num_streams=3), tokenizer)
    with pytest.raises(ValueError, match=r"data\.train\.urls: 16 shards cannot feed data\.num_streams=32"):
        loader(make_cfg(items, num_streams=32), tokenizer, global_batch=32)
    cfg = make_cfg(items, num_streams=None)
    # a power of two up to 16 that the batch and the 16 shards allow, the same for 1, 2, 4 or 8 ranks x workers
    assert [auto_num_streams(cfg.train, 8, slots) for slots in (1, 2, 4, 8)] == [8] * 4
    assert auto_num_streams(cfg.train, 96) == 16 and auto_num_streams(cfg.train, 6) == 2
    assert auto_num_streams(cfg.train, 48, 3) == 12  # 3 slots: 3 x 2^k (none divides the 16 shards: the largest)
    twenty = TrainDataConfig(urls=items.replace("000015", "000019"))  # 20 shards (unchecked: only counted)
    assert auto_num_streams(twenty, 128) == 4  # streams of 5 shards each, not 16 streams of 1 or 2
    resampled = TrainDataConfig(urls=items, resampled=True, samples_per_epoch=96)
    assert auto_num_streams(resampled, 4096, 64) == 64  # more slots than 16: one stream a worker
    assert auto_num_streams(cfg.train, 4096, 64) == 64  # not enough shards: the check says so
    with pytest.raises(ValueError, match=r"^data\.train\.urls: 16 shards cannot feed data\.num_streams=64"):
        loader(cfg, tokenizer, global_batch=4096, world_size=64)
