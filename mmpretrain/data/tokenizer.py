"""CLIP's byte-level BPE tokenizer (vocab 49408), built offline from the shipped merges file.

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI's CLIP merges list (MIT licence). From it we derive
``vocab.json`` and ``merges.txt`` exactly as CLIP does:

    ids 0..255        the 256 byte-level unicode characters
    ids 256..511      the same characters with the end-of-word suffix ``</w>``
    ids 512..49405    one token per merge (the first 49152 - 256 - 2 merges after the header line)
    id 49406          <|startoftext|>
    id 49407          <|endoftext|>

and load them into a ``transformers.CLIPTokenizerFast``, so tokenizing is fast (Rust) and the
tokenizer saves with ``save_pretrained`` next to exported weights.

Output convention (OpenCLIP's, not Hugging Face's): each row is SOT + tokens + EOT, padded with
id 0 up to ``context_length``; a text that is too long is cut so that EOT still sits in the last
position. Text is cleaned like CLIP before BPE: ftfy, HTML unescape, whitespace collapsed,
lower case. The ids equal ``open_clip.tokenize`` (tests/unit/test_tokenizer.py checks it).
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import tempfile
from pathlib import Path

import ftfy
import torch

# Rust-side threads buy nothing for 77-token captions (DataLoader workers already run in parallel), and a
# worker forked after the parent tokenized would warn and turn them off anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0  # OpenCLIP pads with 0; the text tower pools at EOT (the largest id), so padding never matters


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters CLIP maps the bytes 0..255 to (so BPE never sees whitespace/control bytes).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n) in byte order.
    Returned in CLIP's vocabulary order: printable bytes first, then the remapped ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + n))
            n += 1
    return chars


def clip_vocab_and_merges(bpe_path: str | os.PathLike = BPE_PATH) -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's vocab (token -> id) and merges ("a b" strings, in rank order) from the gzipped merges file."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    # line 0 is the "#version" header; CLIP keeps the first 49152 - 256 - 2 merges
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE and vocab[SOT_TOKEN] == SOT_ID and vocab[EOT_TOKEN] == EOT_ID
    return vocab, merges


@functools.cache
def _build_hf(context_length: int):
    """A CLIPTokenizerFast from the shipped merges (cached: building takes ~0.1 s, and every worker asks)."""
    from transformers import CLIPTokenizerFast  # import here: transformers costs ~2 s

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        # going through the two files (not the constructor) works across transformers 4.x and 5.x
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizerFast.from_pretrained(tmp, model_max_length=context_length, trust_remote_code=False)


def clean_text(text: str) -> str:
    """CLIP's cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer: ``tokenizer(texts) -> LongTensor (N, context_length)``.

    ``tokenizer.hf`` is the underlying ``CLIPTokenizerFast`` (standard Hugging Face behaviour:
    it pads with EOT and does not run ftfy/HTML cleaning; ids agree on clean text).
    """

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold SOT and EOT (got {context_length})")
        self.context_length = context_length
        self.vocab_size = VOCAB_SIZE
        self.sot_id, self.eot_id, self.pad_id = SOT_ID, EOT_ID, PAD_ID

    @property
    def hf(self):
        return _build_hf(self.context_length)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        return self.hf(clean_text(text), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        cleaned = [clean_text(t) for t in texts]
        # split_special_tokens: a caption that literally contains "<|endoftext|>" is text, as in CLIP
        ids = self.hf(cleaned, add_special_tokens=False, split_special_tokens=True)["input_ids"] if cleaned else []
        max_body = self.context_length - 2
        tokens_NL = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for i, body in enumerate(ids):
            row = [SOT_ID, *body[:max_body], EOT_ID]  # truncation keeps EOT at the last position
            tokens_NL[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return tokens_NL

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one row of ids, SOT/EOT/padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        body = []
        for i in ids:
            if i == EOT_ID:
                break
            if i != SOT_ID:
                body.append(i)
        return self.hf.decode(body)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the Hugging Face tokenizer files (tokenizer.json, vocab.json, merges.txt, configs)."""
        self.hf.save_pretrained(str(directory))
