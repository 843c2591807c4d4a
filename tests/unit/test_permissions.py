"""Handed-over outputs get the modes of the user's umask, not the temporary folder's 0700 or safetensors' 0600."""

import os

import pytest
import torch

from mmpretrain.convert.common import apply_umask, atomic_folder, save_safetensors


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize(
    "mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o002, 0o775, 0o664)]
)
def test_atomic_folder_output_follows_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    out = tmp_path / "shared" / "consolidated"
    with atomic_folder(str(out)) as tmp:
        assert os.stat(tmp).st_mode & 0o777 == 0o700  # mkdtemp's: private while it is written
        save_safetensors({"w": torch.zeros(2)}, os.path.join(tmp, "model.safetensors"))
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "config.yaml"), "w") as f:
            f.write("model: {}\n")
    assert os.stat(out).st_mode & 0o777 == dir_mode
    assert os.stat(out / "sub").st_mode & 0o777 == dir_mode
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == file_mode
    assert os.stat(out / "sub" / "config.yaml").st_mode & 0o777 == file_mode


def test_safetensors_alone_writes_0600_and_apply_umask_fixes_a_file(tmp_path, umask):
    path = str(tmp_path / "adapted.safetensors")
    save_safetensors({"w": torch.zeros(2)}, path)
    assert os.stat(path).st_mode & 0o777 == 0o600  # why apply_umask exists
    apply_umask(path)
    assert os.stat(path).st_mode & 0o777 == 0o644
