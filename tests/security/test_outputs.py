"""What a user has is never lost, and evaluation decodes no image over the pixel limit (issue: trust what users
hand each other, finding 9).

- `export` and `adapt` refuse a non-empty --output without --force, naming the flag, before loading anything;
  with --force a run that fails while writing leaves the old folder as it was and no temporary folder beside it;
- the files that are rewritten in place (eval.json, `eval --output`, metrics.jsonl on resume) go through one
  rename: a write that fails leaves the old content whole, and no temporary file;
- evaluation skips and counts (oversized_image) a JPEG whose header declares 81 megapixels, under the default
  data.max_image_pixels, and evaluates the rest; adapt honours --max-image-pixels for its K-shot images.
"""

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from mmpretrain import adapt, atomic, export
from mmpretrain.config import Config
from mmpretrain.eval.suite import evaluate_all
from mmpretrain.logging import MetricsLogger
from mmpretrain.logging_config import LoggingConfig
from mmpretrain.model import ModelConfig, resolve_model_config
from tests.unit.eval.helpers import CLASSNAMES, COLORS, TEMPLATES, CharTokenizer, RandomTwoTower, png, write_tar


def snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture
def old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"from": "the run before"}\n')
    return out


def never_load(path):
    raise AssertionError("the checkpoint was loaded before the --output check")


# ----------------------------------------------------------------------------- export, adapt: --force, atomic


def test_export_refuses_a_non_empty_output(old_output, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "load_any", never_load)
    argv = [str(tmp_path), "--output", str(old_output), "--torch-export"]
    assert export.main(argv) == 2
    assert "not empty (pass --force" in capsys.readouterr().err
    assert snapshot(old_output) == {"results.json": b'{"from": "the run before"}\n'}


def test_export_failing_with_force_keeps_the_old_output(old_output, tmp_path, monkeypatch):
    before = snapshot(old_output)
    monkeypatch.setattr(export, "load_any", lambda path, **kw: (None, Config()))

    def half_written(model, model_cfg, out_dir, **kw):
        open(os.path.join(out_dir, "image_encoder.pt2"), "wb").write(b"half")
        raise RuntimeError("the exporter crashed")

    monkeypatch.setattr(export, "export_encoders", half_written)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export.main([str(tmp_path), "--output", str(old_output), "--torch-export", "--force"])
    assert snapshot(old_output) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def adapt_argv(tmp_path, out, *extra):
    return [str(tmp_path), "--train", str(tmp_path), "--test", str(tmp_path), "--output", str(out), *extra]


def test_adapt_refuses_a_non_empty_output(old_output, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(adapt.convert, "load_any", never_load)
    assert adapt.main(adapt_argv(tmp_path, old_output)) == 2
    assert "not empty (pass --force" in capsys.readouterr().err
    assert snapshot(old_output) == {"results.json": b'{"from": "the run before"}\n'}


def test_adapt_failing_with_force_keeps_the_old_output(old_output, tmp_path, monkeypatch):
    before = snapshot(old_output)
    cfg = Config(model=resolve_model_config(ModelConfig(name="tiny")))
    monkeypatch.setattr(adapt.convert, "load_any", lambda path, **kw: (RandomTwoTower(), cfg))
    monkeypatch.setattr(adapt, "adapt", lambda *a, **kw: ({"num_train": 1}, {}, {}))

    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(adapt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        adapt.main(adapt_argv(tmp_path, old_output, "--force"))
    assert snapshot(old_output) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------- files rewritten in place


def fail_at_sync(fd):
    raise OSError("No space left on device")


def test_a_failed_rewrite_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    path.write_text('{"step": 100}')
    monkeypatch.setattr(atomic.os, "fsync", fail_at_sync)
    with pytest.raises(OSError):
        atomic.write_atomic(str(path), '{"step": 200, ' + "x" * 100_000)
    assert path.read_text() == '{"step": 100}' and os.listdir(tmp_path) == ["eval.json"]


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    logger_args = dict(is_main=True, run_id="r", config={}, total_steps=40)
    cfg = LoggingConfig(wandb="disabled", progress=False)
    monkeypatch.setattr(atomic.os, "fsync", fail_at_sync)
    with pytest.raises(OSError):
        MetricsLogger(cfg, str(tmp_path), start_step=20, **logger_args)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)  # whole, not cut
    monkeypatch.undo()
    MetricsLogger(cfg, str(tmp_path), start_step=20, **logger_args)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    assert sorted(os.listdir(tmp_path)) == ["metrics.dropped.jsonl", "metrics.jsonl"]


# ----------------------------------------------------------------------------- the pixel limit at eval and adapt


def declared_huge_jpeg(side: int = 9000) -> bytes:
    """A 16x16 JPEG whose header (SOF0) declares side x side pixels: what a decompression bomb looks like."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2  # height, width
    return bytes(data)


def write_set(root, images: dict[int, bytes]) -> str:
    """A zero-shot set: images[i] has class i % C."""
    samples = [(f"s{i:04d}", {"jpg" if d[:2] == b"\xff\xd8" else "png": d, "cls": str(i % len(CLASSNAMES)).encode()})
               for i, d in images.items()]  # fmt: skip
    write_tar(os.path.join(root, "test", "0.tar"), samples)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return str(root)


def test_eval_skips_and_counts_an_oversized_image(tmp_path, caplog):
    colors = list(COLORS.values())
    images = {i: png(colors[i % len(colors)], i) for i in range(6)}
    images[3] = declared_huge_jpeg()
    cfg = Config()
    cfg.data.eval.zeroshot = write_set(tmp_path / "set", images)
    cfg.eval.num_workers = 0
    with caplog.at_level(logging.WARNING):
        results = evaluate_all(RandomTwoTower(), CharTokenizer(), cfg.data.eval, cfg.eval, image_size=8)
    assert results["zeroshot/set/num_samples"] == 5
    assert "oversized_image" in caplog.text and "9000x9000" in caplog.text


def test_adapt_honours_max_image_pixels(tmp_path):
    colors = list(COLORS.values())
    images = {i: png(colors[i % len(colors)], i) for i in range(2 * len(CLASSNAMES))}  # 12 x 12 pixels
    big = io.BytesIO()
    Image.fromarray(np.full((13, 12, 3), 200, np.uint8)).save(big, format="PNG")
    images[0] = big.getvalue()  # class 0's first image: 13 x 12 pixels
    root = write_set(tmp_path / "set", images)
    _, labels, stats = adapt.k_shot_images(root, "test", 2, 0, len(CLASSNAMES), 8)  # the default limit
    assert len(labels) == 2 * len(CLASSNAMES) and stats["num_skipped"] == 0
    _, labels, stats = adapt.k_shot_images(root, "test", 2, 0, len(CLASSNAMES), 8, max_image_pixels=12 * 12)
    assert len(labels) == 2 * len(CLASSNAMES) - 1 and stats["num_skipped"] == 1 and stats["short_classes"] == {0: 1}
