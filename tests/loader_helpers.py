"""Helpers shared by the train-loader tests (test_data.py, test_data_mixing.py)."""

import torch

from mmpretrain.data import build_train_loader


def take(cfg, tokenizer, n, *, batch_size=8, rank=0, world_size=1, seed=0, start_batch=0, image_size=16):
    """The first n batches of one rank's train loader."""
    loader = build_train_loader(
        cfg, tokenizer=tokenizer, image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size,
        seed=seed, start_batch=start_batch,
    )  # fmt: skip
    it = iter(loader)
    return [next(it) for _ in range(n)]


def captions(batches, tokenizer) -> list[str]:
    # CLIP's BPE splits numbers into digits and decode() puts spaces between tokens: compare without spaces
    return ["".join(tokenizer.decode(row).split()) for b in batches for row in b["text"]]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])
        assert x["num_skipped"] == y["num_skipped"] and x["data_stats"] == y["data_stats"]
