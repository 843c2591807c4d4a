"""Data config: train shards, eval sets, synthetic demo data (owned by mmpretrain.data).

The root config nests ``DataConfig`` under ``data`` and calls ``validate("data")``; the seed
lives in the root config and is passed to the loader builders.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import braceexpand

log = logging.getLogger(__name__)

DECODE_CHOICES = ("fast", "pil")


def expand_shard_spec(spec: str) -> list[list[str]]:
    """Split a shard spec on "::" into sources and brace-expand each: "a/{0..1}.tar::b.tar" -> [[a/0, a/1], [b]]."""
    return [list(braceexpand.braceexpand(source)) for source in spec.split("::") if source]


def is_remote(url: str) -> bool:
    """True for urls webdataset opens through a pipe or the network (we do not check those for existence)."""
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def check_shard_spec(spec: str, key: str) -> list[list[str]]:
    """Expand a spec and check its local files: ValueError naming ``key`` when no file of a source exists.

    Some files missing is only a warning: a missing shard is a data fault met at read time (counted as
    ``unreadable_shard`` and skipped, like a corrupt one), not a reason to refuse the run.
    """
    sources = expand_shard_spec(spec)
    if not sources:
        raise ValueError(f"{key}: empty shard spec {spec!r}")
    for source_spec, urls in zip([s for s in spec.split("::") if s], sources):
        missing = [u for u in urls if not is_remote(u) and not os.path.isfile(_local_path(u))]
        if len(missing) == len(urls):
            raise ValueError(f"{key}: no file matches {source_spec!r}")
        if missing:
            log.warning(
                "%s: %d of %d files of %r missing (e.g. %r); they will be skipped and counted as unreadable_shard",
                key, len(missing), len(urls), source_spec, missing[0],
            )  # fmt: skip
    return sources


@dataclass
class SourceConfig:
    """One source of a multi-source mixture (``data.train.sources``)."""

    urls: str
    """The source's shards: a brace-expandable spec as in ``data.train.urls`` (no ``::``)."""
    weight: float = 1.0
    """Share of the train SAMPLES drawn from this source: weight / sum of weights (not per shard)."""
    name: Optional[str] = None
    """Name in the per-batch ``data_stats["sources"]`` counts and logs; None: ``source<i>`` by position."""


def source_names(sources: list[SourceConfig]) -> list[str]:
    """The names of ``sources``, defaults filled in: ``source0``, ``source1``, ... by position."""
    return [s.name if s.name is not None else f"source{i}" for i, s in enumerate(sources)]


@dataclass
class RegionsConfig:
    """Region tasks of the caption decoder (mmpretrain/data/regions.py): a sample whose ``<key>.json`` holds
    ``regions`` trains a referring expression (the box from the words) with probability ``ref_fraction``, a grounded
    caption (the words from the box) with ``gcap_fraction``, else its caption."""

    ref_fraction: float = 0.0
    """Share of samples with a region that predict its box from its words (referring expression)."""
    gcap_fraction: float = 0.0
    """Share of samples with a region that predict its words from its box (grounded captioning)."""
    box_bins: int = 100
    """Coordinates are written as integers 0 .. box_bins - 1 (text tokens)."""

    @property
    def enabled(self) -> bool:
        return self.ref_fraction + self.gcap_fraction > 0

    def validate(self, prefix: str) -> None:
        for key in ("ref_fraction", "gcap_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{prefix}.{key}: must be in [0, 1] (got {getattr(self, key)})")
        if self.ref_fraction + self.gcap_fraction > 1:
            raise ValueError(f"{prefix}: ref_fraction + gcap_fraction must be <= 1 (got {self.ref_fraction} + "
                             f"{self.gcap_fraction})")  # fmt: skip
        if self.box_bins < 2:
            raise ValueError(f"{prefix}.box_bins: must be >= 2 (got {self.box_bins})")


@dataclass
class TrainDataConfig:
    urls: Optional[str] = None
    """Train shards: a brace-expandable spec (local paths, ``pipe:...`` or http(s) urls, as webdataset opens
    them), e.g. ``/data/laion/{000000..041407}.tar``. Several sources may be separated by ``::`` (one shard
    pool; see ``source_weights``). Exclusive with ``sources``."""
    sources: Optional[list[SourceConfig]] = None
    """Several sources mixed by SAMPLE share: each stream (data.num_streams) reads every source on its own
    (own shard order and shuffle buffer: memory is sources x shuffle_buffer samples a stream) and a seeded draw
    picks the source of every next sample with probability weight / sum of weights. Exclusive with ``urls``.
    On the command line, quote brace specs inside the list:
    ``data.train.sources=[{urls: '/laion/{0..99}.tar', weight: 3}, {urls: '/cc12m/{0..9}.tar', name: cc12m}]``."""
    resampled: bool = False
    """Draw shards with replacement (seeded per rank and worker) instead of seeded passes over the shard list.
    Use it when shards < ranks x workers or to weight sources."""
    source_weights: Optional[list[float]] = None
    """Resampled mode only: one weight per ``::`` source; a shard of source i is drawn with probability
    proportional to weight_i (so a source's share is weight_i x its number of shards). None: all shards equal."""
    samples_per_epoch: Optional[int] = None
    """Nominal epoch size in samples (all ranks together). Required in resampled mode, where there is no natural
    epoch; the loader streams forever, and the train loop uses it to report epochs."""
    shuffle_buffer: int = 1000
    """Samples held by each stream's shuffle buffer, one per source (data.num_streams: a worker holds num_streams /
    (ranks x workers) streams; data.num_streams=0: one stream a worker). Memory: this many encoded samples each."""
    image_key: str = "jpg;png;webp"
    """Tar member extensions tried in order for the image."""
    text_key: str = "txt"
    """Tar member extension of the caption (UTF-8 text)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """RandomResizedCrop area range (min, max) as fractions of the image area."""
    local_crops: int = 0
    """Extra small crops of every train image, as ``batch["local_crops"]`` (b, n, 3, S, S) uint8 at the model's
    size (self-distillation's student views, loss.terms.self_distill); 0 = none."""
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    """RandomResizedCrop area range (min, max) of the local crops (DINO's local views: 0.05 to 0.4)."""
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    """Referring-expression and grounded-caption targets for loss.terms.caption (``<key>.json`` ``regions``)."""

    def validate(self, prefix: str) -> None:
        self.regions.validate(f"{prefix}.regions")
        if self.urls is not None and self.sources is not None:
            raise ValueError(f"{prefix}.sources: set either {prefix}.urls or {prefix}.sources, not both")
        if self.sources is not None:
            self._validate_sources(prefix)
        if self.urls is not None:
            sources = check_shard_spec(self.urls, f"{prefix}.urls")
            if self.source_weights is not None:
                if not self.resampled:
                    raise ValueError(f"{prefix}.source_weights: only used with {prefix}.resampled=true")
                if len(self.source_weights) != len(sources):
                    raise ValueError(
                        f"{prefix}.source_weights: {len(self.source_weights)} weights for {len(sources)} '::' sources"
                    )
                if any(w < 0 for w in self.source_weights) or sum(self.source_weights) <= 0:
                    raise ValueError(f"{prefix}.source_weights: must be >= 0 with a positive sum")
        if self.resampled and self.samples_per_epoch is None:
            raise ValueError(f"{prefix}.samples_per_epoch: required when {prefix}.resampled is true")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise ValueError(f"{prefix}.samples_per_epoch: must be > 0 (got {self.samples_per_epoch})")
        if self.shuffle_buffer < 1:
            raise ValueError(f"{prefix}.shuffle_buffer: must be >= 1 (got {self.shuffle_buffer})")
        if not self.image_key or not self.text_key:
            raise ValueError(f"{prefix}.image_key/text_key: must not be empty")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"{prefix}.crop_scale: need [min, max] with 0 < min <= max <= 1 (got {self.crop_scale})")
        if self.local_crops < 0:
            raise ValueError(f"{prefix}.local_crops must be >= 0 (got {self.local_crops})")
        lo_hi = self.local_crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"{prefix}.local_crop_scale: need [min, max] with 0 < min <= max <= 1 (got {lo_hi})")

    def _validate_sources(self, prefix: str) -> None:
        if not self.sources:
            raise ValueError(f"{prefix}.sources: empty list (give at least one source, or use {prefix}.urls)")
        if self.source_weights is not None:
            raise ValueError(f"{prefix}.source_weights: not used with {prefix}.sources (give each source a weight)")
        for i, source in enumerate(self.sources):
            key = f"{prefix}.sources[{i}]"
            if not source.urls or "::" in source.urls:
                raise ValueError(f"{key}.urls: one non-empty shard spec per source, without '::' (got {source.urls!r})")
            check_shard_spec(source.urls, f"{key}.urls")
            if not source.weight >= 0:
                raise ValueError(f"{key}.weight: must be >= 0 (got {source.weight})")
            if source.name is not None and not source.name:
                raise ValueError(f"{key}.name: must not be empty (null for the default 'source{i}')")
        if sum(s.weight for s in self.sources) <= 0:
            raise ValueError(f"{prefix}.sources: the weights must have a positive sum")
        names = source_names(self.sources)
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"{prefix}.sources: the name {dup!r} is used twice")


@dataclass
class EvalDataConfig:
    zeroshot: Optional[str] = None
    """Zero-shot classification set in clip_benchmark WebDataset layout: ``<root>/test/*.tar`` (``<key>.jpg|png|webp``
    + ``<key>.cls``), ``<root>/classnames.txt`` and ``<root>/zeroshot_classification_templates.txt``."""
    retrieval: Optional[str] = None
    """Retrieval set in clip_benchmark layout: ``<root>/test/*.tar`` with ``<key>.txt`` holding one caption a line."""
    zeroshot_name: Optional[str] = None
    """Name of the zero-shot set in the results (``zeroshot/<name>/top1``); null: derived from the set, i.e.
    "shapes" for the synthetic demo sets, else the set folder's name."""
    retrieval_name: Optional[str] = None
    """Name of the retrieval set in the results (``retrieval/<name>/image_to_text_R@1``); null: derived, as above."""
    split: str = "test"
    """Split folder under each eval root."""
    batch_size: int = 64
    """Eval images per rank per forward pass."""

    def validate(self, prefix: str) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{prefix}.batch_size: must be >= 1 (got {self.batch_size})")
        for name in ("zeroshot", "retrieval"):
            set_name = getattr(self, f"{name}_name")
            if set_name is not None and (not set_name or "/" in set_name):
                raise ValueError(f"{prefix}.{name}_name: must be non-empty and without '/' (got {set_name!r})")
            root = getattr(self, name)
            if root is None or is_remote(root):
                continue
            if not os.path.isdir(root):
                raise ValueError(f"{prefix}.{name}: no such directory {root!r}")
            if not glob.glob(os.path.join(root, self.split, "*.tar")):
                raise ValueError(f"{prefix}.{name}: no file matches {os.path.join(root, self.split, '*.tar')!r}")
        if self.zeroshot is not None and not is_remote(self.zeroshot):
            for fname in ("classnames.txt", "zeroshot_classification_templates.txt"):
                if not os.path.isfile(os.path.join(self.zeroshot, fname)):
                    raise ValueError(f"{prefix}.zeroshot: missing {os.path.join(self.zeroshot, fname)!r}")


@dataclass
class SyntheticConfig:
    root: Optional[str] = None
    """Folder of the synthetic colored-shapes dataset (generated there if absent). When set and
    ``data.train.urls`` is unset, training and eval use it (the demo)."""
    num_train: int = 20000
    """Train samples."""
    samples_per_shard: int = 1000
    """Train samples per tar shard."""
    num_eval: int = 1024
    """Held-out samples in each eval set (zero-shot and retrieval)."""
    image_size: int = 32
    """Side of the generated square images in pixels."""
    seed: int = 0
    """Generator seed (the eval sets use seeds derived from it, distinct from train)."""
    train_labels: bool = False
    """Also write each train sample's class (color x shape index) as ``<key>.cls`` (UniCL's labels); images,
    captions and order are the same either way."""

    def validate(self, prefix: str) -> None:
        for name in ("num_train", "samples_per_shard", "num_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1 (got {getattr(self, name)})")
        if self.image_size < 16:
            raise ValueError(f"{prefix}.image_size: must be >= 16 pixels (got {self.image_size})")


@dataclass
class NaflexConfig:
    """SigLIP 2's NaFlex with sequence packing (``data.naflex``; data/naflex.py and model/naflex.py)."""

    enabled: bool = False
    """Train images keep their aspect ratio: each is resized to at most ``max_patches`` patches of
    model.vision.patch_size (no crop) and the batch's images are packed into rows (SigLIP models only)."""
    max_patches: int = 256
    """Patch budget per image (Siglip2ImageProcessor's max_num_patches)."""
    seq_len: int = 1024
    """Longest packed row in patches; each batch gets the fewest rows of one length <= seq_len that hold it."""
    multiple: int = 8
    """Row lengths are rounded up to a multiple of this (fewer distinct shapes)."""

    def validate(self, prefix: str) -> None:
        for name in ("max_patches", "seq_len", "multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1 (got {getattr(self, name)})")
        if self.max_patches > self.seq_len:
            raise ValueError(f"{prefix}.max_patches: must be <= {prefix}.seq_len (got {self.max_patches} and "
                             f"{self.seq_len}): an image must fit one row")  # fmt: skip


@dataclass
class DataConfig:
    train: TrainDataConfig = field(default_factory=TrainDataConfig)
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    naflex: NaflexConfig = field(default_factory=NaflexConfig)
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    num_streams: Optional[int] = None
    """Virtual streams of the global sample order (a run's constant): the global batch is an equal share of each,
    ranks x data workers own whole streams, so the batches do not depend on the launch (resume on another world
    size). Must divide train.batch_size and be a multiple of ranks x max(1, num_workers); in epoch mode at most the
    shards of each source. Memory: a worker holds num_streams / (ranks x workers) shuffle buffers. null: chosen at
    the run's first launch and kept in its checkpoints: the largest power of two <= 16 that the batch and the shards
    allow (preferring one that divides the shard count: equal streams) for up to 16 ranks x workers (powers of two),
    else ranks x workers (one stream a worker); a resume may use any divisor of it. 0: the per-rank order of
    earlier versions (tied to the world size, resumed by replay)."""
    max_bad_fraction: float = 0.1
    """Stop training (DataFaultError) when broken samples / samples read (all ranks, since the start of this
    launch) exceeds it. Broken: every skipped sample, unreadable shard and truncated tar (DATA_FAULT_REASONS).
    1.0: never stop."""
    bad_min_samples: int = 1000
    """Do not judge ``max_bad_fraction`` before this many samples were read (all ranks together)."""
    max_image_pixels: int = 50_000_000
    """Images whose header declares more pixels (width x height) are skipped before decoding
    (``oversized_image``: decompression-bomb guard)."""
    max_member_bytes: int = 64 * 2**20
    """Tar members larger than this (as their header says) are not read; their sample is skipped and counted
    (``oversized_member``). Only the members the loader uses (image, caption, ``.cls``) are read at all."""
    max_caption_bytes: int = 16384
    """Captions longer than this in bytes are skipped and counted (``oversized_caption``) before any cleaning or
    tokenizing: the text tower reads at most context_length tokens (77: a few hundred bytes)."""
    allow_compressed_tars: bool = False
    """Read gzip/bzip2/xz-compressed tar streams (counted ``compressed_tar`` and skipped otherwise): a compressed
    stream inflates without a bound known in advance (the member limits above still hold)."""
    decode: str = "fast"
    """Image decoding (``fast=`` of the transforms): "fast" decodes JPEGs with libjpeg-turbo, at a reduced DCT
    scale when the crop allows it (same crop geometry, pixels within a grey level); "pil": PIL + torchvision,
    open_clip's exact pixels."""

    def validate(self, prefix: str) -> None:
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers: must be >= 0 (got {self.num_workers})")
        if self.num_streams is not None and self.num_streams < 0:
            raise ValueError(f"{prefix}.num_streams: must be >= 0 or null (got {self.num_streams})")
        if self.train.urls is None and self.train.sources is None and self.synthetic.root is None:
            raise ValueError(f"{prefix}.train.urls: required (or set {prefix}.synthetic.root for synthetic data)")
        for name in ("max_member_bytes", "max_caption_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"{prefix}.max_bad_fraction: must be in [0, 1] (got {self.max_bad_fraction})")
        if self.bad_min_samples < 1:
            raise ValueError(f"{prefix}.bad_min_samples: must be >= 1 (got {self.bad_min_samples})")
        if self.max_image_pixels < 1:
            raise ValueError(f"{prefix}.max_image_pixels: must be >= 1 (got {self.max_image_pixels})")
        if self.decode not in DECODE_CHOICES:
            raise ValueError(f"{prefix}.decode: must be one of {', '.join(DECODE_CHOICES)} (got {self.decode!r})")
        self.train.validate(f"{prefix}.train")
        self.eval.validate(f"{prefix}.eval")
        self.synthetic.validate(f"{prefix}.synthetic")
        self.naflex.validate(f"{prefix}.naflex")
