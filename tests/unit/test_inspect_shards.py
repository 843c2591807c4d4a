"""mmpretrain-inspect-shards (mmpretrain/tools/inspect_shards.py): counts, injected broken samples listed by
shard:key, histograms, JSON + PNG output."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmpretrain.data.shards import ShardWriter
from mmpretrain.tools import inspect_shards


def jpeg(width, height, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


# (key, members) in write order; the broken ones name what is wrong
GOOD = [(f"good{i}", {"jpg": jpeg(20 + 50 * i, 70, seed=i), "txt": "x" * (10 * i + 5)}) for i in range(5)]
BROKEN = {
    "noimage": {"txt": "a caption without an image"},
    "nocaption": {"jpg": jpeg(16, 16)},
    "badjpeg": {"jpg": jpeg(16, 16)[:60], "txt": "cut"},
    "badutf8": {"jpg": jpeg(16, 16), "txt": b"caf\xe9 au lait"},
    "blank": {"jpg": jpeg(16, 16), "txt": "   "},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 shards: 5 good samples and 5 broken ones interleaved, plus a third tar that is cut short."""
    root = tmp_path_factory.mktemp("shards")
    samples = [GOOD[0], *list(BROKEN.items())[:3], *GOOD[1:3], *list(BROKEN.items())[3:], *GOOD[3:]]
    with ShardWriter(root, samples_per_shard=5) as w:
        for key, members in samples:
            w.write({"__key__": key, **members})
    # a tar cut inside the image of its second sample: one sample read, then the tar breaks off
    with ShardWriter(root / "cut", samples_per_shard=10) as w:
        for i in range(3):
            w.write({"__key__": f"c{i}", "jpg": jpeg(40, 40, seed=50 + i), "txt": "fine"})
    with tarfile.open(root / "cut" / "shard-000000.tar") as tar:
        cut = tar.getmember("c1.jpg").offset_data + 10
    (root / "shard-000002.tar").write_bytes((root / "cut" / "shard-000000.tar").read_bytes()[:cut])
    return root


def expected_broken_where():
    """shard:key of each broken sample, in file order (shard 0 holds good0 + 3 broken + good1)."""
    return ["shard-000000.tar:noimage", "shard-000000.tar:nocaption", "shard-000000.tar:badjpeg",
            "shard-000001.tar:badutf8", "shard-000001.tar:blank"]  # fmt: skip


def test_counts_broken_and_histograms(shards, capsys, tmp_path):
    out = tmp_path / "report"
    spec = str(shards / "shard-{000000..000002}.tar")
    assert inspect_shards.main([spec, "--length", "chars", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "inspect.json").read_text())
    sizes = sum(os.path.getsize(shards / f"shard-00000{i}.tar") for i in range(3))
    assert (report["num_shards"], report["num_bytes"]) == (3, sizes)
    # 10 samples in the two whole shards; the cut tar yields the sample before the cut
    assert report["num_samples"] == 11 and report["num_good"] == 6
    where = [b["where"] for b in report["broken"]]
    assert where[:5] == expected_broken_where() and where[5] == "shard-000002.tar"
    # the loader's reason names (mmpretrain.data.pipeline.DATA_FAULT_REASONS)
    reasons = [b["reason"] for b in report["broken"]]
    assert reasons == ["no_image", "no_caption", "corrupt_image", "bad_utf8", "empty_caption", "truncated_tar"]
    from mmpretrain.data.pipeline import DATA_FAULT_REASONS

    assert set(reasons) <= set(DATA_FAULT_REASONS)
    for w, r in zip(expected_broken_where(), reasons):
        assert f"| {w} | {r} |" in stdout
    # caption lengths in characters: 5, 15, 25, 35, 45 and "fine" (4)
    assert report["caption_length"] == {"min": 4, "median": 20.0, "mean": 129 / 6, "max": 45}
    assert dict(report["caption_length_hist"]) == {"0-19": 3, "20-49": 3, "50-99": 0, "100-199": 0, "200-499": 0,
                                                   "500-999": 0, ">= 1000": 0}  # fmt: skip
    # shorter sides: widths 20, 70, 120, 170, 220 at height 70 -> 20, 70, 70, 70, 70; and 40 from the cut tar
    assert dict(report["image_shorter_side_hist"])["0-63"] == 2 and dict(report["image_shorter_side_hist"])[
        "64-127"] == 4  # fmt: skip
    assert report["image_width"]["max"] == 220
    assert "| shards | samples | good | broken | bytes |" in stdout and "## Caption length (characters" in stdout
    png = out / "inspect.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[1] > 500


def test_token_lengths_workers_and_exit_codes(shards, capsys):
    from mmpretrain.data.tokenizer import Tokenizer

    spec = str(shards / "shard-00000[01].tar")  # a glob
    assert inspect_shards.main([spec, "--workers", "2", "--fail-on-broken"]) == 1
    stdout = capsys.readouterr().out
    report = inspect_shards.inspect(inspect_shards.resolve_urls([spec]), unit="tokens")
    tokenizer = Tokenizer()
    want = [len(tokenizer.encode(m["txt"])) for _, m in GOOD]
    assert report["_lengths"] == want and report["caption_length"]["max"] == max(want)
    assert "## Caption length (CLIP BPE tokens" in stdout and report["captions_truncated"] == 0
    assert inspect_shards.main([str(shards / "nope-{0..1}.tar")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_folder_with_classes(tmp_path, capsys):
    """A clip_benchmark folder: <root>/test/*.tar with .cls instead of .txt is not broken."""
    with ShardWriter(tmp_path / "test", samples_per_shard=2, name_format="{:d}.tar") as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "jpg": jpeg(30, 20, seed=i), "cls": i})
    assert inspect_shards.main([str(tmp_path), "--length", "chars", "--no-decode"]) == 0
    stdout = capsys.readouterr().out
    assert "| 2 | 3 | 3 | 0 |" in stdout
