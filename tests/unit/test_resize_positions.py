"""Longer (or shorter) text and other image sizes from existing weights (mmpretrain.convert.resize): the text
position embedding keeps its first positions and stretches the rest (Long-CLIP), checked against a float64 loop;
a CLIP text tower then gives the old features for captions that end before the kept positions; model.init_from
and `convert --context-length` resize on the way in and out."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from mmpretrain.config import Config
from mmpretrain.convert.ours import write_folder
from mmpretrain.convert.resize import KEEP_TEXT_POSITIONS, TEXT_POS_KEY, stretch_positions
from mmpretrain.data import Tokenizer
from mmpretrain.loop import init_weights
from mmpretrain.model import ModelConfig, build_model, resolve_model_config


def reference_stretch(pos, length, keep):
    """New row j < keep: old row j; j >= keep: linear between the two old rows around
    keep + (j - keep) * (L - 1 - keep) / (length - 1 - keep), in float64, one row at a time."""
    old = pos.shape[0]
    out = []
    for j in range(length):
        if j < keep:
            out.append(pos[j].double())
            continue
        x = keep + (j - keep) * (old - 1 - keep) / (length - 1 - keep)
        lo = min(int(x), old - 1)
        hi = min(lo + 1, old - 1)
        out.append(pos[lo].double() * (1 - (x - lo)) + pos[hi].double() * (x - lo))
    return torch.stack(out)


@pytest.mark.parametrize("old,new", [(32, 64), (77, 248), (16, 17), (8, 40)])
def test_stretch_equals_the_float64_reference(old, new):
    pos = torch.randn(old, 12, generator=torch.Generator().manual_seed(old))
    got = stretch_positions(pos, new)
    keep = min(KEEP_TEXT_POSITIONS, old - 1)
    assert got.shape == (new, 12) and got.dtype == pos.dtype
    torch.testing.assert_close(got.double(), reference_stretch(pos, new, keep), rtol=0, atol=1e-6)
    assert torch.equal(got[:keep], pos[:keep]) and torch.allclose(got[-1], pos[-1])


def test_shorter_keeps_the_first_positions():
    pos = torch.randn(77, 8)
    assert torch.equal(stretch_positions(pos, 32), pos[:32])


def tiny(family="clip", ctx=32, image_size=32):
    cfg = ModelConfig(name="tiny", family=family)
    cfg.text.context_length = ctx
    cfg.vision.image_size = image_size
    return resolve_model_config(cfg)


@pytest.fixture(scope="module")
def short_folder(tmp_path_factory):
    """A consolidated folder of the tiny CLIP at 32 tokens and 32 px."""
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg)
    out = str(tmp_path_factory.mktemp("short") / "clip32")
    write_folder(model.state_dict(), Config(model=cfg), out)
    return out, model


def test_init_from_a_shorter_model_keeps_short_captions_features(short_folder, capsys):
    folder, short = short_folder
    cfg = tiny(ctx=64, image_size=48)
    long = build_model(cfg)
    init_weights(long, folder, model_cfg=cfg)
    assert "text positions 32 -> 64 (first 20 kept, the rest stretched)" in capsys.readouterr().out
    assert long.state_dict()[TEXT_POS_KEY].shape[0] == 64
    captions = ["a red circle", "a small blue square on a green background"]  # ending before token 20
    tok32, tok64 = Tokenizer(context_length=32)(captions), Tokenizer(context_length=64)(captions)
    assert int(tok32.argmax(-1).max()) < KEEP_TEXT_POSITIONS
    with torch.no_grad():
        before, after = short.encode_text(tok32), long.encode_text(tok64)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # a caption longer than the old context now fits, and gives a finite feature
    long_caption = Tokenizer(context_length=64)([" ".join(["a red circle"] * 15)])
    assert int(long_caption.argmax(-1)) > 32 and torch.isfinite(long.encode_text(long_caption)).all()


def test_init_from_another_image_size_resizes_the_patch_grid(short_folder, capsys):
    folder, short = short_folder
    cfg = tiny(image_size=48)  # 4x4 -> 6x6 patches
    model = build_model(cfg)
    init_weights(model, folder, model_cfg=cfg)
    assert "image positions 4x4 -> 6x6 patches (bicubic)" in capsys.readouterr().out
    key = "vision_model.embeddings.position_embedding.weight"
    assert model.state_dict()[key].shape[0] == 1 + 36
    assert torch.equal(model.state_dict()[key][0], short.state_dict()[key][0])  # the class token's row


def test_other_widths_are_still_refused(short_folder):
    folder, _ = short_folder
    cfg = dataclasses.replace(tiny(), embed_dim=32)
    with pytest.raises(Exception, match="does not fit this model"):
        init_weights(build_model(cfg), folder, model_cfg=cfg)


def test_convert_context_length_to_hf(short_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, short = short_folder
    out = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.convert", "to-hf", folder, out, "--context-length", "48"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = transformers.CLIPModel.from_pretrained(out)
    assert hf.config.text_config.max_position_embeddings == 48
    want = stretch_positions(short.state_dict()[TEXT_POS_KEY], 48)
    torch.testing.assert_close(hf.text_model.embeddings.position_embedding.weight.detach(), want)
