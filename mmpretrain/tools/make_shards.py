"""Turn your own images into WebDataset shards for training (and zero-shot eval sets).

    # a folder of class subfolders (photos/cat/*.jpg, photos/dog/*.jpg): captions from templates
    mmpretrain-make-shards folder photos/ data/pets --templates "a photo of a {c}."
    # the same layout as a clip_benchmark zero-shot eval set (test/0.tar, classnames.txt, templates)
    mmpretrain-make-shards folder photos_val/ data/pets-eval --eval --templates templates.txt
    # a CSV / TSV / JSONL / parquet table with a local image path column and a caption column
    mmpretrain-make-shards table captions.csv data/mine --image-col file --caption-col text
    # img2dataset output (folder of tars): re-shard to --samples-per-shard per tar
    mmpretrain-make-shards img2dataset /data/cc3m-raw data/cc3m --resize-shorter 256
    # LLaVA's conversation JSON + its image folder: instruction-tuning shards (python -m mmpretrain.instruct)
    mmpretrain-make-shards llava llava_v1_5_mix665k.json data/llava --image-folder /data/llava/images

The same command as ``python -m mmpretrain.tools.make_shards`` or, in a checkout, ``python tools/make_shards.py``.
Output (train): ``<out>/shard-000000.tar ...`` holding ``<key>.jpg`` (or .png/.webp with
--keep-format), ``<key>.txt`` (caption, UTF-8) and ``<key>.json`` (where the sample came from,
original and stored size), plus ``<out>/_stats.json``; the last line printed is the brace spec to
pass as ``data.train.urls``. Output (--eval): ``<out>/<split>/{0..n-1}.tar`` with ``<key>.jpg`` +
``<key>.cls`` (class index) + ``<key>.json``, ``<split>/nshards.txt``, ``<out>/classnames.txt`` and
``<out>/zeroshot_classification_templates.txt`` -- what ``data.eval.zeroshot`` reads. Output (llava): shards of
``<key>.json`` (the record, its "image" naming the sample's own members: ``"jpg"`` for ``<key>.jpg``, or
``["0.jpg", "1.png"]`` for ``<key>.0.jpg``, ``<key>.1.png``; "source" says where it came from) beside the images,
what a stage with ``data: shards`` reads (mmpretrain.instruct.data.read_conversation_shards). A record is skipped
and counted when its conversation cannot train (the reasons of mmpretrain.instruct.template: no_conversation,
bad_turn, bad_order, no_assistant_turn, image_count_mismatch, image_in_answer, bad_image_field; bad_record for a
non-object), or an image is missing, outside --image-folder or undecodable.

Keys are the sample's zero-padded position in the input order (files sorted by path; table rows
in order; tars in natural order), and every tar header field is fixed, so the same input gives
the same tars byte for byte, whatever ``--workers``. JPEG inputs are copied byte for byte unless
``--resize-shorter`` shrinks them, ``--quality`` asks for a re-encode or an EXIF orientation must
be applied (the loaders ignore EXIF); other formats are re-encoded to JPEG (quality 95 unless
--quality; transparency composited on white). Every input that is skipped (missing or
undecodable image, empty caption, missing column, bad row) is listed with its line/row/path in
the summary and in ``_stats.json``: nothing is dropped silently.
An output folder that is not empty is refused unless ``--overwrite``, which replaces only files
this tool writes (shard tars, stats, eval metadata) and leaves any other file alone. Everything is written
into a temporary folder beside the output and moved in only once complete: a run that fails (or is
interrupted) leaves the previous output as it was.

A table's image paths stay inside ``--image-root`` (default: the table's folder): an absolute path, a
``~`` path or a ``../`` path that leads outside it is skipped and counted (``outside_image_root``).
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from mmpretrain.atomic import apply_umask, swap_in
from mmpretrain.data.shards import ShardWriter, local_tar_urls, natural_key, read_tar_samples
from mmpretrain.instruct.template import IMAGE_PLACEHOLDER, BadConversation, normalize_turns, record_images

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what webdataset samples (and our loaders) carry
DEFAULT_QUALITY = 95  # JPEG quality when an image has to be (re-)encoded and --quality is not given
KEY_DIGITS = 9  # keys "000000012": room for a billion samples in input order
MAX_LISTED = 100_000  # skipped inputs listed one by one in _stats.json (all of them are counted)
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


MISSING = object()  # a table row without the column


class UsageError(ValueError):
    """A bad argument, column or file: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- one input sample


@dataclass
class Item:
    """One input sample before its image is read and checked (picklable: it travels to the workers)."""

    index: int  # position in the input order; the tar key
    where: str  # how a person finds it: "cat/001.jpg", "captions.csv line 14", "00003.tar:000000042"
    path: str | None = None  # local image file to read ...
    data: bytes | None = None  # ... or the image bytes themselves (tars, binary parquet columns)
    caption: str | None = None
    label: int | None = None  # class index (eval sets)
    meta: dict = field(default_factory=dict)  # goes into <key>.json
    skip: tuple[str, str] | None = None  # (reason, detail) found while reading the input
    conversation: dict | None = None  # llava: the record (goes into <key>.json); its images are image_paths
    image_paths: list[str] = field(default_factory=list)  # llava: local image files, in placeholder order


@dataclass
class Result:
    index: int
    where: str
    sample: dict | None  # ShardWriter sample, or None when skipped
    skip: tuple[str, str] | None = None


@dataclass
class ImageOptions:
    resize_shorter: int | None = None  # shrink so the shorter side is this many pixels (never enlarge)
    quality: int | None = None  # re-encode every image as JPEG at this quality
    keep_format: bool = False  # store PNG/WEBP as they are instead of re-encoding them to JPEG


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for JPEG; transparent pixels become white (JPEG has no alpha, and black halos look worse)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


JPEG_FORMATS = ("JPEG", "MPO")  # MPO: phones' multi-picture JPEG; its bytes are a JPEG that every decoder reads
EXIF_ORIENTATION = 0x0112  # 1 = upright; 5..8 swap width and height


def convert_image(data: bytes, opts: ImageOptions) -> tuple[bytes, str, dict]:
    """Check that ``data`` decodes and apply the options: (stored bytes, tar extension, size info).

    Raises on anything PIL cannot decode completely (truncated files included). An EXIF orientation
    other than upright is applied (re-encoding the image): the loaders ignore EXIF, and a phone photo
    stored sideways would otherwise be trained on sideways.
    """
    with Image.open(io.BytesIO(data)) as img:
        fmt, (w, h) = img.format, img.size
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        upright = orientation not in (2, 3, 4, 5, 6, 7, 8)
        swap = orientation in (5, 6, 7, 8)
        shown_w, shown_h = (h, w) if swap else (w, h)
        sizes = {"original_width": w, "original_height": h}
        if not upright:
            sizes["exif_orientation"] = orientation
        shrink = opts.resize_shorter is not None and min(w, h) > opts.resize_shorter
        kept = "jpg" if fmt in JPEG_FORMATS else {"PNG": "png", "WEBP": "webp"}.get(fmt) if opts.keep_format else None
        if kept is not None and upright and not shrink and opts.quality is None:
            if fmt in JPEG_FORMATS:  # a full check at 1/8 scale: every entropy-coded byte is still decoded
                img.draft(None, (max(1, w // 8), max(1, h // 8)))
            img.load()
            return data, kept, {**sizes, "width": w, "height": h}
        new_wh = (shown_w, shown_h)
        if shrink:
            n, scale = opts.resize_shorter, opts.resize_shorter / min(w, h)
            new_wh = (n, max(1, round(shown_h * scale))) if shown_w <= shown_h else (max(1, round(shown_w * scale)), n)
            if fmt in JPEG_FORMATS:  # decode at a power-of-2 scale >= the target: much faster, same look
                img.draft("RGB", (new_wh[1], new_wh[0]) if swap else new_wh)
        rgb = _to_rgb(img if upright else ImageOps.exif_transpose(img))
        if rgb.size != new_wh:
            rgb = rgb.resize(new_wh, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=opts.quality or DEFAULT_QUALITY)
        return buf.getvalue(), "jpg", {**sizes, "width": rgb.width, "height": rgb.height}


def read_and_convert(path: str, opts: ImageOptions) -> tuple[tuple[bytes, str, dict] | None, tuple[str, str] | None]:
    """(convert_image's result, None) for a local image file, or (None, the reason it is skipped)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, ("missing_image_file", path)
    except OSError as exn:
        return None, ("unreadable_image_file", f"{path}: {exn}")
    try:
        return convert_image(data, opts), None
    except Exception as exn:  # noqa: BLE001 -- PIL raises many types for broken files
        return None, ("undecodable_image", f"{path}: {type(exn).__name__}: {exn}")


def process_conversation(item: Item, opts: ImageOptions) -> Result:
    """A LLaVA record -> <key>.json + its images as the sample's members (see the module docstring)."""
    record = dict(item.conversation)
    single = isinstance(record.get("image"), str)
    sample: dict[str, Any] = {"__key__": f"{item.index:0{KEY_DIGITS}d}"}
    names = []
    for k, path in enumerate(item.image_paths):
        converted, skip = read_and_convert(path, opts)
        if skip is not None:
            return Result(item.index, item.where, None, skip)
        stored, ext, _ = converted
        names.append(ext if single else f"{k}.{ext}")
        sample[names[-1]] = stored
    if "image" in record:
        record["image"] = names[0] if single else names
    record["source"] = {"where": item.where, "image": item.conversation.get("image")}
    sample["json"] = record
    return Result(item.index, item.where, sample)


def process(item: Item, opts: ImageOptions) -> Result:
    """Item -> a ShardWriter sample, or the reason it is skipped. Pure: the same item gives the same bytes."""
    if item.skip is not None:
        return Result(item.index, item.where, None, item.skip)
    if item.conversation is not None:
        return process_conversation(item, opts)
    data = item.data
    if data is None:
        try:
            with open(item.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Result(item.index, item.where, None, ("missing_image_file", item.path))
        except OSError as exn:
            return Result(item.index, item.where, None, ("unreadable_image_file", f"{item.path}: {exn}"))
    try:
        stored, ext, sizes = convert_image(data, opts)
    except Exception as exn:  # noqa: BLE001 -- PIL raises many types for broken files
        return Result(item.index, item.where, None, ("undecodable_image", f"{type(exn).__name__}: {exn}"))
    sample: dict[str, Any] = {"__key__": f"{item.index:0{KEY_DIGITS}d}", ext: stored}
    if item.label is not None:
        sample["cls"] = item.label
    if item.caption is not None:
        sample["txt"] = item.caption
    sample["json"] = {**item.meta, **sizes}
    return Result(item.index, item.where, sample)


def _process_chunk(chunk: list[Item], opts: ImageOptions) -> list[Result]:
    return [process(item, opts) for item in chunk]


def ordered_map(items: Iterable[Item], opts: ImageOptions, workers: int, chunk: int = 8) -> Iterator[Result]:
    """process() over items in input order; with workers > 1 in a process pool, at most 4 x workers chunks
    in flight (bounded memory even when items carry image bytes)."""
    if workers <= 1:
        for item in items:
            yield process(item, opts)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        while batch := list(itertools.islice(it, chunk)):
            pending.append(pool.apply_async(_process_chunk, (batch, opts)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ----------------------------------------------------------------------------- inputs


def read_templates(values: list[str] | None) -> list[str]:
    """--templates: each value is a template with {c} or a file of them (one a line, # comments)."""
    templates: list[str] = []
    for value in values or ["a photo of a {c}."]:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            if not lines:
                raise UsageError(f"--templates: {value}: no template in the file")
            templates += lines
        else:
            templates.append(value)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UsageError(f"--templates: {bad[0]!r} has no '{{c}}' placeholder (nor is it a file)")
    return templates


@dataclass
class FolderInput:
    classes: list[str]  # folder names, sorted: index = class id
    classnames: list[str]  # what goes into captions / classnames.txt
    files: list[tuple[int, str]]  # (class id, path relative to the root), in input order
    ignored: list[str]  # files without an image extension (relative paths)


def scan_folder(root: str, classnames_file: str | None) -> FolderInput:
    if not os.path.isdir(root):
        raise UsageError(f"input: {root}: no such folder")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise UsageError(f"input: {root}: no class subfolders (expected {root}/<class name>/<image files>)")
    if classnames_file:
        with open(classnames_file, encoding="utf-8") as f:
            classnames = [ln.strip() for ln in f if ln.strip()]
        if len(classnames) != len(classes):
            raise UsageError(
                f"--classnames: {classnames_file} has {len(classnames)} names for {len(classes)} class folders"
            )
    else:
        classnames = [c.replace("_", " ") for c in classes]
    files, ignored = [], []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if name.startswith("."):
                    continue
                (found if name.lower().endswith(IMAGE_EXTS) else ignored).append(rel)
        files += [(label, rel) for rel in sorted(found, key=natural_key)]
    return FolderInput(classes, classnames, files, sorted(ignored))


def folder_items(root: str, scan: FolderInput, templates: list[str], eval_set: bool) -> Iterator[Item]:
    """Template i % T for the i-th image of a class: every template is used about equally within each class."""
    counts = collections.Counter()
    for index, (label, rel) in enumerate(scan.files):
        meta = {"source": rel, "label": label, "classname": scan.classnames[label]}
        item = Item(index, rel, path=os.path.join(root, rel), label=label, meta=meta)
        if not eval_set:
            item.label = None
            item.caption = templates[counts[label] % len(templates)].replace("{c}", scan.classnames[label])
            counts[label] += 1
        yield item


def _clean_caption(value: Any) -> tuple[str | None, tuple[str, str] | None]:
    if value is None:
        return None, ("empty_caption", "no value")
    if isinstance(value, (dict, list)):  # a JSON row's caption that is not text (str() of a deep one recurses)
        return None, ("bad_row", f"the caption is a JSON {type(value).__name__}, not text")
    text = str(value).strip()
    if not text:
        return None, ("empty_caption", "blank caption")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes survive reading as surrogates
        return None, ("bad_utf8", "caption is not valid UTF-8")
    return text, None


def _image_source(value: Any, base: str) -> tuple[str | None, bytes | None, tuple[str, str] | None]:
    """(path, bytes, skip) from an image column value: a path (relative to ``base``), raw bytes, or {"bytes": ...}.

    A path must stay inside ``base`` (--image-root, else the table's folder): a table is data, and one from
    elsewhere must not pick files of this machine (``/etc/...``, ``~/.ssh/...``, ``../../secret``) into shards
    that get shared. The check is on the path as written, normalized (``..`` resolved), not on symlinks.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value), None
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        return None, None, ("missing_image_path", "empty image column")
    text = str(value).strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I):
        return None, None, ("not_local", f"{text} (download it first, e.g. with img2dataset)")
    root = os.path.abspath(base)
    path = os.path.normpath(os.path.join(root, os.path.expanduser(text)))
    if os.path.commonpath([root, path]) != root:
        why = f"{text} is outside the image root {root} (pass --image-root to allow a folder that holds it)"
        return None, None, ("outside_image_root", why)
    return path, None, None


def _table_rows(path: str, fmt: str, image_col: str, caption_col: str) -> Iterator[tuple[str, dict, Any, Any, str]]:
    """(where, position meta, image value, caption value, skip reason) per data row."""
    name = os.path.basename(path)
    missing = MISSING
    if fmt in ("csv", "tsv"):
        # surrogateescape: a byte that is not UTF-8 skips that row (bad_utf8) instead of aborting the file
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            header = next(reader, None)
            if header is None:
                raise UsageError(f"input: {path}: empty file (expected a header line)")
            header = [h.strip().lstrip("\ufeff") for h in header]
            for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
                if col not in header:
                    raise UsageError(f"{flag}: {path} has no column {col!r}; its columns: {', '.join(header)}")
            i_img, i_cap = header.index(image_col), header.index(caption_col)
            line, row = reader.line_num + 1, 0
            for fields in reader:
                where, pos = f"{name} line {line}", {"file": name, "line": line, "row": row}
                line = reader.line_num + 1
                if not fields:
                    continue  # blank line: not a row
                row += 1
                if len(fields) != len(header):
                    yield where, pos, missing, missing, f"{len(fields)} fields, the header has {len(header)}"
                    continue
                yield where, pos, fields[i_img], fields[i_cap], ""
    elif fmt == "jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            row = 0
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where, pos = f"{name} line {line_no}", {"file": name, "line": line_no, "row": row}
                row += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exn:
                    yield where, pos, missing, missing, f"not JSON: {exn}"
                    continue
                except RecursionError:  # json's parser recurses once per nesting level
                    yield where, pos, missing, missing, "JSON nested too deeply to read"
                    continue
                if not isinstance(obj, dict):
                    yield where, pos, missing, missing, "not a JSON object"
                    continue
                if "regions" in obj:  # boxes with their words, kept for the caption decoder's region tasks
                    pos["regions"] = obj["regions"]  # (mmpretrain/data/regions.py reads and checks them)
                yield where, pos, obj.get(image_col, missing), obj.get(caption_col, missing), ""
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
            if col not in names:
                raise UsageError(f"{flag}: {path} has no column {col!r}; its columns: {', '.join(names)}")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[image_col, caption_col]):
            for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield f"{name} row {row}", {"file": name, "row": row}, image, caption, ""
                row += 1


def table_items(paths: list[str], image_col: str, caption_col: str, image_root: str | None) -> Iterator[Item]:
    """Rows of every table in order; a row's image path is relative to --image-root or to its table's folder."""
    index = 0
    for path in paths:
        fmt = TABLE_FORMATS[os.path.splitext(path)[1].lower()]
        base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        for where, pos, image, caption, bad in _table_rows(path, fmt, image_col, caption_col):
            item = Item(index, where, meta=dict(pos))
            index += 1
            if bad:
                item.skip = ("bad_row", bad)
            elif image is MISSING:
                item.skip = ("missing_column", f"no {image_col!r} in this row (--image-col)")
            elif caption is MISSING:
                item.skip = ("missing_column", f"no {caption_col!r} in this row (--caption-col)")
            else:
                item.caption, skip = _clean_caption(caption)
                item.path, item.data, img_skip = _image_source(image, base)
                item.skip = skip or img_skip
                if isinstance(image, str):
                    item.meta["source"] = image
                    item.where = f"{where} ({image})"
            yield item


def check_conversation(record: Any) -> list[str]:
    """A LLaVA record's image names, after the checks that need no tokenizer; BadConversation otherwise."""
    if not isinstance(record, dict):
        raise BadConversation("bad_record", "not a JSON object")
    turns = normalize_turns(record)
    names = record_images(record)
    if any(IMAGE_PLACEHOLDER in text for role, text in turns if role == "assistant"):
        raise BadConversation("image_in_answer", "an assistant turn holds an <image> placeholder")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
    if placeholders != len(names):
        raise BadConversation("image_count_mismatch", f"{placeholders} placeholders but {len(names)} images")
    return names


def llava_items(path: str, image_folder: str) -> Iterator[Item]:
    """One item per record of a LLaVA JSON list; image names are paths inside ``image_folder`` (the same rule as a
    table's --image-root: a path that leads outside is skipped, outside_image_root). The file is read here, before
    any output is written: UsageError when it is not a JSON list."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as exn:
        raise UsageError(f"input: {path}: not a readable JSON file ({exn})") from None
    if not isinstance(records, list):
        raise UsageError(f"input: {path}: expected a JSON list of conversation records")
    return _llava_items(records, os.path.basename(path), image_folder)


def _llava_items(records: list, name: str, image_folder: str) -> Iterator[Item]:
    root = os.path.abspath(image_folder)
    for index, record in enumerate(records):
        where = f"{name} record {index}"
        try:
            names = check_conversation(record)
        except BadConversation as exn:
            yield Item(index, where, skip=(exn.reason, str(exn)))
            continue
        paths = [os.path.normpath(os.path.join(root, name)) for name in names]
        outside = [n for n, p in zip(names, paths) if os.path.commonpath([root, p]) != root]
        if outside:
            yield Item(index, where, skip=("outside_image_root", f"{outside[0]!r} leads outside {image_folder}"))
            continue
        yield Item(index, where, conversation=record, image_paths=paths)


def tar_urls(inputs: list[str]) -> list[str]:
    """Tars of folders (*.tar in natural order), brace specs and globs, in the order given."""
    try:
        return local_tar_urls(inputs)
    except ValueError as e:
        raise UsageError(f"input: {e}") from None


def img2dataset_items(urls: list[str], bad_tars: list[tuple[str, str]]) -> Iterator[Item]:
    """Samples of the tars in order, read by the train loader's own reader (same grouping, same cut-tar rule:
    samples before a break are kept, the one whose bytes are cut is lost with it)."""

    def on_fault(reason: str, url: str, detail: str) -> None:  # unreadable_shard / truncated_tar
        bad_tars.append((str(url), f"{reason}: {detail}"))

    index = 0
    for url in urls:
        shard = os.path.basename(url)
        for parts in read_tar_samples(url, on_fault):
            key = parts["__key__"]
            where = f"{shard}:{key}"
            meta: dict[str, Any] = {"source_shard": shard, "source_key": key}
            item = Item(index, where, meta=meta)
            index += 1
            if "json" in parts:
                try:
                    meta["img2dataset"] = json.loads(parts["json"])
                    json.dumps(meta["img2dataset"])  # it is written again into our .json: fail here, not there
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    meta["img2dataset"] = None
            ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
            if ext is None:
                members = ", ".join(sorted(k for k in parts if not k.startswith("__")))
                item.skip = ("missing_image", f"members: {members}")
            elif "txt" not in parts:
                item.skip = ("empty_caption", "no .txt member")
            else:
                try:
                    item.caption, item.skip = _clean_caption(parts["txt"].decode("utf-8"))
                except UnicodeDecodeError:
                    item.skip = ("bad_utf8", "caption is not valid UTF-8")
                item.data = parts[ext]
            yield item


# ----------------------------------------------------------------------------- output


OWN_OUTPUTS = ("shard-*.tar", "shard-*.tar.tmp", "_stats.json")
OWN_EVAL_OUTPUTS = ("classnames.txt", "zeroshot_classification_templates.txt")
OWN_SPLIT_OUTPUTS = ("*.tar", "*.tar.tmp", "nshards.txt", "_stats.json")


def check_output(out: str, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless --overwrite (nothing is removed here: see move_outputs)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"output: {out} exists and is not a folder")
    entries = os.listdir(out) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise UsageError(
            f"output: {out} is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]!r}); "
            "pass --overwrite to replace the shards written there before"
        )


def move_outputs(tmp: str, out: str, split: str | None) -> None:
    """Put the complete output written in ``tmp`` (a sibling of ``out``) in place.

    An empty or new ``out`` is replaced by ``tmp`` in one rename. Otherwise (--overwrite) each new file is renamed
    over its old namesake, then this tool's files of the earlier run that the new one has not replaced (shards
    past the new count) are removed; any other file in ``out`` stays.
    """
    apply_umask(tmp)  # mkdtemp made the folder 0700
    if not os.path.islink(out) and (not os.path.isdir(out) or not os.listdir(out)):
        swap_in(tmp, os.path.abspath(out))
        return
    new = set()
    for folder, _, files in os.walk(tmp):
        rel = os.path.relpath(folder, tmp)
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for name in files:
            dst = os.path.normpath(os.path.join(out, rel, name))
            os.replace(os.path.join(folder, name), dst)
            new.add(dst)
    patterns = [os.path.join(out, p) for p in OWN_OUTPUTS]
    if split is not None:
        patterns += [os.path.join(out, p) for p in OWN_EVAL_OUTPUTS]
        patterns += [os.path.join(out, split, p) for p in OWN_SPLIT_OUTPUTS]
    for pattern in patterns:
        for path in glob.glob(pattern):
            if os.path.normpath(path) not in new:
                os.remove(path)
    shutil.rmtree(tmp, ignore_errors=True)


def brace_spec(out: str, name_format: str, num_shards: int) -> str:
    """The brace spec of shards 0..n-1: "out/shard-{000000..000012}.tar" (a plain path for one shard)."""
    m = re.search(r"\{:(\w*)\}", name_format)
    lo, hi = format(0, m.group(1)), format(num_shards - 1, m.group(1))
    middle = lo if num_shards == 1 else f"{{{lo}..{hi}}}"
    return os.path.join(out, name_format[: m.start()] + middle + name_format[m.end() :])


def write_shards(
    items: Iterable[Item],
    out_dir: str,
    *,
    opts: ImageOptions,
    workers: int,
    samples_per_shard: int,
    name_format: str,
    total: int | None,
    progress: Callable | None = None,
) -> tuple[dict, list[dict]]:
    """Write the items; returns (ShardWriter stats, skipped inputs as dicts with reason/where/detail)."""

    skipped: list[dict] = []
    bar = tqdm(total=total, desc="make_shards", unit="img", disable=None, mininterval=1.0, file=sys.stderr)
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard, name_format=name_format) as writer:
        for result in ordered_map(items, opts, workers):
            if result.sample is None:
                reason, detail = result.skip
                skipped.append({"reason": reason, "where": result.where, "detail": detail})
            else:
                writer.write(result.sample)
            bar.update()
            bar.set_postfix(skipped=len(skipped), refresh=False)
        bar.close()
        if writer.num_samples == 0:
            raise NoSamples(skipped)
    return writer.close(), skipped


class NoSamples(Exception):
    def __init__(self, skipped: list[dict]):
        super().__init__("no sample could be written")
        self.skipped = skipped


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summarize(
    stats: dict, skipped: list[dict], bad_tars: list, extra: dict, out_dir: str, args: dict, shown_dir: str = ""
) -> dict:
    """Extend ShardWriter's _stats.json with the skipped inputs, byte total and arguments; print a summary.

    The files are in ``out_dir`` (the temporary folder while writing); the summary names ``shown_dir``, where they
    end up."""
    shown_dir = shown_dir or out_dir
    by_reason = collections.Counter(s["reason"] for s in skipped)
    full = {
        **stats,
        "num_bytes": sum(os.path.getsize(os.path.join(out_dir, s["name"])) for s in stats["shards"]),
        "num_inputs": stats["num_samples"] + len(skipped),
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped": skipped[:MAX_LISTED],
        "unreadable_tars": [{"tar": u, "error": e} for u, e in bad_tars],
        **extra,
        "args": args,
    }
    with open(os.path.join(out_dir, "_stats.json"), "w", encoding="utf-8") as f:
        json.dump(full, f, indent=1, ensure_ascii=False)
    print(
        f"wrote {_plural(full['num_samples'], 'sample')} in {_plural(full['num_shards'], 'shard')} "
        f"({full['num_bytes'] / 1e6:.1f} MB) "
        f"to {shown_dir}; skipped {len(skipped)} of {full['num_inputs']} inputs"
    )
    for reason, n in sorted(by_reason.items()):
        print(f"  skipped {n:>8} {reason}")
    for s in skipped[:20]:
        print(f"    {s['where']}: {s['reason']}: {s['detail']}")
    if len(skipped) > 20 and full["num_samples"]:
        print(f"    ... {len(skipped) - 20} more in {os.path.join(shown_dir, '_stats.json')}")
    elif len(skipped) > 20:  # nothing is written (the output keeps what it held)
        print(f"    ... {len(skipped) - 20} more")
    if "ignored_files" in extra:
        ignored = extra["ignored_files"]
        print(f"  ignored {ignored['count']} files without an image extension, e.g. {ignored['first'][0]}")
    for url, err in bad_tars:
        print(f"  unreadable tar (samples after the break are lost): {url}: {err}")
    return full


# ----------------------------------------------------------------------------- CLI


PROG = "mmpretrain-make-shards"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=f"Options of each input kind: {prog} folder|table|img2dataset --help. Long form: docs/data.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{folder,table,img2dataset,llava}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("out", help="output folder (must be empty or new, unless --overwrite)")
        p.add_argument("--samples-per-shard", type=int, default=10000, metavar="N", help="samples per tar (10000)")
        p.add_argument(
            "--resize-shorter", type=int, metavar="PX", help="shrink images whose shorter side exceeds PX to PX"
        )
        p.add_argument(
            "--quality", type=int, metavar="Q", help=f"re-encode every image as JPEG quality Q (else {DEFAULT_QUALITY} "
            "where encoding is needed; JPEG inputs are copied byte for byte when neither this nor a resize applies)",
        )  # fmt: skip
        p.add_argument("--keep-format", action="store_true", help="store PNG/WEBP as .png/.webp instead of JPEG")
        p.add_argument("--workers", type=int, default=1, metavar="N", help="processes (1); same output for any N")
        p.add_argument("--overwrite", action="store_true", help="replace this tool's files in a non-empty output")

    p = sub.add_parser(
        "folder",
        help="a folder of class subfolders: captions from templates, or --eval for a zero-shot eval set",
        description="ROOT/<class>/<images> (recursive within a class; classes sorted by folder name = class ids). "
        "Class name = folder name with '_' -> ' ', or --classnames.",
    )
    p.add_argument("input", help="root folder holding one subfolder per class")
    common(p)
    p.add_argument(
        "--templates", action="append", metavar="T|FILE", help="caption template with {c} for the class name, or a "
        "file of them (one a line); repeatable. Default 'a photo of a {c}.'. Image i of a class gets template i %% T",
    )  # fmt: skip
    p.add_argument("--classnames", metavar="FILE", help="class names, one a line, in sorted folder order")
    p.add_argument("--eval", action="store_true", help="write a clip_benchmark zero-shot set (.jpg + .cls) instead")
    p.add_argument("--split", default="test", help="--eval: split folder under OUT (test)")

    p = sub.add_parser(
        "table",
        help="CSV/TSV/JSONL/parquet rows with an image path column and a caption column",
        description="Format from the extension: .csv .tsv (quoted like Python's csv / pandas) .jsonl .ndjson .parquet. "
        "The image column holds a local path (relative to --image-root, else to the table's folder) or, in parquet, "
        "image bytes ({'bytes': ...} structs too). Several tables are read in the order given.",
    )
    p.add_argument("inputs", nargs="+", metavar="TABLE", help="table file(s)")
    common(p)
    p.add_argument("--image-col", default="image", help="image path column (image)")
    p.add_argument("--caption-col", default="caption", help="caption column (caption)")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the table's folder)")

    p = sub.add_parser(
        "img2dataset",
        help="re-shard img2dataset output (tars of .jpg/.txt/.json)",
        description="Inputs: folders (their *.tar, natural order; parquet/json files beside are ignored), brace "
        "specs or globs. The original .json goes under 'img2dataset' in the new .json.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, brace spec or glob of tars")
    common(p)

    p = sub.add_parser(
        "llava",
        help="LLaVA's conversation JSON + its image folder: shards of .json conversations beside their images",
        description="A JSON list of records {'image': name or [names], 'conversations': [{'from', 'value'}, ...]}; "
        "image names are relative to --image-folder (default: the JSON's folder). For python -m mmpretrain.instruct "
        "(a stage with data: shards).",
    )
    p.add_argument("input", help="the LLaVA JSON file")
    common(p)
    p.add_argument("--image-folder", help="folder the records' image names start from (default: the JSON's folder)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard: must be >= 1 (got {args.samples_per_shard})")
    if args.resize_shorter is not None and args.resize_shorter < 1:
        raise UsageError(f"--resize-shorter: must be >= 1 pixel (got {args.resize_shorter})")
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise UsageError(f"--quality: must be in 1..100 (got {args.quality})")
    if args.workers < 1:
        raise UsageError(f"--workers: must be >= 1 (got {args.workers})")
    if args.command == "table":
        for path in args.inputs:
            if os.path.splitext(path)[1].lower() not in TABLE_FORMATS:
                raise UsageError(f"input: {path}: unknown table format (expected {', '.join(TABLE_FORMATS)})")
            if not os.path.isfile(path):
                raise UsageError(f"input: {path}: no such file")
        if args.image_root is not None and not os.path.isdir(args.image_root):
            raise UsageError(f"--image-root: {args.image_root}: no such folder")
    if args.command == "llava":
        if not os.path.isfile(args.input):
            raise UsageError(f"input: {args.input}: no such file")
        if args.image_folder is not None and not os.path.isdir(args.image_folder):
            raise UsageError(f"--image-folder: {args.image_folder}: no such folder")
    src = [os.path.abspath(p) for p in ([args.input] if args.command in ("folder", "llava") else args.inputs)]
    out = os.path.abspath(args.out)
    if out in src:
        raise UsageError(f"output: {args.out} is also the input")
    if args.command == "folder" and out.startswith(src[0] + os.sep):
        raise UsageError(f"output: {args.out} is inside the input folder (it would become a class)")


def run(args: argparse.Namespace) -> dict:
    """Make the shards of parsed ``args``; returns the _stats.json content. UsageError for bad input."""
    check_args(args)
    opts = ImageOptions(args.resize_shorter, args.quality, args.keep_format)
    out = os.path.normpath(args.out)
    eval_set = args.command == "folder" and args.eval
    bad_tars: list[tuple[str, str]] = []
    extra: dict[str, Any] = {}
    if args.command == "folder":
        templates = read_templates(args.templates)
        scan = scan_folder(args.input, args.classnames)
        items, total = folder_items(args.input, scan, templates, eval_set), len(scan.files)
        extra = {"classes": dict(zip(scan.classes, scan.classnames)), "templates": templates}
        if scan.ignored:
            extra["ignored_files"] = {"count": len(scan.ignored), "first": scan.ignored[:20]}
    elif args.command == "table":
        for path in args.inputs:  # header / schema errors before the output folder is touched
            next(
                _table_rows(path, TABLE_FORMATS[os.path.splitext(path)[1].lower()], args.image_col, args.caption_col),
                None,
            )
        items, total = table_items(args.inputs, args.image_col, args.caption_col, args.image_root), None
    elif args.command == "llava":
        folder = args.image_folder if args.image_folder is not None else os.path.dirname(os.path.abspath(args.input))
        items, total = llava_items(args.input, folder), None
    else:
        items, total = img2dataset_items(tar_urls(args.inputs), bad_tars), None
    check_output(out, args.overwrite)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # written beside the output (same filesystem: the final move is a rename), moved in only when complete
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp", dir=parent)
    try:
        full, spec = write_output(args, items, total, tmp, out, eval_set, opts, bad_tars, extra)
        move_outputs(tmp, out, args.split if eval_set else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if eval_set:
        print(f"zero-shot eval set ({len(extra['classes'])} classes): data.eval.zeroshot={out}")
    else:
        print(f"data.train.urls={spec}")
    return full


def write_output(args, items, total, tmp, out, eval_set, opts, bad_tars, extra) -> tuple[dict, str]:
    """Write the shards and metadata into ``tmp`` (laid out as ``out`` will be); (_stats.json content, brace spec)."""
    shard_dir = os.path.join(tmp, args.split) if eval_set else tmp
    final_dir = os.path.join(out, args.split) if eval_set else out
    name_format = "{:d}.tar" if eval_set else "shard-{:06d}.tar"
    try:
        stats, skipped = write_shards(
            items, shard_dir, opts=opts, workers=args.workers, samples_per_shard=args.samples_per_shard,
            name_format=name_format, total=total,
        )  # fmt: skip
    except NoSamples as exn:
        summarize({"num_samples": 0, "num_shards": 0, "shards": []}, exn.skipped, bad_tars, extra, shard_dir, {},
                  shown_dir=final_dir)  # fmt: skip
        raise UsageError(f"input: no sample could be written ({len(exn.skipped)} inputs skipped)") from None
    if eval_set:
        with open(os.path.join(shard_dir, "nshards.txt"), "w") as f:
            f.write(f"{stats['num_shards']}\n")
        with open(os.path.join(tmp, "classnames.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(extra["classes"].values()) + "\n")
        with open(os.path.join(tmp, "zeroshot_classification_templates.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(extra["templates"]) + "\n")
    spec = brace_spec(final_dir, name_format, stats["num_shards"])
    extra["urls"] = spec
    full = summarize(stats, skipped, bad_tars, extra, shard_dir, dict(vars(args)), shown_dir=final_dir)
    return full, spec


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The console script ``mmpretrain-make-shards``; ``prog`` names the command in usage and error lines."""
    args = build_parser(prog).parse_args(argv)
    try:
        run(args)
    except UsageError as exn:
        print(f"{prog} {args.command}: error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m mmpretrain.tools.make_shards"))
