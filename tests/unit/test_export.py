"""Deployment export: ONNX files under onnxruntime and torch.export programs equal the eager encoders."""

import json

import pytest
import torch

from mmpretrain.export import example_inputs, export_encoders, main
from mmpretrain.model import ModelConfig, build_model, resolve_model_config

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'mmpretrain[export]')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (torch.onnx.export's exporter needs it)")

TOL = 1e-4


def _tiny(name: str):
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(name=name))
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="module", params=["tiny", "siglip-tiny"])
def exported(request, tmp_path_factory):
    model, cfg = _tiny(request.param)
    out = tmp_path_factory.mktemp(request.param)
    info = export_encoders(model, cfg, str(out))
    return model, cfg, out, info


def test_onnx_matches_pytorch_at_two_batch_sizes(exported):
    model, cfg, out, info = exported
    for batch in (1, 7):  # neither the traced batch (2) nor the ones export_encoders checked (1, 5) alone
        x = example_inputs(cfg, batch, seed=100 + batch)
        with torch.no_grad():
            ref = {"image": model.encode_image(x["image"]), "text": model.encode_text(x["text"])}
        for tower, input_name in (("image", "pixel_values"), ("text", "input_ids")):
            session = ort.InferenceSession(str(out / f"{tower}_encoder.onnx"), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {input_name: x[tower].numpy()})
            assert got.shape == (batch, cfg.embed_dim)
            assert (torch.from_numpy(got) - ref[tower]).abs().max().item() < TOL, tower


def test_torch_export_program_matches_pytorch(exported):
    model, cfg, out, _ = exported
    x = example_inputs(cfg, 3, seed=7)
    image = torch.export.load(str(out / "image_encoder.pt2")).module()
    text = torch.export.load(str(out / "text_encoder.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(image(x["image"]), model.encode_image(x["image"]), atol=TOL, rtol=0)
        torch.testing.assert_close(text(x["text"]), model.encode_text(x["text"]), atol=TOL, rtol=0)


def test_export_json_reports_every_file(exported):
    model, cfg, out, info = exported
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert sorted(info["files"].values()) == sorted(
        ["image_encoder.onnx", "text_encoder.onnx", "image_encoder.pt2", "text_encoder.pt2"]
    )
    for name, per_batch in info["max_abs_diff"].items():
        assert sorted(per_batch) == ["1", "5"] and max(per_batch.values()) < TOL, name
    assert info["image_size"] == cfg.vision.image_size and info["context_length"] == cfg.text.context_length
    scale, bias = model.logit_params()
    assert info["logit_scale"] == pytest.approx(scale.item())
    assert (info["logit_bias"] is None) == (cfg.family == "clip")


def test_export_leaves_the_model_untouched(exported):
    model, *_ = exported
    impls = {m.impl for m in model.modules() if hasattr(m, "impl")}
    assert impls == {"auto"}  # the sdpa switch happened on a copy


def test_cli_onnx_only_from_consolidated_folder(tmp_path, capsys):
    from mmpretrain.config import Config
    from mmpretrain.convert.ours import write_folder

    model, model_cfg = _tiny("tiny")
    write_folder(model.state_dict(), Config(model=model_cfg), str(tmp_path / "ckpt"))
    assert main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"), "--onnx"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "export.json", "image_encoder.onnx", "text_encoder.onnx"
    ]  # fmt: skip
    printed = capsys.readouterr().out
    assert "image_encoder.onnx" in printed and "max_abs_diff" in printed


def test_cli_missing_checkpoint_names_it(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and err.count("\n") == 1
