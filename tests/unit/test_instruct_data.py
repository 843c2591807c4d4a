"""LLaVA JSON + image folder: good records become items, bad ones are skipped and counted by reason."""

import json

import numpy as np
import torch
from PIL import Image

from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD
from mmpretrain.instruct.data import collate, read_llava_json
from mmpretrain.instruct.template import IGNORE_INDEX, ChatTemplate, ConversationEncoder

VOCAB = {w: i + 10 for i, w in enumerate("USER: ASSISTANT: what is it ? red blue and".split())}


class WordTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [VOCAB[w] for w in text.split()]


def turns(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_read_llava_json_counts_bad_records(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "a.png")
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(root / "b.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "outside.png")
    records = [
        {"image": "a.png", "conversations": turns("<image> what is it ?", "red")},
        {"image": ["a.png", "b.jpg"], "conversations": turns("<image> and <image> ?", "red and blue")},
        {"conversations": turns("what is it ?", "blue")},  # text only
        {"image": "nope.png", "conversations": turns("<image> what is it ?", "red")},
        {"image": "broken.jpg", "conversations": turns("<image> what is it ?", "red")},
        {"image": "../outside.png", "conversations": turns("<image> what is it ?", "red")},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> what is it ?"}]},
        {"image": "a.png", "conversations": turns("what is it ?", "red")},
        ["not", "a", "record"],
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(records))
    template = ChatTemplate(system="", user_prefix="USER:", user_suffix="", assistant_prefix="ASSISTANT:",
                            answer_prefix="")  # fmt: skip
    enc = ConversationEncoder(WordTokenizer(), image_token_id=3, num_image_tokens=2, template=template)
    items, skipped = read_llava_json(str(path), str(root), enc, image_size=32)
    assert dict(skipped) == {"missing_image": 2, "unreadable_image": 1, "no_assistant_turn": 1,
                             "image_count_mismatch": 1, "bad_record": 1}  # fmt: skip
    assert [it[2].shape[0] for it in items] == [1, 2, 0]
    assert items[0][2].dtype == torch.uint8 and items[0][2].shape == (1, 3, 32, 32)
    assert items[1][0] == [1, 10, 3, 3, 18, 3, 3, 15, 11, 16, 18, 17, 2]  # USER: <i> and <i> ? ASSISTANT: red and blue

    batch = collate(items, pad_id=0)
    assert batch["input_ids"].shape == (3, 13) and batch["images"].shape == (3, 3, 32, 32)
    assert batch["attention_mask"].sum(1).tolist() == [len(it[0]) for it in items]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # a 200-gray image normalizes to (200/255 - mean) / std in every pixel
    want = (200 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(batch["images"][0].mean(dim=(1, 2)), want, rtol=1e-5, atol=1e-5)
