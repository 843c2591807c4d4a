"""Session-wide test setup shared by the whole suite.

Environment first (before anything imports wandb, deepspeed or tokenizers): wandb never
reaches the network, DeepSpeed uses its CPU accelerator, HF tokenizers do not spawn threads
that forked DataLoader workers would complain about.
"""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402


@dataclass
class ShapesDataset:
    root: str
    train_urls: str  # brace spec: 4 shards x 128 samples
    num_train: int
    num_train_shards: int
    zeroshot_root: str  # clip_benchmark layout, 64 samples, 32 classes
    retrieval_root: str  # clip_benchmark layout, 64 samples, 3 captions each
    num_eval: int
    image_size: int


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> ShapesDataset:
    """A small synthetic colored-shapes dataset, written once per session (~0.3 s)."""
    from mmpretrain.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes") / "data"
    paths = write_shapes_dataset(root, num_train=512, samples_per_shard=128, num_eval=64, image_size=32, seed=0)
    return ShapesDataset(
        root=paths.root,
        train_urls=paths.train_urls,
        num_train=512,
        num_train_shards=4,
        zeroshot_root=paths.zeroshot_root,
        retrieval_root=paths.retrieval_root,
        num_eval=64,
        image_size=32,
    )
