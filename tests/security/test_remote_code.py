"""A Hugging Face folder never runs its own Python (issue: trust what users hand each other, finding 9): every
transformers from_pretrained / from_config call passes trust_remote_code=False, so a config.json whose auto_map
points at a configuration_*.py beside it is refused (an error naming the file), and that file is never imported.
"""

import json

import pytest

from mmpretrain.convert.hf import read_hf
from mmpretrain.model import ModelConfig, resolve_model_config
from mmpretrain.model.config import hf_text_config

EVIL = """import pathlib
pathlib.Path(__file__).with_name("ran").write_text("code from the folder ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


@pytest.fixture
def evil_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                                 "AutoModel": "configuration_evil.EvilConfig"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(EVIL)
    return folder


def test_hf_model_folder_with_remote_code_is_refused(evil_folder):
    with pytest.raises(ValueError, match="config.json"):
        read_hf(str(evil_folder))
    assert not (evil_folder / "ran").exists()


def test_hf_text_tower_folder_with_remote_code_is_refused(evil_folder):
    cfg = resolve_model_config(ModelConfig(name="tiny"))
    cfg.text.kind, cfg.text.hf_config = "hf", str(evil_folder)
    with pytest.raises(ValueError, match="model.text.hf_config: .*config.json"):
        hf_text_config(cfg.text)
    assert not (evil_folder / "ran").exists()
