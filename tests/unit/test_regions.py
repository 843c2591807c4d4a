"""Region tasks for the caption decoder (mmpretrain/data/regions.py, data.train.regions).

- The synthetic shapes' boxes are where the shapes' pixels are, and after the train crop the box in the crop's
  frame is where the shape's pixels are in the cropped image (checked on the pixels, not on the formula).
- The decoder sequences: the prompt's token count, zero-padded coordinates that read back to the box, the words.
- Malformed regions are left out; both train loaders hand out the decoder fields; config errors name the key.
"""

import io
import json

import numpy as np
import pytest
import torch

from mmpretrain.data import Tokenizer
from mmpretrain.data.regions import (
    box_in_crop,
    choose,
    decoder_fields,
    parse_regions,
    quantize,
    region_sequence,
)
from mmpretrain.data.synthetic import make_shape_sample, region
from mmpretrain.data.transforms import TrainTransform


def foreground_box(pixels: np.ndarray, bg) -> list[float] | None:
    """[x0, y0, x1, y1] / side of the pixels unlike the background color (None if there are none)."""
    mask = np.abs(pixels.astype(int) - np.asarray(bg, dtype=int)).sum(-1) > 90
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_synthetic_boxes_hold_the_shapes_pixels():
    rng = np.random.default_rng(0)
    for _ in range(40):
        s = make_shape_sample(rng, 64)
        pixels = np.asarray(s.image)
        want = foreground_box(pixels, pixels[0, 0] if s.cx > 0.5 else pixels[-1, -1])
        got = region(s)["box"]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 2.5 / 64, (s.shape, got, want)
        assert region(s)["text"] == f"{s.size_word}{s.fg} {s.shape}"


def test_the_box_follows_the_train_crop():
    """RandomResizedCrop down to a third of the area: the box mapped into the crop's frame bounds the shape's
    pixels in the output image (within 2.5 output pixels); a region mostly cut off is dropped."""
    rng = np.random.default_rng(1)
    transform = TrainTransform(32, scale=(0.3, 1.0), fast=True)
    checked = dropped = 0
    for seed in range(60):
        s = make_shape_sample(rng, 96)
        pixels = np.asarray(s.image)
        corner = [pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]
        bg = max(corner, key=lambda c: sum(np.array_equal(c, d) for d in corner))
        image, crop, (height, width) = transform.from_bytes(png(s.image), seed, with_crop=True)
        assert (height, width) == (96, 96) and crop == transform.crop_params(96, 96, seed)
        box = box_in_crop(region(s)["box"], crop, height, width)
        want = foreground_box(image.permute(1, 2, 0).numpy(), bg)
        if box is None:
            dropped += 1
            continue
        assert want is not None
        assert max(abs(a - b) for a, b in zip(box, want)) <= 2.5 / 32, (seed, box, want)
        checked += 1
    assert checked >= 40 and dropped >= 1, (checked, dropped)


def test_box_in_crop_keeps_a_region_only_when_half_of_it_is_inside():
    # crop: the right half of a 100 x 100 image
    crop = (0, 50, 100, 50)
    assert box_in_crop([0.6, 0.1, 0.8, 0.3], crop, 100, 100) == pytest.approx((0.2, 0.1, 0.6, 0.3))
    assert box_in_crop([0.4, 0.1, 0.8, 0.3], crop, 100, 100) == pytest.approx((0.0, 0.1, 0.6, 0.3))  # 3/4 inside
    assert box_in_crop([0.2, 0.1, 0.6, 0.3], crop, 100, 100) is None  # 1/4 inside
    assert box_in_crop([0.0, 0.0, 0.4, 1.0], crop, 100, 100) is None  # outside


def test_sequences_give_the_prompt_and_read_back_to_the_box():
    tok = Tokenizer(context_length=32)
    box, text, bins = (0.03, 0.5, 0.26, 0.99), "small red circle", 32
    assert quantize(box, bins) == [1, 16, 8, 31]
    captions = ["a red circle on blue", "x", "y"]
    picks = [(0, None, ""), (1, box, text), (2, box, text)]
    assert region_sequence(1, "x", box, text, bins) == (
        "find small red circle :",
        "find small red circle : 01 16 08 31",
    )
    assert region_sequence(2, "y", box, text, bins)[1] == "describe 01 16 08 31 : small red circle"
    fields = decoder_fields(tok, captions, picks, bins)
    assert fields["decoder_task"].tolist() == [0, 1, 2]
    assert torch.equal(fields["decoder_text"][0], tok(captions[:1])[0])
    prompt = fields["decoder_prompt"].tolist()
    assert prompt[0] == 0
    for i, want_prompt in ((1, "find small red circle :"), (2, "describe 01 16 08 31 :")):
        ids = fields["decoder_text"][i]
        p_ids = tok([want_prompt])[0]
        assert prompt[i] == int(p_ids.argmax()) - 1
        assert torch.equal(ids[1 : 1 + prompt[i]], p_ids[1 : 1 + prompt[i]])  # the prompt's own tokens come first
    # the ref target: 4 coordinates of 2 digits each, one token a digit, then EOT
    ids = fields["decoder_text"][1]
    target = ids[1 + prompt[1] : int(ids.argmax())].tolist()
    digits = "".join(tok.decode([t]).strip() for t in target)
    assert [int(digits[k : k + 2]) for k in range(0, 8, 2)] == [1, 16, 8, 31]


def test_malformed_regions_are_left_out():
    good = {"box": [0.1, 0.2, 0.3, 0.4], "text": "a dog"}
    bad = [{"box": [0.1, 0.2, 0.3], "text": "3 numbers"}, {"box": [0.5, 0.2, 0.3, 0.4], "text": "x"},
           {"box": [0.1, 0.2, 1.3, 0.4], "text": "out of range"}, {"box": [0.1, 0.2, 0.3, 0.4], "text": " "},
           {"box": ["a", 0, 1, 1], "text": "strings"}, "not a dict"]  # fmt: skip
    meta = {"regions": [good, *bad]}
    assert parse_regions(json.dumps(meta).encode()) == [((0.1, 0.2, 0.3, 0.4), "a dog")]
    for bad in (b"not json", b"[1, 2]", json.dumps({"regions": 5}).encode(), None, b"\xff\xfe"):
        assert parse_regions(bad) == []


def test_task_choice_is_seeded_and_follows_the_fractions():
    from mmpretrain.data.config import RegionsConfig

    cfg = RegionsConfig(ref_fraction=0.3, gcap_fraction=0.5)
    regions = [((0.1, 0.1, 0.5, 0.5), "a"), ((0.2, 0.2, 0.9, 0.9), "b")]
    picks = [choose(regions, cfg, seed) for seed in range(4000)]
    assert picks == [choose(regions, cfg, seed) for seed in range(4000)]
    share = [sum(p[0] == k for p in picks) / len(picks) for k in range(3)]
    assert share == pytest.approx([0.2, 0.3, 0.5], abs=0.03)
    assert {p[2] for p in picks} == {"a", "b"}
    assert choose([], cfg, 0) == (0, None, "")


@pytest.mark.parametrize("num_streams", ["null", "0"])
def test_both_train_loaders_hand_out_the_decoder_fields(tmp_path, num_streams):
    from mmpretrain.config import load_config
    from mmpretrain.data.streams import build_train_loader
    from mmpretrain.data.synthetic import write_shapes_dataset

    paths = write_shapes_dataset(tmp_path / "data", num_train=128, samples_per_shard=64, num_eval=8, image_size=32)
    cfg = load_config(None, ["model.name=tiny", f"data.train.urls={paths.train_urls}", "data.num_workers=0",
                             f"data.num_streams={num_streams}", "loss.terms.clip.weight=1.0",
                             "loss.terms.caption.weight=1.0", "data.train.regions.ref_fraction=0.4",
                             "data.train.regions.gcap_fraction=0.4", "data.train.regions.box_bins=32"])  # fmt: skip
    tok = Tokenizer(context_length=32)
    loader = build_train_loader(cfg.data, tokenizer=tok, image_size=32, batch_size=64, rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    task, prompt, text = batch["decoder_task"], batch["decoder_prompt"], batch["decoder_text"]
    assert task.shape == prompt.shape == (64,) and text.shape == batch["text"].shape
    assert set(task.tolist()) == {0, 1, 2}
    assert torch.equal(text[task == 0], batch["text"][task == 0]) and not prompt[task == 0].any()
    assert (prompt[task > 0] >= 4).all()
    for i in torch.nonzero(task == 1).flatten().tolist():
        assert tok.decode(text[i, 1 : 1 + prompt[i]].tolist()).strip().startswith("find ")


def test_config_errors_name_the_key():
    from mmpretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.train.regions: region tasks train the caption decoder"):
        load_config(None, ["data.synthetic.root=unused", "data.train.regions.ref_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"ref_fraction \+ gcap_fraction must be <= 1"):
        load_config(None, ["data.synthetic.root=unused", "data.train.regions.ref_fraction=0.6",
                           "data.train.regions.gcap_fraction=0.6", "loss.terms.caption.weight=1.0"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.train.regions.box_bins"):
        load_config(None, ["data.synthetic.root=unused", "data.train.regions.box_bins=1"])


@pytest.mark.parametrize("size", [(96, 48), (40, 100), (64, 64)])
def test_the_box_follows_the_eval_crop(size):
    """Resize the shorter side, center crop (EvalTransform): the region's box in the crop's frame bounds the
    rectangle's pixels in the output, on wide, tall and square images."""
    from PIL import Image, ImageDraw

    from mmpretrain.data.transforms import EvalTransform

    width, height = size
    transform = EvalTransform(32)
    for x0, y0, x1, y1 in ((0.3, 0.2, 0.7, 0.6), (0.05, 0.4, 0.5, 0.95), (0.45, 0.05, 0.9, 0.5)):
        img = Image.new("RGB", (width, height), (20, 20, 200))
        ImageDraw.Draw(img).rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1], fill=(250, 250, 0))
        image = transform.from_bytes(png(img))
        box = box_in_crop((x0, y0, x1, y1), transform.crop_box(height, width), height, width)
        want = foreground_box(image.permute(1, 2, 0).numpy(), (20, 20, 200))
        if box is None:
            continue
        assert max(abs(a - b) for a, b in zip(box, want)) <= 1.5 / 32, (size, box, want)
