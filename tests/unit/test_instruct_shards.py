"""LLaVA JSON -> WebDataset shards of conversations (`mmpretrain-make-shards llava`) -> training items: the same items
as reading the JSON itself; bad records skipped and counted on both sides (issue 19, data)."""

import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image

from mmpretrain.data.shards import ShardWriter, read_tar_samples
from mmpretrain.data.synthetic import make_shape_sample
from mmpretrain.instruct.data import read_conversation_shards, read_llava_json
from mmpretrain.instruct.template import IMAGE_PLACEHOLDER, ChatTemplate, ConversationEncoder, HFTokenizer
from mmpretrain.instruct.train import load_instruct_config, stage_data
from mmpretrain.instruct.vqa import twin_tokenizer
from mmpretrain.tools.make_shards import main as make_shards

S = 32


def turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def write_json(root):
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        make_shape_sample(rng, 48).image.save(images / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(images / "wide.jpg", quality=90)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "secret.png").write_bytes((images / "0.png").read_bytes())
    good = [
        {"id": "a", "image": "0.png", "conversations": turns(("<image> what color is the shape ?", "red"))},
        {"image": ["1.png", "wide.jpg"], "conversations": [{"from": "system", "value": "name the shape ."},
                                                          *turns(("<image> and <image> ?", "circle and square"),
                                                                 ("where is the shape ?", "left"))]},
        {"conversations": turns(("what shape is it ?", "cross"))},  # text only
        {"image": "2.png", "conversations": turns(("<image> how big is the shape ?", "small"))},
    ]  # fmt: skip
    bad = [
        ({"image": "0.png", "conversations": [{"from": "human", "value": "<image> what ?"}]}, "no_assistant_turn"),
        ({"image": "nope.png", "conversations": turns(("<image> what ?", "red"))}, "missing_image_file"),
        ({"image": "../secret.png", "conversations": turns(("<image> what ?", "red"))}, "outside_image_root"),
        ({"image": "broken.png", "conversations": turns(("<image> what ?", "red"))}, "undecodable_image"),
        ({"image": ["0.png", "1.png"], "conversations": turns(("<image> what ?", "red"))}, "image_count_mismatch"),
        ("not a record", "bad_record"),
    ]
    records = good[:2] + [r for r, _ in bad] + good[2:]
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return str(path), str(images), Counter(reason for _, reason in bad)


def encoder():
    template = ChatTemplate(system="")
    tok = twin_tokenizer(template)
    return ConversationEncoder(HFTokenizer(tok), tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), 16, template)


def test_make_shards_llava_round_trip_equals_the_json(tmp_path):
    path, images, bad = write_json(tmp_path)
    out = tmp_path / "shards"
    assert make_shards(["llava", path, str(out), "--image-folder", images, "--samples-per-shard", "3",
                        "--keep-format"]) == 0  # fmt: skip
    stats = json.load(open(out / "_stats.json"))
    assert stats["num_samples"] == 4 and stats["num_shards"] == 2
    assert stats["skipped_by_reason"] == dict(bad)
    spec = stats["urls"]

    enc = encoder()
    got, skipped = read_conversation_shards(spec, enc, S)
    want, want_skipped = read_llava_json(path, images, enc, S)
    assert skipped == Counter()
    assert len(got) == len(want) == 4
    for (ids, labels, imgs), (ids2, labels2, imgs2) in zip(got, want):
        assert ids == ids2 and labels == labels2
        assert imgs.shape == imgs2.shape and torch.equal(imgs, imgs2)  # PNG and JPEG bytes kept (--keep-format)
    assert [len(x[2]) for x in got] == [1, 2, 0, 1]
    # the JSON reader skips the same records (its names for the image faults)
    assert sum(want_skipped.values()) == sum(bad.values())

    # a record in a shard names its own members, and where it came from
    samples = list(read_tar_samples(str(out / "shard-000000.tar"), lambda *a: None))
    two = json.loads(samples[1]["json"])
    assert two["image"] == ["0.png", "1.jpg"] and {"0.png", "1.jpg"} <= samples[1].keys()
    assert two["source"] == {"where": "llava.json record 1", "image": ["1.png", "wide.jpg"]}
    assert json.loads(samples[0]["json"])["image"] == "png" and json.loads(samples[0]["json"])["id"] == "a"


def test_conversation_shards_count_bad_samples(tmp_path):
    good = {"image": "jpg", "conversations": turns(("<image> what color is the shape ?", "red"))}
    img = make_shape_sample(np.random.default_rng(1), S).image
    with ShardWriter(tmp_path, samples_per_shard=10) as w:
        w.write({"__key__": "a", "json": good, "jpg": img})
        w.write({"__key__": "b", "json": good})  # its image member is missing
        w.write({"__key__": "c", "json": "not json at all"})
        w.write({"__key__": "d", "jpg": img})  # no conversation
        w.write({"__key__": "e", "json": [1, 2]})  # not an object
        w.write({"__key__": "f", "json": {**good, "image": "png"}, "png": b"not a png"})
        w.write({"__key__": "g", "json": {"conversations": turns(("what ?", "red"))[:1]}})
    spec = str(tmp_path / "shard-000000.tar") + "::" + str(tmp_path / "missing.tar")
    items, skipped = read_conversation_shards(spec, encoder(), S)
    assert len(items) == 1 and items[0][2].shape == (1, 3, S, S)
    assert skipped == Counter(missing_image=1, bad_record=3, unreadable_image=1, no_assistant_turn=1,
                              unreadable_shard=1)  # fmt: skip


def test_a_stage_trains_on_shards(tmp_path):
    """The trainer's data wiring: a stage with data: shards gets the shards' items (the training loop itself is the
    same for every source: tests/distributed/test_instruct_distributed.py)."""
    path, images, _ = write_json(tmp_path)
    out = tmp_path / "shards"
    assert make_shards(["llava", path, str(out), "--image-folder", images, "--keep-format"]) == 0
    spec = json.load(open(out / "_stats.json"))["urls"]
    cfg = load_instruct_config(None, [f"stages=[{{name: s, data: shards, shards: '{spec}', steps: 1}}]"])
    skipped = Counter()
    (items,) = stage_data(cfg, encoder(), S, skipped)
    assert len(items) == 4 and skipped == Counter()
    assert os.path.isfile(out / "shard-000000.tar")
