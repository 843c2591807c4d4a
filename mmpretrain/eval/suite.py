"""Every eval set a run names (`data.eval`), keyed by the set's name: what training and the CLI report.

Keys: `zeroshot/<name>/top1`, `zeroshot/<name>/top5`, `zeroshot/<name>/num_samples`,
`retrieval/<name>/image_to_text_R@1`, ..., `retrieval/<name>/itm_rerank/...` (with a re-ranking head),
`retrieval/<name>/num_images`, `retrieval/<name>/num_texts`, and for a model trained on region tasks
(`box_bins`: data.train.regions.box_bins) on a retrieval set whose samples carry regions `grounding/<name>/...`
(mmpretrain.eval.grounding). A set's name is `data.eval.zeroshot_name` /
`retrieval_name` when given, else derived from the set: "shapes" for the synthetic demo sets, otherwise the
set folder's name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from mmpretrain.data.config import DataConfig
from mmpretrain.data.synthetic import synthetic_set_name
from mmpretrain.eval.config import EvalConfig
from mmpretrain.eval.grounding import grounding
from mmpretrain.eval.retrieval import retrieval
from mmpretrain.eval.zeroshot import zeroshot_classification


def set_name(root: str, name: Optional[str] = None) -> str:
    """The name a set's results are keyed by: `name` when given, "shapes" for a synthetic demo set, else the
    set folder's name."""
    return name or synthetic_set_name(root) or Path(root.rstrip("/")).name


def evaluate_all(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data_cfg,
    eval_cfg: EvalConfig,
    *,
    image_size: int,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
    max_image_pixels: Optional[int] = DataConfig.max_image_pixels,
    box_bins: Optional[int] = None,
) -> dict[str, float]:
    """Every set named in `data_cfg` (`data.eval`: zeroshot, retrieval, their names, split, batch_size).
    Images declaring more than `max_image_pixels` pixels (`data.max_image_pixels`) are skipped and counted in the
    loader's log, never decoded; `num_samples` / `num_images` count only the images evaluated.

    Keys: "zeroshot/<name>/top1", ..., "retrieval/<name>/image_to_text_R@1", ..., "grounding/<name>/ref_acc@0.5",
    ... (with ``box_bins``); {} when no set is configured.
    Call it on every rank; every rank returns the same dict.
    """
    common = dict(
        image_size=image_size, split=data_cfg.split, batch_size=data_cfg.batch_size,
        num_workers=eval_cfg.num_workers, device=device, rank=rank, world_size=world_size, group=group,
        max_image_pixels=max_image_pixels,
    )  # fmt: skip
    results: dict[str, float] = {}
    if data_cfg.zeroshot is not None:
        name = set_name(data_cfg.zeroshot, data_cfg.zeroshot_name)
        r = zeroshot_classification(model, tokenizer, data_cfg.zeroshot, top_k=eval_cfg.top_k, **common)
        results.update({f"zeroshot/{name}/{k}": v for k, v in r.items()})
    if data_cfg.retrieval is not None:
        name = set_name(data_cfg.retrieval, data_cfg.retrieval_name)
        r = retrieval(model, tokenizer, data_cfg.retrieval, recall_k=eval_cfg.recall_k,
                      itm_rerank_k=eval_cfg.itm_rerank_k, **common)  # fmt: skip
        results.update({f"retrieval/{name}/{k}": v for k, v in r.items()})
        if box_bins is not None:  # a model trained on region tasks, on a set whose samples carry regions
            r = grounding(model, tokenizer, data_cfg.retrieval, box_bins=box_bins, **common)
            results.update({f"grounding/{name}/{k}": v for k, v in r.items()})
    return results
