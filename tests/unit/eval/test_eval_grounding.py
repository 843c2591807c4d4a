"""Grounding on a retrieval set with regions (mmpretrain/eval/grounding.py).

- The caption decoder's batched greedy reading equals reading one row at a time with the sequence grown token by
  token (prefixes of different lengths in one batch).
- The metrics, with a reader that always answers the whole image and "red circle", equal those computed from the
  set's own json members (read here with tarfile), and 2 gloo ranks give the same numbers as one with the same
  calls on every rank (ZeRO-3 lockstep).
"""

import io
import json
import tarfile

import pytest
import torch
from torch import nn

from mmpretrain.data import Tokenizer
from mmpretrain.data.pipeline import eval_tar_urls
from mmpretrain.eval.grounding import box_iou, grounding, read_box
from mmpretrain.objectives.caption import CaptionDecoder
from tests.distributed.harness import run_on_ranks

BINS = 32


def test_greedy_reads_like_one_row_at_a_time():
    torch.manual_seed(0)
    V, T = 50, 12
    head = CaptionDecoder(V, T, 16, 16, 2, 2, 32, impl="sdpa").double().eval()
    img = torch.randn(3, 5, 16, dtype=torch.float64)
    prefixes = [[48, 3], [48, 7, 9, 11, 2], [48]]
    got = head.greedy(img, prefixes, steps=6)
    for i, prefix in enumerate(prefixes):
        seq = list(prefix)
        for _ in range(6):
            if len(seq) >= T:
                break
            inputs = torch.tensor([seq])
            logits = head(inputs, torch.zeros(1, dtype=torch.bool), img[i : i + 1])
            seq.append(int(logits[0, -1].argmax()))
        assert got[i] == seq[len(prefix) :], i
    assert [len(g) for g in got] == [6, 6, 6]
    # a prefix that fills the context stops growing
    assert head.greedy(img[:1], [[48] * T], steps=3) == [[]]


def test_read_box_and_iou():
    assert read_box("01 02 30 31", BINS) == pytest.approx((1 / 31, 2 / 31, 30 / 31, 1.0))
    assert read_box("0 1 0 2 3 0 3 1", BINS) == pytest.approx((1 / 31, 2 / 31, 30 / 31, 1.0))  # the tokens' spaces
    assert read_box("01 02 30", BINS) is None and read_box("30 02 01 31", BINS) is None  # short, or x1 <= x0
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)
    assert box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0


class FixedReader(nn.Module):
    """Answers every ref with the whole image and every gcap with ``words``; records its calls."""

    def __init__(self, words: str):
        super().__init__()
        self.words = words
        self.tok = Tokenizer(32)
        self.find = self.tok.encode("find")[0]
        self.calls = []

    def greedy(self, image_tokens, prefixes, steps):
        self.calls.append(("greedy", len(prefixes), steps))
        ref = "find" if prefixes[0][1:2] == [self.find] else "describe"
        assert all((p[1:2] == [self.find]) == (ref == "find") for p in prefixes)
        answer = self.tok.encode("00 00 31 31" if ref == "find" else self.words) + [self.tok.eot_id]
        return [answer[:steps] for _ in prefixes]

    def dummy_greedy(self, device, steps):
        self.calls.append(("dummy", 1, steps))


def model_with_reader(words: str = "red circle"):
    from mmpretrain.model import build_model
    from mmpretrain.model.config import ModelConfig, resolve_model_config

    torch.manual_seed(0)
    model = build_model(resolve_model_config(ModelConfig(name="tiny"))).eval()
    model.heads["caption"] = FixedReader(words)
    return model


def expected(root, words: str):
    """The metrics from the set's json members (square images the size of the model's: the eval crop is all)."""
    areas, texts = [], []
    for url in eval_tar_urls(root):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    for r in json.load(io.BytesIO(tar.extractfile(m).read()))["regions"]:
                        x0, y0, x1, y1 = r["box"]
                        areas.append((x1 - x0) * (y1 - y0))  # IoU with the whole image
                        texts.append(r["text"])
    n = len(areas)
    return {"ref_acc@0.5": sum(a >= 0.5 for a in areas) / n, "ref_miou": sum(areas) / n,
            "gcap_exact": sum(t == words for t in texts) / n, "num_regions": n}  # fmt: skip


def ground_on_rank(rank, root, words):
    model = model_with_reader(words)
    out = grounding(model, Tokenizer(32), root, image_size=32, box_bins=BINS, batch_size=5)
    return out, model.heads["caption"].calls


def test_metrics_from_the_sets_regions_and_two_ranks_equal_one(shapes_dataset):
    root = shapes_dataset.retrieval_root
    words = "small red square"  # one of the set's region texts (3 of its 64)
    want = expected(root, words)
    assert 0 < want["ref_acc@0.5"] < 1 and 0 < want["gcap_exact"] < 1, want  # the check can tell right from wrong
    model = model_with_reader(words)
    one = grounding(model, Tokenizer(32), root, image_size=32, box_bins=BINS, batch_size=5)
    # the whole-image box as the reader wrote it: 00 .. 31 of 31 is exactly [0, 1]
    assert one == pytest.approx(want, rel=1e-6)
    (r0, calls0), (r1, calls1) = run_on_ranks(ground_on_rank, root, words)
    assert r0 == pytest.approx(want, rel=1e-6) and r1 == pytest.approx(want, rel=1e-6)
    assert [s for *_, s in calls0] == [s for *_, s in calls1]  # the same decoder calls, step counts included
    assert sum(n for kind, n, _ in calls0 if kind == "greedy") == 2 * want["num_regions"] // 2  # its half, twice


def test_a_model_without_a_reader_or_a_set_without_regions_gives_nothing(shapes_dataset, tmp_path):
    from mmpretrain.model import build_model
    from mmpretrain.model.config import ModelConfig, resolve_model_config

    plain = build_model(resolve_model_config(ModelConfig(name="tiny"))).eval()
    kw = dict(image_size=32, box_bins=BINS)
    assert grounding(plain, Tokenizer(32), shapes_dataset.retrieval_root, **kw) == {}
    assert grounding(model_with_reader(), Tokenizer(32), shapes_dataset.zeroshot_root, **kw) == {}  # no json
