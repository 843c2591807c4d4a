"""The train loader's global sample order: a fixed number of virtual streams, whose position is state.

The run's samples flow through ``V = data.num_streams`` virtual streams, a number that belongs to the run (not
to the launch: null chooses it at the first launch, auto_num_streams, and the checkpoint keeps it). Stream v reads
the shards that rank v of V with one worker reads in the per-rank loader (pipeline.py): epoch e shuffles all
shards with seed (seed, e) and stream v takes every V-th of them from v (resampled mode: draws shards with
replacement, seeded by v); each source it reads has its own shuffle buffer; with
data.train.sources a seeded draw per sample picks the source. Every random choice is a hash of (seed, stream,
counter) -- a pick of the shuffle buffer, a source draw, a resampled shard, the crop of the stream's n-th
sample -- so a stream's whole state is a few counters, where it is in its shards and the keys in its buffers.

Global batch s (``G = train.batch_size`` samples) is stream 0's next G/V samples, then stream 1's, ..., then
stream V-1's. Ranks x workers ("slots", ``P = world_size x max(1, data.num_workers)``) own whole streams: slot
p = rank x W + worker owns streams [p V/P, (p+1) V/P), so rank r's batch is the global batch's r-th slice of
G/world samples, assembled from one piece per worker. Hence V must divide G, and P must divide V (canonical
nodes in MosaicML Streaming: the order is a function of the seed and V, never of the launch). A run started on
2 ranks and resumed on 1 (or 4 processes resumed as 2) sees the very batches an uninterrupted run sees.

Data position as state. Each piece carries ``data_state``: every stream's state after it (epoch, shard index,
the byte offset of the next sample in the shard, counters, and each buffer's samples as [shard index, byte
offset]). The loop gathers them over ranks into the checkpoint (TrainState). A restart reads each buffered
sample back at its offset and continues every shard at its offset: it reads V x shuffle_buffer samples (the
shards in flight), whatever the step. Without a state (a checkpoint of an older version), ``start_batch`` replays:
each stream draws and drops start_batch x G/V samples undecoded (the per-rank loader's way, kept as reference).

Cost. Memory: a worker holds V/P streams, each with one shuffle buffer per source (shuffle_buffer encoded
samples each). Reads before the first batch: V x shuffle_buffer samples over the run (the buffers fill), at a
start and at every resume. The main process joins W pieces into its batch (one copy into pinned memory).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..signals import ignore_stop_signals
from .config import DataConfig, TrainDataConfig, expand_shard_spec, is_remote
from .naflex import NaflexTrainTransform, pack_batch
from .pipeline import (
    _CROP,
    _MIX,
    _RESAMPLE,
    _SHUFFLE,
    ABANDON_SHARD_AFTER,
    DataFaultError,
    FaultCounter,
    _Source,
    _train_sources,
    build_rank_loader,
    check_loader_args,
    collate_train,
    decode_train_sample,
    epoch_shards,
    merge_data_stats,
    mix_seed,
    naflex_args,
    read_limits,
    sample_fault,
    train_members,
)
from .shards import read_tar_samples
from .tokenizer import Tokenizer
from .transforms import ImageTooLargeError, TrainTransform

# a stream whose shards gave no usable sample this many epochs in a row stops the run (DataFaultError): it could
# never fill its share of a batch. One empty epoch is not enough: each epoch deals the stream other shards
MAX_EMPTY_EPOCHS = 10
MAX_AUTO_STREAMS = 16  # data.num_streams=null: at most this many streams, or ranks x workers when that is more
_UNIT = float(2**63)  # mix_seed is 63 bits: mix_seed(...) / _UNIT is uniform in [0, 1)


def auto_num_streams(train: TrainDataConfig, global_batch: int, slots: int = 1) -> int:
    """data.num_streams=null at a run's first launch: the largest slots x 2^k <= max(MAX_AUTO_STREAMS, slots)
    (``slots`` = ranks x workers) that divides the global batch and, in epoch mode, is at most the shards of the
    smallest source (every stream needs a shard an epoch), preferring one that divides every source's shard count
    (streams of equal size: a stream with fewer samples runs through its epochs faster, so its samples would come
    more often); ``slots`` when none fits (check_num_streams then says why). For 1, 2, 4, 8 or 16 slots that is
    mostly one number, so those launches share one order; above 16 slots it is the slots themselves (one stream a
    worker). The checkpoint keeps the number: later launches use it, and may have any divisor of it as slots."""
    counts = []
    if not train.resampled:
        specs = [train.urls] if train.sources is None else [s.urls for s in train.sources]
        counts = [sum(len(g) for g in expand_shard_spec(spec)) for spec in specs if spec]
    most = min([max(MAX_AUTO_STREAMS, slots), *counts])
    fits = [slots << k for k in range(64) if (slots << k) <= most and global_batch % (slots << k) == 0]
    even = [num for num in fits if all(count % num == 0 for count in counts)]
    return max(even or fits or [slots])


def check_num_streams(train: TrainDataConfig, num_streams: int, *, global_batch: int, world_size: int,
                      num_workers: int) -> None:  # fmt: skip
    """ValueError naming the keys when V streams cannot make this launch's batches."""
    slots = world_size * max(1, num_workers)
    if num_streams % slots:
        raise ValueError(
            f"data.num_streams={num_streams} must be a multiple of ranks x data workers ({world_size} x "
            f"{max(1, num_workers)} = {slots}: each owns whole streams); change data.num_workers, or choose "
            "data.num_streams for the largest launch at the run's start (it cannot change within a run)"
        )
    counted = [("data.train.urls", train.urls)] if train.sources is None else [
        (f"data.train.sources[{i}].urls", s.urls) for i, s in enumerate(train.sources)]  # fmt: skip
    for key, spec in counted if not train.resampled else []:
        num_shards = sum(len(g) for g in expand_shard_spec(spec))
        if num_shards < num_streams:
            raise ValueError(f"{key}: {num_shards} shards cannot feed data.num_streams={num_streams} streams (every "
                             "stream needs one shard an epoch); add shards, lower data.num_streams or set "
                             "data.train.resampled=true")  # fmt: skip
    if global_batch % num_streams:
        raise ValueError(f"data.num_streams={num_streams} must divide train.batch_size={global_batch} (every stream "
                         "gives the same number of samples to each global batch)")  # fmt: skip


class SourceCursor:
    """One source of one stream: its shard sequence, the position in it, and its shuffle buffer.

    State (plain JSON): epoch; ``shard`` (index in the epoch's shard list, or resampled draws so far); ``offset``
    (byte offset of the next sample in that shard, -1: the shard is done); ``picks`` (buffer picks this epoch: the
    shuffle RNG's counter); ``usable`` (samples given this epoch); ``empty_epochs`` (epochs in a row that gave
    none); ``buffer`` ([url index, offset] per sample).
    """

    def __init__(self, cfg: TrainDataConfig, source: _Source, *, stream: int, num_streams: int,
                 counter: FaultCounter, limits: dict, state: dict | None = None):  # fmt: skip
        self.cfg, self.source, self.stream, self.num_streams = cfg, source, stream, num_streams
        self.counter, self.limits = counter, limits
        self.urls = [u for group in source.shards for u in group]
        self.url_index = {u: i for i, u in enumerate(self.urls)}
        self.name_of = {u: name for group, name in zip(source.shards, source.names) for u in group}
        weights = source.shard_weights or [1.0] * len(source.shards)
        self.cum = list(itertools.accumulate(w for w, group in zip(weights, source.shards) for _ in group))
        self.image_keys, self.keep = cfg.image_key.split(";"), train_members(cfg)
        self.epoch, self.shard, self.offset, self.picks, self.usable, self.empty_epochs = 0, 0, 0, 0, 0, 0
        self.buffer: list[dict] = []
        self._order: tuple[int, list[str]] | None = None  # (epoch, this stream's shards of it)
        self._reader: Iterator[dict] | None = None
        self._broken_in_a_row = 0
        if state is not None:
            self.epoch, self.shard, self.offset = state["epoch"], state["shard"], state["offset"]
            self.picks, self.usable, self.empty_epochs = state["picks"], state["usable"], state["empty_epochs"]
            self.buffer = self._read_back(state["buffer"])

    def state(self) -> dict:
        buffer = [[self.url_index[s["__url__"]], s["__offset__"]] for s in self.buffer]
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "picks": self.picks,
                "usable": self.usable, "empty_epochs": self.empty_epochs, "buffer": buffer}  # fmt: skip

    def _read_back(self, entries: list[list[int]]) -> list[dict]:
        """The buffered samples ([url index, byte offset] each, in buffer order), read again (they passed the checks
        when first read): a local shard is seeked to each; a remote one (pipe:, http) is read once, from its first
        wanted sample on, so a shard in flight costs one read of at most itself."""
        wanted: dict[int, set[int]] = {}
        for i, offset in entries:
            wanted.setdefault(i, set()).add(offset)
        found: dict[tuple[int, int], dict] = {}
        for i, offsets in wanted.items():
            url = self.urls[i]
            remote = is_remote(url)
            for start in [min(offsets)] if remote else sorted(offsets):
                todo = set(offsets) if remote else {start}
                for sample in read_tar_samples(url, lambda *fault: None, keep=self.keep, start=start, **self.limits):
                    offset = sample["__offset__"]
                    if offset in todo and sample_fault(sample, self.image_keys, self.cfg.text_key) is None:
                        sample["__source__"] = self.name_of[url]
                        found[i, offset] = sample
                    todo.discard(offset)
                    if not todo or offset > max(todo):
                        break
        missing = [(self.urls[i], offset) for i, offset in entries if (i, offset) not in found]
        if missing:
            raise ValueError(f"data resume: {len(missing)} buffered samples are not in their shards any more, e.g. "
                             f"{missing[0][0]} at byte {missing[0][1]} (were the shards rewritten since the "
                             "checkpoint?)")  # fmt: skip
        return [dict(found[i, offset]) for i, offset in entries]  # resampled shards may buffer a sample twice

    def _shard_url(self) -> str | None:
        """The url of shard number ``self.shard`` of this epoch; None after the epoch's last shard."""
        if self.cfg.resampled:  # one endless epoch of weighted draws with replacement
            u = mix_seed(self.source.seed, _RESAMPLE, self.stream, self.shard) / _UNIT
            return self.urls[bisect.bisect_right(self.cum, u * self.cum[-1])]
        if self._order is None or self._order[0] != self.epoch:
            shards = epoch_shards(self.urls, seed=self.source.seed, epoch=self.epoch, rank=self.stream,
                                  world_size=self.num_streams, worker=0, num_workers=1)  # fmt: skip
            self._order = (self.epoch, [s["url"] for s in shards])
        order = self._order[1]
        return order[self.shard] if self.shard < len(order) else None

    def _pull(self) -> dict | None:
        """The epoch's next usable raw sample (undecoded), faults counted; None when the epoch's shards are done."""
        while True:
            if self._reader is None:
                if self.offset == -1:  # the shard was done
                    self.shard, self.offset = self.shard + 1, 0
                url = self._shard_url()
                if url is None:
                    return None
                self._reader = read_tar_samples(url, self.counter.fault, keep=self.keep, start=self.offset,
                                                **self.limits)  # fmt: skip
                self._broken_in_a_row = 0
            sample = next(self._reader, None)
            if sample is None:
                self._reader, self.offset = None, -1
                continue
            self.offset = sample["__next__"]
            url = sample["__url__"]
            reason = sample_fault(sample, self.image_keys, self.cfg.text_key)
            if reason is None:
                self._broken_in_a_row = 0
                sample["__source__"] = self.name_of[url]
                return sample
            self.counter.fault(reason, url, sample["__key__"])
            self._broken_in_a_row += 1
            if self._broken_in_a_row >= ABANDON_SHARD_AFTER:
                self.counter.fault("abandoned_shard", url, f"{self._broken_in_a_row} broken samples in a row: the "
                                   "rest of the shard is skipped")  # fmt: skip
                self._reader, self.offset = None, -1

    def next(self) -> dict:
        """The next sample through the shuffle buffer; epochs follow each other (a buffer drains at an epoch's end)."""
        while True:
            while len(self.buffer) < self.cfg.shuffle_buffer:
                sample = self._pull()
                if sample is None:
                    break
                self.buffer.append(sample)
            if self.buffer:
                k = mix_seed(self.source.seed, _SHUFFLE, self.stream, self.epoch, self.picks) % len(self.buffer)
                self.picks, self.usable = self.picks + 1, self.usable + 1
                sample, self.buffer[k] = self.buffer[k], self.buffer[-1]
                self.buffer.pop()
                return sample
            self.empty_epochs = self.empty_epochs + 1 if self.usable == 0 else 0
            if self.empty_epochs >= MAX_EMPTY_EPOCHS:  # an endless loop over shards that give nothing would hang
                raise DataFaultError(
                    f"{self.counter.where}: stream {self.stream} found no usable sample in its shards of "
                    f"{'/'.join(self.source.names)} in {self.empty_epochs} epochs in a row (all unreadable or broken? "
                    "check them with mmpretrain-inspect-shards)"
                )
            self.epoch, self.shard, self.offset, self.picks, self.usable = self.epoch + 1, 0, 0, 0, 0


class VirtualStream:
    """Stream ``index`` of V: its sources' cursors and the mixture draw; ``position`` counts the samples it gave
    (the crop of its n-th sample is seeded by n)."""

    def __init__(self, index: int, num_streams: int, cfg: TrainDataConfig, sources: list[_Source],
                 weights: list[float], *, seed: int, counter: FaultCounter, limits: dict,
                 state: dict | None = None):  # fmt: skip
        self.index, self.seed = index, seed
        states = state["sources"] if state is not None else [None] * len(sources)
        self.cursors = [SourceCursor(cfg, source, stream=index, num_streams=num_streams, counter=counter,
                                     limits=limits, state=s) for source, s in zip(sources, states)]  # fmt: skip
        self.cum = list(itertools.accumulate(weights))
        self.position = state["position"] if state is not None else 0
        self.mix_draws = state["mix_draws"] if state is not None else 0

    def state(self) -> dict:
        return {"position": self.position, "mix_draws": self.mix_draws, "sources": [c.state() for c in self.cursors]}

    def next(self) -> dict:
        if len(self.cursors) == 1:
            cursor = self.cursors[0]
        else:
            u = mix_seed(self.seed, _MIX, self.index, self.mix_draws) / _UNIT
            self.mix_draws += 1
            cursor = self.cursors[bisect.bisect_right(self.cum, u * self.cum[-1])]
        sample = cursor.next()
        sample["__position__"] = self.position
        self.position += 1
        return sample


class StreamSet(IterableDataset):
    """One rank's share of the virtual streams; each DataLoader worker makes pieces from the streams it owns.

    A piece is ``{"image", "text", "label", "keys", "data_stats", "data_state"}`` for one step: G/V samples of each
    of the worker's streams, in stream order; ``data_state`` is ``{stream index: state}`` after the piece.
    """

    def __init__(self, cfg: TrainDataConfig, *, num_streams: int, tokenizer: Tokenizer, image_size: int,
                 global_batch: int, rank: int, world_size: int, seed: int, start_batch: int = 0,
                 streams_state: dict | None = None, decode: str = "fast", max_image_pixels: int | None = None,
                 limits: dict | None = None, naflex=None, patch_size: int | None = None):  # fmt: skip
        super().__init__()
        self.cfg, self.num_streams, self.tokenizer = cfg, num_streams, tokenizer
        self.sources, self.weights = _train_sources(cfg, seed)
        self.source_names = [name for s in self.sources for name in s.names]
        self.transform = TrainTransform(image_size, scale=tuple(cfg.crop_scale), fast=decode == "fast",
                                        max_pixels=max_image_pixels, local_crops=cfg.local_crops,
                                        local_scale=tuple(cfg.local_crop_scale))  # fmt: skip
        self.naflex = naflex  # data.naflex when enabled: patches to a budget, packed by StreamLoader (naflex.py)
        if naflex is not None:
            self.transform = NaflexTrainTransform(patch_size, naflex.max_patches, max_pixels=max_image_pixels)
        self.image_keys = cfg.image_key.split(";")
        self.per_stream = global_batch // num_streams  # samples of each stream in every global batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_batch, self.streams_state, self.limits = start_batch, streams_state, limits or {}

    def owned(self, worker: int, num_workers: int) -> range:
        """The streams of slot rank x W + worker."""
        per_slot = self.num_streams // (self.world_size * num_workers)
        slot = self.rank * num_workers + worker
        return range(slot * per_slot, (slot + 1) * per_slot)

    def _decoded(self, stream: VirtualStream, counter: FaultCounter) -> tuple:
        """The stream's next sample that decodes: pipeline.decode_train_sample's tuple."""
        while True:
            sample = stream.next()
            seed = mix_seed(self.seed, _CROP, stream.index, sample["__position__"])
            try:
                item = decode_train_sample(self.transform, sample, self.image_keys, seed, self.cfg.regions)
            except (ImageTooLargeError, Image.DecompressionBombError) as exn:
                counter.fault("oversized_image", sample["__url__"], f"{sample['__key__']}: {exn}")
                continue
            except Exception as exn:  # noqa: BLE001 -- any other decode failure is a corrupt image
                counter.fault("corrupt_image", sample["__url__"], f"{sample['__key__']}: {type(exn).__name__}: {exn}")
                continue
            counter.good(sample["__source__"])
            return item

    def pieces(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        counter = FaultCounter(f"data rank {self.rank} worker {worker}", self.source_names)
        states = self.streams_state or {}
        streams = [VirtualStream(v, self.num_streams, self.cfg, self.sources, self.weights, seed=self.seed,
                                 counter=counter, limits=self.limits, state=states.get(str(v)))
                   for v in self.owned(worker, num_workers)]  # fmt: skip
        if self.streams_state is None and self.start_batch:  # replay: no state to seek to (an older checkpoint)
            for stream in streams:
                for _ in range(self.start_batch * self.per_stream):
                    stream.next()
            counter.take()
        while True:
            items = [self._decoded(stream, counter) for stream in streams for _ in range(self.per_stream)]
            piece = collate_train(self.tokenizer, self.cfg.regions, items)
            piece.update(data_stats=counter.take(), data_state=Opaque({str(s.index): s.state() for s in streams}))
            yield piece

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.pieces(worker, num_workers)


OPTIONAL_FIELDS = ("grid", "local_crops", "decoder_text", "decoder_prompt", "decoder_task")  # per-sample tensors


class Opaque:
    """A value the DataLoader passes through as it is: its default_convert and pin_memory walk every dict and list,
    and a piece's stream states hold every buffered sample's position (that walk cost a third of a worker's time
    on small images)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def join_pieces(pieces: list[dict], num_streams: int, pin: bool) -> dict[str, Any]:
    """One rank's batch from its workers' pieces (in worker order: the global batch's slice, in stream order)."""
    if len(pieces) == 1:
        batch = dict(pieces[0])
    else:
        batch = {"keys": [k for p in pieces for k in p["keys"]]}
        for name in ("image", "text", "label", *(n for n in OPTIONAL_FIELDS if n in pieces[0])):
            parts = [p[name] for p in pieces]
            shape = (sum(len(t) for t in parts), *parts[0].shape[1:])
            out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin)  # one copy, into pinned memory on CUDA
            batch[name] = torch.cat(parts, out=out)
        stats: dict = {}
        for p in pieces:
            stats = merge_data_stats(stats, p["data_stats"])
        batch["data_stats"] = stats
    batch["num_skipped"] = sum(batch["data_stats"]["skipped"].values())
    streams = {v: state for p in pieces for v, state in p["data_state"].value.items()}
    batch["data_state"] = {"num_streams": num_streams, "streams": streams}
    return batch


class StreamLoader:
    """Infinite iterable of one rank's batches in the global order: ``{"image": (b,3,S,S), "text": (b,L), "label":
    (b,), "keys", "num_skipped", "data_stats", "data_state"}`` with b = G / world_size; ``data_state`` is
    ``{"num_streams": V, "streams": {index: state}}`` of this rank's streams after the batch."""

    def __init__(self, streams: StreamSet, *, num_workers: int, pin_memory: bool):
        self.streams, self.num_workers = streams, num_workers
        self.num_streams, self.pin = streams.num_streams, pin_memory
        self.batch_size = streams.per_stream * len(streams.owned(0, 1))
        self.start_batch = streams.start_batch
        self.samples_per_epoch = streams.cfg.samples_per_epoch
        self.source_names = streams.source_names
        self.dataloader = DataLoader(streams, batch_size=None, num_workers=num_workers,
                                     persistent_workers=num_workers > 0, pin_memory=pin_memory and num_workers <= 1,
                                     worker_init_fn=ignore_stop_signals)  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pieces = iter(self.dataloader)  # in order: worker 0, 1, ..., W-1, 0, ... (one piece each per step)
        while True:
            batch = join_pieces([next(pieces) for _ in range(max(1, self.num_workers))], self.num_streams, self.pin)
            # NaFlex: packed here, in the training process, from the whole rank batch (data/naflex.py)
            yield batch if self.streams.naflex is None else pack_batch(batch, self.streams.naflex)


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
    data_state: dict | None = None,
    num_epochs: int | None = None,
    patch_size: int | None = None,
):
    """The train loader of one rank; ``batch_size`` is per rank (the global batch is batch_size x world_size).

    The global order over data.num_streams streams (this module's docstring), resumed from ``data_state`` (the
    streams' states gathered over ranks, as a checkpoint holds them), else replayed to ``start_batch``. With
    data.num_streams=0 or ``num_epochs`` (a finite pass, for scanning shards and tests): the per-rank loader of
    pipeline.py (order tied to the world size, resumed by replay).
    """
    if cfg.num_streams == 0 or num_epochs is not None:
        return build_rank_loader(cfg, tokenizer=tokenizer, image_size=image_size, batch_size=batch_size,
                                 rank=rank, world_size=world_size, seed=seed, start_batch=start_batch,
                                 num_epochs=num_epochs, patch_size=patch_size)  # fmt: skip
    train = cfg.train
    check_loader_args(cfg, rank=rank, world_size=world_size, batch_size=batch_size, start_batch=start_batch)
    global_batch = batch_size * world_size
    slots = world_size * max(1, cfg.num_workers)
    has_state = bool(data_state and data_state.get("streams"))
    # the run's number: the config's, else the checkpoint's (chosen at the first launch), else chosen now
    num_streams = cfg.num_streams or (data_state["num_streams"] if has_state else None)
    num_streams = num_streams or auto_num_streams(train, global_batch, slots)
    try:
        check_num_streams(train, num_streams, global_batch=global_batch, world_size=world_size,
                          num_workers=cfg.num_workers)  # fmt: skip
    except ValueError as e:
        if cfg.num_streams is None:  # say where the number came from
            took = "the checkpoint's number" if has_state else f"chosen for {slots} ranks x workers"
            raise ValueError(f"{e} [data.num_streams=null took {num_streams}: {took}]") from None
        raise
    streams_state = None
    if has_state:
        if data_state.get("num_streams") != num_streams or len(data_state["streams"]) != num_streams:
            raise ValueError(f"data resume: the checkpoint holds {len(data_state['streams'])} of "
                             f"{data_state.get('num_streams')} streams' states, this run has data.num_streams="
                             f"{num_streams}")  # fmt: skip
        streams_state = data_state["streams"]
    streams = StreamSet(train, num_streams=num_streams, tokenizer=tokenizer, image_size=image_size,
                        global_batch=global_batch, rank=rank, world_size=world_size, seed=seed,
                        start_batch=start_batch, streams_state=streams_state, decode=cfg.decode,
                        max_image_pixels=cfg.max_image_pixels, limits=read_limits(cfg),
                        **naflex_args(cfg, patch_size))  # fmt: skip
    return StreamLoader(streams, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
