"""A visual question set from the synthetic shapes (mmpretrain.data.synthetic): the tiny twin's data.

Five question types, each with eight phrasings; the last phrasing of each type is held out of training. A held-out
phrasing is a new wording made of words the training phrasings use (the twin's LM starts from scratch: a word it
never saw in training has an untrained embedding, which would test nothing but that). The training phrasings share
their filler words and sentence forms across types ("... in the image ?", "tell me ...", "the shape is what ...
?"), so that only a type's own words (color, kind / shape, background / behind, size / big, where / side) tell
the types apart: with five phrasings whose fillers were type-specific (only shape questions said "in the image"),
the LM learned the fillers and answered the held-out "where in the image is the shape ?" at 0.26:

    type        answers
    color       the shape's color (8)
    shape       circle / square / triangle / cross
    background  the background color (10, never the shape's color)
    size        small / medium / large (circumradius < 0.29 / > 0.38 of the side)
    position    left / middle / right (centre x < 0.45 / > 0.55 of the side)

Chance per type (the most frequent answer's share on the eval split) is reported next to the accuracy in eval.json.

Stage 1 (projector pre-training) reads caption conversations ("<image> describe the image ." -> a caption);
stage 2 reads one question a record. Images of the train and eval splits come from different seed streams
(held-out images). Records are LLaVA conversation dicts, so they go through the same ConversationEncoder as any
LLaVA JSON.

The twin's tokenizer is word-level (transformers PreTrainedTokenizerFast over a WordLevel model, vocabulary = every
word the set and the template use): a few dozen ids instead of 49408, so the LM head costs nothing on a CPU.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from mmpretrain.data.synthetic import CAPTION_FORMATS, COLORS, SHAPES, caption, make_shape_sample
from mmpretrain.instruct.template import IMAGE_PLACEHOLDER, ChatTemplate

PHRASINGS = {
    "color": ["what color is the shape ?", "what is the color of the shape ?", "which color does the shape have ?",
              "name the color of the shape .", "what color is the shape in the image ?",
              "tell me the color of the shape .", "the color of the shape is what ?",
              "the shape is what color ?"],
    "shape": ["what shape is it ?", "which shape is drawn ?", "what kind of shape is in the image ?",
              "name the shape .", "tell me the kind of shape .", "the shape is what kind ?", "what shape is drawn ?",
              "what shape is drawn in the image ?"],
    "background": ["what color is the background ?", "what is the background color ?",
                   "which color is behind the shape ?", "name the background color .",
                   "what color is the background in the image ?", "tell me the color of the background .",
                   "the background is what color ?",
                   "what is the color of the background ?"],
    "size": ["how big is the shape ?", "what size is the shape ?", "is the shape small , medium or large ?",
             "describe the size of the shape .", "how big is the shape in the image ?",
             "tell me the size of the shape .", "the shape is what size ?",
             "what is the size of the shape ?"],
    "position": ["where is the shape ?", "is the shape left , middle or right ?", "where is the shape placed ?",
                 "which side is the shape on ?", "where is the shape in the image ?", "tell me where the shape is .",
                 "the shape is where ?",
                 "where in the image is the shape ?"],
}  # fmt: skip
QUESTION_TYPES = tuple(PHRASINGS)
CAPTION_PROMPT = "describe the image ."
SPLIT_STREAMS = {"train": 10, "eval": 11}  # seed streams: held-out images


def answer(sample, qtype: str) -> str:
    if qtype == "color":
        return sample.fg
    if qtype == "shape":
        return sample.shape
    if qtype == "background":
        return sample.bg
    if qtype == "size":
        return "small" if sample.frac < 0.29 else "large" if sample.frac > 0.38 else "medium"
    if qtype == "position":
        return "left" if sample.cx < 0.45 else "right" if sample.cx > 0.55 else "middle"
    raise ValueError(f"unknown question type {qtype!r}")


def image_tensor(image) -> torch.Tensor:
    """A PIL image at the tower's size -> uint8 (1, 3, S, S): one image of a record, as instruct.data gives them."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()[None]


def _record(question: str, ans: str) -> dict:
    return {"image": "0.png", "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER} {question}"},
                                                {"from": "gpt", "value": ans}]}  # fmt: skip


def make_vqa(split: str, num_images: int, image_size: int, seed: int, phrasings: str = "train") -> list[dict]:
    """Records with an "image_tensor" and "qtype": one question per image, types in turn.

    phrasings: "train" (all but the last phrasing of each type, drawn at random) or "held_out" (the last).
    """
    if split not in SPLIT_STREAMS or phrasings not in ("train", "held_out"):
        raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)} and phrasings train or held_out")
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
    out = []
    for i in range(num_images):
        sample = make_shape_sample(rng, image_size)
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        options = PHRASINGS[qtype][:-1] if phrasings == "train" else PHRASINGS[qtype][-1:]
        question = options[int(rng.integers(len(options)))]
        out.append(_record(question, answer(sample, qtype)) | {"image_tensor": image_tensor(sample.image),
                                                                "qtype": qtype})  # fmt: skip
    return out


def make_dialogues(num_images: int, image_size: int, seed: int) -> list[dict]:
    """Stage 2 records for training: one image, every question type once in a random order (a multi-turn
    conversation, as LLaVA's instruction data holds several questions about one image), each in a random training
    phrasing. One pass of the vision tower then trains five answers. qtype "dialogue"; "truth" maps each question
    type to its answer."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS["train"], 2])
    out = []
    for _ in range(num_images):
        sample = make_shape_sample(rng, image_size)
        turns = []
        for k in rng.permutation(len(QUESTION_TYPES)):
            qtype = QUESTION_TYPES[int(k)]
            options = PHRASINGS[qtype][:-1]
            question = options[int(rng.integers(len(options)))]
            user = f"{IMAGE_PLACEHOLDER} {question}" if not turns else question
            turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer(sample, qtype)}]
        truth = {q: answer(sample, q) for q in QUESTION_TYPES}
        out.append({"image": "0.png", "conversations": turns, "image_tensor": image_tensor(sample.image),
                    "qtype": "dialogue", "truth": truth})  # fmt: skip
    return out


def make_captions(num_images: int, image_size: int, seed: int) -> list[dict]:
    """Stage 1 records: "<image> describe the image ." -> one of the synthetic caption formats."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS["train"], 1])
    out = []
    for _ in range(num_images):
        sample = make_shape_sample(rng, image_size)
        text = caption(sample, int(rng.integers(len(CAPTION_FORMATS))))
        out.append(_record(CAPTION_PROMPT, text) | {"image_tensor": image_tensor(sample.image), "qtype": "caption"})
    return out


def words(text: str) -> list[str]:
    """What the word-level tokenizer splits on (transformers' Whitespace pre-tokenizer: words and punctuation)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def twin_vocabulary(template: ChatTemplate) -> list[str]:
    """Every word the set and the template can produce, sorted (special tokens first, in the tokenizer)."""
    texts = [q for qs in PHRASINGS.values() for q in qs] + [CAPTION_PROMPT, *CAPTION_FORMATS]
    texts += [*COLORS, *SHAPES, "small", "medium", "large", "left", "middle", "right"]
    texts += [template.system, template.user_prefix, template.user_suffix, template.assistant_prefix]
    return sorted({w for t in texts for w in words(t.replace("{", " ").replace("}", " "))})


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_PLACEHOLDER]  # ids 0..4


def twin_tokenizer(template: ChatTemplate):
    """A transformers PreTrainedTokenizerFast over a WordLevel vocabulary: <pad>=0, <s>=1, </s>=2, <unk>=3,
    <image>=4, then the words. It saves and loads like any HF tokenizer (the LLaVA export carries it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in twin_vocabulary(template):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    extra = {"image_token": IMAGE_PLACEHOLDER}
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra, **special)
