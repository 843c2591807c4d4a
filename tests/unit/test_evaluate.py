"""mmpretrain.evaluate: metric math against brute force, end-to-end on small tar sets, 2 ranks == 1, CLI errors.

Legend: N images, C classes, T texts, E embedding width.
"""

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, normalize_images
from mmpretrain.evaluate import (
    EvalConfig,
    build_zeroshot_classifier,
    evaluate_all,
    fit_logistic_regression,
    imagenet_zeroshot,
    linear_probe,
    main,
    retrieval,
    retrieval_recall,
    set_name,
    topk_accuracy,
    zeroshot_classification,
)

# ----------------------------------------------------------------------------- helpers

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
COLORS.update({"purple": (140, 30, 160), "cyan": (30, 210, 220), "white": (250, 250, 250)})
CLASSNAMES = list(COLORS)
TEMPLATES = ["a photo of {c}.", "{c}", "something {c} here"]


def _png(rgb, seed: int) -> bytes:
    """A 12x12 image of color `rgb` with seeded noise (so a random model scores no two images alike)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.integers(-25, 26, size=(12, 12, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, samples):
    """samples: list of (key, {ext: bytes})."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write_sets(root, num_images: int = 11, broken: int = 3):
    """A zero-shot and a retrieval set in clip_benchmark layout; returns (zeroshot_root, retrieval_root, meta).

    Image i has class i % C; sample `broken` holds corrupt image bytes (skipped by the loader, which makes
    rank 1 of 2 hold fewer batches); shards split unevenly (3 + rest). Captions: 1 to 3 per image, naming its color.
    """
    zs, rt = os.path.join(root, "colors"), os.path.join(root, "colors_captions")
    zs_samples, rt_samples, labels, captions = [], [], [], []
    for i in range(num_images):
        c = i % len(CLASSNAMES)
        image = b"not an image" if i == broken else _png(COLORS[CLASSNAMES[c]], i)
        labels.append(c)
        caps = [f"{CLASSNAMES[c]} number {i} version {j}" for j in range(1 + i % 3)]
        captions.append(caps)
        zs_samples.append((f"s{i:04d}", {"png": image, "cls": str(c).encode()}))
        rt_samples.append((f"s{i:04d}", {"png": image, "txt": "\n".join(caps).encode()}))
    for folder, samples in ((zs, zs_samples), (rt, rt_samples)):
        _write_tar(os.path.join(folder, "test", "0.tar"), samples[:3])
        _write_tar(os.path.join(folder, "test", "1.tar"), samples[3:])
    with open(os.path.join(zs, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    with open(os.path.join(zs, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    return zs, rt, {"labels": labels, "captions": captions, "broken": broken}


SIZE = 8  # eval image side: the 12x12 test images are resized and center-cropped to it
transform = EvalTransform(SIZE)


class CharTokenizer:
    """Deterministic stand-in for the BPE tokenizer: characters mod 97, padded with 0, length 24."""

    def __call__(self, texts):
        out = torch.zeros(len(texts), 24, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + ord(ch) % 96 for ch in t[:24]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class RandomTwoTower(nn.Module):
    """Seeded random towers with the model's interface; records every forward call's batch size."""

    def __init__(self, seed: int = 0, embed: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Parameter(torch.randn(3 * 8 * 8, embed, generator=g))
        self.token_emb = nn.Parameter(torch.randn(97, embed, generator=g))
        self.calls = []

    def encode_image(self, images_BCHW):
        self.calls.append(("image", len(images_BCHW), torch.is_grad_enabled(), self.training))
        images_BCHW = normalize_images(images_BCHW)  # uint8 straight from the transform; floats pass through
        return F.normalize(images_BCHW.flatten(1).to(self.image_proj.dtype) @ self.image_proj, dim=-1).float()

    def encode_text(self, tokens_BL):
        self.calls.append(("text", len(tokens_BL), torch.is_grad_enabled(), self.training))
        weights_BL = torch.arange(1, tokens_BL.shape[1] + 1, dtype=self.token_emb.dtype)  # order-sensitive pooling
        return F.normalize((self.token_emb[tokens_BL] * weights_BL[None, :, None]).sum(1), dim=-1).float()


class ColorOracle(RandomTwoTower):
    """Knows the answer: images embed as the one-hot of their nearest palette color, texts as the one-hot of
    the color they name, shifted by `shift` classes (shift=0: always right; shift=1: always wrong)."""

    def __init__(self, shift: int = 0):
        super().__init__(embed=len(CLASSNAMES))
        self.shift = shift
        self.tokenizer = CharTokenizer()
        self.name_tokens = [self.tokenizer([n])[0, : len(n)] for n in CLASSNAMES]

    def encode_image(self, images_BCHW):
        super().encode_image(images_BCHW)
        images_BCHW = normalize_images(images_BCHW)  # uint8 straight from the transform; floats pass through
        pixels_BCHW = (
            images_BCHW.float() * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
        )
        mean_B3 = pixels_BCHW.mean((2, 3)) * 255
        palette_C3 = torch.tensor(list(COLORS.values()), dtype=torch.float32)
        return F.one_hot(torch.cdist(mean_B3, palette_C3).argmin(1), len(CLASSNAMES)).float()

    def encode_text(self, tokens_BL):
        super().encode_text(tokens_BL)
        out = torch.zeros(len(tokens_BL), len(CLASSNAMES))
        for b, row in enumerate(tokens_BL):
            for c, name in enumerate(self.name_tokens):
                if row.unfold(0, len(name), 1).eq(name).all(1).any():
                    out[b, (c + self.shift) % len(CLASSNAMES)] = 1.0
        return out


# ----------------------------------------------------------------------------- metric math


def _topk_reference(logits, labels, ks):
    order = logits.argsort(1, descending=True)
    return {k: (order[:, :k] == labels[:, None]).any(1).double().mean().item() for k in ks}


def _recall_reference(img, txt, txt_to_img, ks):
    sim = img @ txt.T
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(img)):
            top = sim[i].argsort(descending=True)[:k].tolist()
            hits += any(txt_to_img[t] == i for t in top)
        out[f"image_to_text_R@{k}"] = hits / len(img)
    for k in ks:
        hits = 0
        for t in range(len(txt)):
            top = sim[:, t].argsort(descending=True)[:k].tolist()
            hits += txt_to_img[t].item() in top
        out[f"text_to_image_R@{k}"] = hits / len(txt)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_accuracy_matches_sorting(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 9, (200,), generator=g)
    logits = torch.randn(200, 9, generator=g, dtype=torch.float64) + F.one_hot(labels, 9)  # better than chance
    ks = [1, 2, 5, 9]
    got = topk_accuracy(logits, labels, ks)
    assert got == pytest.approx(_topk_reference(logits, labels, ks))
    assert got[9] == 1.0 and 0 < got[1] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_recall_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_img = 13
    caps_per_img = torch.randint(1, 4, (num_img,), generator=g)
    txt_to_img = torch.repeat_interleave(torch.arange(num_img), caps_per_img)
    txt_to_img = txt_to_img[torch.randperm(len(txt_to_img), generator=g)]  # captions in any order
    img = F.normalize(torch.randn(num_img, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(len(txt_to_img), 5, generator=g, dtype=torch.float64), dim=-1)
    ks = [1, 5, 10]
    got = retrieval_recall(img, txt, txt_to_img, ks, chunk=4)  # chunks smaller than N and T
    assert got == pytest.approx(_recall_reference(img, txt, txt_to_img, ks))
    assert 0 < got["image_to_text_R@1"] < got["image_to_text_R@10"] <= 1


def test_retrieval_recall_perfect_and_any_caption_counts():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0], [0.6, 0.8, 0]])
    txt_to_img = torch.tensor([0, 2, 1, 0])  # caption 3 of image 0 is nearer image 1: one miss at R@1
    got = retrieval_recall(img, txt, txt_to_img, [1, 2])
    assert got["image_to_text_R@1"] == 1.0  # image 0's best caption (0) ranks first; others are exact
    assert got["text_to_image_R@1"] == 0.75 and got["text_to_image_R@2"] == 1.0


def test_eval_config_validate():
    EvalConfig().validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.top_k"):
        EvalConfig(top_k=[0, 5]).validate("eval")
    with pytest.raises(ValueError, match=r"^eval\.every_steps"):
        EvalConfig(every_steps=-1).validate("eval")


# ----------------------------------------------------------------------------- end to end on tar sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_sets(str(tmp_path_factory.mktemp("evalsets")))


def test_classifier_is_renormalized_prompt_mean(sets):
    model = RandomTwoTower()
    tok = CharTokenizer()
    got = build_zeroshot_classifier(model, tok, CLASSNAMES, TEMPLATES, batch_size=4)
    for c, name in enumerate(CLASSNAMES):
        emb_TE = model.encode_text(tok([t.replace("{c}", name) for t in TEMPLATES]))
        ref = F.normalize(emb_TE.double().mean(0), dim=0)
        torch.testing.assert_close(got[c].double(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("shift", "top1", "top2"), [(0, 1.0, 1.0), (1, 0.0, 1.0)])
def test_zeroshot_oracle_scores_exactly(sets, shift, top1, top2):
    zs, _, meta = sets
    model = ColorOracle(shift)
    model.train()
    got = zeroshot_classification(model, model.tokenizer, zs, image_size=SIZE, batch_size=3, top_k=[1, 2])
    # shift=1: the label's score is 0 and exactly one class scores 1, so the label ranks second
    assert got == {"top1": top1, "top2": top2, "num_samples": len(meta["labels"]) - 1}  # the broken one skipped
    assert model.training, "the previous train/eval mode is restored"
    assert not any(grad or training for _, _, grad, training in model.calls), "no_grad and eval mode inside"


def test_zeroshot_random_model_matches_direct_computation(sets):
    """Plumbing check: reading, batching, padding and ensembling against a straightforward loop."""
    zs, _, meta = sets
    model, tok = RandomTwoTower(seed=3), CharTokenizer()
    got = zeroshot_classification(model, tok, zs, image_size=SIZE, batch_size=4, top_k=[1, 3])
    keep = [i for i in range(len(meta["labels"])) if i != meta["broken"]]
    images = torch.stack([transform(Image.open(io.BytesIO(_png(COLORS[CLASSNAMES[i % 7]], i)))) for i in keep])
    prompts_CT = [[t.replace("{c}", n) for t in TEMPLATES] for n in CLASSNAMES]
    classifier = torch.stack([F.normalize(model.encode_text(tok(p)).mean(0), dim=0) for p in prompts_CT])
    logits = model.encode_image(images) @ classifier.T
    ref = _topk_reference(logits, torch.tensor([meta["labels"][i] for i in keep]), [1, 3])
    assert got == {"top1": pytest.approx(ref[1]), "top3": pytest.approx(ref[3]), "num_samples": len(keep)}


def test_retrieval_matches_direct_computation(sets):
    _, rt, meta = sets
    model, tok = RandomTwoTower(seed=4), CharTokenizer()
    got = retrieval(model, tok, rt, image_size=SIZE, batch_size=4, recall_k=[1, 2, 5])
    keep = [i for i in range(len(meta["captions"])) if i != meta["broken"]]
    images = torch.stack([transform(Image.open(io.BytesIO(_png(COLORS[CLASSNAMES[i % 7]], i)))) for i in keep])
    caps = [c for i in keep for c in meta["captions"][i]]
    txt_to_img = torch.tensor([j for j, i in enumerate(keep) for _ in meta["captions"][i]])
    ref = _recall_reference(model.encode_image(images), model.encode_text(tok(caps)), txt_to_img, [1, 2, 5])
    assert {k: got[k] for k in ref} == pytest.approx(ref)
    assert (got["num_images"], got["num_texts"]) == (len(keep), len(caps))  # the broken image and its captions left


def test_retrieval_oracle_any_caption(sets):
    _, rt, meta = sets
    model = ColorOracle()
    got = retrieval(model, model.tokenizer, rt, image_size=SIZE, batch_size=5, recall_k=[1])
    # every caption names its image's color: ties among same-colored images count in the query's favour
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == 1.0


def test_bf16_model_runs_under_autocast(sets):
    zs, rt, _ = sets
    model = RandomTwoTower(seed=5).to(torch.bfloat16)
    tok = CharTokenizer()
    got = zeroshot_classification(model, tok, zs, image_size=SIZE, batch_size=4)
    assert set(got) == {"top1", "top5", "num_samples"} and 0 <= got["top1"] <= got["top5"] <= 1
    assert all(not grad for _, _, grad, _ in model.calls)


def test_evaluate_all_keys(sets):
    from mmpretrain.data.config import EvalDataConfig

    zs, rt, _ = sets
    data_cfg = EvalDataConfig(zeroshot=zs, retrieval=rt, batch_size=4)
    data_cfg.validate("data.eval")
    results = evaluate_all(
        RandomTwoTower(), CharTokenizer(), data_cfg, EvalConfig(num_workers=0, recall_k=[1, 5]), image_size=8
    )
    assert set(results) == {
        "zeroshot/colors/top1", "zeroshot/colors/top5", "zeroshot/colors/num_samples",
        "retrieval/colors_captions/image_to_text_R@1", "retrieval/colors_captions/image_to_text_R@5",
        "retrieval/colors_captions/text_to_image_R@1", "retrieval/colors_captions/text_to_image_R@5",
        "retrieval/colors_captions/num_images", "retrieval/colors_captions/num_texts",
    }  # fmt: skip
    assert evaluate_all(RandomTwoTower(), CharTokenizer(), EvalDataConfig(), EvalConfig(), image_size=8) == {}


def test_decoding_workers_give_the_same_result(sets):
    zs, _, _ = sets
    kwargs = dict(image_size=SIZE, batch_size=4)
    serial = zeroshot_classification(RandomTwoTower(seed=6), CharTokenizer(), zs, num_workers=0, **kwargs)
    assert zeroshot_classification(RandomTwoTower(seed=6), CharTokenizer(), zs, num_workers=2, **kwargs) == serial


# ----------------------------------------------------------------------------- 2 ranks == 1 rank


def _rank_worker(rank, world_size, init_file, zs, rt, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, tok = RandomTwoTower(seed=7), CharTokenizer()
        kwargs = dict(image_size=SIZE, batch_size=2)
        results = {
            "zeroshot": zeroshot_classification(model, tok, zs, top_k=[1, 3], **kwargs),
            "retrieval": retrieval(model, tok, rt, recall_k=[1, 3], **kwargs),
            "classifier": build_zeroshot_classifier(model, tok, CLASSNAMES, TEMPLATES, 2).tolist(),
            "probe": linear_probe(model, zs, split_train="test", max_iter=50, **kwargs),
            "calls": [(kind, n) for kind, n, _, _ in model.calls],
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank(sets, tmp_path):
    zs, rt, _ = sets  # 11 images, 7 classes, 1..3 captions each: every share needs padding on 2 ranks
    args = (2, str(tmp_path / "init"), zs, rt, str(tmp_path))
    torch.multiprocessing.spawn(_rank_worker, args=args, nprocs=2)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))

    model, tok = RandomTwoTower(seed=7), CharTokenizer()
    one = {
        "zeroshot": zeroshot_classification(model, tok, zs, image_size=SIZE, batch_size=2, top_k=[1, 3]),
        "retrieval": retrieval(model, tok, rt, image_size=SIZE, batch_size=2, recall_k=[1, 3]),
        "probe": linear_probe(model, zs, split_train="test", max_iter=50, image_size=SIZE, batch_size=2),
    }
    assert one["probe"]["num_train"] == one["probe"]["num_test"] == 10
    for r in (r0, r1):
        assert r["probe"] == pytest.approx(one["probe"])
        assert r["zeroshot"] == pytest.approx(one["zeroshot"])
        assert r["retrieval"] == pytest.approx(one["retrieval"])
        classifier = build_zeroshot_classifier(model, tok, CLASSNAMES, TEMPLATES, 2)
        torch.testing.assert_close(torch.tensor(r["classifier"]), classifier, atol=1e-6, rtol=0)
    # ZeRO-3 needs the same forward calls, batch shapes included, on every rank
    assert [kind for kind, _ in r0["calls"]] == [kind for kind, _ in r1["calls"]]
    assert r0["calls"] != r1["calls"], "uneven shares: rank 1 ran dummy batches"
    assert one["zeroshot"]["num_samples"] == 10 and one["zeroshot"]["top3"] > 0


# ----------------------------------------------------------------------------- CLI errors


def test_cli_missing_checkpoint_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "nope") in err


def test_cli_bad_eval_sets(tiny_run, tmp_path, sets, monkeypatch, capsys):
    import mmpretrain.convert

    zs, rt, _ = sets
    monkeypatch.setattr(mmpretrain.convert, "load_any", lambda path: copy.deepcopy(tiny_run))
    no_classnames = tmp_path / "no_classnames"
    shutil.copytree(os.path.join(zs, "test"), no_classnames / "test")
    for args, named in [
        (["--zeroshot", str(tmp_path / "missing")], str(tmp_path / "missing")),
        (["--zeroshot", str(no_classnames)], str(no_classnames / "classnames.txt")),
        (["--retrieval", rt, "--split", "val"], os.path.join(rt, "val", "*.tar")),
    ]:
        assert main([str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and named in err, err


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmpretrain.evaluate", str(tmp_path / "missing_run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "missing_run") in proc.stderr


# ----------------------------------------------------------------------------- the real tiny model


@pytest.fixture(scope="module")
def tiny_run(shapes_dataset):
    """(model, config) as mmpretrain.convert.load_any returns them: a random tiny CLIP, shapes eval sets."""
    from mmpretrain.config import Config
    from mmpretrain.model import ModelConfig, build_model, resolve_model_config

    cfg = Config()
    cfg.model = resolve_model_config(ModelConfig(name="tiny"))
    cfg.data.eval.zeroshot, cfg.data.eval.retrieval = shapes_dataset.zeroshot_root, shapes_dataset.retrieval_root
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


def test_random_tiny_model_is_near_chance(tiny_run, shapes_dataset):
    from mmpretrain.data import Tokenizer

    model, cfg = tiny_run
    tok = Tokenizer(cfg.model.text.context_length)
    results = evaluate_all(model, tok, cfg.data.eval, EvalConfig(num_workers=0), image_size=cfg.model.vision.image_size)
    zs, rt = set_name(shapes_dataset.zeroshot_root), set_name(shapes_dataset.retrieval_root)
    assert results[f"zeroshot/{zs}/num_samples"] == shapes_dataset.num_eval
    assert results[f"zeroshot/{zs}/top1"] <= min(0.25, results[f"zeroshot/{zs}/top5"])  # 32 classes: chance 3%
    assert results[f"retrieval/{rt}/num_texts"] == 3 * shapes_dataset.num_eval
    for direction in ("image_to_text", "text_to_image"):
        r1, r5, r10 = (results[f"retrieval/{rt}/{direction}_R@{k}"] for k in (1, 5, 10))
        assert r1 <= r5 <= r10 <= 0.5  # 64 images: chance R@10 is about 16%


def test_cli_prints_table_and_writes_json(tiny_run, shapes_dataset, tmp_path, monkeypatch, capsys):
    import mmpretrain.convert

    monkeypatch.setattr(mmpretrain.convert, "load_any", lambda path: copy.deepcopy(tiny_run))
    out = tmp_path / "out" / "results.json"
    assert main([str(tmp_path), "--batch-size", "16", "--num-workers", "0", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    zs = set_name(shapes_dataset.zeroshot_root)
    printed = capsys.readouterr().out
    assert f"zeroshot/{zs}/top1" in printed and f"{results[f'zeroshot/{zs}/top1']:.4f}" in printed
    assert len(results) == 3 + 8  # the run's two sets: top1/top5/num_samples + 6 recalls and 2 counts

    # sets named on the command line replace the run's
    assert main([str(tmp_path), "--zeroshot", shapes_dataset.zeroshot_root, "--output", str(out)]) == 0
    assert sorted(json.loads(out.read_text())) == sorted(k for k in results if k.startswith("zeroshot/"))


# ----------------------------------------------------------------------------- linear probe


def test_logistic_regression_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers_CE = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1) * 3
    y_N = torch.randint(0, 5, (300,), generator=g)
    x_NE = centers_CE[y_N] + 0.3 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    assert (x_NE @ centers_CE.T).argmax(1).eq(y_N).all(), "the synthetic set is linearly separable"
    w_EC, b_C = fit_logistic_regression(x_NE.float(), y_N, 5, weight_decay=1e-4, max_iter=200)
    assert (x_NE @ w_EC + b_C).argmax(1).eq(y_N).all()  # 100% train accuracy
    # the L-BFGS optimum has zero gradient of the regularized loss
    w, b = w_EC.clone().requires_grad_(), b_C.clone().requires_grad_()
    (F.cross_entropy(x_NE @ w + b, y_N) + 1e-4 * w.square().sum()).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5


def test_linear_probe_oracle_features(sets, tmp_path):
    """The color oracle's one-hot features make the 7 classes separable: the probe scores 100% on held-out data."""
    zs, _, meta = sets
    root = tmp_path / "probe"
    shutil.copytree(os.path.join(zs, "test"), root / "train")
    samples = [(f"t{i}", {"png": _png(COLORS[CLASSNAMES[i % 7]], 100 + i), "cls": str(i % 7).encode()})
               for i in range(9)]  # fmt: skip
    _write_tar(str(root / "test" / "0.tar"), samples)
    model = ColorOracle()
    got = linear_probe(model, str(root), image_size=SIZE, batch_size=4, max_iter=100)
    assert got == {"top1": 1.0, "num_train": len(meta["labels"]) - 1, "num_test": 9}
    assert not any(grad or training for _, _, grad, training in model.calls)


def test_linear_probe_shapes_end_to_end(tiny_run, shapes_dataset, tmp_path, monkeypatch, capsys):
    """A random tiny CLIP through the CLI: the shapes zero-shot tars serve as both splits."""
    import mmpretrain.convert

    monkeypatch.setattr(mmpretrain.convert, "load_any", lambda path: copy.deepcopy(tiny_run))
    root = tmp_path / "shapes_probe"
    for split in ("train", "test"):
        shutil.copytree(os.path.join(shapes_dataset.zeroshot_root, "test"), root / split)
    out = tmp_path / "r.json"
    assert main([str(tmp_path), "--linear-probe", str(root), "--num-workers", "0", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {f"linear_probe/shapes_probe/{k}" for k in ("top1", "num_train", "num_test")}
    assert results["linear_probe/shapes_probe/num_test"] == shapes_dataset.num_eval
    assert 0 <= results["linear_probe/shapes_probe/top1"] <= 1


# ----------------------------------------------------------------------------- ImageNet-1k zero-shot


class CountingTokenizer(CharTokenizer):
    def __init__(self):
        self.texts = []

    def __call__(self, texts):
        self.texts += texts
        return super().__call__(texts)


def test_imagenet_zeroshot_uses_open_clip_names_and_80_templates(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    labels = [0, 999, 417, 3, 512]
    samples = [(f"v{i:03d}", {"png": _png((40 * i, 90, 200 - 30 * i), i), "cls": str(c).encode()})
               for i, c in enumerate(labels)]  # fmt: skip
    _write_tar(str(tmp_path / "imagenet" / "test" / "0.tar"), samples)  # no classnames.txt, no templates file
    model, tok = RandomTwoTower(seed=8), CountingTokenizer()
    got = imagenet_zeroshot(model, tok, str(tmp_path / "imagenet"), image_size=SIZE, batch_size=512, top_k=[1, 5])
    assert set(got) == {"top1", "top5", "num_samples"} and got["num_samples"] == len(labels)
    prompts = [t for t in tok.texts if t]  # "" are dummy-forward prompts (none on one rank)
    assert len(prompts) == 1000 * 80 and len(set(prompts)) > 1000 * 70
    assert prompts[:80] == [t(IMAGENET_CLASSNAMES[0]) for t in OPENAI_IMAGENET_TEMPLATES]
    assert prompts[-1] == OPENAI_IMAGENET_TEMPLATES[-1](IMAGENET_CLASSNAMES[999])

    classifier_CE = build_zeroshot_classifier(
        model, CharTokenizer(), IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, batch_size=512
    )
    assert classifier_CE.shape == (1000, 6)
    images = torch.stack([transform(Image.open(io.BytesIO(files["png"]))) for _, files in samples])
    ref = _topk_reference(model.encode_image(images) @ classifier_CE.T, torch.tensor(labels), [1, 5])
    assert (got["top1"], got["top5"]) == pytest.approx((ref[1], ref[5]))


def test_imagenet_cli_keys(tiny_run, tmp_path, monkeypatch):
    """The CLI path with the real tiny model; a 3-class stand-in for open_clip's lists keeps it fast."""
    import mmpretrain.convert
    import mmpretrain.evaluate

    monkeypatch.setattr(mmpretrain.convert, "load_any", lambda path: copy.deepcopy(tiny_run))
    monkeypatch.setattr(
        mmpretrain.evaluate, "imagenet_classes_and_templates", lambda: (["tench", "goldfish", "shark"], [str, "a {c}."])
    )
    samples = [(f"v{i}", {"png": _png((80 * i, 90, 30), i), "cls": str(i % 3).encode()}) for i in range(4)]
    _write_tar(str(tmp_path / "imagenet" / "test" / "0.tar"), samples)
    out = tmp_path / "r.json"
    args = ["--imagenet", str(tmp_path / "imagenet"), "--num-workers", "0", "--output", str(out)]
    assert main([str(tmp_path), *args]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {f"zeroshot/imagenet1k/{k}" for k in ("top1", "top5", "num_samples")}
    assert results["zeroshot/imagenet1k/num_samples"] == 4 and results["zeroshot/imagenet1k/top5"] == 1.0


def test_imagenet_without_open_clip_is_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    import mmpretrain.convert

    monkeypatch.setattr(mmpretrain.convert, "load_any", lambda path: copy.deepcopy(tiny_run))
    monkeypatch.setitem(sys.modules, "open_clip.zero_shot_metadata", None)  # import fails as if not installed
    (tmp_path / "imagenet").mkdir()
    assert main([str(tmp_path), "--imagenet", str(tmp_path / "imagenet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "open_clip_torch" in err, err


# ----------------------------------------------------------------------------- ITM re-ranking


def test_reranked_ranks_match_brute_force_reordering():
    from mmpretrain.evaluate import reranked_ranks

    g = torch.Generator().manual_seed(0)
    Q, C, K = 40, 12, 4
    sim_QC, itm_QC = torch.randn(Q, C, generator=g), torch.randn(Q, C, generator=g)
    correct_QC = torch.rand(Q, C, generator=g) < 0.15
    correct_QC[torch.arange(Q), torch.randint(0, C, (Q,), generator=g)] = True  # every query has an answer
    want = []
    for q in range(Q):
        order = sim_QC[q].argsort(descending=True).tolist()
        top = sorted(order[:K], key=lambda c: -itm_QC[q, c].item())  # top K by match score, then the rest
        want.append(next(i for i, c in enumerate(top + order[K:]) if correct_QC[q, c]))
    plain_Q = torch.tensor([(sim_QC[q] > sim_QC[q][correct_QC[q]].max()).sum() for q in range(Q)])
    cand_QK = sim_QC.topk(K, dim=1).indices
    got = reranked_ranks(itm_QC.gather(1, cand_QK), correct_QC.gather(1, cand_QK), plain_Q)
    assert got.tolist() == want


def _tiny_itm_model(seed: int = 0):
    from mmpretrain.config import load_config
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective

    cfg = load_config(None, ["data.synthetic.root=/tmp/unused", "model.name=tiny", "loss.terms.clip.weight=1",
                             "loss.terms.itm.layers=1"])  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    Objective(cfg).attach_heads(model)
    return model.eval(), cfg


def _rerank_worker(rank, world_size, init_file, rt, out_dir):
    import torch.distributed as dist

    from mmpretrain.data import Tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, cfg = _tiny_itm_model()
        r = retrieval(model, Tokenizer(cfg.model.text.context_length), rt, image_size=cfg.model.vision.image_size,
                      batch_size=3, recall_k=[1, 2, 4], itm_rerank_k=3)  # fmt: skip
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(r, f)
    finally:
        dist.destroy_process_group()


def test_itm_rerank_matches_direct_scoring_and_two_ranks(sets, tmp_path):
    """Re-ranked recall equals scoring every (image, caption) pair with the head directly and reordering each
    query's top K by that score; plain retrieval is reported beside it, unchanged; 2 ranks give the same."""
    from mmpretrain.data import Tokenizer, build_eval_loader, load_retrieval_set
    from mmpretrain.objectives.itm import match_score, text_valid_mask

    _, rt, _ = sets
    model, cfg = _tiny_itm_model()
    tok, size, K = Tokenizer(cfg.model.text.context_length), cfg.model.vision.image_size, 3
    got = retrieval(model, tok, rt, image_size=size, batch_size=4, recall_k=[1, 2, 4], itm_rerank_k=K)
    plain = retrieval(model, tok, rt, image_size=size, batch_size=4, recall_k=[1, 2, 4])
    assert {k: v for k, v in got.items() if not k.startswith("itm_rerank/")} == pytest.approx(plain)

    loader = build_eval_loader(load_retrieval_set(rt, "test").urls, task="retrieval", image_size=size, batch_size=64,
                               rank=0, world_size=1, num_workers=0)  # fmt: skip
    batch = next(iter(loader))
    captions = [c for caps in batch["captions"] for c in caps]
    owner_T = torch.tensor([i for i, caps in enumerate(batch["captions"]) for _ in caps])
    with torch.no_grad():
        v = model.vision_model(normalize_images(batch["image"], torch.float32))
        img_NE, img_tok = F.normalize(v.embeds, dim=-1), v.last_hidden_state
        tokens = tok(captions)
        t = model.text_model(tokens)
        txt_TE, txt_tok = F.normalize(t.embeds, dim=-1), t.last_hidden_state
        N, T = len(img_NE), len(txt_TE)
        itm_NT = torch.stack([
            match_score(model.heads["itm"](img_tok[i].expand(T, -1, -1), txt_tok, text_valid_mask(tokens)))
            for i in range(N)
        ])  # fmt: skip
    sim_NT = img_NE @ txt_TE.T
    correct_NT = owner_T[None, :] == torch.arange(N)[:, None]

    def brute(sim_QC, itm_QC, correct_QC, ks):
        ranks = []
        for q in range(len(sim_QC)):
            order = sim_QC[q].argsort(descending=True).tolist()
            top = sorted(order[:K], key=lambda c: -itm_QC[q, c].item())
            ranks.append(next(i for i, c in enumerate(top + order[K:]) if correct_QC[q, c]))
        return {k: sum(r < k for r in ranks) / len(ranks) for k in ks}

    i2t, t2i = brute(sim_NT, itm_NT, correct_NT, [1, 2, 4]), brute(sim_NT.T, itm_NT.T, correct_NT.T, [1, 2, 4])
    for k in (1, 2, 4):
        assert got[f"itm_rerank/image_to_text_R@{k}"] == pytest.approx(i2t[k])
        assert got[f"itm_rerank/text_to_image_R@{k}"] == pytest.approx(t2i[k])
    assert got["itm_rerank/image_to_text_R@4"] == got["image_to_text_R@4"]  # K <= 4: only the top K move
    top_NK = sim_NT.topk(K, dim=1).indices
    assert (itm_NT.gather(1, top_NK).argsort(1, descending=True) != torch.arange(K)).any(), "the head reorders"

    torch.multiprocessing.spawn(_rerank_worker, args=(2, str(tmp_path / "init"), rt, str(tmp_path)), nprocs=2)
    for r in range(2):
        assert json.load(open(tmp_path / f"rank{r}.json")) == pytest.approx(got)


def test_evaluate_all_reports_rerank_beside_plain_and_zero_turns_it_off(sets):
    from mmpretrain.data import Tokenizer

    _, rt, _ = sets
    model, cfg = _tiny_itm_model()
    cfg.data.eval.zeroshot, cfg.data.eval.retrieval, cfg.data.eval.batch_size = None, rt, 4
    tok, size = Tokenizer(cfg.model.text.context_length), cfg.model.vision.image_size
    on = evaluate_all(model, tok, cfg.data.eval, EvalConfig(num_workers=0, itm_rerank_k=2), image_size=size)
    off = evaluate_all(model, tok, cfg.data.eval, EvalConfig(num_workers=0, itm_rerank_k=0), image_size=size)
    name = set_name(rt)
    assert f"retrieval/{name}/itm_rerank/image_to_text_R@1" in on and f"retrieval/{name}/image_to_text_R@1" in on
    assert not any("itm_rerank" in k for k in off)
    assert {k: v for k, v in on.items() if "itm_rerank" not in k} == pytest.approx(off)
    with pytest.raises(ValueError, match=r"eval.itm_rerank_k"):
        EvalConfig(itm_rerank_k=-1).validate("eval")


def test_cli_loads_a_runs_itm_head_and_reranks(shapes_dataset, tmp_path):
    """A run trained with loss.terms.itm: `python -m mmpretrain.evaluate RUN` builds the head from the run's config,
    loads it strictly with the towers and reports the re-ranked recalls, equal to the trainer's final eval."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ds, out = shapes_dataset, tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mmpretrain.train", os.path.join(repo, "configs", "recipes", "itm-tiny.yaml"),
         f"output_dir={out}", f"data.train.urls={ds.train_urls}", f"data.eval.zeroshot={ds.zeroshot_root}",
         f"data.eval.retrieval={ds.retrieval_root}", "train.steps=2", "train.batch_size=8", "data.num_workers=0",
         "checkpoint.every_steps=0", "logging.wandb=disabled", "logging.progress=false", "eval.num_workers=0"],
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trained = json.load(open(out / "eval.json"))
    assert main([str(out), "--num-workers", "0", "--output", str(tmp_path / "r.json")]) == 0
    got = json.load(open(tmp_path / "r.json"))
    name = set_name(ds.retrieval_root)
    assert f"retrieval/{name}/itm_rerank/image_to_text_R@1" in got
    assert {k: v for k, v in got.items()} == pytest.approx({k: v for k, v in trained.items() if k != "step"})
