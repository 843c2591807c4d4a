"""Shards with every data fault of mmpretrain.data.pipeline.DATA_FAULT_REASONS injected a known number of times.

    spec, expected = write_faulty_shards(tmp_path / "faulty")
    # data.train.urls=spec, data.max_image_pixels=FAULTY_MAX_IMAGE_PIXELS (or the value passed)

``expected[reason]`` is how often one full pass over ``spec`` meets each fault; ``<out_dir>/faults.json``
also lists the good captions (each good sample has a unique one) and the per-shard fault counts.

Layout (``faulty-{0..6}.tar``, ``repeat`` copies of every sample-level fault):
    0  good samples + a corrupt JPEG (JPEG magic, garbage after) + a caption without image
       + an image without caption
    1  good samples + an empty (whitespace) caption + a non-UTF-8 caption + a zero-byte jpg
       + a zero-byte caption + an oversized image (a real JPEG with more pixels than max_image_pixels)
       + a caption over max_caption_bytes + an image member over max_member_bytes (neither is read)
    2  good samples, then the tar is cut in the middle of the next sample's jpg data: by the counting
       rule that is 1 truncated_tar, the samples before the cut are read normally, the cut sample is lost
    3  missing (listed in the spec, no file)                           -> unreadable_shard
    4  not a tar (text bytes)                                          -> unreadable_shard
    5  good samples only
    6  a gzip-compressed tar of good samples                         -> compressed_tar (none read)
``write_broken_run_shard`` writes the shard-abandoning case apart (it would dominate the bad fraction here).
Pass ``data.max_member_bytes=FAULTY_MAX_MEMBER_BYTES`` and ``data.max_caption_bytes=FAULTY_MAX_CAPTION_BYTES``.
Images are tiny (``image_size`` pixels a side; the oversized one is 4x that a side), so a pass is fast.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from mmpretrain.data.pipeline import DATA_FAULT_REASONS
from mmpretrain.data.shards import ShardWriter

FAULTY_MAX_IMAGE_PIXELS = 1024  # good images have 8 x 8 = 64 pixels, the oversized one 33 x 33 = 1089
FAULTY_MAX_MEMBER_BYTES = 8192  # the oversized image's JPEG is ~1-2 KB: under it; the oversized member is 16 KB
FAULTY_MAX_CAPTION_BYTES = 256
MANIFEST = "faults.json"
APART = ("abandoned_shard",)  # reasons injected apart (write_broken_run_shard), 0 in write_faulty_shards' set


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_faulty_shards(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    good_per_shard: int = 6,
    repeat: int = 1,
    image_size: int = 8,
    max_image_pixels: int = FAULTY_MAX_IMAGE_PIXELS,
) -> tuple[str, dict[str, int]]:
    """Write the shards described in the module docstring; returns (brace spec, faults per pass by reason).

    ``max_image_pixels`` is the limit the loader will be given: good images stay under it, the oversized
    ones go over it. ``repeat`` multiplies every sample-level fault (not the shard-level ones).
    """
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if image_size * image_size > max_image_pixels:
        raise ValueError(f"image_size {image_size} is over max_image_pixels {max_image_pixels} itself")
    rng = np.random.default_rng(seed)
    side = int(max_image_pixels**0.5) + 1  # side x side > max_image_pixels
    good: list[str] = []

    def good_samples(shard: int, count: int) -> list[dict]:
        out = []
        for i in range(count):
            caption = f"ok{shard}x{i}"
            good.append(caption)
            out.append({"__key__": f"s{shard}g{i:03d}", "jpg": _jpeg(rng, image_size, image_size), "txt": caption})
        return out

    def write(index: int, samples: list[dict]) -> str:
        name = f"faulty-{index}.tar"
        with ShardWriter(out_dir, samples_per_shard=len(samples) + 1, name_format=name) as w:
            for sample in samples:
                w.write(sample)
        return os.path.join(out_dir, name)

    def jpg() -> bytes:
        return _jpeg(rng, image_size, image_size)

    shard0 = good_samples(0, good_per_shard)  # faults after the good samples: the shuffle mixes them in
    for r in range(repeat):
        shard0 += [
            {"__key__": f"s0corrupt{r}", "jpg": b"\xff\xd8\xff\xe0" + b"not the rest of a jpeg" * 4, "txt": "corrupt"},
            {"__key__": f"s0noimage{r}", "txt": "a caption without an image"},
            {"__key__": f"s0nocaption{r}", "jpg": jpg()},
        ]
    write(0, shard0)

    shard1 = good_samples(1, good_per_shard)
    for r in range(repeat):
        shard1 += [
            {"__key__": f"s1blank{r}", "jpg": jpg(), "txt": " \t\n "},
            {"__key__": f"s1latin1{r}", "jpg": jpg(), "txt": "caf\xe9 cr\xe8me".encode("latin-1")},
            {"__key__": f"s1zerojpg{r}", "jpg": b"", "txt": "zero-byte image"},
            {"__key__": f"s1zerotxt{r}", "jpg": jpg(), "txt": b""},
            {"__key__": f"s1big{r}", "jpg": _jpeg(rng, side, side), "txt": "too many pixels"},
            {"__key__": f"s1longtxt{r}", "jpg": jpg(), "txt": "a caption far too long " * 20},
            {"__key__": f"s1hugejpg{r}", "jpg": b"\xff\xd8" + bytes(2 * FAULTY_MAX_MEMBER_BYTES), "txt": "huge"},
        ]
    write(1, shard1)

    # shard 2: good samples, then one more whose jpg is cut in the middle of its data
    shard2_good = good_samples(2, good_per_shard)
    lost = {"__key__": "s2lost", "jpg": jpg(), "txt": "lost in the cut"}
    path2 = write(2, shard2_good + [lost, {"__key__": "s2after", "jpg": jpg(), "txt": "after the cut"}])
    with tarfile.open(path2) as tar:
        member = tar.getmember("s2lost.jpg")
        cut = member.offset_data + member.size // 2
    with open(path2, "rb") as f:
        data = f.read()
    with open(path2, "wb") as f:
        f.write(data[:cut])

    with open(os.path.join(out_dir, "faulty-4.tar"), "wb") as f:  # 3 stays missing
        f.write(b"this is a text file, not a tar archive\n" * 40)

    write(5, good_samples(5, good_per_shard))

    # 6: a gzip-compressed tar (refused unless data.allow_compressed_tars); its samples are not good ones
    import gzip

    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for i in range(3):
            for ext, data in (("jpg", jpg()), ("txt", f"inside gzip {i}".encode())):
                info = tarfile.TarInfo(f"s6g{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(out_dir, "faulty-6.tar"), "wb") as f:
        f.write(gzip.compress(plain.getvalue()))

    per_shard = {
        "faulty-0.tar": {"corrupt_image": repeat, "no_image": repeat, "no_caption": repeat},
        "faulty-1.tar": {
            "empty_caption": repeat,
            "bad_utf8": repeat,
            "zero_byte": 2 * repeat,
            "oversized_image": repeat,
            "oversized_caption": repeat,
            "oversized_member": repeat,
        },
        "faulty-2.tar": {"truncated_tar": 1},
        "faulty-3.tar": {"unreadable_shard": 1},
        "faulty-4.tar": {"unreadable_shard": 1},
        "faulty-6.tar": {"compressed_tar": 1},
    }
    expected = {reason: sum(c.get(reason, 0) for c in per_shard.values()) for reason in DATA_FAULT_REASONS}
    assert all(n for r, n in expected.items() if r not in APART), "every other reason is injected"
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        manifest = {"expected": expected, "per_shard": per_shard, "good_captions": good}
        json.dump({**manifest, "max_image_pixels": max_image_pixels}, f, indent=1)
    return os.path.join(out_dir, "faulty-{0..6}.tar"), expected


def write_broken_run_shard(path: str | os.PathLike, broken: int, good: int = 4, seed: int = 0) -> list[str]:
    """One shard: ``broken`` captions without an image, then ``good`` good samples; returns the good captions.
    With broken >= ABANDON_SHARD_AFTER the loader gives the shard up: ABANDON_SHARD_AFTER no_image + 1
    abandoned_shard, and the good samples after the run are never read."""
    rng = np.random.default_rng(seed)
    out_dir, name = os.path.split(str(path))
    captions = [f"late good {i}" for i in range(good)]
    with ShardWriter(out_dir, samples_per_shard=broken + good + 1, name_format=name) as w:
        for i in range(broken):
            w.write({"__key__": f"n{i:06d}", "txt": "no image"})
        for i, caption in enumerate(captions):
            w.write({"__key__": f"g{i:06d}", "jpg": _jpeg(rng, 8, 8), "txt": caption})
    return captions


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """``{"expected", "per_shard", "good_captions", "max_image_pixels"}`` as written by write_faulty_shards."""
    with open(os.path.join(str(out_dir), MANIFEST), encoding="utf-8") as f:
        return json.load(f)
