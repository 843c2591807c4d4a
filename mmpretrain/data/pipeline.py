"""WebDataset train loader (infinite, deterministic, exactly resumable) and clip_benchmark eval sets.

Training reads through streams.py's global order (data.num_streams virtual streams, resumed by seeking); it is
built from this module's parts: shard lists, the member checks, fault counting and the per-rank loader below,
which stays as data.num_streams=0, for finite passes (``num_epochs``) and as the replay reference.

Train stream of one DataLoader worker (``W = max(1, num_workers)`` workers per rank):

    shard urls   epoch mode: epoch e shuffles all shards with seed (seed, e), the same order on every
                 rank; rank r keeps every world-th shard from r, worker w every W-th of those.
                 Resampled mode: shards drawn with replacement (optionally weighted by source) from
                 an RNG seeded with (seed, rank, w). Epochs never end the stream: it runs forever.
      -> tar members grouped into samples        (unreadable shard / truncated tar: counted, skipped)
      -> check members: image and caption present, non-empty, caption UTF-8 and not blank, ``.cls`` (if
         any) a class index (else counted)
      -> shuffle buffer, RNG seeded with (seed, rank, w, epoch)
      [-> data.train.sources: one such stream per source; an RNG seeded with (seed, rank, w) picks the
          source of every next sample with probability weight / sum of weights]
      -> [resume: drop the first k * batch_size samples undecoded]
      -> decode image, transform                 (oversized / undecodable: counted, skipped)
      -> batches of batch_size, tokenized        {"image": (B,3,S,S), "text": (B,L), "label": (B,) int64,
                                                  "num_skipped": int, "data_stats": dict,
                                                  "keys": ["<url>:<key>", ...]}

``label`` is each sample's ``<key>.cls`` (its class index, e.g. ImageNet-21k shards; UniCL uses it),
-1 for a sample without one.

Every random choice is seeded from (seed, rank, worker, epoch or sample position), so the batch
sequence is a pure function of (urls, seed, rank, world_size, num_workers, batch_size).

Exact resume. torch's DataLoader takes batch i from worker i % W, so with ``start_batch=N`` the
stream of worker w (its seeds and shards) drops its first ceil((N - w) / W) batches' worth of
samples before decoding; as the DataLoader always asks worker 0 first, DataLoader worker i runs
stream (i + N) % W. The loader then yields batches N, N+1, ... of an uninterrupted run.
Brokenness found before the skip point (unreadable tars, every member check above) is handled
identically in both runs; an image that only fails to *decode* inside the skipped range is not
seen by the resumed run, which then runs one sample ahead of the uninterrupted one per such image
(a shift, not a loss or a crash). Decoding the skipped range would make that exact at the cost of
a slow restart; rare corrupt JPEGs are not worth it. The skipped samples are still read from the
tars (the shuffle buffer at the resume point holds samples from that range): a restart at batch N
reads N x batch_size samples per rank, without decoding them. The source mixture is drawn before
the skip, so it resumes exactly too.

Bad data never stops a run. Every fault is skipped and counted under one of DATA_FAULT_REASONS:
    unreadable_shard  the shard cannot be opened or is not a tar (missing file, no permission, garbage)
    truncated_tar     the tar stream breaks after its start (cut mid-member, garbled or missing end)
    no_image          a sample without an image member (e.g. a caption alone)
    no_caption        a sample with an image but no caption member
    zero_byte         the image or the caption member has 0 bytes
    bad_utf8          the caption is not UTF-8
    empty_caption     the caption is only whitespace
    oversized_image   the header declares more than data.max_image_pixels pixels (nothing decoded)
    corrupt_image     anything else that fails to decode, a ``<key>.cls`` that is not a class index (decimal
                      integer >= 0) included (as in the eval sets)
    oversized_member  a member the loader uses is larger than data.max_member_bytes (never read)
    oversized_caption the caption is longer than data.max_caption_bytes (never read, cleaned or tokenized)
    compressed_tar    a gzip/bzip2/xz/zstd stream, refused unless data.allow_compressed_tars (shard-level)
    abandoned_shard   ABANDON_SHARD_AFTER broken samples in a row: the rest of the shard is not read
Only the members the loader uses (image, caption, ``.cls``) are read at all; others pass by unread.
Truncated tar, the counting rule: it counts exactly one ``truncated_tar``. Every sample whose members
all lie before the cut is read normally; the sample whose member data is cut is lost with the tar (no
second count). A cut between two members of one sample (at a header) leaves that sample with the
members before the cut, judged as usual (e.g. ``no_caption``). A tar that lacks its end-of-archive
blocks is truncated (a tar cut exactly at a member boundary looks like that).
Each batch carries ``data_stats`` for the samples its worker read since its previous batch (a plain
picklable dict; ``read`` = good + broken, a shard-level fault counting one):
    {"read": int, "skipped": {reason: int, all of DATA_FAULT_REASONS}, "bad_shards": {url: int broken},
     "sources": {source name: good samples in this batch}}
The train loop sums them over steps and ranks with ``merge_data_stats`` and calls
``check_bad_fraction``, which raises DataFaultError when broken / read passes data.max_bad_fraction
(after data.bad_min_samples samples): a run on a dataset that is mostly broken stops with the worst shards
named. Faults found after a worker's last good sample of a window are reported with its next batch.
A worker that meets MAX_CONSECUTIVE_BROKEN broken samples in a row (over shards), or a whole epoch of its
shards without a usable sample, raises DataFaultError (the data is broken: nothing would reach the trainer)
instead of spinning; short of that, data.max_bad_fraction alone decides whether a run stops.
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
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import redact
from ..signals import ignore_stop_signals
from .config import DataConfig, NaflexConfig, TrainDataConfig, expand_shard_spec, source_names
from .decode import EncodedImage
from .naflex import NaflexTrainTransform, pack_batch, stack_images
from .regions import REGION_KEY, box_in_crop, choose, decoder_fields, parse_regions
from .shards import OVERSIZED, natural_key, read_tar_samples
from .tokenizer import Tokenizer
from .transforms import EvalTransform, ImageTooLargeError, TrainTransform, split_views

log = logging.getLogger(__name__)

# a shard that gives this many broken samples in a row is given up: the rest of it is not read (one
# abandoned_shard fault), and the worker goes on with its next shard
ABANDON_SHARD_AFTER = 1000
# a worker that meets this many broken samples in a row with no good one, over its shards, is reading only
# garbage: it stops with DataFaultError rather than spin (no batch would ever reach the trainer's checks)
MAX_CONSECUTIVE_BROKEN = 20_000
EVAL_MAX_MEMBER_BYTES = 64 * 2**20  # eval sets: members larger than this are skipped unread (DataConfig's default)

DATA_FAULT_REASONS = (
    "unreadable_shard",
    "truncated_tar",
    "no_image",
    "no_caption",
    "zero_byte",
    "bad_utf8",
    "empty_caption",
    "oversized_image",
    "corrupt_image",
    "oversized_member",
    "oversized_caption",
    "compressed_tar",
    "abandoned_shard",
)


class DataFaultError(RuntimeError):
    """Too large a fraction of the train data is broken (see check_bad_fraction)."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (Python's hash() of str is salted per process)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


LABEL_KEY = "cls"  # tar member extension of a sample's class index (optional in train shards)

# the seed streams a worker draws from
_SHARD_ORDER, _RESAMPLE, _SHUFFLE, _CROP, _SOURCE, _MIX, _REGION = 0, 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------- fault counts


def empty_data_stats(sources: Iterable[str] = ()) -> dict[str, Any]:
    """Zero counts in the ``data_stats`` format (see the module docstring)."""
    return {
        "read": 0,
        "skipped": dict.fromkeys(DATA_FAULT_REASONS, 0),
        "bad_shards": {},
        "sources": dict.fromkeys(sources, 0),
    }


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def merge_data_stats(total: dict, new: dict) -> dict:
    """``total`` + ``new`` as a new dict (counts added key by key); either may be ``{}``.

    Sums the batches of one rank over steps, and the sums of all ranks (e.g. after all_gather_object).
    """
    out = empty_data_stats()
    out["read"] = total.get("read", 0) + new.get("read", 0)
    for key in ("skipped", "bad_shards", "sources"):
        out[key] = _add_counts(_add_counts(out[key], total.get(key, {})), new.get(key, {}))
    return out


def check_bad_fraction(stats: dict, *, max_bad_fraction: float, min_samples: int) -> None:
    """Raise DataFaultError when broken / read > max_bad_fraction, once read >= min_samples.

    ``stats``: data_stats summed over all ranks, so that every rank decides alike (no rank left hanging
    in a collective). The message names the worst shards and the reasons.
    """
    read = stats.get("read", 0)
    skipped = stats.get("skipped", {})
    broken = sum(skipped.values())
    if read < min_samples or read == 0 or broken / read <= max_bad_fraction:
        return
    worst = sorted(stats.get("bad_shards", {}).items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    reasons = sorted(((r, n) for r, n in skipped.items() if n), key=lambda kv: -kv[1])
    raise DataFaultError(
        f"data: {100 * broken / read:.1f}% of {read} samples read were broken "
        f"(> data.max_bad_fraction={max_bad_fraction}); "
        f"worst shards: {', '.join(f'{url} ({n})' for url, n in worst) or 'none'}; "
        f"by reason: {', '.join(f'{r} {n}' for r, n in reasons)}"
    )


class FaultCounter:
    """The counts of one worker since its last batch (``take()``), plus a guard against endless garbage."""

    def __init__(self, where: str, sources: Iterable[str] = ()):
        self.where = where
        self.source_names = list(sources)
        self.total = 0  # broken, over the worker's life (for the log)
        self.consecutive = 0  # broken in a row, reset by every good sample
        self.stats = empty_data_stats(self.source_names)

    def fault(self, reason: str, url: str | None, detail: Any) -> None:
        assert reason in DATA_FAULT_REASONS, reason
        stats = self.stats
        stats["read"] += 1
        stats["skipped"][reason] += 1
        # the url (a pipe: command may carry an ${oc.env:...} token) and the error as they are written down: the
        # counts go to meta.json and the log, the message to stderr
        url, detail = redact(str(url)), redact(str(detail))
        stats["bad_shards"][url] = stats["bad_shards"].get(url, 0) + 1
        self.total += 1
        self.consecutive += 1
        if self.total <= 5 or self.total % 1000 == 0:
            log.warning("%s: skipped broken sample #%d (%s): %s: %s", self.where, self.total, reason, url,
                        str(detail)[:300])  # fmt: skip
        if self.consecutive >= MAX_CONSECUTIVE_BROKEN:
            raise DataFaultError(
                f"{self.where}: {self.consecutive} broken samples in a row and no good one (last: {reason} in "
                f"{url}): the data is broken; check it with mmpretrain-inspect-shards"
            )

    def good(self, source: str) -> None:
        self.stats["read"] += 1
        self.stats["sources"][source] = self.stats["sources"].get(source, 0) + 1
        self.consecutive = 0

    def take(self) -> dict[str, Any]:
        stats, self.stats = self.stats, empty_data_stats(self.source_names)
        return stats


def _first_key(sample: dict, keys: list[str]) -> str | None:
    return next((k for k in keys if k in sample), None)


def parse_label(data: bytes) -> int | None:
    """A ``.cls`` member's class index (clip_benchmark: decimal text), or None if it is not an integer >= 0."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return int(text) if text.isdigit() else None


def sample_fault(sample: dict, image_keys: list[str], text_key: str) -> str | None:
    """The reason a raw sample is unusable, judged from its bytes without decoding the image; None if usable.
    A usable sample gets ``"__caption__"``: the stripped caption, and ``"__label__"``: its ``LABEL_KEY``
    member's class index, -1 without one."""
    if OVERSIZED in sample:  # a member over its size limit, never read
        return "oversized_caption" if sample[OVERSIZED][0] == text_key else "oversized_member"
    image_key = _first_key(sample, image_keys)
    if image_key is None:
        return "no_image"
    if text_key not in sample:
        return "no_caption"
    if not sample[image_key] or not sample[text_key]:
        return "zero_byte"
    try:
        caption = sample[text_key].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_utf8"
    if not caption:
        return "empty_caption"
    label = parse_label(sample[LABEL_KEY]) if LABEL_KEY in sample else -1
    if label is None:  # the eval loader counts a label that does not parse the same way
        return "corrupt_image"
    sample["__caption__"], sample["__label__"] = caption, label
    return None


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


@dataclass
class _Source:
    """One stream of shards as the worker reads it: a data.train.sources entry, or all of data.train.urls."""

    shards: list[list[str]]  # "::" groups (only data.train.urls has several: they weight resampled shards)
    shard_weights: list[float] | None  # data.train.source_weights, per group
    names: list[str]  # the name counted in data_stats["sources"], per group
    seed: int


def train_members(cfg: TrainDataConfig) -> set[str]:
    """The tar members a train loader reads: the image keys, the caption, the class index, and ``json`` when
    data.train.regions is on (the regions)."""
    return {*cfg.image_key.split(";"), cfg.text_key, LABEL_KEY, *((REGION_KEY,) if cfg.regions.enabled else ())}


def _checked_samples(
    shards: Iterable[dict], *, name_of: dict[str, str], image_keys: list[str], text_key: str, keep: set[str],
    counter: FaultCounter, limits: dict,
) -> Iterator[dict]:  # fmt: skip
    """Usable raw samples of a stream of shards, each tagged ``"__source__"``; every fault counted. Only the
    members the loader uses (``keep``: train_members) are read, each within its size limit (``limits``:
    read_tar_samples' keywords); a shard giving ABANDON_SHARD_AFTER broken samples in a row is given up (the rest
    unread, one fault)."""
    for shard in shards:
        url = shard["url"]
        broken_in_a_row = 0
        for sample in read_tar_samples(url, counter.fault, keep=keep, **limits):
            reason = sample_fault(sample, image_keys, text_key)
            if reason is not None:
                counter.fault(reason, url, sample["__key__"])
                broken_in_a_row += 1
                if broken_in_a_row >= ABANDON_SHARD_AFTER:
                    counter.fault("abandoned_shard", url, f"{broken_in_a_row} broken samples in a row: the rest of "
                                  "the shard is skipped")  # fmt: skip
                    break
                continue
            broken_in_a_row = 0
            sample["__source__"] = name_of[url]
            yield sample


def read_limits(data_cfg) -> dict:
    """read_tar_samples' bounds from the data config (members, captions, compressed streams)."""
    return {"max_member_bytes": data_cfg.max_member_bytes, "allow_compressed": data_cfg.allow_compressed_tars,
            "member_limits": {data_cfg.train.text_key: data_cfg.max_caption_bytes}}  # fmt: skip


def _raw_samples(
    cfg: TrainDataConfig,
    source: _Source,
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    counter: FaultCounter,
    num_epochs: int | None = None,
    limits: dict | None = None,
) -> Iterator[dict]:
    """Stream of shuffled, not yet decoded, usable samples of one source for one worker (endless by default).

    Epoch mode chains epochs, each shuffled on its own (an epoch is one pass: no sample of epoch e+1
    enters the buffer before epoch e is done). Resampled mode is one endless "epoch".
    """
    seed = source.seed
    urls = [u for group in source.shards for u in group]
    name_of = {u: name for group, name in zip(source.shards, source.names) for u in group}
    for epoch in itertools.count() if num_epochs is None else range(num_epochs):
        if cfg.resampled:
            shards = _resampled_shards(source.shards, source.shard_weights, seed=seed, rank=rank, worker=worker)
        else:
            shards = epoch_shards(
                urls, seed=seed, epoch=epoch, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
            )
        samples = _checked_samples(
            shards,
            name_of=name_of,
            image_keys=cfg.image_key.split(";"),
            text_key=cfg.text_key,
            keep=train_members(cfg),
            counter=counter,
            limits=limits or {},
        )
        shuffle = wds.shuffle(
            cfg.shuffle_buffer,
            initial=cfg.shuffle_buffer,
            rng=random.Random(mix_seed(seed, _SHUFFLE, rank, worker, epoch)),
        )
        usable = 0
        for sample in shuffle(samples):
            usable += 1
            yield sample
        if usable == 0 and num_epochs is None:  # an endless loop over shards that give nothing would hang training
            raise DataFaultError(
                f"{counter.where}: no usable sample in its shards of {'/'.join(source.names)} in epoch {epoch} "
                "(all unreadable or broken? check them with mmpretrain-inspect-shards)"
            )


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Every next sample from stream i with probability weights[i] / sum(weights)."""
    cum = list(itertools.accumulate(weights))
    while True:
        yield next(streams[bisect.bisect_right(cum, rng.random() * cum[-1])])


def _skip(src: Iterable, n: int, counter: FaultCounter) -> Iterator:
    """Drop the first n items undecoded, then start counting afresh (as the batch before did)."""
    it = iter(src)
    for _ in range(n):
        next(it)
    counter.take()
    yield from it


def decode_train_sample(transform, sample: dict, image_keys: list[str], seed: int, regions) -> tuple:
    """(image, caption, "<url>:<key>", label, region pick) of a raw sample; decode errors propagate (the callers
    count them). The pick: regions.choose's (task, box in the crop's frame, words), or None when data.train.regions
    is off."""
    data = sample[_first_key(sample, image_keys)]
    key = f"{sample['__url__']}:{sample['__key__']}"
    if not regions.enabled:
        return transform.from_bytes(data, seed), sample["__caption__"], key, sample["__label__"], None
    found = parse_regions(sample.get(REGION_KEY))
    if isinstance(transform, TrainTransform):
        image, crop, (height, width) = transform.from_bytes(data, seed, with_crop=True)
        found = [(b, text) for b, text in ((box_in_crop(b, crop, height, width), t) for b, t in found) if b]
    else:  # NaFlex keeps the whole image: the boxes stay as they are
        image = transform.from_bytes(data, seed)
    return image, sample["__caption__"], key, sample["__label__"], choose(found, regions, mix_seed(seed, _REGION))


def collate_train(tokenizer, regions, items: list[tuple]) -> dict:
    """A batch's (or piece's) image, text, label, keys, local crops and decoder fields from decode_train_sample's
    tuples."""
    images, texts, keys, labels, picks = zip(*items)
    out = stack_images(list(images))
    out["image"], local_crops = split_views(out["image"])  # self-distillation's local crops, if made
    out.update(text=tokenizer(list(texts)), label=torch.tensor(labels, dtype=torch.long), keys=list(keys))
    if local_crops is not None:
        out["local_crops"] = local_crops
    if regions.enabled:
        out.update(decoder_fields(tokenizer, list(texts), list(picks), regions.box_bins, text=out["text"]))
    return out


def _decode_train(
    src: Iterable[dict],
    *,
    image_keys: list[str],
    transform: TrainTransform,
    crop_seed: int,
    first_position: int,
    counter: FaultCounter,
    regions,
) -> Iterator[tuple]:
    """decode_train_sample's tuple per good sample; the crop is seeded by the sample's stream position."""
    for position, sample in enumerate(src, start=first_position):
        try:
            item = decode_train_sample(transform, sample, image_keys, mix_seed(crop_seed, position), regions)
        except (ImageTooLargeError, Image.DecompressionBombError) as exn:
            counter.fault("oversized_image", sample["__url__"], f"{sample['__key__']}: {exn}")
            continue
        except Exception as exn:  # noqa: BLE001 -- any other decode failure is a corrupt image
            counter.fault("corrupt_image", sample["__url__"], f"{sample['__key__']}: {type(exn).__name__}: {exn}")
            continue
        counter.good(sample["__source__"])
        yield item


def _batch(src: Iterable, batch_size: int, collate: Callable[[list], Any], last_partial: bool = False) -> Iterator:
    """Full batches. Unlike wds.batched, a batch is emitted as soon as it is full, so the counts it carries
    cover exactly the samples read since the previous batch. ``last_partial``: a finite stream ends with one
    short (maybe empty) batch carrying the last counts."""
    batch = []
    for item in src:
        batch.append(item)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if last_partial:
        yield collate(batch)


# ---------------------------------------------------------------- train loader


def worker_skip_batches(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of its own batches worker ``worker`` drops so that the loader starts at global batch start_batch.

    The DataLoader takes global batch i from worker i % W: worker w produced batches w, w + W, ... < N.
    """
    w = max(1, num_workers)
    return max(0, -(-(start_batch - worker) // w))


def _train_sources(cfg: TrainDataConfig, seed: int) -> tuple[list[_Source], list[float]]:
    """The worker's streams and their sample weights: one per data.train.sources entry, or one for urls."""
    if cfg.sources is not None:
        names = source_names(cfg.sources)
        streams = [
            _Source([expand_shard_spec(s.urls)[0]], None, [name], mix_seed(seed, _SOURCE, i))
            for i, (s, name) in enumerate(zip(cfg.sources, names))
        ]
        return streams, [float(s.weight) for s in cfg.sources]
    groups = expand_shard_spec(cfg.urls)
    # legacy spelling: one pool of shards (its "::" groups only weight resampled shards), the run's own seed
    return [_Source(groups, cfg.source_weights, [f"source{i}" for i in range(len(groups))], seed)], [1.0]


class TrainStream(IterableDataset):
    """One rank's stream of batches; each DataLoader worker builds its own seeded pipeline."""

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
        decode: str = "fast",
        max_image_pixels: int | None = None,
        num_epochs: int | None = None,
        limits: dict | None = None,
        naflex: NaflexConfig | None = None,
        patch_size: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.limits = limits or {}  # read_tar_samples' bounds (read_limits of the DataConfig)
        self.streams, self.weights = _train_sources(cfg, seed)
        self.source_names = [name for s in self.streams for name in s.names]
        self.tokenizer = tokenizer
        self.transform = TrainTransform(
            image_size, scale=tuple(cfg.crop_scale), fast=decode == "fast", max_pixels=max_image_pixels,
            local_crops=cfg.local_crops, local_scale=tuple(cfg.local_crop_scale),
        )  # fmt: skip
        self.naflex = naflex  # data.naflex when enabled: patches to a budget, packed by TrainLoader (naflex.py)
        if naflex is not None:
            self.transform = NaflexTrainTransform(patch_size, naflex.max_patches, max_pixels=max_image_pixels)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_batch, self.num_epochs = seed, start_batch, num_epochs

    def _collate(self, batch: list[tuple], counter: FaultCounter) -> dict[str, Any]:
        stats = counter.take()
        if batch:
            out = collate_train(self.tokenizer, self.cfg.regions, batch)
        else:  # the end of a finite stream
            if self.naflex is not None:
                raise ValueError("data.naflex: finite passes (num_epochs) are not built for NaFlex batches")
            size, no_ids = self.transform.image_size, torch.empty(0, dtype=torch.long)
            out = {"image": torch.empty(0, 3, size, size), "label": no_ids, "keys": [],
                   "text": torch.empty(0, self.tokenizer.context_length, dtype=torch.long)}  # fmt: skip
            if self.cfg.regions.enabled:
                out.update(decoder_text=out["text"], decoder_prompt=no_ids, decoder_task=no_ids)
        return {**out, "num_skipped": sum(stats["skipped"].values()), "data_stats": stats}

    def pipeline(self, worker: int, num_workers: int) -> wds.DataPipeline:
        """The pipeline of worker ``worker`` of ``num_workers`` (>= 1) on this rank."""
        counter = FaultCounter(f"data rank {self.rank} worker {worker}", self.source_names)
        num_skip = worker_skip_batches(self.start_batch, worker, num_workers) * self.batch_size
        streams = [
            _raw_samples(
                self.cfg,
                source,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
                counter=counter,
                num_epochs=self.num_epochs,
                limits=self.limits,
            )
            for source in self.streams
        ]
        if len(streams) == 1:
            samples = streams[0]
        else:
            samples = _mix(streams, self.weights, random.Random(mix_seed(self.seed, _MIX, self.rank, worker)))
        return wds.DataPipeline(
            lambda: samples,
            partial(_skip, n=num_skip, counter=counter),
            partial(
                _decode_train,
                image_keys=self.cfg.image_key.split(";"),
                transform=self.transform,
                crop_seed=mix_seed(self.seed, _CROP, self.rank, worker),
                first_position=num_skip,
                counter=counter,
                regions=self.cfg.regions,
            ),
            partial(
                _batch,
                batch_size=self.batch_size,
                collate=partial(self._collate, counter=counter),
                last_partial=self.num_epochs is not None,
            ),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader always asks its worker 0 first, but global batch start_batch belongs to stream
        # start_batch % W: DataLoader worker i plays stream (i + start_batch) % W
        return iter(self.pipeline((loader_worker + self.start_batch) % num_workers, num_workers))


class TrainLoader:
    """Infinite iterable of ``{"image": (B,3,S,S), "text": LongTensor (B,L), "label": LongTensor (B,),
    "num_skipped": int, "data_stats": dict}``.

    ``num_skipped`` counts broken samples the producing worker skipped since its previous batch;
    ``data_stats`` breaks them down (see the module docstring); ``keys`` name the batch's samples.
    Iterating again restarts the stream at ``start_batch``.
    """

    def __init__(self, stream: TrainStream, *, num_workers: int, pin_memory: bool):
        self.stream = stream
        self.batch_size = stream.batch_size
        self.start_batch = stream.start_batch
        self.samples_per_epoch = stream.cfg.samples_per_epoch
        self.source_names = stream.source_names
        self.num_shards = sum(len(group) for s in stream.streams for group in s.shards)
        self.dataloader = DataLoader(
            stream,
            batch_size=None,  # batches are built inside the workers
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            worker_init_fn=ignore_stop_signals,  # a process-group signal is the trainer's to act on
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.stream.naflex is not None:  # packed here, in the training process (data/naflex.py)
            return (pack_batch(batch, self.stream.naflex) for batch in self.dataloader)
        return iter(self.dataloader)


def check_loader_args(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, start_batch: int) -> None:
    """The checks both train loaders (this per-rank one and streams.build_train_loader) make of their arguments."""
    train = cfg.train
    if train.urls is None and train.sources is None:
        raise ValueError("data.train.urls: not set (for synthetic data, resolve it with with_synthetic_data first)")
    if train.urls is not None and train.sources is not None:
        raise ValueError("data.train.sources: set either data.train.urls or data.train.sources, not both")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or start_batch < 0:
        raise ValueError(f"batch_size must be >= 1 and start_batch >= 0 (got {batch_size}, {start_batch})")


def build_rank_loader(
    cfg: DataConfig,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    num_epochs: int | None = None,
    patch_size: int | None = None,
) -> TrainLoader:
    """The per-rank train loader (data.num_streams=0, and finite passes); ``batch_size`` is per rank. See the module
    docstring: its order depends on the world size and worker count, and it resumes by replay. The global order is
    streams.build_train_loader's.

    ``num_epochs``: None (training) streams forever; N ends after N passes over the shards (epoch mode with
    data.train.urls only; for scanning shards and tests), with a last short batch holding the last counts.
    """
    train = cfg.train
    check_loader_args(cfg, rank=rank, world_size=world_size, batch_size=batch_size, start_batch=start_batch)
    if num_epochs is not None and (num_epochs < 1 or train.resampled or train.sources is not None):
        raise ValueError(f"num_epochs={num_epochs}: only >= 1, in epoch mode, with data.train.urls")
    num_streams = world_size * max(1, cfg.num_workers)
    if train.sources is not None:
        counted = [(f"data.train.sources[{i}].urls", expand_shard_spec(s.urls)) for i, s in enumerate(train.sources)]
    else:
        counted = [("data.train.urls", expand_shard_spec(train.urls))]
    for key, groups in counted:
        num_shards = sum(len(g) for g in groups)
        if not train.resampled and num_shards < num_streams:
            raise ValueError(
                f"{key}: {num_shards} shard{'' if num_shards == 1 else 's'} cannot feed {world_size} ranks x "
                f"{max(1, cfg.num_workers)} "
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
        decode=cfg.decode,
        max_image_pixels=cfg.max_image_pixels,
        num_epochs=num_epochs,
        limits=read_limits(cfg),
        **naflex_args(cfg, patch_size),
    )
    return TrainLoader(stream, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())


def naflex_args(cfg: DataConfig, patch_size: int | None) -> dict:
    """The train streams' NaFlex arguments: {} unless data.naflex.enabled (then the model's patch size is needed)."""
    if not cfg.naflex.enabled:
        return {}
    if patch_size is None:
        raise ValueError("data.naflex.enabled: the train loader needs the model's patch_size")
    return {"naflex": cfg.naflex, "patch_size": patch_size}


# ---------------------------------------------------------------- eval sets (clip_benchmark WebDataset layout)

EVAL_IMAGE_KEYS = ["webp", "png", "jpg", "jpeg"]
MAX_EVAL_SHARDS = 100_000  # nshards.txt above this is refused (ImageNet-1k's 50k images fit in 7 or 50 tars)


def _read_text(path: str) -> str:
    with wds.gopen(path, "rb") as f:  # local paths, pipe: and http(s) alike
        return f.read().decode("utf-8")


def read_nshards(path: str) -> int:
    """The shard count in a clip_benchmark ``nshards.txt``: an integer in 1..MAX_EVAL_SHARDS, else a ValueError
    naming the file (a set handed over could otherwise make every rank build a list of a billion urls)."""
    with wds.gopen(path, "rb") as f:
        text = f.read(64).decode("utf-8", errors="replace").strip()  # a count: a few bytes, never the whole file
    if not re.fullmatch(r"\d{1,12}", text):
        raise ValueError(f"{path}: expected the number of shards, got {text[:20]!r}")
    n = int(text)
    if not 1 <= n <= MAX_EVAL_SHARDS:
        raise ValueError(f"{path}: {n} shards is outside 1..{MAX_EVAL_SHARDS}")
    return n


def eval_tar_urls(root: str, split: str = "test") -> list[str]:
    """Tars of ``<root>/<split>``: ``{0..n-1}.tar`` from nshards.txt (clip_benchmark), else a sorted glob."""
    split_dir = os.path.join(root, split)
    nshards_path = os.path.join(split_dir, "nshards.txt")
    if os.path.isfile(nshards_path) or "://" in root or root.startswith("pipe:"):
        n = read_nshards(nshards_path)
        return [os.path.join(split_dir, f"{i}.tar") for i in range(n)]
    urls = sorted(glob.glob(os.path.join(split_dir, "*.tar")), key=lambda u: natural_key(os.path.basename(u)))
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


def read_first_sample_members(urls: list[str]) -> set[str]:
    """The member extensions of the first sample of the first tar ({} when it has none): what a set carries."""
    samples = read_tar_samples(urls[0], lambda *fault: None, max_member_bytes=EVAL_MAX_MEMBER_BYTES)
    try:
        first = next(samples, {})
    finally:
        samples.close()
    return {k for k in first if not k.startswith("__")}


def load_retrieval_set(root: str, split: str = "test") -> RetrievalSet:
    return RetrievalSet(eval_tar_urls(root, split))


def _eval_samples(
    urls: list[str], *, label_key: str, slot: int, num_slots: int, counter: FaultCounter
) -> Iterator[tuple[int, dict]]:
    """(global index, raw sample) for samples with index % num_slots == slot; all tars, in order."""
    index = 0
    keep = {*EVAL_IMAGE_KEYS, label_key}
    limits = {"max_member_bytes": EVAL_MAX_MEMBER_BYTES}
    for sample in (s for url in urls for s in read_tar_samples(url, counter.fault, keep=keep, **limits)):
        if OVERSIZED in sample:
            counter.fault("oversized_member", sample["__url__"], f"{sample['__key__']}: {sample[OVERSIZED]}")
            continue
        if _first_key(sample, EVAL_IMAGE_KEYS) is None or label_key not in sample:
            # the label stands where a train caption would: a missing one counts as no_caption
            reason = "no_image" if _first_key(sample, EVAL_IMAGE_KEYS) is None else "no_caption"
            counter.fault(reason, sample["__url__"], sample["__key__"])
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

    def __init__(
        self,
        urls: list[str],
        *,
        task: str,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        decode: str = "fast",
        max_image_pixels: int | None = None,
    ):
        super().__init__()
        assert task in ("zeroshot", "retrieval", "grounding")
        self.urls, self.task = list(urls), task
        self.transform = EvalTransform(image_size, fast=decode == "fast", max_pixels=max_image_pixels)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def _decode(self, sample: dict) -> tuple[torch.Tensor, Any]:
        data = sample[_first_key(sample, EVAL_IMAGE_KEYS)]
        image = self.transform.from_bytes(data)
        if self.task == "zeroshot":
            return image, int(sample["cls"].decode("ascii").strip())
        if self.task == "grounding":  # the regions the center crop keeps, in its frame
            enc = EncodedImage(data, self.transform.max_pixels)
            crop = self.transform.crop_box(enc.height, enc.width)
            kept = ((box_in_crop(b, crop, enc.height, enc.width), t) for b, t in parse_regions(sample[REGION_KEY]))
            return image, [(b, t) for b, t in kept if b is not None]
        captions = [c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()]
        if not captions:
            raise ValueError("no caption")
        return image, captions

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = FaultCounter(f"eval rank {self.rank} worker {worker}")
        # slot s of world * W: rank s % world, worker s // world; a rank's slots cover index % world == rank
        samples = _eval_samples(
            self.urls,
            label_key={"zeroshot": "cls", "retrieval": "txt", "grounding": REGION_KEY}[self.task],
            slot=self.rank + self.world_size * worker,
            num_slots=self.world_size * num_workers,
            counter=counter,
        )
        batch: list[tuple[int, torch.Tensor, Any]] = []
        for index, sample in samples:
            try:
                image, target = self._decode(sample)
            except (ImageTooLargeError, Image.DecompressionBombError) as exn:
                counter.fault("oversized_image", sample["__url__"], f"{sample['__key__']}: {exn}")
                continue
            except Exception as exn:  # noqa: BLE001 -- undecodable image, or a label / captions that do not parse
                counter.fault("corrupt_image", sample["__url__"], f"{sample['__key__']}: {type(exn).__name__}: {exn}")
                continue
            batch.append((index, image, target))
            if len(batch) == self.batch_size:
                yield self._collate(batch, counter)
                batch = []
        if batch:
            yield self._collate(batch, counter)

    def _collate(self, batch: list, counter: FaultCounter) -> dict[str, Any]:
        indices, images, targets = zip(*batch)
        num_skipped = sum(counter.take()["skipped"].values())
        out = {"image": torch.stack(images), "index": torch.tensor(indices), "num_skipped": num_skipped}
        if self.task == "zeroshot":
            out["label"] = torch.tensor(targets)
        elif self.task == "grounding":
            out["regions"] = list(targets)
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
    decode: str = "fast",
    max_image_pixels: int | None = None,
) -> DataLoader:
    """A finite loader over this rank's share of an eval set (``task``: "zeroshot" or "retrieval").

    Over all ranks every good sample appears exactly once; gather ``index`` to line results up.
    ``decode`` and ``max_image_pixels``: as data.decode and data.max_image_pixels (None: no limit).
    """
    if task not in ("zeroshot", "retrieval", "grounding"):
        raise ValueError(f"task must be 'zeroshot', 'retrieval' or 'grounding' (got {task!r})")
    stream = EvalStream(
        urls,
        task=task,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        decode=decode,
        max_image_pixels=max_image_pixels,
    )
    return DataLoader(stream, batch_size=None, num_workers=num_workers)
