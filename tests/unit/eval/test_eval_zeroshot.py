"""mmpretrain.eval.zeroshot: the classifier, exact oracle scores, a random model against a direct loop,
half precision, decoding workers, ImageNet-1k with open_clip's names and 80 templates."""

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmpretrain.eval.zeroshot import build_zeroshot_classifier, imagenet_zeroshot, zeroshot_classification
from tests.unit.eval.helpers import (
    CLASSNAMES,
    COLORS,
    SIZE,
    TEMPLATES,
    CharTokenizer,
    ColorOracle,
    CountingTokenizer,
    RandomTwoTower,
    png,
    topk_reference,
    transform,
    write_tar,
)


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
    images = torch.stack([transform(Image.open(io.BytesIO(png(COLORS[CLASSNAMES[i % 7]], i)))) for i in keep])
    prompts_CT = [[t.replace("{c}", n) for t in TEMPLATES] for n in CLASSNAMES]
    classifier = torch.stack([F.normalize(model.encode_text(tok(p)).mean(0), dim=0) for p in prompts_CT])
    logits = model.encode_image(images) @ classifier.T
    ref = topk_reference(logits, torch.tensor([meta["labels"][i] for i in keep]), [1, 3])
    assert got == {"top1": pytest.approx(ref[1]), "top3": pytest.approx(ref[3]), "num_samples": len(keep)}


def test_bf16_model_runs_under_autocast(sets):
    zs, rt, _ = sets
    model = RandomTwoTower(seed=5).to(torch.bfloat16)
    tok = CharTokenizer()
    got = zeroshot_classification(model, tok, zs, image_size=SIZE, batch_size=4)
    assert set(got) == {"top1", "top5", "num_samples"} and 0 <= got["top1"] <= got["top5"] <= 1
    assert all(not grad for _, _, grad, _ in model.calls)


def test_decoding_workers_give_the_same_result(sets):
    zs, _, _ = sets
    kwargs = dict(image_size=SIZE, batch_size=4)
    serial = zeroshot_classification(RandomTwoTower(seed=6), CharTokenizer(), zs, num_workers=0, **kwargs)
    assert zeroshot_classification(RandomTwoTower(seed=6), CharTokenizer(), zs, num_workers=2, **kwargs) == serial


def test_imagenet_zeroshot_uses_open_clip_names_and_80_templates(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    labels = [0, 999, 417, 3, 512]
    samples = [(f"v{i:03d}", {"png": png((40 * i, 90, 200 - 30 * i), i), "cls": str(c).encode()})
               for i, c in enumerate(labels)]  # fmt: skip
    write_tar(str(tmp_path / "imagenet" / "test" / "0.tar"), samples)  # no classnames.txt, no templates file
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
    ref = topk_reference(model.encode_image(images) @ classifier_CE.T, torch.tensor(labels), [1, 5])
    assert (got["top1"], got["top5"]) == pytest.approx((ref[1], ref[5]))
