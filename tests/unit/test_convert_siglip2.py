"""Ours <-> transformers' Siglip2Model (SigLIP 2, NaFlex): `convert to-hf --siglip2` of a SigLIP model loads in
transformers and gives our image and text features (<= 1e-5) on the processor's own patch inputs at our grid;
a Siglip2 folder reads back to the same weights, bit for bit; the exported processor gives our eval transform's
pixels on a square image."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import Siglip2ImageProcessor, Siglip2Model

from mmpretrain.convert import export_hf, read_hf
from mmpretrain.convert.hf import hf_config
from mmpretrain.model import build_model
from tests.unit.test_convert_hf import ATOL, inputs, our_model, tiny_cfg


def patches(images_BCHW, p):
    """What Siglip2ImageProcessor feeds the model: (B, g*g, p*p*C), patches row-major, pixels (row, col, channel)."""
    B, C, H, W = images_BCHW.shape
    x = images_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def siglip2_features(hf, images, tokens, p):
    B, g = images.shape[0], images.shape[-1] // p
    pix = patches(images, p)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pix, pixel_attention_mask=torch.ones(B, g * g, dtype=torch.long),
                                    spatial_shapes=torch.tensor([[g, g]] * B))  # fmt: skip
        txt = hf.get_text_features(input_ids=tokens)
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny_cfg("siglip-tiny")
    ours = our_model(cfg)
    out = str(tmp_path_factory.mktemp("s2") / "siglip2")
    export_hf(ours.state_dict(), cfg, out, siglip2=True)
    return cfg, ours, out


def test_export_gives_our_features_in_transformers(exported):
    cfg, ours, out = exported
    hf = Siglip2Model.from_pretrained(out).eval()
    assert hf.config.model_type == "siglip2" and hf.config.vision_config.num_patches == 16
    images, tokens = inputs(cfg)
    with torch.no_grad():
        mine = ours(images, tokens)
    img, txt = siglip2_features(hf, images, tokens, cfg.vision.patch_size)
    torch.testing.assert_close(img, mine.image_features, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt, mine.text_features, atol=ATOL, rtol=0)


def test_siglip2_folder_reads_back_bit_exact(exported):
    cfg, ours, out = exported
    sd, model_cfg = read_hf(out)
    assert model_cfg.family == "siglip" and model_cfg.vision.image_size == cfg.vision.image_size
    back = build_model(model_cfg)
    back.load_state_dict(sd)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_exported_processor_gives_our_pixels_on_a_square_image(exported):
    from PIL import Image

    from mmpretrain.data.transforms import EvalTransform, normalize_images

    cfg, _, out = exported
    S, p = cfg.vision.image_size, cfg.vision.patch_size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8))
    proc = Siglip2ImageProcessor.from_pretrained(out)
    got = proc(images=[img], return_tensors="pt")
    assert got["spatial_shapes"].tolist() == [[S // p, S // p]]
    want = patches(normalize_images(EvalTransform(S)(img)[None]), p)
    torch.testing.assert_close(got["pixel_values"], want, atol=1e-5, rtol=0)


def test_clip_is_refused_and_the_cli_writes_it(tmp_path, exported):
    with pytest.raises(ValueError, match="SigLIP models only"):
        hf_config(tiny_cfg("tiny"), siglip2=True)
    _, _, out = exported
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.convert", "to-hf", out, str(tmp_path / "again"),
                           "--siglip2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Siglip2Model.from_pretrained(str(tmp_path / "again")).config.model_type == "siglip2"


# ---------------------------------------------------------------- NaFlex: images of their own aspect ratio, packed

NAFLEX_SIZES = [(40, 100), (90, 30), (33, 33), (20, 64), (64, 24)]  # H x W pixels: aspect ratios 1:3 to 3:1


def naflex_parity(ours, hf, proc):
    """Max |our packed features - transformers' padded features| on NAFLEX_SIZES images through the processor."""
    from PIL import Image

    from mmpretrain.data.naflex import pack_images
    from mmpretrain.model.naflex import PackedImages

    rng = np.random.default_rng(5)
    imgs = [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for H, W in NAFLEX_SIZES]
    got = proc(images=imgs, return_tensors="pt")
    grids = [tuple(s) for s in got["spatial_shapes"].tolist()]
    assert len(set(grids)) >= 4  # grids of several aspect ratios, the square 4 x 4 one of them
    with torch.no_grad():
        theirs = hf.get_image_features(
            **{k: got[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
        )
        theirs = torch.nn.functional.normalize(getattr(theirs, "pooler_output", theirs), dim=-1)
        packed = pack_images([got["pixel_values"][i, : h * w] for i, (h, w) in enumerate(grids)], grids, max_len=32)
        assert len(packed["shapes"]) < len(grids)  # several images share a row
        mine = ours.encode_image(PackedImages(packed["patches"], packed["segment_ids"], packed["shapes"]))
    mine_in_input_order = torch.empty_like(mine)
    mine_in_input_order[packed["order"]] = mine
    return (mine_in_input_order - theirs).abs().max().item()


def test_naflex_packed_features_equal_siglip2_to_hf(exported):
    _, ours, out = exported
    err = naflex_parity(ours, Siglip2Model.from_pretrained(out).eval(), Siglip2ImageProcessor.from_pretrained(out))
    print(f"to-hf NaFlex parity: max |diff| {err:.2e}")
    assert err <= ATOL


def test_naflex_packed_features_equal_siglip2_from_hf(exported, tmp_path):
    from tests.unit.test_convert_hf import perturb_

    cfg, _, out = exported
    torch.manual_seed(3)
    hf = perturb_(Siglip2Model(hf_config(cfg, siglip2=True)), 7)  # transformers' own init, every weight moved
    hf.save_pretrained(tmp_path / "hf")
    sd, model_cfg = read_hf(str(tmp_path / "hf"))
    ours = build_model(model_cfg)
    ours.load_state_dict(sd)
    err = naflex_parity(ours.eval(), hf, Siglip2ImageProcessor.from_pretrained(out))
    print(f"from-hf NaFlex parity: max |diff| {err:.2e}")
    assert err <= ATOL
