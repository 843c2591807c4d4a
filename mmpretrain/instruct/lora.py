"""LoRA on the language model through peft: adapters to train, merged back before export.

    add_lora(model, rank=8, alpha=16)     # model.language_model becomes a peft model; only the adapters train
    merge_lora(model)                     # W + (alpha / rank) B A folded into W; a plain transformers LM again

The adapters sit on the attention and MLP projections of a Llama-style LM (`LLAMA_TARGETS`, LLaVA's LoRA recipe
targets every linear layer of the LM). The vision tower and the projector are untouched (train or freeze them as
parts of the stage).
"""

from __future__ import annotations

from mmpretrain.instruct.model import VisionLanguageModel

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: VisionLanguageModel, rank: int, alpha: float, targets=LLAMA_TARGETS, dropout: float = 0.0):
    """Wrap model.language_model in LoRA adapters (B initialized to zero: the model's output is unchanged)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    model.language_model = get_peft_model(model.language_model, cfg)
    return model


def has_lora(model: VisionLanguageModel) -> bool:
    return hasattr(model.language_model, "merge_and_unload")


def merge_lora(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fold the adapters into the LM's weights and drop peft's wrapper (no-op without adapters)."""
    if has_lora(model):
        model.language_model = model.language_model.merge_and_unload()
    return model
