"""mmpretrain-make-shards (mmpretrain/tools/make_shards.py): round trips for every input kind (folder, eval layout,
CSV, TSV, JSONL, parquet, img2dataset), bytes kept or resized as asked, bad rows reported with their line, same tars
for any worker count, refusal of a non-empty output folder; the train and eval loaders read what it writes."""

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmpretrain.tools import make_shards


def save_image(path, height, width, seed, fmt="JPEG", channels=3) -> bytes:
    """A smooth random picture (distinct per seed; smooth so that JPEG keeps it close) saved at ``path``;
    returns the file bytes."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(3, 3, channels), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    with open(path, "rb") as f:
        return f.read()


def read_tars(paths) -> list[dict]:
    """All samples of the tars, in order: {"__key__", ext: bytes, ...}."""
    samples = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def shard_paths(out):
    stats = json.load(open(os.path.join(out, "_stats.json")))
    return [os.path.join(out, s["name"]) for s in stats["shards"]], stats


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run_tool(argv, capsys):
    code = make_shards.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- folder of class subfolders

CLASSES = ["cat", "dog", "red_fox"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """3 class folders x 3 JPEGs (one in a nested folder), a PNG with alpha, a truncated JPEG, a notes file."""
    root = tmp_path_factory.mktemp("photos")
    files = {}  # relative path -> bytes
    for c, cls in enumerate(CLASSES):
        for i in range(3):
            rel = f"{cls}/{'sub/' if i == 2 else ''}{i}.jpg"
            files[rel] = save_image(root / rel, 12 + i, 16, seed=10 * c + i)
    files["dog/x.png"] = save_image(root / "dog/x.png", 10, 10, seed=99, fmt="PNG", channels=4)
    with open(root / "cat/broken.jpg", "wb") as f:
        f.write(files["cat/0.jpg"][:150])
    (root / "cat/notes.txt").write_text("not an image")
    return str(root), files


def test_folder_round_trip_and_train_loader(photos, tmp_path, capsys):
    root, files = photos
    out = tmp_path / "shards"
    code, stdout, _ = run_tool(["folder", root, out, "--samples-per-shard", 4, "--templates", "a photo of a {c}.",
                                "--templates", "a {c}."], capsys)  # fmt: skip
    assert code == 0
    paths, stats = shard_paths(out)
    samples = read_tars(paths)
    assert len(samples) == stats["num_samples"] == 10 and [s["num_samples"] for s in stats["shards"]] == [4, 4, 2]
    # the truncated JPEG is reported with its path, in stdout and _stats.json; the notes file is listed as ignored
    assert stats["skipped"] == [{"reason": "undecodable_image", "where": "cat/broken.jpg", "detail": stats[
        "skipped"][0]["detail"]}]  # fmt: skip
    assert "cat/broken.jpg: undecodable_image" in stdout and stats["ignored_files"]["first"] == ["cat/notes.txt"]
    assert f"wrote 10 samples in 3 shards ({stats['num_bytes'] / 1e6:.1f} MB)" in stdout
    # input order: classes sorted, files sorted by path (natural order); keys = position in that order
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert list(by_source) == ["cat/0.jpg", "cat/1.jpg", "cat/sub/2.jpg", "dog/0.jpg", "dog/1.jpg", "dog/sub/2.jpg",
                               "dog/x.png", "red_fox/0.jpg", "red_fox/1.jpg", "red_fox/sub/2.jpg"]  # fmt: skip
    assert samples[0]["__key__"] == "000000000"
    # image i of a class (broken ones count: they are inputs) gets template i % 2
    template = {"cat/0.jpg": 0, "cat/1.jpg": 1, "cat/sub/2.jpg": 1, "dog/0.jpg": 0, "dog/1.jpg": 1, "dog/sub/2.jpg": 0,
                "dog/x.png": 1, "red_fox/0.jpg": 0, "red_fox/1.jpg": 1, "red_fox/sub/2.jpg": 0}  # fmt: skip
    for rel, s in by_source.items():
        cls = rel.split("/")[0]
        want = ["a photo of a {c}.", "a {c}."][template[rel]].replace("{c}", cls.replace("_", " "))
        assert s["txt"].decode() == want
        meta = json.loads(s["json"])
        assert meta["label"] == CLASSES.index(cls)
        if rel.endswith(".jpg"):  # JPEGs are copied byte for byte
            assert s["jpg"] == files[rel]
            assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(files[rel])).size
    png = by_source["dog/x.png"]  # PNG re-encoded to JPEG (alpha on white)
    assert "png" not in png and Image.open(io.BytesIO(png["jpg"])).format == "JPEG"
    # the printed brace spec is what data.train.urls takes, and the train loader reads it
    spec = stdout.strip().splitlines()[-1].removeprefix("data.train.urls=")
    assert spec == str(out / "shard-{000000..000002}.tar") == stats["urls"]

    from mmpretrain.data import DataConfig, Tokenizer, build_train_loader
    from mmpretrain.data.config import TrainDataConfig

    cfg = DataConfig(num_workers=0, train=TrainDataConfig(urls=spec, shuffle_buffer=10))
    cfg.validate("data")
    tokenizer = Tokenizer(context_length=16)
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=16, batch_size=5, rank=0, world_size=1, seed=0)
    batches = [b for b, _ in zip(loader, range(2))]  # one epoch: the 10 samples
    got = sorted("".join(tokenizer.decode(row).split()) for b in batches for row in b["text"])
    want = sorted("".join(s["txt"].decode().lower().split()) for s in samples)
    assert got == want and batches[0]["image"].shape == (5, 3, 16, 16)
    assert sum(b["num_skipped"] for b in batches) == 0


def test_folder_keep_format_keeps_png_pixels(photos, tmp_path, capsys):
    root, files = photos
    code, stdout, _ = run_tool(["folder", root, tmp_path / "o", "--keep-format"], capsys)
    assert code == 0 and "wrote 10 samples in 1 shard (" in stdout  # not "1 shards"
    samples = read_tars(shard_paths(tmp_path / "o")[0])
    png = next(s for s in samples if json.loads(s["json"])["source"] == "dog/x.png")
    assert png["png"] == files["dog/x.png"]
    np.testing.assert_array_equal(pixels(png["png"]), pixels(files["dog/x.png"]))


def test_eval_layout_read_by_zeroshot_loader(photos, tmp_path, capsys):
    from mmpretrain.data import build_eval_loader, load_zeroshot_set

    root, _ = photos
    out = tmp_path / "eval"
    code, stdout, _ = run_tool(["folder", root, out, "--eval", "--samples-per-shard", 4, "--templates",
                                "a photo of a {c}.", "--templates", "art of the {c}."], capsys)  # fmt: skip
    assert code == 0 and f"data.eval.zeroshot={out}" in stdout
    zs = load_zeroshot_set(str(out))
    assert zs.classnames == ["cat", "dog", "red fox"]
    assert zs.templates == ["a photo of a {c}.", "art of the {c}."]
    assert zs.urls == [str(out / "test" / f"{i}.tar") for i in range(3)]  # via test/nshards.txt
    samples = read_tars(zs.urls)
    want = [CLASSES.index(json.loads(s["json"])["source"].split("/")[0]) for s in samples]
    assert [int(s["cls"]) for s in samples] == want and "txt" not in samples[0]
    loader = build_eval_loader(zs.urls, task="zeroshot", image_size=16, batch_size=4)
    labels = [int(x) for b in loader for x in b["label"]]
    assert labels == want and len(labels) == 10


def test_templates_and_classnames_errors(photos, tmp_path, capsys):
    root, _ = photos
    code, _, err = run_tool(["folder", root, tmp_path / "a", "--templates", "a photo"], capsys)
    assert code == 2 and "--templates: 'a photo' has no '{c}'" in err
    names = tmp_path / "names.txt"
    names.write_text("kitty\npuppy\n")
    code, _, err = run_tool(["folder", root, tmp_path / "b", "--classnames", names], capsys)
    assert code == 2 and "--classnames" in err and "2 names for 3 class folders" in err
    code, _, err = run_tool(["folder", tmp_path / "nope", tmp_path / "c"], capsys)
    assert code == 2 and "no such folder" in err
    code, _, err = run_tool(["folder", root, os.path.join(root, "shards")], capsys)
    assert code == 2 and "inside the input folder" in err


# ----------------------------------------------------------------------------- resize / quality / workers


def test_resize_shorter_only_shrinks_and_quality_reencodes(tmp_path, capsys):
    src = tmp_path / "src"
    wide = save_image(src / "a/wide.jpg", 20, 40, seed=1)  # H=20, W=40
    tall = save_image(src / "a/tall.jpg", 30, 15, seed=2)
    small = save_image(src / "a/small.jpg", 8, 9, seed=3)
    code, _, _ = run_tool(["folder", src, tmp_path / "r", "--resize-shorter", 10], capsys)
    assert code == 0
    samples = {json.loads(s["json"])["source"]: s for s in read_tars(shard_paths(tmp_path / "r")[0])}
    assert Image.open(io.BytesIO(samples["a/wide.jpg"]["jpg"])).size == (20, 10)
    assert Image.open(io.BytesIO(samples["a/tall.jpg"]["jpg"])).size == (10, 20)
    meta = json.loads(samples["a/tall.jpg"]["json"])
    assert (meta["original_width"], meta["original_height"], meta["width"], meta["height"]) == (15, 30, 10, 20)
    assert samples["a/small.jpg"]["jpg"] == small  # never enlarged: copied unchanged
    assert samples["a/wide.jpg"]["jpg"] != wide

    # EXIF orientation 6 (stored 16x10, shown rotated 90 degrees clockwise as 10x16) is applied
    stored = Image.open(io.BytesIO(save_image(src / "b/phone.jpg", 10, 16, seed=4)))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(src / "b/phone.jpg", quality=95, exif=exif)
    code, _, _ = run_tool(["folder", src, tmp_path / "e"], capsys)
    phone = next(s for s in read_tars(shard_paths(tmp_path / "e")[0]) if b"phone" in s["json"])
    meta = json.loads(phone["json"])
    assert (meta["original_width"], meta["width"], meta["height"], meta["exif_orientation"]) == (16, 10, 16, 6)
    # clockwise: close to the stored pixels turned that way (JPEG re-encode), far from the other way
    err = [
        np.abs(pixels(phone["jpg"]).astype(int) - np.rot90(np.asarray(stored.convert("RGB")), k)).mean()
        for k in (-1, 1)
    ]
    assert err[0] < 10 < 30 < err[1], err

    code, _, _ = run_tool(["folder", src, tmp_path / "q", "--quality", 50], capsys)
    samples = {json.loads(s["json"])["source"]: s for s in read_tars(shard_paths(tmp_path / "q")[0])}
    assert samples["a/tall.jpg"]["jpg"] != tall and Image.open(io.BytesIO(samples["a/tall.jpg"]["jpg"])).size == (
        15,
        30,
    )
    # a re-encode at quality 50 stays close to the original pixels (it is the same image)
    assert np.abs(pixels(samples["a/tall.jpg"]["jpg"]).astype(int) - pixels(tall)).mean() < 8


def test_workers_give_identical_tars(photos, tmp_path, capsys):
    root, _ = photos
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code, _, _ = run_tool(["folder", root, out, "--samples-per-shard", 3, "--resize-shorter", 11,
                               "--workers", workers], capsys)  # fmt: skip
        assert code == 0
        outs.append(shard_paths(out)[0])
    assert [os.path.basename(p) for p in outs[0]] == [os.path.basename(p) for p in outs[1]]
    for a, b in zip(*outs):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()


def test_refuses_non_empty_output_without_overwrite(photos, tmp_path, capsys):
    root, _ = photos
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    code, _, err = run_tool(["folder", root, out], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["mine.txt"]
    # --overwrite: stale shards of an earlier, bigger run go; files that are not ours stay
    (out / "shard-000007.tar").write_bytes(b"stale")
    code, _, _ = run_tool(["folder", root, out, "--overwrite"], capsys)
    assert code == 0 and sorted(os.listdir(out)) == ["_stats.json", "mine.txt", "shard-000000.tar"]


# ----------------------------------------------------------------------------- tables

ROWS = [  # (image, caption, expected skip reason or None)
    ("img/0.jpg", "a dog, sitting", None),
    ("img/1.jpg", 'a "quoted" caption', None),
    ("img/missing.jpg", "no file", "missing_image_file"),
    ("img/2.jpg", "   ", "empty_caption"),
    ("img/broken.jpg", "corrupt", "undecodable_image"),
    ("img/3.png", "ünïcödé ✓", None),
    ("http://example.com/a.jpg", "remote", "not_local"),
    ("img/4.jpg", "last one", None),
]


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    files = {}
    for i in range(5):
        rel = f"img/{i}.{'png' if i == 3 else 'jpg'}"
        files[rel] = save_image(root / rel, 10, 14, seed=100 + i, fmt="PNG" if i == 3 else "JPEG")
    (root / "img/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, files


def write_table(root, fmt, rows) -> str:
    path = str(root / f"captions.{fmt}")
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["caption", "file", "other"])
            w.writerow([])  # a blank line is not a row, but moves the line numbers
            for image, caption, _ in rows:
                w.writerow([caption, image, "x"])
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n")
            for image, caption, _ in rows:
                f.write(json.dumps({"file": image, "caption": caption}, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"file": [r[0] for r in rows], "caption": [r[1] for r in rows]}), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_table_round_trip_and_bad_rows(table_dir, fmt, tmp_path, capsys):
    root, files = table_dir
    path = write_table(root, fmt, ROWS)
    out = tmp_path / "out"
    code, stdout, _ = run_tool(["table", path, out, "--image-col", "file", "--caption-col", "caption",
                                "--samples-per-shard", 2], capsys)  # fmt: skip
    assert code == 0
    paths, stats = shard_paths(out)
    samples = read_tars(paths)
    good = [r for r in ROWS if r[2] is None]
    assert [s["txt"].decode() for s in samples] == [r[1] for r in good]
    for s, (image, _, _) in zip(samples, good):
        if image.endswith(".jpg"):
            assert s["jpg"] == files[image]
        else:  # PNG -> JPEG at quality 95: the same picture, not the same bytes
            assert np.abs(pixels(s["jpg"]).astype(int) - pixels(files[image])).mean() < 4
        assert json.loads(s["json"])["source"] == image
    # keys are input positions: the gaps are the skipped rows
    assert [s["__key__"] for s in samples] == [f"{ROWS.index(r):09d}" for r in good]
    # every bad row is reported with its line (CSV/TSV: header, blank line, rows from line 3;
    # JSONL: blank line, rows from line 2) or row (parquet)
    bad = [(i, r) for i, r in enumerate(ROWS) if r[2] is not None]
    assert [s["reason"] for s in stats["skipped"]] == [r[2] for _, r in bad]
    for (i, _), s in zip(bad, stats["skipped"]):
        line = i + 2 if fmt == "jsonl" else i + 3
        where = f"captions.{fmt} row {i}" if fmt == "parquet" else f"captions.{fmt} line {line}"
        assert s["where"].startswith(where) and f"{s['where']}: {s['reason']}" in stdout
    assert stats["num_inputs"] == len(ROWS) and stats["num_skipped"] == len(bad)


def test_table_missing_column_and_bad_rows(table_dir, tmp_path, capsys):
    root, files = table_dir
    path = write_table(root, "csv", ROWS[:2])
    code, _, err = run_tool(["table", path, tmp_path / "a", "--image-col", "path"], capsys)
    assert code == 2 and "--image-col" in err and "no column 'path'" in err and "caption, file, other" in err
    assert not os.path.exists(tmp_path / "a")  # checked before anything is written
    jsonl = root / "rows.jsonl"
    jsonl.write_text('{"file": "img/0.jpg", "caption": "ok"}\n{"caption": "no image"}\nnot json\n'
                     '{"file": "img/1.jpg", "text": "x"}\n')  # fmt: skip
    code, stdout, _ = run_tool(["table", jsonl, tmp_path / "b", "--image-col", "file"], capsys)
    assert code == 0
    stats = json.load(open(tmp_path / "b" / "_stats.json"))
    assert [(s["where"], s["reason"]) for s in stats["skipped"]] == [
        ("rows.jsonl line 2", "missing_column"),
        ("rows.jsonl line 3", "bad_row"),
        ("rows.jsonl line 4", "missing_column"),
    ]
    assert "rows.jsonl line 3: bad_row: not JSON" in stdout
    # --image-root: paths relative to another folder; an unknown extension is named
    other = tmp_path / "tables"
    other.mkdir()
    path = write_table(other, "csv", ROWS[:2])
    code, _, _ = run_tool(["table", path, tmp_path / "c", "--image-col", "file", "--image-root", root], capsys)
    assert code == 0 and len(read_tars(shard_paths(tmp_path / "c")[0])) == 2
    code, _, err = run_tool(["table", root / "x.xlsx", tmp_path / "d"], capsys)
    assert code == 2 and "x.xlsx: unknown table format" in err


def test_nothing_written_is_an_error(table_dir, tmp_path, capsys):
    root, _ = table_dir
    path = write_table(root, "csv", [("img/missing.jpg", "x", None)])
    code, stdout, err = run_tool(["table", path, tmp_path / "o", "--image-col", "file"], capsys)
    assert code == 2 and "no sample could be written" in err and "missing_image_file" in stdout


# ----------------------------------------------------------------------------- img2dataset


def test_img2dataset_reshard(tmp_path, capsys):
    from mmpretrain.data.shards import ShardWriter

    src = tmp_path / "raw"
    originals = []
    with ShardWriter(src, samples_per_shard=4, name_format="{:05d}.tar") as w:
        for i in range(10):
            key = f"{i:09d}"
            img = save_image(tmp_path / "tmp" / f"{i}.jpg", 9, 11, seed=200 + i)
            sample = {"__key__": key, "jpg": img, "json": {"url": f"http://x/{i}.jpg", "key": key}}
            if i != 5:  # img2dataset never writes this, but a damaged shard can
                sample["txt"] = f"caption {i}"
                originals.append((img, f"caption {i}", key))
            w.write(sample)
    (src / "00000.parquet").write_bytes(b"PAR1")  # written by img2dataset beside the tars: ignored
    # a third tar cut inside its second image: its first sample is kept, the break is reported
    with ShardWriter(tmp_path / "cut", samples_per_shard=5, name_format="{:05d}.tar") as w:
        for i in range(2):
            img = save_image(tmp_path / "tmp" / f"c{i}.jpg", 9, 11, seed=300 + i)
            w.write({"__key__": f"c{i}", "jpg": img, "txt": f"cut {i}"})
    with tarfile.open(tmp_path / "cut" / "00000.tar") as tar:
        cut = tar.getmember("c1.jpg").offset_data + 10
    (src / "00003.tar").write_bytes((tmp_path / "cut" / "00000.tar").read_bytes()[:cut])
    originals.append((open(tmp_path / "tmp" / "c0.jpg", "rb").read(), "cut 0", "c0"))
    out = tmp_path / "out"
    code, stdout, _ = run_tool(["img2dataset", src, out, "--samples-per-shard", 3], capsys)
    assert code == 0
    paths, stats = shard_paths(out)
    samples = read_tars(paths)
    assert len(paths) == 4 and [s["num_samples"] for s in stats["shards"]] == [3, 3, 3, 1]
    assert stats["unreadable_tars"][0]["tar"] == str(src / "00003.tar") and "unreadable tar" in stdout
    assert [(s["jpg"], s["txt"].decode()) for s in samples] == [(img, cap) for img, cap, _ in originals]
    meta = json.loads(samples[0]["json"])
    assert meta["source_shard"] == "00000.tar" and meta["img2dataset"]["url"] == "http://x/0.jpg"
    assert stats["skipped"][0]["where"] == "00001.tar:000000005" and "00001.tar:000000005" in stdout


def test_jsonl_regions_reach_the_train_loader(table_dir, tmp_path, capsys):
    """A JSONL row's "regions" (boxes with their words) go into <key>.json, where data.train.regions reads them:
    a loader with every region sample on the ref task writes the box's coordinates after the prompt."""
    from mmpretrain.config import load_config
    from mmpretrain.data import Tokenizer
    from mmpretrain.data.streams import build_train_loader

    root, _ = table_dir
    rows = root / "regions.jsonl"
    region = {"box": [0.1, 0.2, 0.6, 0.9], "text": "a small dog"}
    rows.write_text("".join(json.dumps({"file": f"img/{i}.jpg", "caption": f"photo {i}",
                                        **({"regions": [region]} if i % 2 else {})}) + "\n"
                            for i in (0, 1, 2, 4)))  # fmt: skip
    code, _, _ = run_tool(["table", rows, tmp_path / "out", "--image-col", "file"], capsys)
    assert code == 0
    paths, _ = shard_paths(tmp_path / "out")
    samples = read_tars(paths)
    assert [json.loads(s["json"]).get("regions") for s in samples] == [None, [region], None, None]
    cfg = load_config(None, ["model.name=tiny", f"data.train.urls={paths[0]}", "data.num_workers=0",
                             "data.train.shuffle_buffer=1", "data.train.crop_scale=[1.0,1.0]",
                             "loss.terms.clip.weight=1.0", "loss.terms.caption.weight=1.0",
                             "data.train.regions.ref_fraction=1.0", "data.train.regions.box_bins=11"])  # fmt: skip
    tok = Tokenizer(context_length=32)
    batch = next(iter(build_train_loader(cfg.data, tokenizer=tok, image_size=8, batch_size=4, rank=0, world_size=1,
                                         seed=0)))  # fmt: skip
    texts = {k.rsplit(":", 1)[1]: tok.decode(t) for k, t in zip(batch["keys"], batch["decoder_text"])}
    assert texts[samples[1]["__key__"]].replace(" ", "") == "findasmalldog:01020609"
    assert texts[samples[0]["__key__"]] == "photo 0"
