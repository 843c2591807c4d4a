"""Evaluation: zero-shot classification, image<->text retrieval (with ITM re-ranking), linear probe.

    config.py        EvalConfig (`eval.*`); no project imports, so mmpretrain.config composes it cheaply
    metrics.py       pure metric math: top-k, retrieval ranks and recall, re-ranked ranks, logistic regression
    runner.py        running a model on every rank: sharding, lockstep (ZeRO-3), inference mode, batched encoding
    zeroshot.py      zero-shot classification on a clip_benchmark set; ImageNet-1k with open_clip's names/templates
    retrieval.py     image<->text recall; re-ranking through the `Reranker` a model's head provides (ITM)
    linear_probe.py  logistic regression on frozen image features
    suite.py         every set a run names (`data.eval`), keyed `zeroshot/<name>/top1`, `retrieval/<name>/...`
    cli.py           `python -m mmpretrain.eval RUN [--zeroshot ROOT] [--retrieval ROOT] [--imagenet ROOT] ...`

Sets use clip_benchmark's WebDataset layout (docs/data.md). The collectives are mmpretrain.distributed's; this
package imports no objective.
"""

from mmpretrain.eval.config import EvalConfig

__all__ = ["EvalConfig"]
