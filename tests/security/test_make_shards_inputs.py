"""make-shards keeps what a user has and reads only what it is pointed at (issue: trust what users hand each
other, findings 7 and 9's make-shards parts).

- `--overwrite` writes into a temporary folder beside the output and moves the result in only once complete: a
  run that fails half-way (here: an image read raises) leaves the earlier shards byte for byte and no temp folder;
- a JSONL row nested 100,000 levels deep is one skipped and counted bad row naming its line, the other rows are
  written (no RecursionError traceback, no empty output folder);
- a table's absolute, `~` and `../` image paths outside the image root (the table's folder, or --image-root) are
  skipped and counted as outside_image_root: the secret file's bytes are in no shard; inside --image-root they
  are read;
- an eval set's nshards.txt above the limit, or not a number, is an error naming the file.
"""

import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmpretrain.data.pipeline import MAX_EVAL_SHARDS, eval_tar_urls
from mmpretrain.tools import make_shards


def save_jpeg(path, seed: int) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return open(path, "rb").read()


def tar_bytes(out) -> bytes:
    """Every member's bytes of every tar under ``out``, concatenated."""
    data = b""
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tar:
                data += b"".join(tar.extractfile(m).read() for m in tar.getmembers())
    return data


def snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture
def table(tmp_path):
    """tmp/data/{captions.jsonl, img/0..2.jpg}, and a JPEG 'secret' outside data/ (tmp/secret/key.jpg)."""
    data = tmp_path / "data"
    for i in range(3):
        save_jpeg(str(data / f"img/{i}.jpg"), seed=i)
    secret = save_jpeg(str(tmp_path / "secret/key.jpg"), seed=99)
    return data, secret


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def row(image, caption="a photo") -> str:
    return json.dumps({"image": image, "caption": caption})


def test_failing_overwrite_keeps_the_old_output(table, tmp_path, capsys, monkeypatch):
    data, _ = table
    src = write_jsonl(data / "captions.jsonl", [row(f"img/{i}.jpg") for i in range(3)])
    out = tmp_path / "shards"
    assert make_shards.main(["table", src, str(out), "--samples-per-shard", "1"]) == 0
    before = snapshot(out)
    assert len([n for n in before if n.endswith(".tar")]) == 3

    def broken(item, opts):  # the disk fills up, a worker dies: any failure after the writing began
        raise OSError("No space left on device")

    monkeypatch.setattr(make_shards, "process", broken)
    with pytest.raises(OSError, match="No space left"):
        make_shards.main(["table", src, str(out), "--overwrite"])
    assert snapshot(out) == before  # the old shards, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["data", "secret", "shards"]  # no temp folder left beside it


def test_deeply_nested_json_row_is_a_counted_bad_row(table, tmp_path, capsys):
    data, _ = table
    deep = '{"image": ' + "[" * 100_000 + "]" * 100_000 + ', "caption": "x"}'
    src = write_jsonl(data / "captions.jsonl", [row("img/0.jpg"), deep, row("img/1.jpg")])
    out = tmp_path / "shards"
    code = make_shards.main(["table", src, str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    stats = json.load(open(out / "_stats.json"))
    assert stats["num_samples"] == 2 and stats["skipped_by_reason"] == {"bad_row": 1}
    (bad,) = stats["skipped"]
    assert bad["where"] == "captions.jsonl line 2" and "nested too deeply" in bad["detail"]
    assert "captions.jsonl line 2" in stdout


def test_deeply_nested_caption_is_a_bad_row(table, tmp_path, capsys):
    data, _ = table
    nested = {"image": "img/0.jpg", "caption": [[[["not text"]]]]}
    src = write_jsonl(data / "captions.jsonl", [json.dumps(nested), row("img/1.jpg")])
    assert make_shards.main(["table", src, str(tmp_path / "o")]) == 0
    stats = json.load(open(tmp_path / "o" / "_stats.json"))
    assert stats["num_samples"] == 1 and stats["skipped_by_reason"] == {"bad_row": 1}


def test_image_paths_stay_under_the_image_root(table, tmp_path, capsys, monkeypatch):
    data, secret = table
    monkeypatch.setenv("HOME", str(tmp_path / "secret"))
    hostile = [str(tmp_path / "secret/key.jpg"), "~/key.jpg", "../secret/key.jpg", "img/../../secret/key.jpg"]
    src = write_jsonl(data / "captions.jsonl", [row("img/0.jpg")] + [row(p) for p in hostile])
    out = tmp_path / "shards"
    assert make_shards.main(["table", src, str(out)]) == 0
    stdout = capsys.readouterr().out
    stats = json.load(open(out / "_stats.json"))
    assert stats["num_samples"] == 1 and stats["skipped_by_reason"] == {"outside_image_root": len(hostile)}
    assert all("--image-root" in s["detail"] for s in stats["skipped"])
    assert "outside_image_root" in stdout
    assert secret not in tar_bytes(out)
    # the same paths are read when the user names a root that holds them
    assert make_shards.main(["table", src, str(out), "--overwrite", "--image-root", str(tmp_path)]) == 0
    stats = json.load(open(out / "_stats.json"))
    assert stats["num_samples"] == 2  # img/0.jpg is now data/img/0.jpg: missing under tmp_path
    assert secret in tar_bytes(out)


@pytest.mark.parametrize("text", [str(MAX_EVAL_SHARDS + 1), "10" * 20, "-3", "many"])
def test_nshards_is_bounded(tmp_path, text):
    split = tmp_path / "set" / "test"
    split.mkdir(parents=True)
    (split / "nshards.txt").write_text(text + "\n")
    with pytest.raises(ValueError, match="nshards.txt"):
        eval_tar_urls(str(tmp_path / "set"))
    (split / "nshards.txt").write_text("3\n")
    assert [os.path.basename(u) for u in eval_tar_urls(str(tmp_path / "set"))] == ["0.tar", "1.tar", "2.tar"]
