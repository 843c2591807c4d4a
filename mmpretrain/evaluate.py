"""Zero-shot classification and image<->text retrieval on clip_benchmark-layout WebDatasets.

    python -m mmpretrain.evaluate outputs/demo                   # the run's eval sets (data.eval)
    python -m mmpretrain.evaluate outputs/demo/checkpoints/step_500 --zeroshot data/shapes/zeroshot --output r.json
    torchrun --nproc_per_node=8 -m mmpretrain.evaluate RUN --retrieval /data/flickr30k

Dataset layout (clip_benchmark's WebDataset export). A zero-shot set is a folder holding
`classnames.txt` (one class a line), `zeroshot_classification_templates.txt` (one prompt a
line, `{c}` marks the class name) and tar shards of `<key>.webp|jpg|jpeg|png` + `<key>.cls`
(class index). A retrieval set holds shards of an image + `<key>.txt` (one caption a line,
several per image). Shards sit in `<root>/<split>/*.tar` (split `test` unless
`data.eval.split` says otherwise). The folder's name names the set in the results:
`zeroshot/<name>/top1`, `retrieval/<name>/image_to_text_R@1`.

Distributed. The train loop calls `evaluate_all` on every rank. Under ZeRO-3 each rank holds a
slice of the weights and every forward is a collective, so every rank must make the same
forward calls with the same batch shapes: samples are dealt out round-robin (rank r takes
global samples r, r + W, ...), every rank's list is padded to ceil(N / W) with repeats
marked invalid, and correct counts are all-reduced. Retrieval all-gathers the padded
features to every rank, which then all compute the same recalls.

Metric conventions: a query's rank is the number of candidates that score strictly higher
than its best correct candidate, and it is a hit at k when that rank is < k. This equals
`topk` membership when scores have no ties and is deterministic (independent of sharding and
sample order) when they do (duplicate captions embed identically).

Legend: N images, C classes, T texts (prompts or captions), E embedding width, L context
length, K number of k values.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

IMAGE_EXTS = ("webp", "jpg", "jpeg", "png")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@dataclass
class EvalConfig:
    """When to evaluate and what to report (the root config composes it as `eval`).

    The eval sets themselves (roots, split, per-rank batch size) are data: `data.eval.*`.
    """

    every_steps: int = 0
    """Evaluate every this many optimizer steps during training; 0 = only at the end."""
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    """Zero-shot accuracies reported, as `top<k>`."""
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Retrieval recalls reported, as `image_to_text_R@<k>` and `text_to_image_R@<k>`."""
    num_workers: int = 2
    """Image decoding worker processes per rank during eval (0 = decode in the main process)."""

    def validate(self, prefix: str) -> None:
        if self.every_steps < 0:
            raise ValueError(f"{prefix}.every_steps must be >= 0 (got {self.every_steps})")
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers must be >= 0 (got {self.num_workers})")
        for name in ("top_k", "recall_k"):
            ks = getattr(self, name)
            if not ks or any(k <= 0 for k in ks):
                raise ValueError(f"{prefix}.{name} must be a non-empty list of positive ints (got {list(ks)})")


# ----------------------------------------------------------------------------- metric math (pure)


def topk_correct(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(K,) int64: how many rows have their label among the k best-scoring classes, for each k."""
    label_score_N1 = logits_NC.gather(1, labels_N[:, None])
    rank_N = (logits_NC > label_score_N1).sum(1)  # classes strictly better than the label
    return torch.stack([(rank_N < k).sum() for k in ks])


def topk_accuracy(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k best-scoring classes}."""
    correct_K = topk_correct(logits_NC, labels_N, ks)
    return {k: c.item() / len(labels_N) for k, c in zip(ks, correct_K)}


def retrieval_recall(
    img_NE: torch.Tensor,
    txt_TE: torch.Tensor,
    txt_to_img_T: torch.Tensor,
    ks: Sequence[int],
    chunk: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k over normalized features.

    txt_to_img_T[t] is the index of the image caption t belongs to. An image query is a hit
    when any of its captions ranks in the top k; a caption query when its own image does.
    Scores are computed in chunks of `chunk` queries, never a full N x T matrix at once.
    Returns {"image_to_text_R@k": ..., "text_to_image_R@k": ...}.
    """
    num_img, num_txt = len(img_NE), len(txt_TE)
    ks_K = torch.tensor(list(ks), device=img_NE.device)
    i2t_hits_K = torch.zeros(len(ks), dtype=torch.long, device=img_NE.device)
    t2i_hits_K = torch.zeros_like(i2t_hits_K)
    for start in range(0, num_img, chunk):
        scores_nT = img_NE[start : start + chunk] @ txt_TE.T
        own_nT = txt_to_img_T[None, :] == torch.arange(start, start + len(scores_nT), device=img_NE.device)[:, None]
        best_own_n1 = scores_nT.masked_fill(~own_nT, -math.inf).amax(1, keepdim=True)
        rank_n = (scores_nT > best_own_n1).sum(1)
        i2t_hits_K += (rank_n[None, :] < ks_K[:, None]).sum(1)
    for start in range(0, num_txt, chunk):
        scores_tN = txt_TE[start : start + chunk] @ img_NE.T
        own_t1 = scores_tN.gather(1, txt_to_img_T[start : start + chunk, None])
        rank_t = (scores_tN > own_t1).sum(1)
        t2i_hits_K += (rank_t[None, :] < ks_K[:, None]).sum(1)
    out = {}
    for k, hits in zip(ks, i2t_hits_K):
        out[f"image_to_text_R@{k}"] = hits.item() / num_img
    for k, hits in zip(ks, t2i_hits_K):
        out[f"text_to_image_R@{k}"] = hits.item() / num_txt
    return out


# ----------------------------------------------------------------------------- dataset reading


@dataclass
class _Sample:
    """One WebDataset sample inside a tar: where each of its files' bytes lie."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (byte offset in the tar, size)

    def read(self, ext: str) -> bytes:
        offset, size = self.members[ext]
        with open(self.shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def image_ext(self) -> Optional[str]:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def _find_shards(root: Path, split: str, what: str) -> list[str]:
    shards = sorted((root / split).glob("*.tar"))
    if not shards:
        raise ValueError(f"{what}: no file matches '{root / split / '*.tar'}'")
    return [str(s) for s in shards]


def _check_root(root: str, split: str, what: str, files: Sequence[str]) -> Path:
    if "://" in root or root.startswith("pipe:"):
        raise ValueError(f"{what}: eval sets must be local folders (got '{root}')")
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"{what}: no such folder '{root}'")
    for name in files:
        if not (path / name).is_file():
            raise ValueError(f"{what}: missing '{path / name}'")
    _find_shards(path, split, what)
    return path


def check_zeroshot_root(root: str, split: str = "test", what: str = "zeroshot") -> Path:
    """Raise ValueError naming `what` and the path unless `root` is a zero-shot set."""
    return _check_root(root, split, what, (CLASSNAMES_FILE, TEMPLATES_FILE))


def check_retrieval_root(root: str, split: str = "test", what: str = "retrieval") -> Path:
    """Raise ValueError naming `what` and the path unless `root` holds retrieval shards."""
    return _check_root(root, split, what, ())


def _index_samples(shards: Sequence[str], required_ext: str) -> list[_Sample]:
    """Every sample of the shards in order, from the tar headers alone (payloads are seeked over).

    Samples without an image or without `required_ext` are left out with a warning.
    """
    samples: list[_Sample] = []
    for shard in shards:
        with tarfile.open(shard, "r:") as tf:
            for info in tf:
                match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", info.name)  # webdataset's key.ext split
                if not info.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not samples or samples[-1].key != key or samples[-1].shard != shard:
                    samples.append(_Sample(shard, key, {}))
                samples[-1].members[ext] = (info.offset_data, info.size)
    complete = [s for s in samples if s.image_ext() is not None and required_ext in s.members]
    if len(complete) < len(samples):
        where = os.path.dirname(shards[0])
        warnings.warn(
            f"{len(samples) - len(complete)} samples in {where} lack an image or .{required_ext}; skipped",
            stacklevel=2,
        )
    return complete


def _read_all(samples: Sequence[_Sample], ext: str) -> list[str]:
    """The UTF-8 text of member `ext` of every sample, opening each shard once."""
    out, handle, handle_shard = [], None, None
    try:
        for sample in samples:
            if sample.shard != handle_shard:
                if handle is not None:
                    handle.close()
                handle, handle_shard = open(sample.shard, "rb"), sample.shard
            offset, size = sample.members[ext]
            handle.seek(offset)
            out.append(handle.read(size).decode("utf-8"))
    finally:
        if handle is not None:
            handle.close()
    return out


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes this rank's (padded) share of the images into (image CHW, decoded, real).

    `real` is False for padding; `decoded` is False for a broken image, which becomes the
    transform of a black image so that batch shapes (and forward calls) stay the same on every rank.
    """

    def __init__(self, samples: Sequence[_Sample], indices: Sequence[int], real: Sequence[bool], transform):
        self.samples, self.indices, self.real, self.transform = samples, indices, real, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from PIL import Image

        sample = self.samples[self.indices[i]]
        try:
            with Image.open(io.BytesIO(sample.read(sample.image_ext()))) as img:
                return self.transform(img.convert("RGB")), True, self.real[i]
        except Exception as e:  # a broken sample is skipped and counted, never fatal
            warnings.warn(f"skipping broken image {sample.key} in {sample.shard}: {e}", stacklevel=1)
            return self.transform(Image.new("RGB", (256, 256))), False, self.real[i]


def _collate(items):
    images, decoded, real = zip(*items)
    return torch.stack(images), torch.tensor(decoded), torch.tensor(real)


def _image_batches(samples, indices, real, transform, batch_size: int, num_workers: int):
    """(images_BCHW, decoded_B, real_B) batches of this rank's share, in order."""
    dataset = _ImageDataset(samples, indices, real, transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )


# ----------------------------------------------------------------------------- distributed plumbing


@dataclass
class _Ranks:
    """Who evaluates: this rank among `world_size` in `group` (collectives only when world_size > 1)."""

    rank: int
    world_size: int
    group: Optional[object]
    device: torch.device

    def deal(self, num_items: int) -> tuple[list[int], list[bool]]:
        """Round-robin share of range(num_items) for this rank, padded to ceil(N / W) entries.

        Returns (indices, real): padding repeats this rank's first index (or 0) with real=False.
        """
        per_rank = -(-num_items // self.world_size)
        own = list(range(self.rank, num_items, self.world_size))
        num_pad = per_rank - len(own)
        return own + [own[0] if own else 0] * num_pad, [True] * len(own) + [False] * num_pad

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)  # collective
        return t

    def gather_dealt(self, local_n: torch.Tensor, num_items: int) -> torch.Tensor:
        """Undo `deal`: all-gather every rank's padded (n, ...) share; (num_items, ...) in global order."""
        if self.world_size == 1:
            return local_n[:num_items]
        parts = [torch.empty_like(local_n) for _ in range(self.world_size)]
        dist.all_gather(parts, local_n.contiguous(), group=self.group)  # collective
        # rank r's j-th item is global item j * W + r: interleaving the shares restores the order
        # and leaves the padding (j * W + r >= N) at the end.
        return torch.stack(parts, dim=1).flatten(0, 1)[:num_items]

    def check_same(self, values: Sequence[int], what: str) -> None:
        """Every rank must have indexed the same set, or their forward counts would diverge."""
        if self.world_size == 1:
            return
        t = torch.tensor([*values, *(-v for v in values)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)  # collective: max and -min at once
        high, low = t[: len(values)].tolist(), (-t[len(values) :]).tolist()
        if high != low:
            raise ValueError(f"{what}: the ranks read different sample counts (from {low} to {high})")


def _ranks(model, rank, world_size, group, device) -> _Ranks:
    """Explicit rank/world_size, else the group's (or the world's) when torch.distributed is up, else (0, 1)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        else:
            rank, world_size = 0, 1
    assert world_size == 1 or dist.is_initialized(), "world_size > 1 needs an initialized process group"
    assert 0 <= rank < world_size, (rank, world_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _Ranks(rank, world_size, group, device)


# ----------------------------------------------------------------------------- running the model


def _unwrap(model):
    """The plain model inside a DeepSpeed engine or DDP wrapper (ZeRO-3's hooks live on its submodules)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def _inference(model, device: torch.device):
    """no_grad + eval mode (the previous mode is restored) + autocast to the model's dtype when half precision.

    Yields the dtype images must be cast to (the model's), so the first layer sees matching inputs.
    """
    was_training = model.training
    dtype = next(model.parameters()).dtype
    half = dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            yield dtype if half else torch.float32
    finally:
        model.train(was_training)


def _encode_texts(model, tokens_TL: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """(T, E) float32 normalized features, in ceil(T / batch_size) forward calls."""
    feats = [
        model.encode_text(tokens_TL[i : i + batch_size].to(device)).float()
        for i in range(0, len(tokens_TL), batch_size)
    ]
    return torch.cat(feats)


# ----------------------------------------------------------------------------- zero-shot classification


def build_zeroshot_classifier(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 64,
    *,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> torch.Tensor:
    """(C, E) float32 class embeddings: per class, the mean of its normalized prompt embeddings, renormalized.

    Prompts are `template.replace("{c}", classname)`. Under torch.distributed the classes are dealt
    over the ranks (the same forward count on all) and all-reduced: every rank returns the whole classifier.
    """
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    class_ids, real = ranks.deal(len(classnames))
    prompts = [t.replace("{c}", classnames[c]) for c in class_ids for t in templates]
    with _inference(model, ranks.device):
        txt_TE = _encode_texts(model, tokenizer(prompts), batch_size, ranks.device)
    class_cE = F.normalize(txt_TE.view(len(class_ids), len(templates), -1).mean(1), dim=-1)
    classifier_CE = torch.zeros(len(classnames), class_cE.shape[-1], device=ranks.device)
    own = torch.tensor(real, device=ranks.device)
    classifier_CE[torch.tensor(class_ids, device=ranks.device)[own]] = class_cE[own]
    return ranks.all_reduce_sum(classifier_CE)  # each class has one owner: the sum is a gather


def zeroshot_classification(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    transform: Callable,
    split: str = "test",
    batch_size: int = 64,
    top_k: Sequence[int] = (1, 5),
    num_workers: int = 0,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Zero-shot accuracy on a clip_benchmark-layout set: {"top1": .., "top5": .., "num_samples": N}.

    `transform` maps a PIL RGB image to a (3, H, W) tensor (the model's eval transform). Call it on
    every rank of `group`; rank/world_size default to the group's when torch.distributed is initialized.
    """
    path = check_zeroshot_root(root, split, "zeroshot")
    classnames, templates = _lines(path.joinpath(CLASSNAMES_FILE).read_text("utf-8")), []
    templates = _lines(path.joinpath(TEMPLATES_FILE).read_text("utf-8"))
    if not classnames or not templates:
        raise ValueError(f"zeroshot: '{path / CLASSNAMES_FILE}' and '{path / TEMPLATES_FILE}' must not be empty")
    if any("{c}" not in t for t in templates):
        bad = next(t for t in templates if "{c}" not in t)
        raise ValueError(f"zeroshot: template {bad!r} in '{path / TEMPLATES_FILE}' lacks '{{c}}'")
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    samples = _index_samples(_find_shards(path, split, "zeroshot"), "cls")
    labels = [int(x) if x.strip().lstrip("-").isdigit() else -1 for x in _read_all(samples, "cls")]
    if not samples or not all(0 <= y < len(classnames) for y in labels):
        bad = next((i for i, y in enumerate(labels) if not 0 <= y < len(classnames)), None)
        what = "no samples" if bad is None else f"sample {samples[bad].key}: class is not in [0, {len(classnames)})"
        raise ValueError(f"zeroshot: '{path}': {what}")
    ranks.check_same([len(samples)], f"zeroshot: '{path}'")

    classifier_CE = build_zeroshot_classifier(
        model, tokenizer, classnames, templates, batch_size, device=ranks.device, rank=ranks.rank,
        world_size=ranks.world_size, group=group,
    )  # fmt: skip
    indices, real = ranks.deal(len(samples))
    labels_n = torch.tensor([labels[i] for i in indices], device=ranks.device)
    counts = torch.zeros(len(top_k) + 2, dtype=torch.long, device=ranks.device)  # correct@k..., evaluated, broken
    start = 0
    with _inference(model, ranks.device) as dtype:
        for images, decoded_B, real_B in _image_batches(samples, indices, real, transform, batch_size, num_workers):
            img_BE = model.encode_image(images.to(ranks.device, dtype))
            logits_BC = img_BE.float() @ classifier_CE.T
            decoded_B, real_B = decoded_B.to(ranks.device), real_B.to(ranks.device)
            labels_B, start = labels_n[start : start + len(images)], start + len(images)
            valid_B = decoded_B & real_B
            counts[:-2] += topk_correct(logits_BC[valid_B], labels_B[valid_B], top_k)
            counts[-2] += valid_B.sum()
            counts[-1] += (real_B & ~decoded_B).sum()
    counts = ranks.all_reduce_sum(counts).tolist()
    num_samples, num_broken = counts[-2], counts[-1]
    if num_broken and ranks.rank == 0:
        warnings.warn(f"zeroshot: {num_broken} broken images in '{path}' were skipped", stacklevel=2)
    out = {f"top{k}": c / max(num_samples, 1) for k, c in zip(top_k, counts[:-2])}
    out["num_samples"] = num_samples
    return out


# ----------------------------------------------------------------------------- retrieval


def retrieval(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    transform: Callable,
    split: str = "test",
    batch_size: int = 64,
    recall_k: Sequence[int] = (1, 5, 10),
    num_workers: int = 0,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Image<->text recall@k on a clip_benchmark-layout retrieval set.

    Returns {"image_to_text_R@k": .., "text_to_image_R@k": .., "num_images": N, "num_texts": T}.
    Images and captions are dealt over the ranks, encoded with the same forward count on every
    rank and all-gathered, so every rank returns the same numbers.
    """
    path = check_retrieval_root(root, split, "retrieval")
    model = _unwrap(model)
    ranks = _ranks(model, rank, world_size, group, device)
    samples = _index_samples(_find_shards(path, split, "retrieval"), "txt")
    # Captions are small: every rank reads them all, so all agree on T and on the caption -> image map.
    captions, txt_to_img = [], []
    for i, text in enumerate(_read_all(samples, "txt")):
        lines = _lines(text)
        captions += lines
        txt_to_img += [i] * len(lines)
    if not captions:
        raise ValueError(f"retrieval: '{path}': no samples with an image and a caption")
    ranks.check_same([len(samples), len(captions)], f"retrieval: '{path}'")
    num_img, num_txt = len(samples), len(captions)

    img_ids, img_real = ranks.deal(num_img)
    txt_ids, _ = ranks.deal(num_txt)
    img_feats, decoded = [], []
    with _inference(model, ranks.device) as dtype:
        for images, decoded_B, _ in _image_batches(samples, img_ids, img_real, transform, batch_size, num_workers):
            img_feats.append(model.encode_image(images.to(ranks.device, dtype)).float())
            decoded.append(decoded_B.to(ranks.device, torch.long))  # gloo all-gathers no bools
        txt_tE = _encode_texts(model, tokenizer([captions[t] for t in txt_ids]), batch_size, ranks.device)
    img_NE = ranks.gather_dealt(torch.cat(img_feats), num_img)
    decoded_N = ranks.gather_dealt(torch.cat(decoded), num_img).bool()
    txt_TE = ranks.gather_dealt(txt_tE, num_txt)

    # A broken image leaves the gallery and takes its captions out of the queries.
    txt_to_img_T = torch.tensor(txt_to_img, device=ranks.device)
    num_broken = int((~decoded_N).sum())
    if num_broken:
        if ranks.rank == 0:
            warnings.warn(f"retrieval: {num_broken} broken images in '{path}' were skipped", stacklevel=2)
        keep_T = decoded_N[txt_to_img_T]
        new_index_N = torch.cumsum(decoded_N.long(), 0) - 1
        img_NE, txt_TE, txt_to_img_T = img_NE[decoded_N], txt_TE[keep_T], new_index_N[txt_to_img_T[keep_T]]
    out = retrieval_recall(img_NE, txt_TE, txt_to_img_T, recall_k)
    out["num_images"], out["num_texts"] = len(img_NE), len(txt_TE)
    return out


# ----------------------------------------------------------------------------- all configured sets


def set_name(root: str) -> str:
    """The name a set's results are keyed by: its folder's name."""
    return Path(root).resolve().name


def evaluate_all(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data_cfg,
    eval_cfg: EvalConfig,
    *,
    image_size: int,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Every set named in `data_cfg` (`data.eval`: zeroshot, retrieval, split, batch_size).

    Keys: "zeroshot/<folder>/top1", ..., "retrieval/<folder>/image_to_text_R@1", ...; {} when no
    set is configured. Call it on every rank; every rank returns the same dict.
    """
    from mmpretrain.data.transforms import EvalTransform

    common = dict(
        transform=EvalTransform(image_size), split=data_cfg.split, batch_size=data_cfg.batch_size,
        num_workers=eval_cfg.num_workers, device=device, rank=rank, world_size=world_size, group=group,
    )  # fmt: skip
    results: dict[str, float] = {}
    if data_cfg.zeroshot is not None:
        r = zeroshot_classification(model, tokenizer, data_cfg.zeroshot, top_k=eval_cfg.top_k, **common)
        results.update({f"zeroshot/{set_name(data_cfg.zeroshot)}/{k}": v for k, v in r.items()})
    if data_cfg.retrieval is not None:
        r = retrieval(model, tokenizer, data_cfg.retrieval, recall_k=eval_cfg.recall_k, **common)
        results.update({f"retrieval/{set_name(data_cfg.retrieval)}/{k}": v for k, v in r.items()})
    return results


# ----------------------------------------------------------------------------- CLI


def format_table(results: dict[str, float]) -> str:
    width = max([len(k) for k in results] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, value in results.items():
        lines.append(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return "\n".join(lines)


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.evaluate",
        description="Zero-shot classification and image-text retrieval of a trained run or checkpoint.",
    )
    p.add_argument("checkpoint", help="run folder (uses checkpoints/latest) or a checkpoints/step_<N> folder")
    p.add_argument("--zeroshot", help="zero-shot set root (default: data.eval.zeroshot of the run)")
    p.add_argument("--retrieval", help="retrieval set root (default: data.eval.retrieval of the run)")
    p.add_argument("--split", help="shard folder under each root (default: data.eval.split of the run)")
    p.add_argument("--batch-size", type=int, help="images per forward pass per rank (default: data.eval.batch_size)")
    p.add_argument("--num-workers", type=int, help="image decoding workers per rank (default: eval.num_workers)")
    p.add_argument("--output", help="also write the results here as JSON")
    return p.parse_args(argv)


def _run(args) -> dict[str, float]:
    """Load, evaluate, return the results (on every rank); user errors raise ValueError."""
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint: no such folder '{args.checkpoint}'")
    split = args.split or "test"
    if args.zeroshot is not None:
        check_zeroshot_root(args.zeroshot, split, "--zeroshot")
    if args.retrieval is not None:
        check_retrieval_root(args.retrieval, split, "--retrieval")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")

    from mmpretrain.checkpoint import load_model_from_run
    from mmpretrain.data import Tokenizer
    from mmpretrain.distributed import env_rank_world, init_distributed

    model, cfg = load_model_from_run(args.checkpoint)
    data_cfg, eval_cfg = cfg.data.eval, cfg.eval
    if args.zeroshot is not None or args.retrieval is not None:  # sets named here replace the run's
        data_cfg.zeroshot, data_cfg.retrieval = args.zeroshot, args.retrieval
    if args.split is not None:
        data_cfg.split = args.split
    if args.batch_size is not None:
        data_cfg.batch_size = args.batch_size
    if args.num_workers is not None:
        eval_cfg.num_workers = args.num_workers
    if data_cfg.zeroshot is None and data_cfg.retrieval is None:
        raise ValueError(f"{args.checkpoint}: the run names no eval set (data.eval); pass --zeroshot or --retrieval")
    data_cfg.validate("data.eval")
    eval_cfg.validate("eval")

    if env_rank_world()[1] > 1:  # launched by torchrun / srun: shard the sets over the ranks
        device = init_distributed().device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer = Tokenizer(cfg.model.text.context_length)
    return evaluate_all(model, tokenizer, data_cfg, eval_cfg, image_size=cfg.model.vision.image_size, device=device)


def main(argv=None) -> int:
    """`python -m mmpretrain.evaluate RUN [--zeroshot ROOT] [--retrieval ROOT] [--output results.json]`."""
    from mmpretrain.distributed import env_rank_world

    args = _parse_args(argv)
    is_main = env_rank_world()[0] == 0
    try:
        results = _run(args)
    except ValueError as e:  # user errors: one line, exit code 2, no traceback
        if is_main:
            print(f"mmpretrain.evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if is_main:
        print(format_table(results), flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
            print(f"results written to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
