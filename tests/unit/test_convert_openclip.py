"""Ours <-> OpenCLIP, checked against the real open_clip (one import for the module: it costs ~8 s).

Export: our tiny random CLIP -> `<name>.json` + safetensors -> `open_clip.create_model(name, pretrained=...)`.
Import: a random open_clip model built from the same JSON, saved with torch.save -> ours.
"""

import argparse
import json
import os

import pytest
import torch

from mmpretrain.convert import export_openclip, openclip_config, read_any, read_openclip
from mmpretrain.convert.openclip import WEIGHTS
from mmpretrain.model import ModelConfig, TextConfig, VisionConfig, build_model, resolve_model_config

open_clip = pytest.importorskip("open_clip")

VOCAB = 1000
ATOL = 1e-5


def tiny_cfg(act, name="tiny", **vision):
    return resolve_model_config(
        ModelConfig(name=name, text=TextConfig(vocab_size=VOCAB, act=act), vision=VisionConfig(act=act, **vision))
    )


def perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(cfg, B=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    L = cfg.text.context_length
    tokens = torch.randint(1, VOCAB - 1, (B, L), generator=g)
    for b, eot in enumerate([5, 11, L - 1][:B]):
        tokens[b, eot] = VOCAB - 1
        tokens[b, eot + 1 :] = 0
    return images, tokens


def assert_same(ours, oc, cfg):
    images, tokens = inputs(cfg)
    with torch.no_grad():
        out = ours(images, tokens)
        img = oc.encode_image(images, normalize=True)
        txt = oc.encode_text(tokens, normalize=True)
        scale = oc.logit_scale.exp()
    torch.testing.assert_close(out.image_features, img, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.text_features, txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logit_scale, scale, atol=0, rtol=1e-6)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    torch.testing.assert_close(logits, scale * img @ txt.T, atol=ATOL * scale.item(), rtol=0)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_export_loads_in_open_clip_with_same_outputs(tmp_path, act):
    cfg = tiny_cfg(act)
    torch.manual_seed(0)
    ours = perturbed(build_model(cfg), 1)
    name = f"mmp-test-export-{act}"
    export_openclip(ours.state_dict(), cfg, str(tmp_path / "oc"), name=name)
    open_clip.add_model_config(str(tmp_path / "oc"))
    oc = open_clip.create_model(name, pretrained=str(tmp_path / "oc" / WEIGHTS)).eval()
    assert_same(ours, oc, cfg)


def test_import_from_open_clip_same_outputs_and_round_trip_bit_exact(tmp_path):
    cfg = tiny_cfg("quick_gelu")
    src = tmp_path / "src"
    src.mkdir()
    name = "mmp-test-import"
    json.dump(openclip_config(cfg), open(src / f"{name}.json", "w"))
    open_clip.add_model_config(str(src))
    torch.manual_seed(3)
    oc = perturbed(open_clip.create_model(name), 4)
    # OpenCLIP's trainer layout: {"epoch", "state_dict" (DDP "module." prefix), ...}, loaded with weights_only=True
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}, src / "weights.pt")

    sd, got_cfg = read_openclip(str(src / f"{name}.json"), str(src / "weights.pt"))
    assert got_cfg == cfg
    ours = build_model(got_cfg).eval()
    ours.load_state_dict(sd, strict=True)
    assert_same(ours, oc, cfg)

    # OpenCLIP -> ours -> OpenCLIP: every tensor bit-exact; and read_any finds the folder by itself
    export_openclip(sd, got_cfg, str(tmp_path / "back"), name="back")
    back = read_any(str(tmp_path / "back"))[0]
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / "back" / WEIGHTS))
    ref = oc.state_dict()
    assert again.keys() == {k for k in ref if k != "attn_mask"}
    for k, v in again.items():
        assert torch.equal(v, ref[k]), k


def test_hub_layout_folder_is_found(tmp_path):
    """open_clip_config.json (model_cfg nested) + tokenizer files + a .bin twin of the safetensors weights."""
    cfg = tiny_cfg("gelu")
    sd = build_model(cfg).state_dict()
    export_openclip(sd, cfg, str(tmp_path / "oc"), name="m")
    hub = tmp_path / "oc"
    hub_cfg = {"model_cfg": json.load(open(hub / "m.json")), "preprocess_cfg": {}}
    json.dump(hub_cfg, open(hub / "open_clip_config.json", "w"))
    os.remove(hub / "m.json")
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (hub / f).write_text("{}")
    (hub / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    back, got_cfg = read_any(str(hub))
    assert got_cfg.model == cfg and all(torch.equal(back[k], v) for k, v in sd.items())


def test_unsupported_models_and_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="supports clip only"):
        openclip_config(resolve_model_config(ModelConfig(name="siglip-tiny")))
    with pytest.raises(ValueError, match="one activation"):
        openclip_config(resolve_model_config(ModelConfig(name="tiny", vision=VisionConfig(act="quick_gelu"))))
    raw = openclip_config(tiny_cfg("gelu"))
    raw["vision_cfg"]["attentional_pool"] = True
    path = tmp_path / "x.json"
    json.dump(raw, open(path, "w"))
    torch.save({}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"vision_cfg.attentional_pool=True"):
        read_openclip(str(path), str(tmp_path / "w.pt"))


def test_leftover_key_and_non_tensor_pickle_are_refused(tmp_path):
    cfg = tiny_cfg("gelu")
    export_openclip(build_model(cfg).state_dict(), cfg, str(tmp_path / "oc"), name="m")
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "oc" / WEIGHTS)
    sd = load_file(path)
    sd["visual.extra"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(ValueError, match="unexpected key visual.extra"):
        read_openclip(str(tmp_path / "oc" / "m.json"), path)
    # a pickle holding an arbitrary object is refused by weights_only=True, named
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pt")  # not on the weights_only allowlist
    with pytest.raises(ValueError, match="evil.pt: not a readable torch weights file"):
        read_openclip(str(tmp_path / "oc" / "m.json"), str(tmp_path / "evil.pt"))
