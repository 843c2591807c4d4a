"""Check and describe WebDataset shards: counts, broken samples, caption-length and image-size histograms.

    mmpretrain-inspect-shards "data/mine/shard-{000000..000012}.tar"
    mmpretrain-inspect-shards data/mine --out reports/mine          # + inspect.json, inspect.png
    mmpretrain-inspect-shards data/pets-eval --length chars          # an eval set folder (test/*.tar)

The same command as ``python -m mmpretrain.tools.inspect_shards`` or, in a checkout, ``python tools/inspect_shards.py``.
Input: a brace spec, a glob, a folder (its *.tar, else <folder>/test/*.tar for a clip_benchmark set)
or tar files. Every sample is read and its image fully decoded (``--no-decode``: headers only).
Samples are judged by the train loader's own code (read_tar_samples in mmpretrain.data.shards,
sample_fault in mmpretrain.data.pipeline) and listed by ``shard:key`` with the loader's reason
names: no_image (no .jpg/.jpeg/.png/.webp), no_caption (no .txt, or .cls in a zero-shot eval set),
zero_byte, bad_utf8, empty_caption, corrupt_image (does not decode), oversized_image (PIL's
decompression-bomb limit); a shard that cannot be opened (unreadable_shard) or breaks off
(truncated_tar) is listed by its name. These are the samples the loader skips and counts in ``skipped_samples``.

Caption length is in CLIP BPE tokens (``--length tokens``, the default: without start/end tokens,
so more than 75 is cut at the usual context length of 77) or in characters (``--length chars``,
no tokenizer load). Image size is width x height as stored; the histogram is over the shorter side.
The report is a markdown document on stdout; ``--out DIR`` also writes ``inspect.json`` (all
numbers, every broken sample) and ``inspect.png`` (the two histograms). Exit code 1 with
``--fail-on-broken`` if anything is broken, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import sys
from dataclasses import dataclass, field
from functools import partial

from PIL import Image
from tqdm import tqdm

from mmpretrain.data.pipeline import sample_fault
from mmpretrain.data.shards import local_tar_urls, read_tar_samples
from mmpretrain.data.tokenizer import Tokenizer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CONTEXT_LENGTH = 77  # CLIP's: 75 caption tokens + start + end
# histogram bin edges (left-closed): shorter image side in pixels, caption length in tokens / characters
SIZE_BINS = [0, 64, 128, 224, 256, 384, 512, 1024]
TOKEN_BINS = [0, 5, 10, 20, 40, 76]
CHAR_BINS = [0, 20, 50, 100, 200, 500, 1000]


def resolve_urls(specs: list[str]) -> list[str]:
    """Tar paths of brace specs / globs / folders (or their test/ subfolder), in order; ValueError naming
    what matched nothing."""
    return local_tar_urls(specs, subfolders=("", "test"))


@dataclass
class ShardReport:
    url: str
    num_bytes: int = 0
    num_samples: int = 0
    broken: list[dict] = field(default_factory=list)  # {"where": "shard:key", "reason": ...}
    captions: list[str] = field(default_factory=list)  # good samples' captions (lengths are measured later)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of good samples
    has_cls: bool = False


def check_sample(sample: dict, decode: bool) -> tuple[str | None, str, str | None, tuple[int, int] | None]:
    """(fault reason or None, detail, caption, (width, height)), judged as the loader does: its byte checks
    (``sample_fault``), then the image decode (``--no-decode``: the header only)."""
    # a zero-shot eval sample carries its class (.cls) where a train sample has its caption (.txt)
    text_key = "cls" if "cls" in sample and "txt" not in sample else "txt"
    reason = sample_fault(sample, list(IMAGE_EXTS), text_key)
    if reason is not None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
        return reason, f"members: {members}", None, None
    ext = next(e for e in IMAGE_EXTS if e in sample)
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            size = img.size
            if decode:
                img.load()
    except Image.DecompressionBombError as exn:
        return "oversized_image", str(exn), None, None
    except Exception as exn:  # noqa: BLE001 -- any decoder failure makes the sample unusable
        return "corrupt_image", f".{ext}: {type(exn).__name__}: {exn}", None, None
    return None, "", sample["__caption__"] if text_key == "txt" else None, size


def inspect_shard(url: str, decode: bool = True) -> ShardReport:
    report = ShardReport(url, num_bytes=os.path.getsize(url))
    shard = os.path.basename(url)
    faults: list[tuple[str, str]] = []  # (reason, detail) of the shard itself: unreadable_shard, truncated_tar
    for sample in read_tar_samples(url, lambda reason, _url, detail: faults.append((reason, str(detail)))):
        report.num_samples += 1
        report.has_cls |= "cls" in sample
        reason, detail, caption, size = check_sample(sample, decode)
        if reason is not None:
            report.broken.append({"where": f"{shard}:{sample['__key__']}", "reason": reason, "detail": detail})
            continue
        if caption is not None:
            report.captions.append(caption)
        report.sizes.append(size)
    report.broken += [{"where": shard, "reason": reason, "detail": detail} for reason, detail in faults]
    return report


def histogram(values: list[int], edges: list[int]) -> list[tuple[str, int]]:
    """(label, count) per bin [edges[i], edges[i+1]); the last bin is open-ended."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f">= {edges[-1]}"]
    counts = [0] * len(labels)
    for v in values:
        counts[max(i for i, e in enumerate(edges) if v >= e)] += 1
    return list(zip(labels, counts))


def summary(values: list[int]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "max": max(values)}  # fmt: skip


def caption_lengths(captions: list[str], unit: str) -> list[int]:
    if unit == "chars":
        return [len(c) for c in captions]
    tokenizer = Tokenizer()
    return [len(tokenizer.encode(c)) for c in captions]


def inspect(urls: list[str], *, unit: str = "tokens", decode: bool = True, workers: int = 1) -> dict:
    """Read every shard of ``urls``; returns the report as a dict (what inspect.json holds)."""

    work = partial(inspect_shard, decode=decode)
    bar = tqdm(total=len(urls), desc="inspect", unit="shard", disable=None, file=sys.stderr)
    reports: list[ShardReport] = []
    if workers > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for r in pool.imap(work, urls):  # imap keeps shard order: the report does not depend on workers
                reports.append(r)
                bar.update()
    else:
        for url in urls:
            reports.append(work(url))
            bar.update()
    bar.close()
    captions = [c for r in reports for c in r.captions]
    lengths = caption_lengths(captions, unit)
    shorter = [min(w, h) for r in reports for w, h in r.sizes]
    broken = [b for r in reports for b in r.broken]
    return {
        "num_shards": len(reports),
        "num_bytes": sum(r.num_bytes for r in reports),
        "num_samples": sum(r.num_samples for r in reports),
        "num_good": sum(len(r.sizes) for r in reports),
        "num_broken": len(broken),
        "broken": broken,
        "eval_classes": any(r.has_cls for r in reports),
        "caption_length_unit": unit,
        "caption_length": summary(lengths),
        "caption_length_hist": histogram(lengths, TOKEN_BINS if unit == "tokens" else CHAR_BINS),
        "captions_truncated": sum(n > CONTEXT_LENGTH - 2 for n in lengths) if unit == "tokens" else None,
        "image_shorter_side": summary(shorter),
        "image_shorter_side_hist": histogram(shorter, SIZE_BINS),
        "image_width": summary([w for r in reports for w, _ in r.sizes]),
        "image_height": summary([h for r in reports for _, h in r.sizes]),
        "decoded": decode,
        "shards": [
            {"url": r.url, "num_samples": r.num_samples, "num_broken": len(r.broken), "num_bytes": r.num_bytes}
            for r in reports
        ],  # fmt: skip
        "_lengths": lengths,
        "_shorter": shorter,
    }


def _fmt(x) -> str:
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def to_markdown(report: dict, max_broken: int = 50) -> str:
    unit = "CLIP BPE tokens" if report["caption_length_unit"] == "tokens" else "characters"
    lines = [
        "# Shards",
        "",
        "| shards | samples | good | broken | bytes |",
        "|---:|---:|---:|---:|---:|",
        f"| {report['num_shards']} | {report['num_samples']} | {report['num_good']} | {report['num_broken']} "
        f"| {report['num_bytes']:,} |",
        "",
    ]
    if report["broken"]:
        lines += ["## Broken samples", "", "| shard:key | reason | detail |", "|---|---|---|"]
        lines += [f"| {b['where']} | {b['reason']} | {b['detail'][:200].replace('|', '/')} |"
                  for b in report["broken"][:max_broken]]  # fmt: skip
        if len(report["broken"]) > max_broken:
            lines.append(f"| ... | {len(report['broken']) - max_broken} more (all in inspect.json with --out) |")
        lines.append("")
    stats = [("caption length", report["caption_length"]), ("image width", report["image_width"]),
             ("image height", report["image_height"]), ("shorter side", report["image_shorter_side"])]  # fmt: skip
    lines += ["## Summary", "", "| | min | median | mean | max |", "|---|---:|---:|---:|---:|"]
    for name, s in stats:
        if s:
            lines.append(f"| {name} | {' | '.join(_fmt(s[k]) for k in ('min', 'median', 'mean', 'max'))} |")
    lines.append("")
    if report["caption_length"]:
        lines += [f"## Caption length ({unit}; good samples with a .txt)", "", f"| {unit} | captions |", "|---|---:|"]
        lines += [f"| {label} | {n} |" for label, n in report["caption_length_hist"]]
        if report["captions_truncated"] is not None:
            lines.append(f"\nLonger than {CONTEXT_LENGTH - 2} tokens (cut at context {CONTEXT_LENGTH}): "
                         f"{report['captions_truncated']}")  # fmt: skip
        lines.append("")
    lines += ["## Image size (shorter side, pixels)", "", "| pixels | images |", "|---|---:|"]
    lines += [f"| {label} | {n} |" for label, n in report["image_shorter_side_hist"]]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out_dir: str) -> tuple[str, str]:
    """inspect.json and inspect.png (caption length and shorter-side histograms) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "inspect.json"), os.path.join(out_dir, "inspect.png")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if not k.startswith("_")}, f, indent=1)
    fig, (ax_len, ax_size) = plt.subplots(1, 2, figsize=(11, 4))
    unit = "CLIP BPE tokens" if report["caption_length_unit"] == "tokens" else "characters"
    ax_len.hist(report["_lengths"], bins=40, color="tab:blue")
    ax_len.set(title="caption length", xlabel=unit, ylabel="captions")
    ax_size.hist(report["_shorter"], bins=40, color="tab:orange")
    ax_size.set(title="image shorter side", xlabel="pixels", ylabel="images")
    shards = f"{report['num_shards']} shard{'' if report['num_shards'] == 1 else 's'}"
    fig.suptitle(f"{report['num_good']} good samples of {report['num_samples']} in {shards}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


PROG = "mmpretrain-inspect-shards"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The console script ``mmpretrain-inspect-shards``; ``prog`` names the command in usage and error lines."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", nargs="+", help="brace spec, glob, folder or tar files")
    parser.add_argument("--out", metavar="DIR", help="also write DIR/inspect.json and DIR/inspect.png")
    parser.add_argument("--length", choices=["tokens", "chars"], default="tokens", help="caption length unit")
    parser.add_argument("--no-decode", action="store_true", help="read image headers only (fast, misses bad pixels)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading shards (1)")
    parser.add_argument("--max-broken", type=int, default=50, help="broken samples listed on stdout (50)")
    parser.add_argument("--fail-on-broken", action="store_true", help="exit code 1 if any sample is broken")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise ValueError(f"--workers: must be >= 1 (got {args.workers})")
        urls = resolve_urls(args.shards)
    except ValueError as exn:
        print(f"{prog}: error: {exn}", file=sys.stderr)
        return 2
    report = inspect(urls, unit=args.length, decode=not args.no_decode, workers=args.workers)
    print(to_markdown(report, args.max_broken))
    if args.out:
        json_path, png_path = write_outputs(report, args.out)
        print(f"wrote {json_path} and {png_path}")
    return 1 if args.fail_on_broken and report["num_broken"] else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m mmpretrain.tools.inspect_shards"))
