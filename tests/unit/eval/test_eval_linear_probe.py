"""mmpretrain.eval.linear_probe: 100% on the oracle's separable features, and the CLI on the shapes set."""

import copy
import json
import os
import shutil

import mmpretrain.checkpoint
from mmpretrain.eval.cli import main
from mmpretrain.eval.linear_probe import linear_probe
from tests.unit.eval.helpers import CLASSNAMES, COLORS, SIZE, ColorOracle, png, write_tar


def test_linear_probe_oracle_features(sets, tmp_path):
    """The color oracle's one-hot features make the 7 classes separable: the probe scores 100% on held-out data."""
    zs, _, meta = sets
    root = tmp_path / "probe"
    shutil.copytree(os.path.join(zs, "test"), root / "train")
    samples = [(f"t{i}", {"png": png(COLORS[CLASSNAMES[i % 7]], 100 + i), "cls": str(i % 7).encode()})
               for i in range(9)]  # fmt: skip
    write_tar(str(root / "test" / "0.tar"), samples)
    model = ColorOracle()
    got = linear_probe(model, str(root), image_size=SIZE, batch_size=4, max_iter=100)
    assert got == {"top1": 1.0, "num_train": len(meta["labels"]) - 1, "num_test": 9}
    assert not any(grad or training for _, _, grad, training in model.calls)


def test_linear_probe_shapes_end_to_end(tiny_run, shapes_dataset, tmp_path, monkeypatch, capsys):
    """A random tiny CLIP through the CLI: the shapes zero-shot tars serve as both splits."""
    monkeypatch.setattr(mmpretrain.checkpoint, "load_model", lambda path, **kw: copy.deepcopy(tiny_run))
    root = tmp_path / "shapes_probe"
    for split in ("train", "test"):
        shutil.copytree(os.path.join(shapes_dataset.zeroshot_root, "test"), root / split)
    out = tmp_path / "r.json"
    assert main([str(tmp_path), "--linear-probe", str(root), "--num-workers", "0", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {f"linear_probe/shapes_probe/{k}" for k in ("top1", "num_train", "num_test")}
    assert results["linear_probe/shapes_probe/num_test"] == shapes_dataset.num_eval
    assert 0 <= results["linear_probe/shapes_probe/top1"] <= 1
