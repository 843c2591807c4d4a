"""CLIP tokenizer: ids equal OpenCLIP's reference tokenizer; the saved HF tokenizer reloads offline."""

import pytest
import torch

from mmpretrain.data.tokenizer import EOT_ID, SOT_ID, VOCAB_SIZE, Tokenizer

CAPTIONS = [
    "a red circle on a BLUE background",
    "A photo of a dog!!! (running) -- fast; very fast...",
    "3.14159 and 1,000,000 items; 42nd street, it's we'll they've",
    "Café crème brûlée — naïve façade",
    "emoji 🎉🐶 and 日本語のテキスト and Ελληνικά",
    "   lots   of\n\twhitespace  ",
    "&amp; html &lt;b&gt; entities &quot;quoted&quot;",
    "mojibake: cafÃ©",
    "a caption that literally says <|endoftext|> in it",
    "",
    " ".join(f"word{i}" for i in range(120)),  # far longer than 77 tokens: truncated
    "don't STOP me now!!!??? #hashtag @user http://example.com/x?y=1",
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenizer.SimpleTokenizer()


def test_ids_equal_open_clip(open_clip_tokenizer):
    import open_clip

    ours = Tokenizer(context_length=77)(CAPTIONS)
    assert ours.shape == (len(CAPTIONS), 77) and ours.dtype == torch.long
    torch.testing.assert_close(ours, open_clip.tokenize(CAPTIONS), rtol=0, atol=0)
    torch.testing.assert_close(ours, open_clip_tokenizer(CAPTIONS, context_length=77), rtol=0, atol=0)
    # BPE bodies without SOT/EOT/truncation agree too (open_clip's encode is the pure-Python reference)
    tok = Tokenizer()
    for text in CAPTIONS:
        assert tok.encode(text) == open_clip_tokenizer.encode(text)


@pytest.mark.parametrize("context_length", [8, 16])
def test_truncation_keeps_eot_last_and_pads_with_zero(open_clip_tokenizer, context_length):
    tok = Tokenizer(context_length=context_length)
    ids = tok(["a b c d e f g h i j k l m n o p q r s t", "a cat"])
    ref = open_clip_tokenizer(["a b c d e f g h i j k l m n o p q r s t", "a cat"], context_length=context_length)
    torch.testing.assert_close(ids, ref, rtol=0, atol=0)
    assert ids[0, 0] == SOT_ID and ids[0, -1] == EOT_ID  # too long: EOT overwrites the last position
    assert ids[1].tolist()[:4] == [SOT_ID, *tok.encode("a cat"), EOT_ID]
    assert (ids[1, 4:] == 0).all()  # OpenCLIP pads with 0
    assert int(ids.max()) < VOCAB_SIZE


def test_vocab_matches_open_clip(open_clip_tokenizer):
    tok = Tokenizer()
    vocab = tok.hf.get_vocab()
    assert len(vocab) == VOCAB_SIZE == len(open_clip_tokenizer.encoder)
    # same token strings at the same ids, apart from the special token spelling
    # (OpenCLIP: <start_of_text>, CLIP and Hugging Face: <|startoftext|>)
    for token, idx in open_clip_tokenizer.encoder.items():
        if idx < SOT_ID:
            assert vocab[token] == idx
    assert vocab["<|startoftext|>"] == SOT_ID and vocab["<|endoftext|>"] == EOT_ID


def test_decode_roundtrip():
    tok = Tokenizer()
    ids = tok(["A Red  Circle, on blue!"])
    assert tok.decode(ids[0]) == "a red circle , on blue !"


def test_saved_tokenizer_reloads_offline_with_same_ids(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer(context_length=77)
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.model_max_length == 77
    clean = [c for c in CAPTIONS if c and "&" not in c and "Ã" not in c and "<|" not in c]
    # Hugging Face runs no ftfy/HTML cleaning and pads with EOT; on clean text the ids before padding agree
    ours = tok(clean)
    theirs = hf(clean, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    for row_ours, row_theirs in zip(ours, theirs):
        n = int((row_ours == EOT_ID).nonzero()[0]) + 1
        assert row_ours[:n].tolist() == row_theirs[:n].tolist()
        assert (row_theirs[n:] == hf.pad_token_id).all() and (row_ours[n:] == 0).all()


def test_context_length_validated():
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=1)
