"""Image decode + augment + collate throughput per CPU core, on real JPEG photos.

    python tools/bench_data.py                          # 400x320 and 1024x768 JPEGs, crop scale 0.9-1.0
    python tools/bench_data.py --crop-scale 0.08 1.0    # open_clip's usual RandomResizedCrop range
    python tools/bench_data.py --workdir /tmp/bench_data --rounds 9

Inputs: the colour photos that ship inside the scikit-image wheel (astronaut, chelsea, coffee, rocket,
motorcycle; no download), cut to random windows of the target aspect ratio (70-100% of the largest
one), resized (bicubic) to each size and saved as baseline JPEG (quality 90, 4:2:0) into one
WebDataset-style tar per size (``<key>.jpg`` + ``<key>.txt``) under --workdir (a temp dir by default).
The sources are 300-741 px wide, so the 1024x768 images are upscaled: smoother, hence smaller files
and cheaper entropy decoding than native photos of that size; the table gives the mean file size.
The tars are read into memory before timing: file IO is not measured.

Measured: encoded bytes -> (3, 224, 224) per image -> ``torch.stack`` of batches of --batch images,
in this one process with ``torch.set_num_threads(1)`` (a DataLoader worker's setting). img/s/core is
images per CPU second of this process (time.process_time): on a shared machine it counts only the time
the process ran, which wall-clock img/s (also given) does not; caches and memory bandwidth shared with
other processes still slow both.

  train, ours fast    TrainTransform(224, scale, fast=True).from_bytes(data, seed)   -> uint8
  train, ours plain   TrainTransform(224, scale, fast=False).from_bytes(data, seed)  -> uint8 (PIL + torchvision)
  train, torchvision  Image.open, convert RGB, RandomResizedCrop(224, scale, bicubic), ToTensor, Normalize -> float
  eval,  ours fast / ours plain / torchvision: the same with resize shorter side + center crop

Each round runs every pipeline once over every image (new seeds each round), interleaved, so load
from other processes hits all of them alike; a cell is the median over rounds, and "x tv" is the
median of the per-round ratios of img/s/core to torchvision's (ratios taken side by side are what
survive a noisy machine). A stage breakdown (CPU ms per image) of the fast train path follows the table.

``--loader``: the whole train loader of one data worker instead (in this process, ``data.num_workers=0``: tar
reading, checks, shuffle buffer, decode + augment, tokenize, collate), on --loader-shards copies of the first
size's tar: the per-rank loader (``data.num_streams=0``, replay resume) side by side with the global order
(data/streams.py) where the worker owns 1 and 4 streams. The buffers' first fill is not timed (one batch first);
then --loader-steps batches of --batch. img/s/core as above; "x per-rank" is the median per-round ratio. Then the
resume cost: samples read from the tars, wall and CPU seconds until the first batch of a restart at step 50 and
at step 1000, from the data state and by replay (medians of --resume-rounds interleaved rounds; a restart here
builds a new loader in this warm process: tokenizer and imports are loaded, so this is the seek and one batch).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mmpretrain.data.decode import EncodedImage, reduction_for, resize_region
from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform

GOALS = {(400, 320): 1000.0, (1024, 768): 400.0}  # train, ours fast: images/s/core (issue #8)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view
    return getattr(skimage.data, name)()


def build_tars(workdir: str, sizes: list[tuple[int, int]], num_images: int, quality: int) -> dict:
    """One tar of ``num_images`` JPEGs per (width, height); returns {size: path}."""
    os.makedirs(workdir, exist_ok=True)
    photos = [Image.fromarray(_photo(n)).convert("RGB") for n in PHOTOS]
    paths = {}
    for width, height in sizes:
        path = os.path.join(workdir, f"photos_{width}x{height}_q{quality}_n{num_images}.tar")
        paths[(width, height)] = path
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(width * 7919 + height)
        with tarfile.open(path + ".tmp", "w") as tf:
            for k in range(num_images):
                src = photos[k % len(photos)]
                # the largest window of the target aspect, shrunk to 70-100%, at a random place
                win_w = min(src.width, src.height * width / height) * rng.uniform(0.7, 1.0)
                win_h = win_w * height / width
                x0, y0 = rng.uniform(0, src.width - win_w), rng.uniform(0, src.height - win_h)
                img = src.resize((width, height), Image.BICUBIC, box=(x0, y0, x0 + win_w, y0 + win_h))
                if k % 2:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=quality)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"{PHOTOS[k % len(PHOTOS)]} {k}".encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)
    return paths


def read_jpegs(path: str) -> list[bytes]:
    with tarfile.open(path) as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]


def pipelines(size: int, scale: tuple[float, float]) -> dict:
    """name -> fn(data, seed) -> (3, size, size) tensor."""
    fast, plain = TrainTransform(size, scale, fast=True), TrainTransform(size, scale, fast=False)
    eval_fast, eval_plain = EvalTransform(size, fast=True), EvalTransform(size, fast=False)
    to_float = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    tv_train = T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC), *to_float])
    tv_eval = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size), *to_float])

    def torchvision_train(data: bytes, seed: int) -> torch.Tensor:
        # unseeded, as in open_clip's loader: torch.manual_seed costs ~0.15 ms here (it queues CUDA seeding too)
        return tv_train(Image.open(io.BytesIO(data)).convert("RGB"))

    return {
        ("train", "ours fast"): fast.from_bytes,
        ("train", "ours plain"): plain.from_bytes,
        ("train", "torchvision"): torchvision_train,
        ("eval", "ours fast"): lambda data, seed: eval_fast.from_bytes(data),
        ("eval", "ours plain"): lambda data, seed: eval_plain.from_bytes(data),
        ("eval", "torchvision"): lambda data, seed: tv_eval(Image.open(io.BytesIO(data)).convert("RGB")),
    }


def images_per_s(fn, datas: list[bytes], seed0: int, batch: int) -> tuple[float, float]:
    """(images per CPU second of this process, images per wall-clock second) over one pass."""
    c0, t0 = time.process_time(), time.perf_counter()
    for b in range(0, len(datas), batch):
        chunk = datas[b : b + batch]
        torch.stack([fn(d, seed0 + b + k) for k, d in enumerate(chunk)])
    return len(datas) / (time.process_time() - c0), len(datas) / (time.perf_counter() - t0)


def stage_ms(datas: list[bytes], size: int, scale: tuple[float, float], batch: int, seed0: int) -> dict:
    """Per-image CPU milliseconds of the fast train path's stages, each timed in its own pass."""
    tf = TrainTransform(size, scale, fast=True)

    def header(d, s):
        enc = EncodedImage(d)
        return enc, tf.crop_params(enc.height, enc.width, s)

    parsed = [header(d, seed0 + k) for k, d in enumerate(datas)]
    out, n = {}, len(datas)
    t0 = time.process_time()
    for k, d in enumerate(datas):
        header(d, seed0 + k)
    out["header + crop draw"] = (time.process_time() - t0) / n * 1e3
    factors = [reduction_for(min(h, w), size) for _, (_, _, h, w) in parsed]
    t0 = time.process_time()
    decoded = [enc.decode(f) for (enc, _), f in zip(parsed, factors)]
    out["decode"] = (time.process_time() - t0) / n * 1e3
    t0 = time.process_time()
    outs = []
    for (pixels, sy, sx), (_, (i, j, h, w)) in zip(decoded, parsed):
        top, left = round(i * sy), round(j * sx)
        outs.append(resize_region(pixels, top, left, round(h * sy), round(w * sx), (size, size)))
    out["crop + resize"] = (time.process_time() - t0) / n * 1e3
    t0 = time.process_time()
    for b in range(0, n, batch):
        torch.stack(outs[b : b + batch])
    out["collate (stack)"] = (time.process_time() - t0) / n * 1e3
    out["decode reductions"] = " ".join(f"1/{f}: {factors.count(f)}" for f in sorted(set(factors)))
    return out


def _loader(urls: str, num_streams: int, batch: int, image_size: int, scale, **kw):
    from mmpretrain.data import DataConfig, Tokenizer, TrainDataConfig, build_train_loader

    cfg = DataConfig(num_workers=0, num_streams=num_streams)
    cfg.train = TrainDataConfig(urls=urls, shuffle_buffer=64, crop_scale=list(scale))
    return build_train_loader(cfg, tokenizer=Tokenizer(context_length=77), image_size=image_size, batch_size=batch,
                              rank=0, world_size=1, seed=0, **kw)  # fmt: skip


def loader_bench(path: str, args, scale) -> None:
    """The --loader table and the resume cost (see the module docstring)."""
    import mmpretrain.data.streams as streams_module

    folder = os.path.join(os.path.dirname(path), "loader_shards")
    os.makedirs(folder, exist_ok=True)
    for i in range(args.loader_shards):
        shard = os.path.join(folder, f"shard-{i:06d}.tar")
        if not os.path.exists(shard):
            os.link(path, shard)  # the same tar under other names: keys repeat, urls differ
    urls = os.path.join(folder, f"shard-{{000000..{args.loader_shards - 1:06d}}}.tar")
    variants = {"per-rank loader (num_streams=0)": 0, "global order, 1 stream a worker": 1,
                "global order, 4 streams a worker": 4}  # fmt: skip
    rates: dict = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, num_streams in variants.items():
            it = iter(_loader(urls, num_streams, args.batch, args.image_size, scale))
            next(it)  # the shuffle buffers fill: not timed
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.loader_steps):
                next(it)
            n = args.loader_steps * args.batch
            rates[name].append((n / (time.process_time() - c0), n / (time.perf_counter() - t0)))
    ref = [c for c, _ in rates["per-rank loader (num_streams=0)"]]
    print(f"\n{os.path.basename(path)} x {args.loader_shards} shards, batch {args.batch}, shuffle buffer 64, "
          f"{args.loader_steps} batches a round, {args.rounds} rounds; {machine()}")  # fmt: skip
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| loader (one worker) | img/s/core | x per-rank | wall img/s |\n|---|---:|---:|---:|")
    for name, values in rates.items():
        cpu, wall = zip(*values)
        ratio = statistics.median(a / b for a, b in zip(cpu, ref))
        print(f"| {name} | {statistics.median(cpu):.0f} | {ratio:.2f}x | {statistics.median(wall):.0f} |")

    reads = [0]
    real = streams_module.read_tar_samples

    def counting(*a, **kw):
        for sample in real(*a, **kw):
            reads[0] += 1
            yield sample

    print("\n| restart at step | from the data state: samples read, s, CPU s | by replay: samples read, s, CPU s |\n"
          "|---|---:|---:|")  # fmt: skip
    small = 8  # 8 streams of 8 images a batch
    it = iter(_loader(urls, 8, small, args.image_size, scale))
    states = {}
    for step in range(1, 1001):
        batch = next(it)
        if step in (50, 1000):
            states[step] = batch["data_state"]
    cells: dict = {(step, how): [] for step in states for how in ("state", "replay")}
    streams_module.read_tar_samples = counting
    try:
        for rep in range(args.resume_rounds):  # interleaved, the order alternating: load hits every cell alike
            for step in list(states) if rep % 2 == 0 else list(states)[::-1]:
                for how, kw in (("state", {"data_state": states[step]}), ("replay", {"start_batch": step})):
                    reads[0], t0, c0 = 0, time.perf_counter(), time.process_time()
                    next(iter(_loader(urls, 8, small, args.image_size, scale, **kw)))
                    cells[step, how].append((reads[0], time.perf_counter() - t0, time.process_time() - c0))
    finally:
        streams_module.read_tar_samples = real

    def cell(values):
        return ", ".join(f"{statistics.median(v):{f}}" for v, f in zip(zip(*values), ("", ".3f", ".3f")))

    for step, state in states.items():
        buffered = sum(len(c["buffer"]) for v in state["streams"].values() for c in v["sources"])
        print(f"| {step} (batch {small}, 8 streams, {buffered} samples buffered) | {cell(cells[step, 'state'])} | "
              f"{cell(cells[step, 'replay'])} |")  # fmt: skip
    print(f"(medians of {args.resume_rounds} interleaved rounds; CPU s: this process's CPU seconds)")


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="where the tars go (default: a temp dir, removed at exit)")
    p.add_argument("--sizes", nargs="+", default=["400x320", "1024x768"], help="WxH of the JPEGs")
    p.add_argument("--crop-scale", nargs=2, type=float, default=[0.9, 1.0], metavar=("LO", "HI"))
    p.add_argument("--image-size", type=int, default=224, help="output side S")
    p.add_argument("--num-images", type=int, default=128, help="JPEGs per size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--loader", action="store_true", help="bench the train loader of one worker (see above)")
    p.add_argument("--loader-shards", type=int, default=24, help="--loader: copies of the tar")
    p.add_argument("--loader-steps", type=int, default=8, help="--loader: batches timed a round")
    p.add_argument("--resume-rounds", type=int, default=7, help="--loader: restarts timed per cell (medians)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    scale = tuple(args.crop_scale)

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    paths = build_tars(args.workdir or tmp.name, sizes, args.num_images, args.quality)
    if args.loader:
        loader_bench(paths[sizes[0]], args, scale)
        print(f"\ncommand: python {' '.join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))}")
        if tmp is not None:
            tmp.cleanup()
        return
    datas = {s: read_jpegs(paths[s]) for s in sizes}
    fns = pipelines(args.image_size, scale)
    for s in sizes:  # warm-up: imports, first-call allocations
        for fn in fns.values():
            fn(datas[s][0], 0)

    load_before = os.getloadavg()[0]
    rates = {(s, name): [] for s in sizes for name in fns}
    for r in range(args.rounds):
        for s in sizes:
            for name, fn in fns.items():
                rates[(s, name)].append(images_per_s(fn, datas[s], r * len(datas[s]), args.batch))
    load_after = os.getloadavg()[0]

    def cell(s, name):
        cpu, wall = zip(*rates[(s, name)])
        ref_cpu = [c for c, _ in rates[(s, (name[0], "torchvision"))]]
        ratio = statistics.median(a / b for a, b in zip(cpu, ref_cpu))
        return f"{statistics.median(cpu):6.0f} | {ratio:5.2f}x | {statistics.median(wall):6.0f}"

    kb = {s: statistics.mean(map(len, datas[s])) / 1e3 for s in sizes}
    head = " | ".join(f"{w}x{h} ({kb[(w, h)]:.0f} kB): img/s/core | x tv | wall img/s" for w, h in sizes)
    print(
        f"\ncrop scale {scale[0]}-{scale[1]}, output {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{args.num_images} images per size, {args.rounds} rounds, 1 thread; {machine()}"
    )
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 1-min load average "
        f"{load_before:.2f} before, {load_after:.2f} after\n"
    )
    print(f"| pipeline | {head} |")
    print("|---|" + "---:|---:|---:|" * len(sizes))
    for name in fns:
        print(f"| {name[0]}, {name[1]} | " + " | ".join(cell(s, name) for s in sizes) + " |")
    goals = " | ".join(f"{GOALS.get(s, float('nan')):6.0f} | |" for s in sizes)
    print(f"| goal (train, ours fast) | {goals} |")

    print("\nfast train path, CPU ms per image, one pass each:\n")
    stages = {s: stage_ms(datas[s], args.image_size, scale, args.batch, 10**6) for s in sizes}
    print("| stage | " + " | ".join(f"{w}x{h}" for w, h in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for key in stages[sizes[0]]:
        vals = [stages[s][key] for s in sizes]
        print(f"| {key} | " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in vals) + " |")
    print(f"\ncommand: python {' '.join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
