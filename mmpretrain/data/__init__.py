"""Data: WebDataset train loader, clip_benchmark eval sets, CLIP tokenizer, transforms, synthetic shapes.

Heavy imports (transformers, webdataset) happen on first use of the names below, so that
``import mmpretrain.data.config`` stays cheap for the config system.
"""

import importlib

from .config import DataConfig, EvalDataConfig, SourceConfig, SyntheticConfig, TrainDataConfig

_LAZY = {
    "Tokenizer": "tokenizer",
    "TrainTransform": "transforms",
    "EvalTransform": "transforms",
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "normalize_images": "transforms",
    "ImageTooLargeError": "transforms",
    "build_train_loader": "streams",
    "StreamLoader": "streams",
    "TrainLoader": "pipeline",
    "DATA_FAULT_REASONS": "pipeline",
    "DataFaultError": "pipeline",
    "merge_data_stats": "pipeline",
    "check_bad_fraction": "pipeline",
    "build_eval_loader": "pipeline",
    "load_zeroshot_set": "pipeline",
    "load_retrieval_set": "pipeline",
    "ZeroShotSet": "pipeline",
    "RetrievalSet": "pipeline",
    "ShardWriter": "shards",
    "write_shapes_dataset": "synthetic",
    "ensure_synthetic": "synthetic",
    "with_synthetic_data": "synthetic",
    "SyntheticPaths": "synthetic",
    "synthetic_set_name": "synthetic",
}

__all__ = ["DataConfig", "EvalDataConfig", "SourceConfig", "SyntheticConfig", "TrainDataConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
