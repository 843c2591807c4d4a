"""The conversation template and the loss mask, against a hand-built example (issue 19).

A word-level tokenizer (one id per whitespace-separated word) makes every expected id readable by hand.
"""

import pytest

from mmpretrain.data.tokenizer import EOT_ID, Tokenizer
from mmpretrain.instruct.template import (
    IGNORE_INDEX,
    BadConversation,
    ChatTemplate,
    ConversationEncoder,
    HFTokenizer,
)

VOCAB = {"be": 10, "brief": 11, "USER:": 12, "what": 13, "color": 14, "?": 15, "and": 16, "this": 17,
         "ASSISTANT:": 18, "red": 19, "blue": 20, "shape": 21, "circle": 22, "default": 23, "sys": 24}  # fmt: skip
BOS, EOS, IMG = 1, 2, 99
X = IGNORE_INDEX


class WordTokenizer:
    bos_id, eos_id = BOS, EOS

    def encode(self, text):
        return [VOCAB[w] for w in text.split()]


TEMPLATE = ChatTemplate(system="default sys", system_suffix="", user_prefix="USER:", user_suffix="",
                        assistant_prefix="ASSISTANT:", answer_prefix="")  # fmt: skip


def encoder(**kw):
    return ConversationEncoder(WordTokenizer(), image_token_id=IMG, num_image_tokens=3, template=TEMPLATE, **kw)


RECORD = {
    "id": "x",
    "image": ["a.png", "b.png"],
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image> what color ? <image> and this ?"},
        {"from": "gpt", "value": "red blue"},
        {"from": "human", "value": "shape ?"},
        {"from": "gpt", "value": "circle"},
    ],
}


def test_multi_turn_two_images_system_turn():
    enc = encoder().encode(RECORD)
    # fmt: off
    want_ids = [BOS, 10, 11,                                   # bos, system "be brief"
                12, IMG, IMG, IMG, 13, 14, 15, IMG, IMG, IMG, 16, 17, 15,  # USER: <image> what color ? <image> ...
                18, 19, 20, EOS,                               # ASSISTANT: red blue </s>
                12, 21, 15,                                    # USER: shape ?
                18, 22, EOS]                                   # ASSISTANT: circle </s>
    want_labels = [X, X, X,
                   X, X, X, X, X, X, X, X, X, X, X, X, X,
                   X, 19, 20, EOS,
                   X, X, X,
                   X, 22, EOS]
    # fmt: on
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    assert enc.num_images == 2


def test_default_system_and_one_image_name_and_user_role_names():
    record = {"image": "a.png", "conversations": [{"from": "user", "value": "<image> shape ?"},
                                                  {"from": "assistant", "value": "circle"}]}  # fmt: skip
    enc = encoder().encode(record)
    assert enc.input_ids == [BOS, 23, 24, 12, IMG, IMG, IMG, 21, 15, 18, 22, EOS]
    assert enc.labels == [X] * 10 + [22, EOS]


def test_prompt_is_the_training_prefix():
    turns = [("system", "be brief"), ("user", "<image> what color ? <image> and this ?"), ("assistant", "red blue"),
             ("user", "shape ?")]  # fmt: skip
    enc = encoder().encode(RECORD)
    prompt = encoder().encode_prompt(turns)
    assert prompt == enc.input_ids[: len(prompt)]
    assert enc.input_ids[len(prompt) :] == [22, EOS]  # the answer starts right after the prompt


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"conversations": [{"from": "human", "value": "shape ?"}]}, "no_assistant_turn"),
        ({"conversations": [{"from": "gpt", "value": "red"}]}, "bad_order"),
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "shape ?"}, {"from": "gpt", "value": "red"}],
            },
            "image_count_mismatch",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image> shape ?"}, {"from": "gpt", "value": "red"}]},
            "image_count_mismatch",
        ),
        (
            {"conversations": [{"from": "human", "value": "shape ?"}, {"from": "gpt", "value": "<image> red"}]},
            "image_in_answer",
        ),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "bad_turn"),
        ({"conversations": []}, "no_conversation"),
        ({}, "no_conversation"),
        (
            {"image": 3, "conversations": [{"from": "human", "value": "shape ?"}, {"from": "gpt", "value": "red"}]},
            "bad_image_field",
        ),
    ],
)
def test_bad_records_raise_with_a_reason(record, reason):
    with pytest.raises(BadConversation) as e:
        encoder().encode(record)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)


def test_too_long():
    assert len(encoder(max_length=26).encode(RECORD).input_ids) == 26
    with pytest.raises(BadConversation, match="too_long"):
        encoder(max_length=25).encode(RECORD)


def test_real_bpe_tokenizer_trains_exactly_the_answers():
    """With a real tokenizer (our CLIP BPE through transformers), the trained span decodes to the answers."""
    tok = Tokenizer()
    enc = ConversationEncoder(HFTokenizer(tok.hf, bos_id=None, eos_id=EOT_ID), image_token_id=0, num_image_tokens=4)
    out = enc.encode(RECORD)
    spans, cur = [], []
    for i, label in zip(out.input_ids, out.labels):
        if label == X:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert label == i
            cur.append(i)
    spans.append(cur)
    assert [s[-1] for s in spans] == [EOT_ID, EOT_ID]
    assert [tok.hf.decode(s[:-1]).strip() for s in spans] == ["red blue", "circle"]
    assert out.input_ids.count(0) == 8  # two images of 4 tokens
