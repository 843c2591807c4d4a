"""Kernels of the hot path, each with a plain torch reference.

``attention(q, k, v, causal=..., key_padding_mask=None, scale=None, impl="auto")`` is the one
entry point the model uses for attention: the Triton kernel on CUDA (when it lands), PyTorch
SDPA elsewhere.

Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D); key_padding_mask (B, Nk) bool, True = keep.
"""

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("auto", "triton", "sdpa")


def attention(q, k, v, causal=False, key_padding_mask=None, scale=None, impl="auto"):
    """Scaled dot-product attention over (B, H, N, D) tensors; returns (B, H, Nq, D)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS} (got {impl!r})")
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Nk)
        if causal:
            nq, nk = q.shape[-2], k.shape[-2]
            causal_mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
            mask = mask & causal_mask
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
