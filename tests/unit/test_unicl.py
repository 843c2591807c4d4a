"""UniCL (loss.terms.unicl): same-label pairs are all positives, in both directions.

- tiled_unicl_loss (chunked, naive; Triton under TRITON_INTERPRET=1 in a child process) against a naive
  float64 row-by-row implementation with repeated labels: loss and the gradients of image, text and scale.
- all-distinct labels: exactly (bit for bit) the CLIP loss and its gradients, through the kernel and the term.
- labels: .cls, caption normalization (the token row), the auto / cls / caption sources.
- data: train shards with .cls give batch["label"] (-1 without); a .cls that is not a class index is
  skipped and counted (corrupt_image, as in the eval sets).
The 2-rank == 1-rank check is tests/distributed/test_unicl_distributed.py.
"""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from mmpretrain.kernels.contrastive_loss import tiled_clip_loss, tiled_unicl_loss

from mmpretrain.data import DataConfig, build_train_loader
from mmpretrain.data.shards import ShardWriter, encode_image
from mmpretrain.data.tokenizer import Tokenizer
from mmpretrain.objectives import LossConfig, Objective, StepContext, TermsConfig
from mmpretrain.objectives.unicl import UniclTermConfig, label_keys
from tests.kernels.interpret_runner import needs_interpreter, run_under_interpreter, runner_only

RTOL = 1e-5
# repeated labels (within and across the halves a 2-rank split makes), singletons, arbitrary key values
LABELS = [
    [3, 7, 3, -5, 7, 7, 11, 3, 40, -5, 2, 3, 9],
    [0] * 6,  # one label: every pair is a positive of every other
    list(range(9)),  # all distinct: CLIP
]


def naive_unicl(img_BD, txt_BD, scale, labels_B):
    """Row by row, straight from the definition: -1/|P_i| sum_{j in P_i} log softmax_j(l_i.) and the columns."""
    logits_BB = scale * img_BD @ txt_BD.T
    B = logits_BB.shape[0]
    total = 0
    for i in range(B):
        pos = [j for j in range(B) if labels_B[j] == labels_B[i]]
        row_term = -torch.log_softmax(logits_BB[i], 0)[pos].mean()  # image i against every text
        col_term = -torch.log_softmax(logits_BB[:, i], 0)[pos].mean()  # text i against every image
        total = total + row_term + col_term
    return total / (2 * B)


def make_inputs(B, D, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, D, generator=g, dtype=torch.float64)
    txt = img + 1.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(scale, dtype=torch.float64)


def loss_and_grads(fn, inputs, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


def assert_close_rel(got, ref, rtol=RTOL):
    for what, a, b in zip(["loss", "d_image", "d_text", "d_scale"], got, ref):
        err, size = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= rtol * max(size, 1e-2), f"{what}: max error {err:.3g} vs max |ref| {size:.3g}"


@pytest.mark.parametrize("labels", LABELS, ids=["repeated", "one_label", "distinct"])
@pytest.mark.parametrize("impl,chunk_size", [("chunked", 1024), ("chunked", 4), ("naive", 0)])
@pytest.mark.parametrize("scale", [1 / 0.07, 100.0])
def test_matches_naive_float64_reference(labels, impl, chunk_size, scale):
    labels_B = torch.tensor(labels)
    inputs = make_inputs(len(labels), 16, scale)
    got = loss_and_grads(lambda *x: tiled_unicl_loss(*x, labels_B, impl=impl, chunk_size=chunk_size), inputs,
                         torch.float32)  # fmt: skip
    ref = loss_and_grads(lambda *x: naive_unicl(*x, labels), inputs, torch.float64)
    assert_close_rel(got, ref)


def test_repeated_labels_differ_from_clip():  # the test above cannot pass by computing CLIP
    inputs = make_inputs(len(LABELS[0]), 16, 20.0)
    unicl = naive_unicl(*inputs, LABELS[0])
    assert abs(unicl.item() - tiled_clip_loss(*inputs).item()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_distinct_labels_are_exactly_clip(dtype, chunk_size):
    inputs = make_inputs(23, 32, 1 / 0.07, seed=3)
    keys_B = torch.randperm(1000)[:23] - 500  # any distinct values
    got = loss_and_grads(lambda *x: tiled_unicl_loss(*x, keys_B, chunk_size=chunk_size), inputs, dtype)
    want = loss_and_grads(lambda *x: tiled_clip_loss(*x, chunk_size=chunk_size), inputs, dtype)
    for what, a, b in zip(["loss", "d_image", "d_text", "d_scale"], got, want):
        assert torch.equal(a, b), what


@functools.cache
def tokenizer():
    return Tokenizer(context_length=16)


def tokenize(captions):
    return tokenizer()(captions)


def test_caption_labels_ignore_case_whitespace_and_punctuation():
    captions = ["A  Red circle.", "a red circle", "a red-circle!", "a red circles", "a blue circle", "red circle"]
    keys = label_keys("caption", tokenize(captions), None, 0).tolist()
    assert keys[0] == keys[1] == keys[2]  # case, whitespace and punctuation do not matter
    assert len({keys[0], *keys[3:]}) == 4  # words do
    assert all(k < 0 for k in keys)  # never a class id
    # the same in another process (blake2b, not Python's salted hash)
    assert keys[4] == label_keys("caption", tokenize(["A BLUE circle..."]), None, 0).item()


def test_identical_token_rows_give_clip_and_punctuation_variants_do_not():
    """Why captions are compared without punctuation (see mmpretrain.objectives.unicl): pairs whose texts are
    identical have identical text features, and grouping them leaves CLIP's loss unchanged."""
    img, txt, scale = make_inputs(6, 16, 30.0)
    txt = txt.clone()
    txt[3] = txt[0]  # pairs 0 and 3: the same caption, so the same text feature
    labels = torch.tensor([0, 1, 2, 0, 4, 5])
    assert tiled_unicl_loss(img, txt, scale, labels).item() == pytest.approx(tiled_clip_loss(img, txt, scale).item())
    txt[3] = make_inputs(6, 16, 30.0, seed=1)[1][3]  # "a red circle." vs "a red circle": different features
    assert abs(tiled_unicl_loss(img, txt, scale, labels).item() - tiled_clip_loss(img, txt, scale).item()) > 0.01


def test_label_sources():
    tokens = tokenize(["a dog", "a dog", "a cat", "a dog"])
    cls = torch.tensor([5, -1, 5, -1])
    cap = label_keys("caption", tokens, None, 0)
    auto = label_keys("auto", tokens, cls, 0)
    assert auto.tolist() == [5, cap[1], 5, cap[3]] and auto[1] == auto[3]  # .cls first, then the caption
    cls_only = label_keys("cls", tokens, cls, first_index=8)
    assert cls_only.tolist() == [5, -10, 5, -12]  # a sample without .cls: its own label, by global index
    assert torch.equal(label_keys("caption", tokens, cls, 0), cap)  # .cls ignored
    assert torch.equal(label_keys("auto", tokens, None, 0), cap)  # data without .cls: captions
    assert label_keys("cls", tokens, torch.tensor([1, 2, 3, 1]), 0).tolist() == [1, 2, 3, 1]


def test_config_validation_and_family():
    with pytest.raises(ValueError, match=r"loss.terms.unicl.label_source must be one of"):
        UniclTermConfig(label_source="labels").validate("loss.terms.unicl")
    UniclTermConfig(label_source="cls").validate("loss.terms.unicl")


def objective_loss(label_source, img, txt, scale, batch):
    from mmpretrain.config import Config

    cfg = Config()
    cfg.loss = LossConfig(terms=TermsConfig(unicl=UniclTermConfig(label_source=label_source)), impl="chunked")
    objective = Objective(cfg)
    out = type("Out", (), dict(image_features=img, text_features=txt, logit_scale=scale))()
    loss, values = objective(StepContext(out, None, None, batch, None, None, cfg.loss))
    return loss, values


def test_term_with_distinct_captions_is_the_clip_term_and_with_repeats_the_reference():
    img, txt, scale = make_inputs(6, 16, 30.0)
    captions = ["a dog", "a cat", "a red car", "a dog", "a bird", "a cat"]
    batch = {"text": tokenize(captions), "label": torch.full((6,), -1)}
    loss, values = objective_loss("auto", img.float(), txt.float(), scale.float(), batch)
    assert set(values) == {"unicl"}
    want = naive_unicl(img, txt, scale, [0, 1, 2, 0, 3, 1])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # labels from .cls, all distinct: the CLIP loss
    batch["label"] = torch.arange(6)
    loss, _ = objective_loss("cls", img.float(), txt.float(), scale.float(), batch)
    assert torch.equal(loss, tiled_clip_loss(img.float(), txt.float(), scale.float()))


@needs_interpreter
def test_interp_triton_matches_naive_reference():  # the Triton path runs CLIP's kernels, tested at length there
    labels = LABELS[0]
    inputs = make_inputs(len(labels), 16, 1 / 0.07)
    labels_B = torch.tensor(labels)
    got = loss_and_grads(lambda *x: tiled_unicl_loss(*x, labels_B, impl="triton"), inputs, torch.float32)
    assert_close_rel(got, loss_and_grads(lambda *x: naive_unicl(*x, labels), inputs, torch.float64))


@runner_only
def test_triton_interpreter():
    run_under_interpreter(__file__, min_passed=1)


# ---------------------------------------------------------------- data: .cls in train shards


def test_train_batches_carry_cls_labels(tmp_path):
    from PIL import Image

    jpg = encode_image(Image.new("RGB", (20, 20), (200, 30, 30)))
    with ShardWriter(tmp_path, samples_per_shard=100) as w:
        for i in range(12):
            sample = {"__key__": f"k{i:02d}", "jpg": jpg, "txt": f"caption {i}"}
            if i % 3 == 0:
                sample["cls"] = 100 + i  # written as decimal text
            elif i % 3 == 1:
                sample["cls"] = b" 7\n"  # clip_benchmark tars may carry whitespace
            if i in (5, 8):
                sample["cls"] = b"dog" if i == 5 else b"-3"  # not a class index
            w.write(sample)
    cfg = DataConfig()
    cfg.train.urls = str(tmp_path / "shard-000000.tar")
    cfg.num_workers = 0
    loader = build_train_loader(cfg, tokenizer=tokenizer(), image_size=16, batch_size=4, rank=0,
                                world_size=1, seed=0, num_epochs=1)  # fmt: skip
    batches = list(loader)
    got = {k.split(":")[-1]: int(v) for b in batches for k, v in zip(b["keys"], b["label"])}
    assert all(b["label"].dtype == torch.int64 and b["label"].shape == (len(b["keys"]),) for b in batches)
    want = {f"k{i:02d}": 100 + i if i % 3 == 0 else 7 if i % 3 == 1 else -1 for i in range(12) if i not in (5, 8)}
    assert got == want
    total = {}
    for b in batches:
        for reason, n in b["data_stats"]["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    assert total["corrupt_image"] == 2 and sum(total.values()) == 2, json.dumps(total)


def test_synthetic_train_labels_option_adds_cls_and_changes_nothing_else(tmp_path):
    import tarfile

    from mmpretrain.data.synthetic import write_shapes_dataset

    kw = dict(num_train=12, samples_per_shard=6, num_eval=2, image_size=16)
    write_shapes_dataset(tmp_path / "plain", **kw)
    labelled = write_shapes_dataset(tmp_path / "labelled", train_labels=True, **kw)

    def members(root):
        out = {}
        for shard in ("shard-000000.tar", "shard-000001.tar"):
            with tarfile.open(tmp_path / root / "train" / shard) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        return out

    a, b = members("plain"), members("labelled")
    assert not any(k.endswith(".cls") for k in a) and all(b[k] == v for k, v in a.items())  # same samples
    want = {k[: -len(".json")]: json.loads(v)["label"] for k, v in a.items() if k.endswith(".json")}
    assert {k[: -len(".cls")]: int(v) for k, v in b.items() if k.endswith(".cls")} == want
    cfg = DataConfig()
    cfg.train.urls, cfg.num_workers = labelled.train_urls, 0
    loader = build_train_loader(cfg, tokenizer=tokenizer(), image_size=16, batch_size=4, rank=0, world_size=1,
                                seed=0, num_epochs=1)  # fmt: skip
    got = {k.split(":")[-1]: int(x) for batch in loader for k, x in zip(batch["keys"], batch["label"])}
    assert got == want
