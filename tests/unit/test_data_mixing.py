"""Multi-source mixing (data.train.sources): sample shares follow the weights, the mixture is seeded,
resumes exactly, is reported per batch, and bad settings fail naming the key."""

import math
import os

import loader_helpers
import numpy as np
import pytest
from loader_helpers import assert_same_batches, captions
from PIL import Image

from mmpretrain.data import DataConfig, SourceConfig, Tokenizer, TrainDataConfig
from mmpretrain.data.shards import ShardWriter, encode_image


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=8)


def write_source(out_dir, prefix: str, num_shards: int, per_shard: int) -> str:
    """Shards of 8x8 images captioned "<prefix><i>" (unique), so a caption tells its source and sample."""
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    with ShardWriter(out_dir, samples_per_shard=per_shard) as w:
        for i in range(num_shards * per_shard):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            w.write({"__key__": f"{i:05d}", "jpg": encode_image(Image.fromarray(pixels)), "txt": f"{prefix}{i}"})
    return os.path.join(out_dir, f"shard-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Source "alpha": 4 shards x 10; source "beta": 2 shards x 10 (sizes differ: shares must not follow them)."""
    root = tmp_path_factory.mktemp("mix")
    return write_source(root / "a", "alpha", 4, 10), write_source(root / "b", "beta", 2, 10)


def mix_cfg(sources, num_workers=0, **train) -> DataConfig:
    cfg = DataConfig(num_workers=num_workers)
    cfg.train = TrainDataConfig(sources=sources, shuffle_buffer=train.pop("shuffle_buffer", 10), **train)
    return cfg


def take(cfg, tokenizer, n, **kw):
    return loader_helpers.take(cfg, tokenizer, n, image_size=8, **kw)


def test_weights_are_sample_shares(two_sources, tokenizer):
    a, b = two_sources
    cfg = mix_cfg([SourceConfig(urls=a, weight=3.0, name="alpha"), SourceConfig(urls=b, weight=1.0)])
    cfg.num_streams = 1  # one stream: its samples in the batches' order (several interleave in every batch)
    batches = take(cfg, tokenizer, 40, batch_size=50)  # 2000 samples
    caps = captions(batches, tokenizer)
    n, p = len(caps), 3 / 4
    num_alpha = sum(c.startswith("alpha") for c in caps)
    assert sum(c.startswith("beta") for c in caps) == n - num_alpha
    # binomial(n, 3/4): a mixture that followed shard counts (4:2) or sample counts (40:20) would give 2/3
    sigma = math.sqrt(n * p * (1 - p))  # 19.4 for n = 2000; |2/3 - 3/4| * n = 167 = 8.6 sigma
    assert abs(num_alpha - n * p) < 4 * sigma, (num_alpha, n * p, sigma)
    # the per-batch report is the realized mixture, counted from the captions independently
    for batch in batches:
        batch_caps = captions([batch], tokenizer)
        assert batch["data_stats"]["sources"] == {
            "alpha": sum(c.startswith("alpha") for c in batch_caps),
            "source1": sum(c.startswith("beta") for c in batch_caps),
        }
        assert batch["data_stats"]["read"] == 50 and batch["num_skipped"] == 0
    # each source still runs whole epochs of its own: the first 40 alpha samples are alpha's 40, once each
    alpha = [c for c in caps if c.startswith("alpha")]
    assert sorted(alpha[:40]) == sorted(f"alpha{i}" for i in range(40))


def test_zero_weight_source_is_never_drawn(two_sources, tokenizer):
    a, b = two_sources
    cfg = mix_cfg([SourceConfig(urls=a, weight=0.0), SourceConfig(urls=b, weight=2.0)])
    caps = captions(take(cfg, tokenizer, 4, batch_size=20), tokenizer)
    assert all(c.startswith("beta") for c in caps)


@pytest.mark.parametrize("resampled", [False, True])
def test_mixture_is_seeded(two_sources, tokenizer, resampled):
    a, b = two_sources
    extra = dict(resampled=True, samples_per_epoch=100) if resampled else {}
    cfg = mix_cfg([SourceConfig(urls=a, weight=1.0), SourceConfig(urls=b, weight=1.0)], **extra)
    first = take(cfg, tokenizer, 4, batch_size=10, seed=3)
    assert_same_batches(first, take(cfg, tokenizer, 4, batch_size=10, seed=3))
    other = take(cfg, tokenizer, 4, batch_size=10, seed=4)
    assert captions(first, tokenizer) != captions(other, tokenizer)
    # which source each sample came from differs too, not only the order within the sources
    origin = [[c.startswith("alpha") for c in captions(x, tokenizer)] for x in (first, other)]
    assert origin[0] != origin[1]


@pytest.mark.parametrize("num_workers,start", [(0, 3), (0, 7), (2, 5), (2, 6)])
def test_resume_is_exact(two_sources, tokenizer, num_workers, start):
    a, b = two_sources
    cfg = mix_cfg([SourceConfig(urls=a, weight=2.0), SourceConfig(urls=b, weight=1.0)], num_workers=num_workers)
    full = take(cfg, tokenizer, start + 3, batch_size=6)  # 60 samples: crosses epochs of both sources
    assert_same_batches(take(cfg, tokenizer, 3, batch_size=6, start_batch=start), full[start:])


def test_legacy_urls_report_sources_too(two_sources, tokenizer):
    a, b = two_sources
    cfg = DataConfig(num_workers=0)
    cfg.train = TrainDataConfig(urls=f"{a}::{b}", shuffle_buffer=60)
    batches = take(cfg, tokenizer, 3, batch_size=20)  # one epoch of the pooled 6 shards
    assert sum(b["data_stats"]["sources"]["source0"] for b in batches) == 40
    assert sum(b["data_stats"]["sources"]["source1"] for b in batches) == 20


def test_ranks_split_each_source(two_sources, tokenizer):
    a, b = two_sources
    cfg = mix_cfg([SourceConfig(urls=a), SourceConfig(urls=b)])
    per_rank = [set(captions(take(cfg, tokenizer, 2, batch_size=10, rank=r, world_size=2), tokenizer)) for r in (0, 1)]
    assert not per_rank[0] & per_rank[1]  # epoch mode: each source's shards are split over the ranks


def test_config_errors_name_the_key(two_sources, tmp_path):
    a, b = two_sources

    def check(match: str, **train):
        cfg = DataConfig()
        cfg.train = TrainDataConfig(**train)
        with pytest.raises(ValueError, match=match):
            cfg.validate("data")

    check(r"^data\.train\.sources: set either data\.train\.urls or data\.train\.sources", urls=a,
          sources=[SourceConfig(urls=b)])  # fmt: skip
    check(r"^data\.train\.sources: empty list", sources=[])
    check(r"^data\.train\.sources\[1\]\.urls: no file matches", sources=[SourceConfig(urls=a),
          SourceConfig(urls=str(tmp_path / "none-{0..3}.tar"))])  # fmt: skip
    check(r"^data\.train\.sources\[0\]\.urls: one non-empty shard spec", sources=[SourceConfig(urls=f"{a}::{b}")])
    check(r"^data\.train\.sources\[1\]\.weight: must be >= 0", sources=[SourceConfig(a), SourceConfig(b, weight=-1)])
    check(r"^data\.train\.sources: the weights must have a positive sum", sources=[SourceConfig(a, weight=0.0)])
    check(r"^data\.train\.sources: the name 'x' is used twice", sources=[SourceConfig(a, name="x"),
          SourceConfig(b, name="x")])  # fmt: skip
    check(r"^data\.train\.sources: the name 'source1' is used twice", sources=[SourceConfig(a, name="source1"),
          SourceConfig(b)])  # fmt: skip
    check(r"^data\.train\.source_weights: not used with data\.train\.sources", sources=[SourceConfig(a)],
          source_weights=[1.0])  # fmt: skip
    ok = DataConfig()
    ok.train = TrainDataConfig(sources=[SourceConfig(a, weight=3), SourceConfig(b)])
    ok.validate("data")


def test_every_worker_needs_a_shard_of_every_source(two_sources, tokenizer):
    a, b = two_sources  # b has 2 shards: 2 ranks x 2 workers cannot all get one in epoch mode
    cfg = mix_cfg([SourceConfig(urls=a), SourceConfig(urls=b)], num_workers=2)
    cfg.num_streams = 0  # the per-rank loader
    with pytest.raises(ValueError, match=r"^data\.train\.sources\[1\]\.urls: 2 shards cannot feed 2 ranks x 2"):
        take(cfg, tokenizer, 1, batch_size=4, world_size=2)
    cfg.num_streams = 4  # the global order: every stream needs a shard of every source
    with pytest.raises(ValueError, match=r"^data\.train\.sources\[1\]\.urls: 2 shards cannot feed data\.num_str"):
        take(cfg, tokenizer, 1, batch_size=4, world_size=2)


def test_sources_from_yaml_and_cli():
    from omegaconf import OmegaConf

    # brace specs inside a YAML flow mapping need quotes; block style does not
    yaml = "train:\n  sources:\n    - {urls: '/a/{0..3}.tar', weight: 3}\n    - urls: /b.tar\n      name: web\n"
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(yaml))
    cli = OmegaConf.from_dotlist(["train.sources=[{urls: '/c/{0..1}.tar', weight: 2}]"])
    assert OmegaConf.to_object(merged).train.sources == [
        SourceConfig(urls="/a/{0..3}.tar", weight=3.0),
        SourceConfig(urls="/b.tar", weight=1.0, name="web"),
    ]
    assert OmegaConf.to_object(OmegaConf.merge(merged, cli)).train.sources == [SourceConfig("/c/{0..1}.tar", 2.0)]
