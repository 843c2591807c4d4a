"""Fixtures of the evaluation tests: the color sets (tests/unit/eval/helpers.py) and a random tiny CLIP."""

import pytest
import torch

from mmpretrain.config import Config
from mmpretrain.model import ModelConfig, build_model, resolve_model_config
from tests.unit.eval.helpers import write_sets


@pytest.fixture(scope="package")
def sets(tmp_path_factory):
    return write_sets(str(tmp_path_factory.mktemp("evalsets")))


@pytest.fixture(scope="package")
def tiny_run(shapes_dataset):
    """(model, config) as mmpretrain.checkpoint.load_model returns them: a random tiny CLIP, shapes eval sets."""
    cfg = Config()
    cfg.model = resolve_model_config(ModelConfig(name="tiny"))
    cfg.data.eval.zeroshot, cfg.data.eval.retrieval = shapes_dataset.zeroshot_root, shapes_dataset.retrieval_root
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg
