"""Linear probe: L-BFGS logistic regression on frozen image features of a labeled split, top-1 on another.

Reads `<root>/<split>/*.tar` in clip_benchmark layout; only `.cls` labels are used (no class names needed).
Ranks encode their shares of the images in lockstep and all-gather the features; every rank then fits the
same float64 problem (mmpretrain.eval.metrics.fit_logistic_regression) and returns the same numbers.

Legend: N train images, M test images, C classes, E embedding width.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmpretrain.data.config import DataConfig
from mmpretrain.data.pipeline import build_eval_loader, eval_tar_urls
from mmpretrain.eval.metrics import fit_logistic_regression
from mmpretrain.eval.runner import Ranks, encoded_batches, inference, unwrap


def _image_features(
    model, root: str, split: str, *, image_size: int, batch_size: int, num_workers: int, max_image_pixels, ranks
):
    """((N, E) float32 L2-normalized features, (N,) labels) of a whole split, in sample order, on every rank."""
    loader = build_eval_loader(
        eval_tar_urls(root, split), task="zeroshot", image_size=image_size, batch_size=batch_size,
        rank=ranks.rank, world_size=ranks.world_size, num_workers=num_workers, max_image_pixels=max_image_pixels,
    )  # fmt: skip
    feats, labels, index = [], [], []
    with inference(model, ranks.device) as dtype:
        for batch, img_BE, _ in encoded_batches(model, loader, ranks, image_size, dtype):
            feats.append(F.normalize(img_BE, dim=-1))
            labels.append(batch["label"])
            index.append(batch["index"])
    embed_dim = ranks.max(feats[0].shape[-1] if feats else 0)
    feat_nE = torch.cat(feats) if feats else torch.zeros(0, embed_dim, device=ranks.device)
    # labels travel as an extra feature column: one gather, sorted by the same index
    label_n = torch.cat(labels).to(ranks.device, torch.float32) if labels else torch.zeros(0, device=ranks.device)
    index_n = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    rows_NE1, _ = ranks.gather_rows(torch.cat([feat_nE, label_n[:, None]], 1), index_n)
    return rows_NE1[:, :-1], rows_NE1[:, -1].round().long()


def linear_probe(
    model,
    train_root: str,
    test_root: Optional[str] = None,
    *,
    image_size: int,
    split_train: str = "train",
    split_test: str = "test",
    batch_size: int = 64,
    num_workers: int = 0,
    max_image_pixels: Optional[int] = DataConfig.max_image_pixels,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Linear-probe top-1: logistic regression on frozen image features of a labeled split, tested on another.

    Reads `<train_root>/<split_train>/*.tar` and `<test_root>/<split_test>/*.tar` (test_root defaults
    to train_root) in clip_benchmark layout; only `.cls` labels are used (no class names needed; C is
    the largest label + 1). Features are the L2-normalized `encode_image` outputs. Distributed: ranks
    encode their shares of the images (lockstep, as zero-shot) and all-gather the features; every rank
    then fits the same float64 L-BFGS problem and returns the same numbers.
    Returns {"top1": .., "num_train": N_train, "num_test": N_test}.
    """
    test_root = train_root if test_root is None else test_root
    model = unwrap(model)
    ranks = Ranks.of(model, rank, world_size, group, device)
    kw = dict(image_size=image_size, batch_size=batch_size, num_workers=num_workers, max_image_pixels=max_image_pixels,
              ranks=ranks)  # fmt: skip
    train_x_NE, train_y_N = _image_features(model, train_root, split_train, **kw)
    test_x_ME, test_y_M = _image_features(model, test_root, split_test, **kw)
    for where, y in ((f"{train_root}/{split_train}", train_y_N), (f"{test_root}/{split_test}", test_y_M)):
        if len(y) == 0:
            raise ValueError(f"linear_probe: '{where}': no readable samples")
        if y.min() < 0:
            raise ValueError(f"linear_probe: '{where}': negative .cls labels")
    num_classes = int(max(train_y_N.max(), test_y_M.max())) + 1
    w_EC, b_C = fit_logistic_regression(
        train_x_NE, train_y_N, num_classes, weight_decay=weight_decay, max_iter=max_iter
    )
    pred_M = (test_x_ME.double() @ w_EC + b_C).argmax(1)
    top1 = (pred_M == test_y_M).double().mean().item()
    return {"top1": top1, "num_train": len(train_y_N), "num_test": len(test_y_M)}
