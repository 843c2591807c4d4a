"""Two-tower image-text models (CLIP, SigLIP), their config and size table.

Usage::

    model = build_model(ModelConfig(name="ViT-B-16"))
    out = model(images_BCHW, tokens_BL)          # ModelOutput: normalized features, logit scale/bias
    model.encode_image(images_BCHW)              # (B, E) unit vectors; encode_text likewise
    model.vision_model(images, output_hidden_states=True).hidden_states[-2]   # e.g. what LLaVA reads
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.2), lr=...)
"""

import os

import torch
from torch import nn

from mmpretrain.model.base import ModelOutput, TwoTowerModel
from mmpretrain.model.clip import CLIP
from mmpretrain.model.config import ModelConfig, TextConfig, VisionConfig, resolve_model_config
from mmpretrain.model.layers import EncoderLayer, TowerOutput
from mmpretrain.model.siglip import SigLIP
from mmpretrain.model.sizes import SIZES

__all__ = [
    "CLIP",
    "SIZES",
    "ModelConfig",
    "ModelOutput",
    "SigLIP",
    "TextConfig",
    "TowerOutput",
    "TwoTowerModel",
    "VisionConfig",
    "build_model",
    "compile_blocks",
    "no_weight_decay",
    "param_groups",
    "resolve_model_config",
]


def build_model(cfg: ModelConfig) -> TwoTowerModel:
    """Build CLIP or SigLIP from a (possibly unresolved) config; validates it with prefix "model".

    Parameters are created on the current default device (use `with torch.device("meta"):` to
    size a big model without allocating it) and initialized from torch's global RNG.
    """
    cfg.validate("model")
    cfg = resolve_model_config(cfg)
    return CLIP(cfg) if cfg.family == "clip" else SigLIP(cfg)


def no_weight_decay(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """True for biases, norm weights, logit scale/bias (all < 2-D), embeddings (token, position, class) and
    SigLIP's pooling probe. `module` is the module that owns the parameter directly."""
    return param.ndim < 2 or isinstance(module, nn.Embedding) or name.endswith("probe")


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """torch.compile every transformer block (EncoderLayer) in place; returns how many.

    Per block, not per model (torchtitan's choice): the blocks of a tower share one code object, so one graph
    per input shape serves them all (compile time of one block, not of the model), and the Triton attention
    and loss kernels stay custom ops inside the graph. ``nn.Module.compile`` keeps parameter names unchanged.
    """
    # dynamic=False: one graph specialised per shape (vision, text, each tower's pooled last block: 4 for training)
    # rather than a shape-generic graph after the second shape; eval's other batch sizes add a few more, hence the
    # higher recompile limit (past it, dynamo runs that shape eagerly).
    compile_kwargs.setdefault("dynamic", False)
    # MMPRETRAIN_COMPILE_BACKEND=eager: dynamo traces (graph breaks and tracing errors show) but nothing is code-
    # generated; tools/gpu_check.py --dry-run uses it to prove the compiled paths on a CPU in seconds.
    compile_kwargs.setdefault("backend", os.environ.get("MMPRETRAIN_COMPILE_BACKEND", "inductor"))
    dynamo = torch._dynamo.config
    key = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6: the latter
    setattr(dynamo, key, max(getattr(dynamo, key), 64))
    blocks = [m for m in model.modules() if isinstance(m, EncoderLayer)]
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Two AdamW groups over the trainable parameters: [decayed, not decayed].

    Frozen parameters (lock_image) are left out.
    """
    groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            groups[1 if no_weight_decay(full_name, p, module) else 0]["params"].append(p)
    return groups
