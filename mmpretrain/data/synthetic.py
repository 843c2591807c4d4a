"""Synthetic image-text data: colored shapes on colored backgrounds, for the demo and the tests.

32 classes = 8 foreground colors x 4 shapes. Each image is one shape (random size and position)
on a plain background of another color; its caption always names the foreground color and the
shape ("a red circle on a blue background", "a photo of a small red circle", ...), so a tiny
CLIP learns zero-shot classification of these classes within minutes on a CPU.

``write_shapes_dataset(root)`` writes:

    <root>/train/shard-000000.tar ...      <key>.jpg + <key>.txt + <key>.json (+ <key>.cls with train_labels),
                                           and _stats.json
    <root>/eval/test/0.tar ...             clip_benchmark zero-shot layout: <key>.jpg + <key>.cls,
    <root>/eval/classnames.txt             with nshards.txt in test/
    <root>/eval/zeroshot_classification_templates.txt
    <root>/retrieval/test/0.tar ...        clip_benchmark retrieval layout: <key>.jpg + <key>.txt
    <root>/retrieval/dataset_type.txt      (several captions, one a line)
    <root>/_DONE                           marker (JSON of the parameters), written last

Its eval sets are named "shapes" in evaluation results (``synthetic_set_name``): zeroshot/shapes/top1, ...

Everything is a pure function of the parameters; train and the two eval sets use distinct seeds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .config import DataConfig, SyntheticConfig
from .shards import ShardWriter, encode_image

# name -> RGB; the first 8 are foreground colors (classes), all 10 can be backgrounds
COLORS = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 225, 40),
    "purple": (135, 45, 185),
    "pink": (250, 135, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (125, 80, 35),
}
FOREGROUND_COLORS = list(COLORS)[:8]
SHAPES = ["circle", "square", "triangle", "cross"]
CLASSNAMES = [f"{color} {shape}" for color in FOREGROUND_COLORS for shape in SHAPES]  # class index order

# zero-shot prompts, clip_benchmark style: one template a line, {c} is the class name
TEMPLATES = ["a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "an image of a {c} on a background."]

# caption wordings; all name the foreground color and shape ({size} is "small"/"large"/"")
CAPTION_FORMATS = [
    "a {fg} {shape} on a {bg} background",
    "a photo of a {size}{fg} {shape}",
    "{fg} {shape}, {bg} background",
    "a {size}{fg} {shape}",
    "a drawing of a {fg} {shape} on {bg}",
    "{bg} background with a {size}{fg} {shape}",
    "an image of a {fg} {shape}",
]

MARKER = "_DONE"
SET_NAME = "shapes"  # what evaluation calls the eval sets: zeroshot/shapes/top1, retrieval/shapes/...
ZEROSHOT_DIR, RETRIEVAL_DIR = "eval", "retrieval"  # the two eval sets, under the root
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges even at 32 px

# distinct seed streams for the three splits
_TRAIN, _ZEROSHOT, _RETRIEVAL = 0, 1, 2


@dataclass
class ShapeSample:
    image: Image.Image
    label: int  # index into CLASSNAMES
    fg: str
    bg: str
    shape: str
    size_word: str  # "small " / "large " / "" (with the trailing space, for the caption formats)
    frac: float = 0.0  # circumradius / image side (0.22..0.45)
    cx: float = 0.5  # shape centre / image side, from the left
    cy: float = 0.5  # shape centre / image side, from the top


def shape_box(shape: str, cx: float, cy: float, frac: float) -> list[float]:
    """The drawn shape's bounding box [x0, y0, x1, y1] as fractions of the image side (as _draw_shape draws it)."""
    if shape == "square":
        hx = hy0 = hy1 = frac / math.sqrt(2) * 1.15
    elif shape == "triangle":  # vertices at -90, 30 and 150 degrees
        hx, hy0, hy1 = frac * math.cos(math.pi / 6), frac, frac * 0.5
    else:  # circle, cross
        hx = hy0 = hy1 = frac
    return [round(min(1.0, max(0.0, v)), 4) for v in (cx - hx, cy - hy0, cx + hx, cy + hy1)]


def region(sample: ShapeSample) -> dict:
    """The sample's one region (mmpretrain.data.regions): the shape's box and its words, e.g. "small red circle"."""
    return {"box": shape_box(sample.shape, sample.cx, sample.cy, sample.frac),
            "text": f"{sample.size_word}{sample.fg} {sample.shape}"}  # fmt: skip


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw ``shape`` of circumradius ``r`` centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r / math.sqrt(2) * 1.15  # a bit larger than inscribed: similar visual area to the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.38  # half the bar width
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _jitter(rgb: tuple[int, int, int], noise: np.ndarray) -> tuple[int, int, int]:
    """Small per-channel color noise (``noise`` in [0, 1)^3 -> +-12) so a color is not one exact RGB value."""
    return tuple(min(255, max(0, c + int(n * 25) - 12)) for c, n in zip(rgb, noise))


def make_shape_sample(rng: np.random.Generator, image_size: int) -> ShapeSample:
    # one draw for everything: numpy's per-call overhead dominates at this size
    u = rng.random(12)
    fg = FOREGROUND_COLORS[int(u[0] * len(FOREGROUND_COLORS))]
    shape = SHAPES[int(u[1] * len(SHAPES))]
    bg_choices = [c for c in COLORS if c != fg]
    bg = bg_choices[int(u[2] * len(bg_choices))]
    big = image_size * _SUPERSAMPLE
    # circumradius 22%..45% of the side: at 32 px a shape spans 14..29 px
    frac = 0.22 + 0.23 * u[3]
    r = frac * big
    cx, cy = r + (big - 2 * r) * u[4], r + (big - 2 * r) * u[5]
    img = Image.new("RGB", (big, big), _jitter(COLORS[bg], u[6:9]))
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, _jitter(COLORS[fg], u[9:12]))
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    size_word = "small " if frac < 0.29 else "large " if frac > 0.38 else ""
    label = CLASSNAMES.index(f"{fg} {shape}")
    return ShapeSample(img, label, fg, bg, shape, size_word, frac=float(frac), cx=float(cx / big), cy=float(cy / big))


def caption(sample: ShapeSample, fmt_index: int) -> str:
    return CAPTION_FORMATS[fmt_index].format(fg=sample.fg, bg=sample.bg, shape=sample.shape, size=sample.size_word)


def _progress(total: int, desc: str):
    """tqdm bar for large counts only (small test datasets stay quiet)."""
    return tqdm(total=total, desc=desc, unit="img", disable=total < 5000, mininterval=1.0)


def _write_train(out_dir: str, num: int, samples_per_shard: int, image_size: int, seed: int, labels: bool) -> dict:
    rng = np.random.default_rng([seed, _TRAIN])
    bar = _progress(num, "writing synthetic shapes (train split)")  # not "train": the training bar comes later
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer, bar:
        for i in range(num):
            s = make_shape_sample(rng, image_size)
            text = caption(s, int(rng.integers(len(CAPTION_FORMATS))))
            meta = {"label": s.label, "classname": CLASSNAMES[s.label], "background": s.bg, "regions": [region(s)]}
            sample = {"__key__": f"{i:08d}", "jpg": encode_image(s.image), "txt": text, "json": meta}
            if labels:  # the class index as an ImageNet-style labelled shard carries it (UniCL)
                sample["cls"] = s.label
            writer.write(sample)
            bar.update()
    return {"num_samples": num, "num_shards": len(writer.shards)}


def _write_eval(out_dir: str, num: int, image_size: int, seed: int, retrieval: bool) -> None:
    """clip_benchmark layout: <out_dir>/test/{0..n-1}.tar + nshards.txt, metadata files at <out_dir>."""
    rng = np.random.default_rng([seed, _RETRIEVAL if retrieval else _ZEROSHOT])
    test_dir = os.path.join(out_dir, "test")
    with ShardWriter(test_dir, samples_per_shard=max(1, math.ceil(num / 2)), name_format="{:d}.tar") as writer:
        for i in range(num):
            s = make_shape_sample(rng, image_size)
            sample = {"__key__": f"{i:08d}", "jpg": encode_image(s.image)}
            if retrieval:  # three different wordings of the same image, one a line
                fmts = rng.choice(len(CAPTION_FORMATS), size=3, replace=False)
                sample["txt"] = "\n".join(caption(s, int(k)) for k in fmts)
                sample["json"] = {"regions": [region(s)]}  # the grounding eval reads them (mmpretrain.eval.grounding)
            else:
                sample["cls"] = s.label
            writer.write(sample)
    with open(os.path.join(test_dir, "nshards.txt"), "w") as f:
        f.write(f"{len(writer.shards)}\n")
    if retrieval:
        with open(os.path.join(out_dir, "dataset_type.txt"), "w") as f:
            f.write("retrieval\n")
    else:
        with open(os.path.join(out_dir, "classnames.txt"), "w") as f:
            f.write("\n".join(CLASSNAMES) + "\n")
        with open(os.path.join(out_dir, "zeroshot_classification_templates.txt"), "w") as f:
            f.write("\n".join(TEMPLATES) + "\n")


@dataclass
class SyntheticPaths:
    root: str
    train_urls: str  # brace spec of the train shards
    zeroshot_root: str
    retrieval_root: str
    num_train: int


def _paths(root: str, params: dict) -> SyntheticPaths:
    n = params["num_train_shards"]
    return SyntheticPaths(
        root=root,
        train_urls=os.path.join(root, "train", f"shard-{{000000..{n - 1:06d}}}.tar"),
        zeroshot_root=os.path.join(root, ZEROSHOT_DIR),
        retrieval_root=os.path.join(root, RETRIEVAL_DIR),
        num_train=params["num_train"],
    )


def write_shapes_dataset(
    root: str | os.PathLike,
    *,
    num_train: int = 20000,
    samples_per_shard: int = 1000,
    num_eval: int = 1024,
    image_size: int = 32,
    seed: int = 0,
    train_labels: bool = False,
) -> SyntheticPaths:
    """Write the dataset at ``root`` unless the same one is already there; returns its paths.

    Idempotent: a root holding our marker with the same parameters is reused; one with other
    parameters (ours, by the marker) is regenerated. A non-empty folder without the marker is
    never touched (ValueError). The data is written into a sibling temp folder and renamed into
    place, so several ranks calling this at once all end up with one complete dataset.
    ``train_labels``: the train samples also carry ``<key>.cls`` (their class index, as in the eval set);
    the images, captions and order are the same either way.
    """
    root = os.path.abspath(os.fspath(root))
    params = {
        "version": 2,  # 2: train and retrieval samples' json carries "regions" (the shape's box)
        "num_train": num_train,
        "samples_per_shard": samples_per_shard,
        "num_eval": num_eval,
        "image_size": image_size,
        "seed": seed,
        "num_train_shards": math.ceil(num_train / samples_per_shard),
    }
    if train_labels:  # only then: the marker of a dataset written without the option stays the same
        params["train_labels"] = True
    existing = _read_marker(root)
    if existing == params:
        return _paths(root, params)
    if existing is None and os.path.isdir(root) and os.listdir(root):
        raise ValueError(
            f"{root}: exists, is not empty and holds no synthetic dataset ({MARKER} missing); refusing to write there"
        )
    tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_train(os.path.join(tmp, "train"), num_train, samples_per_shard, image_size, seed, train_labels)
        _write_eval(os.path.join(tmp, ZEROSHOT_DIR), num_eval, image_size, seed, retrieval=False)
        _write_eval(os.path.join(tmp, RETRIEVAL_DIR), num_eval, image_size, seed, retrieval=True)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(params, f, indent=1)
        _move_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root, params)


def synthetic_set_name(root: str) -> str | None:
    """SET_NAME when ``root`` is one of a synthetic dataset's eval sets (its parent holds our marker), else None."""
    root = os.path.abspath(root)
    if os.path.basename(root) not in (ZEROSHOT_DIR, RETRIEVAL_DIR):
        return None
    return SET_NAME if _read_marker(os.path.dirname(root)) is not None else None


def _read_marker(root: str) -> dict | None:
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _move_into_place(tmp: str, root: str, params: dict) -> None:
    os.makedirs(os.path.dirname(root), exist_ok=True)
    if _read_marker(root) is not None:  # an older synthetic dataset of ours: move it aside, then delete it
        old = f"{tmp}.old"
        os.rename(root, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, root)  # replaces an empty directory atomically
    except OSError:
        # another process finished first; fine if it wrote the same dataset
        if _read_marker(root) != params:
            raise


def ensure_synthetic(cfg: SyntheticConfig) -> SyntheticPaths:
    """Generate the dataset of ``cfg`` at ``cfg.root`` if it is not there yet; returns its paths."""
    if cfg.root is None:
        raise ValueError("data.synthetic.root: not set")
    return write_shapes_dataset(
        cfg.root,
        num_train=cfg.num_train,
        samples_per_shard=cfg.samples_per_shard,
        num_eval=cfg.num_eval,
        image_size=cfg.image_size,
        seed=cfg.seed,
        train_labels=cfg.train_labels,
    )


def with_synthetic_data(cfg: DataConfig) -> DataConfig:
    """Fill unset train urls / eval roots from the synthetic dataset (generated if absent); returns a copy.

    Does nothing when ``cfg.synthetic.root`` is unset. Call it on every rank (writing is race-safe),
    or on rank 0 followed by a barrier.
    """
    if cfg.synthetic.root is None:
        return cfg
    paths = ensure_synthetic(cfg.synthetic)
    out = copy.deepcopy(cfg)
    if out.train.urls is None and out.train.sources is None:
        out.train.urls = paths.train_urls
    if out.eval.zeroshot is None:
        out.eval.zeroshot = paths.zeroshot_root
    if out.eval.retrieval is None:
        out.eval.retrieval = paths.retrieval_root
    return out
