"""WebDataset train loader (infinite, deterministic, exactly resumable) and clip_benchmark eval sets.

Train stream of one DataLoader worker (``W = max(1, num_workers)`` workers per rank):

    shard urls   epoch mode: epoch e shuffles all shards with seed (seed, e), the same order on every
                 rank; rank r keeps every world-th shard from r, worker w every W-th of those.
                 Resampled mode: shards drawn with replacement (optionally weighted by source) from
                 an RNG seeded with (seed, rank, w). Epochs never end the stream: it runs forever.
      -> tar members grouped into samples        (unreadable tar / truncated member: counted, skipped)
      -> keep samples with an image and a caption (missing one: counted, skipped)
      -> shuffle buffer, RNG seeded with (seed, rank, w, epoch)
      -> [resume: drop the first k * batch_size samples undecoded]
      -> decode image + caption, transform       (undecodable: counted, skipped)
      -> batches of batch_size, tokenized        {"image": (B,3,S,S), "text": (B,L), "num_skipped": int}

Every random choice is seeded from (seed, rank, worker, epoch or sample position), so the batch
sequence is a pure function of (urls, seed, rank, world_size, num_workers, batch_size).

Exact resume. torch's DataLoader takes batch i from worker i % W, so with ``start_batch=N`` the
stream of worker w (its seeds and shards) drops its first ceil((N - w) / W) batches' worth of
samples before decoding; as the DataLoader always asks worker 0 first, DataLoader worker i runs
stream (i + N) % W. The loader then yields batches N, N+1, ... of an uninterrupted run.
Brokenness found before the skip point (unreadable tars, missing image/caption) is handled
identically in both runs; an image that only fails to *decode* inside the skipped range is not
seen by the resumed run, which then runs one sample ahead of the uninterrupted one per such image
(a shift, not a loss or a crash). Decoding the skipped range would make that exact at the cost of
a slow restart; rare corrupt JPEGs are not worth it. The skipped samples are still read from the
tars (the shuffle buffer at the resume point holds samples from that range): a restart at batch N
reads N x batch_size samples per rank, without decoding them.

Broken-sample counts are counts of failures: a truncated tar counts the member that is cut and
the tar stream that ends early; how many samples the lost tail held is unknowable.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig, TrainDataConfig, expand_shard_spec
from .tokenizer import Tokenizer
from .transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

# a worker that meets this many broken samples in a row with no good one is reading garbage: fail loudly
MAX_CONSECUTIVE_BROKEN = 10_000


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (Python's hash() of str is salted per process)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# the seed streams a worker draws from
_SHARD_ORDER, _RESAMPLE, _SHUFFLE, _CROP = 0, 1, 2, 3


class SkipCounter:
    """Broken samples (and unreadable tars) met by one worker: ``taken`` per batch, plus a run of failures."""

    def __init__(self, where: str):
        self.where = where
        self.count = 0  # since the last batch
        self.total = 0
        self.consecutive = 0  # broken in a row, reset by every good sample
        self.usable = 0  # samples with an image and a caption read from tars (detects shards that give nothing)

    def add(self, reason: str) -> None:
        self.count += 1
        self.total += 1
        self.consecutive += 1
        if self.total <= 5 or self.total % 1000 == 0:
            log.warning("%s: skipped broken sample #%d: %s", self.where, self.total, reason[:300])
        if self.consecutive >= MAX_CONSECUTIVE_BROKEN:
            raise RuntimeError(f"{self.where}: {self.consecutive} broken samples in a row; last: {reason[:300]}")

    def good(self) -> None:
        self.consecutive = 0

    def take(self) -> int:
        n, self.count = self.count, 0
        return n

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count and continue."""
        self.add(f"{type(exn).__name__}: {exn}")
        return True


# ---------------------------------------------------------------- shard lists


def take_every(src: Iterable, index: int, count: int) -> Iterator:
    """Items index, index + count, ... of src: splits shards over ranks or workers by explicit ids (not env)."""
    return itertools.islice(src, index, None, count)


def epoch_shards(urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int):
    """Shards of one epoch for one (rank, worker): one seeded order shared by all ranks, then split."""
    order = wds.SimpleShardList(urls, seed=mix_seed(seed, _SHARD_ORDER, epoch))  # yields dict(url=...)
    return take_every(take_every(iter(order), rank, world_size), worker, num_workers)


def _resampled_shards(
    sources: list[list[str]], weights: list[float] | None, *, seed: int, rank: int, worker: int
) -> Iterator[dict]:
    """Endless dict(url=...) drawn with replacement; a shard of source i has weight weights[i].

    Our own draw rather than wds.ResampledShards: that one has no source weights and takes rank from env.
    """
    urls = [u for source in sources for u in source]
    cum = list(itertools.accumulate(w for w, source in zip(weights or [1.0] * len(sources), sources) for _ in source))
    rng = random.Random(mix_seed(seed, _RESAMPLE, rank, worker))
    while True:
        yield dict(url=urls[bisect.bisect_right(cum, rng.random() * cum[-1])])


def _raw_samples(
    cfg: TrainDataConfig,
    sources: list[list[str]],
    *,
    seed: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    counter: SkipCounter,
) -> Iterator[dict]:
    """Endless stream of shuffled, not yet decoded samples (with an image and a caption) for one worker.

    Epoch mode chains epochs, each shuffled on its own (an epoch is one pass: no sample of epoch e+1
    enters the buffer before epoch e is done). Resampled mode is one endless "epoch".
    """
    urls = [u for source in sources for u in source]
    image_keys = cfg.image_key.split(";")
    for epoch in itertools.count():
        if cfg.resampled:
            shards = partial(_resampled_shards, sources, cfg.source_weights, seed=seed, rank=rank, worker=worker)
        else:
            shards = partial(
                epoch_shards,
                urls,
                seed=seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                worker=worker,
                num_workers=num_workers,
            )
        before = counter.usable
        yield from wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(handler=counter.handler),
            partial(_require_keys, image_keys=image_keys, text_key=cfg.text_key, counter=counter),
            wds.shuffle(
                cfg.shuffle_buffer,
                initial=cfg.shuffle_buffer,
                rng=random.Random(mix_seed(seed, _SHUFFLE, rank, worker, epoch)),
            ),
        )
        if counter.usable == before:  # an endless loop over shards that give nothing would hang training
            raise RuntimeError(f"{counter.where}: no usable sample in its shards in epoch {epoch} (unreadable?)")


def _first_key(sample: dict, keys: list[str]) -> str | None:
    return next((k for k in keys if k in sample), None)


def _require_keys(src: Iterable[dict], image_keys: list[str], text_key: str, counter: SkipCounter) -> Iterator[dict]:
    """Drop samples without an image or a caption (decided from member names, before the resume skip)."""
    for sample in src:
        if _first_key(sample, image_keys) is None or text_key not in sample:
            counter.add(f"{sample.get('__url__')}:{sample.get('__key__')}: missing image or {text_key!r}")
            continue
        counter.usable += 1
        yield sample


def _skip(src: Iterable, n: int, counter: SkipCounter) -> Iterator:
    """Drop the first n items undecoded, then start counting broken samples afresh (as the batch before did)."""
    it = iter(src)
    for _ in range(n):
        next(it)
    counter.take()
    yield from it


def _decode_train(
    src: Iterable[dict],
    *,
    image_keys: list[str],
    text_key: str,
    transform: TrainTransform,
    crop_seed: int,
    first_position: int,
    counter: SkipCounter,
) -> Iterator[tuple[torch.Tensor, str]]:
    """(image (3,S,S), caption) per good sample; the crop is seeded by the sample's position in the stream."""
    for position, sample in enumerate(src, start=first_position):
        try:
            image = transform.from_bytes(sample[_first_key(sample, image_keys)], mix_seed(crop_seed, position))
            text = sample[text_key].decode("utf-8").strip()
            if not text:
                raise ValueError("empty caption")
        except Exception as exn:  # noqa: BLE001 -- any decode failure is a broken sample
            counter.add(f"{sample.get('__url__')}:{sample.get('__key__')}: {type(exn).__name__}: {exn}")
            continue
        counter.good()
        yield image, text


def _batch(src: Iterable, batch_size: int, collate: Callable[[list], Any]) -> Iterator:
    """Full batches only. Unlike wds.batched, a batch is emitted as soon as it is full, so the skipped-sample
    count it carries covers exactly the samples read since the previous batch."""
    batch = []
    for item in src:
        batch.append(item)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []


# ---------------------------------------------------------------- train loader


def worker_skip_batches(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of its own batches worker ``worker`` drops so that the loader starts at global batch start_batch.

    The DataLoader takes global batch i from worker i % W: worker w produced batches w, w + W, ... < N.
    """
    w = max(1, num_workers)
    return max(0, -(-(start_batch - worker) // w))


class TrainStream(IterableDataset):
    """One rank's infinite stream of batches; each DataLoader worker builds its own seeded pipeline."""

    def __init__(
        self,
        cfg: TrainDataConfig,
        *,
        tokenizer: Tokenizer,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_batch: int,
    ):
        super().__init__()
        self.sources = expand_shard_spec(cfg.urls)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.transform = TrainTransform(image_size, scale=tuple(cfg.crop_scale))
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_batch = seed, start_batch

    def _collate(self, batch: list[tuple[torch.Tensor, str]], counter: SkipCounter) -> dict[str, Any]:
        images, texts = zip(*batch)
        return {"image": torch.stack(images), "text": self.tokenizer(list(texts)), "num_skipped": counter.take()}

    def pipeline(self, worker: int, num_workers: int) -> wds.DataPipeline:
        """The pipeline of worker ``worker`` of ``num_workers`` (>= 1) on this rank."""
        cfg = self.cfg
        counter = SkipCounter(f"data rank {self.rank} worker {worker}")
        num_skip = worker_skip_batches(self.start_batch, worker, num_workers) * self.batch_size
        raw = partial(
            _raw_samples,
            cfg,
            self.sources,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            counter=counter,
        )
        return wds.DataPipeline(
            raw,
            partial(_skip, n=num_skip, counter=counter),
            partial(
                _decode_train,
                image_keys=cfg.image_key.split(";"),
                text_key=cfg.text_key,
                transform=self.transform,
                crop_seed=mix_seed(self.seed, _CROP, self.rank, worker),
                first_position=num_skip,
                counter=counter,
            ),
            partial(_batch, batch_size=self.batch_size, collate=partial(self._collate, counter=counter)),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader always asks its worker 0 first, but global batch start_batch belongs to stream
        # start_batch % W: DataLoader worker i plays stream (i + start_batch) % W
        return iter(self.pipeline((loader_worker + self.start_batch) % num_workers, num_workers))


class TrainLoader:
    """Infinite iterable of ``{"image": FloatTensor (B,3,S,S), "text": LongTensor (B,L), "num_skipped": int}``.

    ``num_skipped`` counts broken samples the producing worker skipped since its previous batch.
    Iterating again restarts the stream at ``start_batch``.
    """

    def __init__(self, stream: TrainStream, *, num_workers: int, pin_memory: bool):
        self.stream = stream
        self.batch_size = stream.batch_size
        self.start_batch = stream.start_batch
        self.samples_per_epoch = stream.cfg.samples_per_epoch
        self.num_shards = sum(len(s) for s in stream.sources)
        self.dataloader = DataLoader(
            stream,
            batch_size=None,  # batches are built inside the workers
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataloader)


def build_train_loader(
    cfg: DataConfig,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
) -> TrainLoader:
    """The train loader of one rank; ``batch_size`` is per rank. See the module docstring."""
    train = cfg.train
    if train.urls is None:
        raise ValueError("data.train.urls: not set (for synthetic data, resolve it with with_synthetic_data first)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or start_batch < 0:
        raise ValueError(f"batch_size must be >= 1 and start_batch >= 0 (got {batch_size}, {start_batch})")
    num_shards = sum(len(s) for s in expand_shard_spec(train.urls))
    num_streams = world_size * max(1, cfg.num_workers)
    if not train.resampled and num_shards < num_streams:
        raise ValueError(
            f"data.train.urls: {num_shards} shards cannot feed {world_size} ranks x {max(1, cfg.num_workers)} "
            "workers (every worker needs one shard an epoch); add shards, lower data.num_workers or set "
            "data.train.resampled=true"
        )
    stream = TrainStream(
        train,
        tokenizer=tokenizer,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_batch=start_batch,
    )
    return TrainLoader(stream, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------- eval sets (clip_benchmark WebDataset layout)

EVAL_IMAGE_KEYS = ["webp", "png", "jpg", "jpeg"]


def _read_text(path: str) -> str:
    with wds.gopen(path, "rb") as f:  # local paths, pipe: and http(s) alike
        return f.read().decode("utf-8")


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def eval_tar_urls(root: str, split: str = "test") -> list[str]:
    """Tars of ``<root>/<split>``: ``{0..n-1}.tar`` from nshards.txt (clip_benchmark), else a sorted glob."""
    split_dir = os.path.join(root, split)
    nshards_path = os.path.join(split_dir, "nshards.txt")
    if os.path.isfile(nshards_path) or "://" in root or root.startswith("pipe:"):
        n = int(_read_text(nshards_path).strip())
        return [os.path.join(split_dir, f"{i}.tar") for i in range(n)]
    urls = sorted(glob.glob(os.path.join(split_dir, "*.tar")), key=_natural_key)
    if not urls:
        raise ValueError(f"{root}: no file matches {os.path.join(split_dir, '*.tar')!r}")
    return urls


@dataclass
class ZeroShotSet:
    classnames: list[str]  # index = class id (the .cls value)
    templates: list[str]  # each with "{c}" where the class name goes, e.g. "a photo of a {c}."
    urls: list[str]  # tars, in sample order


@dataclass
class RetrievalSet:
    urls: list[str]  # tars with <key>.txt: one caption a line, several per image


def load_zeroshot_set(root: str, split: str = "test") -> ZeroShotSet:
    """Class names, prompt templates and tar urls of a clip_benchmark zero-shot classification set."""

    def lines(name: str) -> list[str]:
        return [line.strip() for line in _read_text(os.path.join(root, name)).splitlines() if line.strip()]

    classnames, templates = lines("classnames.txt"), lines("zeroshot_classification_templates.txt")
    if not classnames or not templates:
        raise ValueError(f"{root}: classnames.txt and zeroshot_classification_templates.txt must not be empty")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"{root}: templates need a '{{c}}' placeholder, got {bad[0]!r}")
    return ZeroShotSet(classnames, templates, eval_tar_urls(root, split))


def load_retrieval_set(root: str, split: str = "test") -> RetrievalSet:
    return RetrievalSet(eval_tar_urls(root, split))


def _eval_samples(
    urls: list[str], *, label_key: str, slot: int, num_slots: int, counter: SkipCounter
) -> Iterator[tuple[int, dict]]:
    """(global index, raw sample) for samples with index % num_slots == slot; all tars, in order."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=counter.handler))
    index = 0
    for sample in pipeline:
        if _first_key(sample, EVAL_IMAGE_KEYS) is None or label_key not in sample:
            counter.add(f"{sample.get('__url__')}:{sample.get('__key__')}: missing image or {label_key!r}")
            continue  # no index: what counts as a sample must not depend on decoding, so ranks agree
        if index % num_slots == slot:
            yield index, sample
        index += 1


class EvalStream(IterableDataset):
    """One rank's share of an eval set in batches: samples with global index % world_size == rank.

    Every rank (and worker) reads all tars but decodes only its own samples. Batches are dicts with
    ``"image"`` (B,3,S,S), ``"index"`` LongTensor (B,) (position in the whole set), ``"num_skipped"``,
    and ``"label"`` LongTensor (B,) (zero-shot) or ``"captions"`` list[list[str]] (retrieval). The last
    batch may be short.
    """

    def __init__(self, urls: list[str], *, task: str, image_size: int, batch_size: int, rank: int, world_size: int):
        super().__init__()
        assert task in ("zeroshot", "retrieval")
        self.urls, self.task = list(urls), task
        self.transform = EvalTransform(image_size)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def _decode(self, sample: dict) -> tuple[torch.Tensor, Any]:
        image = self.transform.from_bytes(sample[_first_key(sample, EVAL_IMAGE_KEYS)])
        if self.task == "zeroshot":
            return image, int(sample["cls"].decode("ascii").strip())
        captions = [c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()]
        if not captions:
            raise ValueError("no caption")
        return image, captions

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter(f"eval rank {self.rank} worker {worker}")
        # slot s of world * W: rank s % world, worker s // world; a rank's slots cover index % world == rank
        samples = _eval_samples(
            self.urls,
            label_key="cls" if self.task == "zeroshot" else "txt",
            slot=self.rank + self.world_size * worker,
            num_slots=self.world_size * num_workers,
            counter=counter,
        )
        batch: list[tuple[int, torch.Tensor, Any]] = []
        for index, sample in samples:
            try:
                image, target = self._decode(sample)
            except Exception as exn:  # noqa: BLE001
                counter.add(f"{sample.get('__url__')}:{sample.get('__key__')}: {type(exn).__name__}: {exn}")
                continue
            batch.append((index, image, target))
            if len(batch) == self.batch_size:
                yield self._collate(batch, counter)
                batch = []
        if batch:
            yield self._collate(batch, counter)

    def _collate(self, batch: list, counter: SkipCounter) -> dict[str, Any]:
        indices, images, targets = zip(*batch)
        out = {"image": torch.stack(images), "index": torch.tensor(indices), "num_skipped": counter.take()}
        if self.task == "zeroshot":
            out["label"] = torch.tensor(targets)
        else:
            out["captions"] = list(targets)
        return out


def build_eval_loader(
    urls: list[str],
    *,
    task: str,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """A finite loader over this rank's share of an eval set (``task``: "zeroshot" or "retrieval").

    Over all ranks every good sample appears exactly once; gather ``index`` to line results up.
    """
    if task not in ("zeroshot", "retrieval"):
        raise ValueError(f"task must be 'zeroshot' or 'retrieval' (got {task!r})")
    stream = EvalStream(urls, task=task, image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size)
    return DataLoader(stream, batch_size=None, num_workers=num_workers)
