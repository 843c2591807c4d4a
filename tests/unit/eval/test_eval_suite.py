"""mmpretrain.eval.suite: every configured set, keyed by the set's name; the random tiny model is near chance."""

import pytest

from mmpretrain.data import Tokenizer
from mmpretrain.data.config import EvalDataConfig
from mmpretrain.eval.config import EvalConfig
from mmpretrain.eval.suite import evaluate_all, set_name
from tests.unit.eval.helpers import CharTokenizer, RandomTwoTower


def test_evaluate_all_keys(sets):
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


def test_random_tiny_model_is_near_chance(tiny_run, shapes_dataset):
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


def test_set_names(sets, shapes_dataset, tmp_path):
    """A set is named by data.eval.*_name, else "shapes" for the synthetic demo sets, else by its folder."""
    zs, rt, _ = sets
    assert set_name(shapes_dataset.zeroshot_root) == set_name(shapes_dataset.retrieval_root) == "shapes"
    assert (set_name(zs), set_name(rt + "/"), set_name(zs, "colors7")) == ("colors", "colors_captions", "colors7")
    assert set_name(str(tmp_path / "eval")) == "eval"  # a folder named eval outside a synthetic dataset

    data_cfg = EvalDataConfig(zeroshot=zs, retrieval=rt, zeroshot_name="c7", retrieval_name="caps", batch_size=4)
    data_cfg.validate("data.eval")
    results = evaluate_all(RandomTwoTower(), CharTokenizer(), data_cfg, EvalConfig(num_workers=0), image_size=8)
    assert {k.split("/")[1] for k in results if k.startswith("zeroshot/")} == {"c7"}
    assert {k.split("/")[1] for k in results if k.startswith("retrieval/")} == {"caps"}
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match=r"^data\.eval\.retrieval_name"):
            EvalDataConfig(retrieval_name=bad).validate("data.eval")
