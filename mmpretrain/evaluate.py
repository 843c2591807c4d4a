"""Zero-shot classification and image<->text retrieval on clip_benchmark-layout WebDatasets.

    python -m mmpretrain.evaluate outputs/demo                        # the eval sets named in the run's config
    python -m mmpretrain.evaluate outputs/demo/checkpoints/step_500 --zeroshot data/shapes/eval --output r.json
    torchrun --nproc_per_node=8 -m mmpretrain.evaluate RUN --retrieval /data/flickr30k

Dataset layout (clip_benchmark's WebDataset export). A zero-shot set is a folder holding
`classnames.txt` (one class a line), `zeroshot_classification_templates.txt` (one prompt a
line, `{c}` marks the class name) and tar shards of `<key>.webp|jpg|jpeg|png` + `<key>.cls`
(class index). A retrieval set holds shards of an image + `<key>.txt` (one caption a line,
several per image). Shards sit in the folder itself or in its `test/` subfolder. The
folder's name names the set in the results: `zeroshot/<name>/top1`,
`retrieval/<name>/image_to_text_R@1`.

Distributed. The train loop calls `evaluate` on every rank. Under ZeRO-3 each rank holds a
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
    """Periodic and final evaluation (the root config composes it as `eval`)."""

    every_steps: int = 0
    """Evaluate every this many optimizer steps during training; 0 = only at the end."""
    batch_size: int = 256
    """Images (and texts) per forward pass, per rank."""
    zeroshot: Optional[str] = None
    """Root folder of a clip_benchmark-layout zero-shot classification set; None = skip."""
    retrieval: Optional[str] = None
    """Root folder of a clip_benchmark-layout image-text retrieval set; None = skip."""
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    """Zero-shot accuracies reported, as `top<k>`."""
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Retrieval recalls reported, as `image_to_text_R@<k>` and `text_to_image_R@<k>`."""
    num_workers: int = 2
    """Image decoding worker processes per rank (0 = decode in the main process)."""

    def validate(self, prefix: str) -> None:
        if self.every_steps < 0:
            raise ValueError(f"{prefix}.every_steps must be >= 0 (got {self.every_steps})")
        if self.batch_size <= 0:
            raise ValueError(f"{prefix}.batch_size must be > 0 (got {self.batch_size})")
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers must be >= 0 (got {self.num_workers})")
        for name in ("top_k", "recall_k"):
            ks = getattr(self, name)
            if not ks or any(k <= 0 for k in ks):
                raise ValueError(f"{prefix}.{name} must be a non-empty list of positive ints (got {list(ks)})")
        if self.zeroshot is not None:
            check_zeroshot_root(self.zeroshot, f"{prefix}.zeroshot")
        if self.retrieval is not None:
            check_retrieval_root(self.retrieval, f"{prefix}.retrieval")


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
    members: dict[str, tuple]  # extension -> (byte offset, size)

    def read(self, ext: str) -> bytes:
        offset, size = self.members[ext]
        with open(self.shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def image_ext(self) -> Optional[str]:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def _find_shards(root: Path, what: str) -> list[str]:
    shards = sorted(root.glob("*.tar")) or sorted((root / "test").glob("*.tar"))
    if not shards:
        raise ValueError(f"{what}: no .tar shards in '{root}' or '{root / 'test'}'")
    return [str(s) for s in shards]


def _check_root(root: str, what: str, files: Sequence[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"{what}: no such folder '{root}'")
    for name in files:
        if not (path / name).is_file():
            raise ValueError(f"{what}: missing '{path / name}'")
    _find_shards(path, what)
    return path


def check_zeroshot_root(root: str, what: str = "zeroshot") -> Path:
    """Raise ValueError naming `what` and the path unless `root` is a zero-shot set."""
    return _check_root(root, what, (CLASSNAMES_FILE, TEMPLATES_FILE))


def check_retrieval_root(root: str, what: str = "retrieval") -> Path:
    """Raise ValueError naming `what` and the path unless `root` holds retrieval shards."""
    return _check_root(root, what, ())


def _index_samples(shards: Sequence[str], required_ext: str) -> list[_Sample]:
    """Every sample of the shards, in order, from the tar headers alone (no payload is read).

    Samples without an image or without `required_ext` are left out with a warning.
    """
    samples, num_incomplete = [], 0
    for shard in shards:
        with tarfile.open(shard, "r:") as tf:  # seekable: skipping a member's payload is a seek
            for info in tf:
                if not info.isfile():
                    continue
                match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", info.name)  # webdataset's key.ext split
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not samples or samples[-1].key != key or samples[-1].shard != shard:
                    samples.append(_Sample(shard, key, {}))
                samples[-1].members[ext] = (info.offset_data, info.size)
    complete = [s for s in samples if s.image_ext() is not None and required_ext in s.members]
    num_incomplete = len(samples) - len(complete)
    if num_incomplete:
        where = os.path.dirname(shards[0])
        warnings.warn(f"{num_incomplete} samples in {where} lack an image or .{required_ext}; skipped", stacklevel=2)
    return complete


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes this rank's (padded) share of the samples into (image CHW, label, decoded, real).

    `real` is False for padding; `decoded` is False for a broken sample, which becomes the
    transform of a black image so that batch shapes (and forward calls) stay the same on every rank.
    """

    def __init__(self, samples: Sequence[_Sample], indices: Sequence[int], real: Sequence[bool], transform, labels):
        self.samples, self.indices, self.real, self.transform, self.labels = samples, indices, real, transform, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from PIL import Image

        sample = self.samples[self.indices[i]]
        try:
            with Image.open(io.BytesIO(sample.read(sample.image_ext()))) as img:
                image = self.transform(img.convert("RGB"))
            label = self.labels(sample) if self.labels is not None else 0
            return image, label, True, self.real[i]
        except Exception as e:  # a broken sample is skipped and counted, never fatal
            warnings.warn(f"skipping broken sample {sample.key} in {sample.shard}: {e}", stacklevel=2)
            return self.transform(Image.new("RGB", (256, 256))), 0, False, self.real[i]


def _collate(items):
    images, labels, decoded, real = zip(*items)
    return torch.stack(images), torch.tensor(labels), torch.tensor(decoded), torch.tensor(real)


# ----------------------------------------------------------------------------- distributed plumbing


def _world(group) -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _deal(num_items: int, rank: int, world_size: int) -> tuple:
    """Round-robin share of range(num_items) for `rank`, padded to ceil(N / W) entries.

    Returns (indices, real): padding repeats index 0 (or this rank's first) with real=False.
    """
    per_rank = -(-num_items // world_size)
    own = list(range(rank, num_items, world_size))
    pad = own[0] if own else 0
    return own + [pad] * (per_rank - len(own)), [True] * len(own) + [False] * (per_rank - len(own))


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if _world(group)[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)  # collective
    return t


def _gather_dealt(local_nE: torch.Tensor, num_items: int, group) -> torch.Tensor:
    """Undo `_deal`: all-gather every rank's padded (n, ...) share and return (num_items, ...) in global order."""
    world_size = _world(group)[1]
    if world_size == 1:
        return local_nE[:num_items]
    parts = [torch.empty_like(local_nE) for _ in range(world_size)]
    dist.all_gather(parts, local_nE.contiguous(), group=group)  # collective
    # rank r's j-th item is global item j * W + r, so interleaving the shares restores the order
    # and puts the padding (j * W + r >= N) exactly at the end.
    stacked_nW = torch.stack(parts, dim=1)
    return stacked_nW.flatten(0, 1)[:num_items]


def _check_same_on_all_ranks(values: Sequence[int], what: str, device, group) -> None:
    """Every rank must have indexed the same set, or the forward counts would diverge."""
    if _world(group)[1] == 1:
        return
    t = torch.tensor([*values, *(-v for v in values)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # collective: max and -min at once
    high, low = t[: len(values)].tolist(), (-t[len(values) :]).tolist()
    if high != low:
        raise ValueError(f"{what}: ranks see different sample counts (from {low} to {high})")


# ----------------------------------------------------------------------------- running the model


def _unwrap(model):
    """The plain model inside a DeepSpeed engine or DDP wrapper (ZeRO-3 hooks live on its submodules)."""
    return getattr(model, "module", model)


def _model_device_dtype(model) -> tuple:
    p = next(model.parameters())
    return p.device, p.dtype


@contextlib.contextmanager
def _inference(model, device):
    """no_grad + eval mode (restored afterwards) + autocast to the model's dtype when it is half precision."""
    was_training = model.training
    _, dtype = _model_device_dtype(model)
    half = dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if half else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            yield dtype if half else None
    finally:
        model.train(was_training)


def _encode_texts(model, tokens_TL: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """(T, E) float32 normalized features, in ceil(T / batch_size) forward calls."""
    feats = [
        model.encode_text(tokens_TL[i : i + batch_size].to(device)).float()
        for i in range(0, len(tokens_TL), batch_size)
    ]
    return torch.cat(feats) if feats else torch.zeros(0, 0, device=device)


def _image_batches(samples, indices, real, transform, labels, batch_size: int, num_workers: int):
    dataset = _ImageDataset(samples, indices, real, transform, labels)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )


# ----------------------------------------------------------------------------- zero-shot classification


def build_zeroshot_classifier(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    *,
    device=None,
    group=None,
) -> torch.Tensor:
    """(C, E) float32 class embeddings: per class, the mean of its normalized prompt embeddings, renormalized.

    Under torch.distributed the classes are dealt over the ranks (same forward count on all)
    and the embeddings all-reduced, so every rank returns the whole classifier.
    """
    model = _unwrap(model)
    device = device if device is not None else _model_device_dtype(model)[0]
    rank, world_size = _world(group)
    class_ids, real = _deal(len(classnames), rank, world_size)
    prompts = [t.replace("{c}", classnames[c]) for c in class_ids for t in templates]
    with _inference(model, device):
        txt_TE = _encode_texts(model, tokenizer(prompts), batch_size, device)
    num_templates = len(templates)
    class_cE = F.normalize(txt_TE.view(len(class_ids), num_templates, -1).mean(1), dim=-1)
    classifier_CE = torch.zeros(len(classnames), class_cE.shape[-1], device=device)
    mask = torch.tensor(real, device=device)
    classifier_CE[torch.tensor(class_ids, device=device)[mask]] = class_cE[mask]
    return _all_reduce_sum(classifier_CE, group)  # each class is owned by one rank: a sum is a gather


def zeroshot_classification(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    transform: Callable,
    batch_size: int = 256,
    top_k: Sequence[int] = (1, 5),
    num_workers: int = 0,
    device=None,
    group=None,
) -> dict[str, float]:
    """Zero-shot accuracy on a clip_benchmark-layout set: {"top1": .., "top5": .., "num_samples": N}.

    `transform` maps a PIL RGB image to a (3, H, W) tensor (the model's eval transform).
    Runs on every rank of `group` (default: the world when torch.distributed is initialized).
    """
    path = check_zeroshot_root(root, "zeroshot")
    classnames = _read_lines(path / CLASSNAMES_FILE)
    templates = _read_lines(path / TEMPLATES_FILE)
    bad = [t for t in templates if "{c}" not in t]
    if not classnames or not templates or bad:
        raise ValueError(f"zeroshot: '{path}' needs classnames and templates that contain '{{c}}' (got {bad[:1]})")
    model = _unwrap(model)
    device = device if device is not None else _model_device_dtype(model)[0]
    rank, world_size = _world(group)
    samples = _index_samples(_find_shards(path, "zeroshot"), "cls")
    _check_same_on_all_ranks([len(samples)], f"zeroshot: {path}", device, group)
    if not samples:
        raise ValueError(f"zeroshot: no complete samples (image + .cls) in '{path}'")

    classifier_CE = build_zeroshot_classifier(
        model, tokenizer, classnames, templates, batch_size, device=device, group=group
    )
    indices, real = _deal(len(samples), rank, world_size)

    def labels(sample: _Sample) -> int:
        label = int(sample.read("cls").decode().strip())
        if not 0 <= label < len(classnames):
            raise ValueError(f"class {label} is outside [0, {len(classnames)})")  # counted as broken
        return label

    counts = torch.zeros(len(top_k) + 2, dtype=torch.long, device=device)  # correct@k..., evaluated, broken
    with _inference(model, device) as half:
        for images, labels_B, decoded_B, real_B in _image_batches(
            samples, indices, real, transform, labels, batch_size, num_workers
        ):
            images = images.to(device, dtype=half or images.dtype)
            img_BE = model.encode_image(images).float()
            logits_BC = img_BE @ classifier_CE.T
            decoded_B, real_B, labels_B = decoded_B.to(device), real_B.to(device), labels_B.to(device)
            valid_B = decoded_B & real_B
            counts[:-2] += topk_correct(logits_BC[valid_B], labels_B[valid_B], top_k)
            counts[-2] += valid_B.sum()
            counts[-1] += (real_B & ~decoded_B).sum()
    counts = _all_reduce_sum(counts, group)
    num_samples, num_broken = counts[-2].item(), counts[-1].item()
    if num_broken and rank == 0:
        warnings.warn(f"zeroshot: {num_broken} broken images in '{path}' were skipped", stacklevel=2)
    out = {f"top{k}": c.item() / max(num_samples, 1) for k, c in zip(top_k, counts[:-2])}
    out["num_samples"] = num_samples
    return out


# ----------------------------------------------------------------------------- retrieval


def retrieval(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    transform: Callable,
    batch_size: int = 256,
    recall_k: Sequence[int] = (1, 5, 10),
    num_workers: int = 0,
    device=None,
    group=None,
) -> dict[str, float]:
    """Image<->text recall@k on a clip_benchmark-layout retrieval set.

    Returns {"image_to_text_R@k": .., "text_to_image_R@k": .., "num_images": N, "num_texts": T}.
    Images and captions are dealt over the ranks, encoded with the same forward count on
    every rank, and the features all-gathered, so every rank returns the same numbers.
    """
    path = check_retrieval_root(root, "retrieval")
    model = _unwrap(model)
    device = device if device is not None else _model_device_dtype(model)[0]
    rank, world_size = _world(group)
    samples = _index_samples(_find_shards(path, "retrieval"), "txt")
    # Captions are tiny: every rank reads them all, so all agree on T and on the caption -> image map.
    captions, txt_to_img = [], []
    for i, sample in enumerate(samples):
        lines = _read_lines_bytes(sample.read("txt"))
        captions += lines
        txt_to_img += [i] * len(lines)
    _check_same_on_all_ranks([len(samples), len(captions)], f"retrieval: {path}", device, group)
    if not captions:
        raise ValueError(f"retrieval: no complete samples (image + .txt) in '{path}'")
    num_img, num_txt = len(samples), len(captions)

    img_ids, img_real = _deal(num_img, rank, world_size)
    txt_ids, _ = _deal(num_txt, rank, world_size)
    with _inference(model, device) as half:
        img_feats, valid_feats = [], []
        for images, _, decoded_B, _ in _image_batches(
            samples, img_ids, img_real, transform, None, batch_size, num_workers
        ):
            images = images.to(device, dtype=half or images.dtype)
            img_feats.append(model.encode_image(images).float())
            valid_feats.append(decoded_B.to(device, torch.long))  # gloo gathers no bools
        tokens_TL = tokenizer([captions[t] for t in txt_ids])
        txt_tE = _encode_texts(model, tokens_TL, batch_size, device)
    img_NE = _gather_dealt(torch.cat(img_feats), num_img, group)
    decoded_N = _gather_dealt(torch.cat(valid_feats), num_img, group).bool()
    txt_TE = _gather_dealt(txt_tE, num_txt, group)

    # A broken image leaves the gallery and takes its captions out of the queries.
    txt_to_img_T = torch.tensor(txt_to_img, device=device)
    keep_T = decoded_N[txt_to_img_T]
    num_broken = int((~decoded_N).sum().item())
    if num_broken:
        if rank == 0:
            warnings.warn(f"retrieval: {num_broken} broken images in '{path}' were skipped", stacklevel=2)
        new_index_N = torch.cumsum(decoded_N.long(), 0) - 1
        img_NE, txt_TE, txt_to_img_T = img_NE[decoded_N], txt_TE[keep_T], new_index_N[txt_to_img_T[keep_T]]
    out = retrieval_recall(img_NE, txt_TE, txt_to_img_T, recall_k)
    out["num_images"] = len(img_NE)
    out["num_texts"] = len(txt_TE)
    return out


def _read_lines_bytes(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- all configured sets


def evaluate(
    model, tokenizer: Callable, transform: Callable, cfg: EvalConfig, *, device=None, group=None
) -> dict[str, float]:
    """Every set configured in `cfg`, keyed "zeroshot/<folder>/top1", "retrieval/<folder>/image_to_text_R@1", ...

    Call it on every rank; every rank returns the same dict.
    """
    common = dict(transform=transform, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    results: dict[str, float] = {}
    if cfg.zeroshot is not None:
        name = Path(cfg.zeroshot).resolve().name
        r = zeroshot_classification(model, tokenizer, cfg.zeroshot, top_k=cfg.top_k, group=group, **common)
        results.update({f"zeroshot/{name}/{k}": v for k, v in r.items()})
    if cfg.retrieval is not None:
        name = Path(cfg.retrieval).resolve().name
        r = retrieval(model, tokenizer, cfg.retrieval, recall_k=cfg.recall_k, group=group, **common)
        results.update({f"retrieval/{name}/{k}": v for k, v in r.items()})
    return results


# ----------------------------------------------------------------------------- CLI


def format_table(results: dict[str, float]) -> str:
    width = max([len(k) for k in results] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def _init_distributed_from_env():
    """Under torchrun (WORLD_SIZE > 1): join the process group; returns the device to use."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.evaluate",
        description="Zero-shot classification and image-text retrieval of a trained run or checkpoint.",
    )
    p.add_argument("checkpoint", help="run folder (uses checkpoints/latest) or a checkpoints/step_<N> folder")
    p.add_argument("--zeroshot", help="zero-shot set root (default: eval.zeroshot of the run's config)")
    p.add_argument("--retrieval", help="retrieval set root (default: eval.retrieval of the run's config)")
    p.add_argument("--batch-size", type=int, help="per-rank batch size (default: eval.batch_size of the run)")
    p.add_argument("--num-workers", type=int, help="image decoding workers per rank (default: eval.num_workers)")
    p.add_argument("--output", help="write the results here as JSON")
    return p.parse_args(argv)


def _run(args) -> dict[str, float]:
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint: no such folder '{args.checkpoint}'")
    if args.zeroshot is not None:
        check_zeroshot_root(args.zeroshot, "--zeroshot")
    if args.retrieval is not None:
        check_retrieval_root(args.retrieval, "--retrieval")

    from mmpretrain.checkpoint import load_model_from_run

    device = _init_distributed_from_env()
    model, cfg = load_model_from_run(args.checkpoint)
    eval_cfg = EvalConfig(**{k: getattr(cfg.eval, k) for k in EvalConfig.__dataclass_fields__})
    if args.zeroshot is not None or args.retrieval is not None:  # explicit sets replace the run's
        eval_cfg.zeroshot, eval_cfg.retrieval = args.zeroshot, args.retrieval
    if args.batch_size is not None:
        eval_cfg.batch_size = args.batch_size
    if args.num_workers is not None:
        eval_cfg.num_workers = args.num_workers
    if eval_cfg.zeroshot is None and eval_cfg.retrieval is None:
        raise ValueError(f"{args.checkpoint}: no eval set in the run's config; pass --zeroshot or --retrieval")
    eval_cfg.validate("eval")

    tokenizer, transform = _tokenizer_and_transform(model, cfg)
    model.to(device)
    return evaluate(model, tokenizer, transform, eval_cfg, device=device)


def _tokenizer_and_transform(model, cfg):
    """The text tokenizer and image eval transform that match the run's model."""
    from mmpretrain.data import Tokenizer, eval_transform
    from mmpretrain.model import resolve_model_config

    model_cfg = resolve_model_config(cfg.model)
    return Tokenizer(model_cfg.text.context_length), eval_transform(model_cfg.vision.image_size)


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        results = _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = _world(None)[0]
    if rank == 0:
        print(format_table(results))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
            print(f"results written to {args.output}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
