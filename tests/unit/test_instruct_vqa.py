"""The synthetic shapes VQA set: answers follow the drawn sample, held-out phrasings and images, the word-level
tokenizer round-trips, the exact-match evaluator counts what it should."""

import numpy as np
import torch

from mmpretrain.convert import export_hf
from mmpretrain.data.synthetic import make_shape_sample
from mmpretrain.instruct.config import InstructConfig, VisionArgs
from mmpretrain.instruct.template import ChatTemplate, ConversationEncoder, HFTokenizer
from mmpretrain.instruct.train import build, evaluate, load_tokenizer
from mmpretrain.instruct.vqa import (
    PHRASINGS,
    QUESTION_TYPES,
    answer,
    make_dialogues,
    make_vqa,
    twin_tokenizer,
    words,
)
from mmpretrain.model import ModelConfig, build_model, resolve_model_config


def test_answers_follow_the_sample():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = make_shape_sample(rng, 32)
        assert answer(s, "color") == s.fg and answer(s, "shape") == s.shape and answer(s, "background") == s.bg
        assert answer(s, "size") == {"small ": "small", "large ": "large", "": "medium"}[s.size_word]
        assert answer(s, "position") == ("left" if s.cx < 0.45 else "right" if s.cx > 0.55 else "middle")
        assert s.frac <= s.cx <= 1 - s.frac


def test_splits_and_phrasings_are_held_out():
    train = make_vqa("train", 20, 32, seed=0)
    held = make_vqa("eval", 20, 32, seed=0, phrasings="held_out")
    assert not any(torch.equal(a["image_tensor"], b["image_tensor"]) for a in train for b in held)
    asked = lambda recs: {r["conversations"][0]["value"].removeprefix("<image> ") for r in recs}  # noqa: E731
    assert asked(held) == {p[-1] for p in PHRASINGS.values()}
    assert not asked(train) & asked(held)
    assert [r["qtype"] for r in train[:5]] == list(QUESTION_TYPES)
    trained_words = {w for p in PHRASINGS.values() for q in p[:-1] for w in words(q)}
    assert {w for p in PHRASINGS.values() for w in words(p[-1])} <= trained_words  # new wordings, known words


def test_dialogues_ask_every_type_once():
    """Training dialogues: one image, the five question types once each in a random order, training phrasings
    only, the image placeholder in the first user turn only; the labels are the five answers and their eos."""
    recs = make_dialogues(30, 32, seed=0)
    kind = {q: t for t, qs in PHRASINGS.items() for q in qs[:-1]}
    orders = set()
    tok = twin_tokenizer(ChatTemplate(system=""))
    enc = ConversationEncoder(HFTokenizer(tok), image_token_id=4, num_image_tokens=16, template=ChatTemplate(system=""))
    for r in recs:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(QUESTION_TYPES)
        users = [t["value"] for t in turns[0::2]]
        assert users[0].startswith("<image> ") and not any("<image>" in u for u in users[1:])
        asked = [kind[u.removeprefix("<image> ")] for u in users]  # KeyError: a held-out or unknown phrasing
        assert sorted(asked) == sorted(QUESTION_TYPES)
        orders.add(tuple(asked))
        assert [t["value"] for t in turns[1::2]] == [r["truth"][q] for q in asked]
        e = enc.encode(r)
        answers = [i for i, y in zip(e.input_ids, e.labels) if y != -100]
        expected = [i for q in asked for i in tok(r["truth"][q], add_special_tokens=False)["input_ids"] + [2]]
        assert answers == expected
    assert len(orders) > 10  # the order is drawn per image


def test_twin_tokenizer_round_trip_and_ids():
    tok = twin_tokenizer(ChatTemplate())
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")] == [0, 1, 2, 4]
    ids = tok("what color is the shape ?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == "what color is the shape ?"


class Oracle:
    """Answers from a table keyed by the image's first pixel: right for some, wrong for others."""

    def __init__(self, table):
        self.table = table

    def generate(self, prompt, images, max_new_tokens, eos_id):
        return self.table[float(images[0, 0, 0, 0])]


def test_exact_match_evaluator():
    tok = twin_tokenizer(ChatTemplate(system=""))
    enc = ConversationEncoder(HFTokenizer(tok), image_token_id=4, num_image_tokens=2, template=ChatTemplate(system=""))
    recs = make_vqa("eval", 4, 32, seed=0)
    data = []
    for i, r in enumerate(recs):
        e = enc.encode(r)
        data.append((e.input_ids, e.labels, torch.full((1, 3, 32, 32), float(i)), r["qtype"]))
    truth = [tok(r["conversations"][1]["value"], add_special_tokens=False)["input_ids"] + [2] for r in recs]
    # 0: right; 1: right words, no eos; 2: right then more; 3: wrong
    table = {0.0: truth[0], 1.0: truth[1][:-1], 2.0: truth[2][:-1] + [7, 2], 3.0: [5, 2]}
    out = evaluate(Oracle(table), data, eos_id=2, max_new_tokens=4)
    assert out["accuracy"] == {"color": 1.0, "shape": 0.0, "background": 0.0, "size": 0.0}
    assert out["count"] == {"color": 1, "shape": 1, "background": 1, "size": 1}


def test_tower_from_a_folder_evaluation_loads(tmp_path):
    """vision.path: the tower comes through mmpretrain.checkpoint.load_model (here an HF CLIP export)."""
    torch.manual_seed(1)
    cfg = resolve_model_config(ModelConfig(name="tiny"))
    two_tower = build_model(cfg)
    export_hf(two_tower.state_dict(), cfg, str(tmp_path / "hf"))
    model = build(InstructConfig(vision=VisionArgs(path=str(tmp_path / "hf"))), twin_tokenizer(ChatTemplate()))
    want = two_tower.vision_model.state_dict()
    got = model.vision_tower.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_lm_from_a_folder_gains_an_image_token(tmp_path):
    """lm.path: a local LM + tokenizer without `<image>` or a pad token; the token is added, the embeddings grow and
    keep their trained rows, and a question trains through it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", *sorted({w for p in PHRASINGS.values()
                                                                          for q in p for w in words(q)})])}  # fmt: skip
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    lm_cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1)  # fmt: skip
    lm = LlamaForCausalLM(lm_cfg)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")

    cfg = InstructConfig()
    cfg.lm.path = str(tmp_path / "lm")
    template = ChatTemplate(system="", user_prefix="", user_suffix=" ", assistant_prefix="", answer_prefix="")
    loaded = load_tokenizer(cfg, template)
    assert loaded.convert_tokens_to_ids("<image>") == len(vocab) and loaded.pad_token == "</s>"
    model = build(cfg, loaded)
    emb = model.language_model.get_input_embeddings().weight
    assert emb.shape[0] == len(vocab) + 1
    torch.testing.assert_close(emb[: len(vocab)], lm.get_input_embeddings().weight)
    enc = ConversationEncoder(HFTokenizer(loaded), model.image_token_id, model.num_image_tokens, template)
    e = enc.encode(make_vqa("train", 1, 32, seed=0)[0] | {"conversations": [
        {"from": "human", "value": "<image> what shape is it ?"}, {"from": "gpt", "value": "what"}]})  # fmt: skip
    out = model(torch.tensor([e.input_ids]), torch.randn(1, 3, 32, 32), labels=torch.tensor([e.labels]))
    assert out.num_targets == 2 and torch.isfinite(out.loss)
