"""Kernels of the hot path, each with a plain torch reference.

``attention(q, k, v, causal=..., key_padding_mask=None, scale=None, impl="auto")`` is the one
entry point the model uses for attention (``model.attention`` picks ``impl``):

- "auto": the Triton kernel (kernels/attention.py) on CUDA for non-causal attention, PyTorch SDPA
  elsewhere. On CUDA, inputs the kernel does not take (head dim > 128, float64) go to SDPA, logged
  once; causal attention (the CLIP text tower) goes to SDPA too: on an H100 the kernel's causal
  forward+backward at N = 77 took 2.46x flash-SDPA's time (docs/benchmarks.md), non-causal 0.80-0.95x.
- "triton": always the Triton kernel; on CPU only under the Triton interpreter, i.e. with
  ``TRITON_INTERPRET=1`` set before this package is imported (slow: for tests).
- "sdpa": always ``torch.nn.functional.scaled_dot_product_attention``.

Shapes: q (B, H, M, D), k and v (B, H, N, D); key_padding_mask (B, N) bool, True = keep.
The causal mask is top-left aligned (query i sees keys j <= i, also when M != N), as SDPA's
``is_causal``. Returns (B, H, M, D).

Note: ``mmpretrain.kernels.attention`` is this function; import the kernel module's names
with ``from mmpretrain.kernels.attention import flash_attention``.
"""

import logging

import torch
import torch.nn.functional as F

# Imported before `attention` is defined below: importing the submodule sets the package
# attribute `attention` to the module, and the function must win.
from .attention import INTERPRET as TRITON_INTERPRET
from .attention import attention_reference, check_attention_inputs, flash_attention, triton_unsupported_reason

__all__ = ["ATTENTION_IMPLS", "attention", "attention_reference", "flash_attention", "TRITON_INTERPRET"]

ATTENTION_IMPLS = ("auto", "triton", "sdpa")
_log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def attention(q, k, v, causal=False, key_padding_mask=None, scale=None, impl="auto"):
    """Scaled dot-product attention over (B, H, N, D) tensors; returns (B, H, M, D). See the module docstring."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS} (got {impl!r})")
    check_attention_inputs(q, k, v, key_padding_mask)
    if impl == "triton":
        if not q.is_cuda and not TRITON_INTERPRET:
            raise ValueError(
                f"model.attention=triton needs CUDA tensors (got device {q.device}); to run the Triton "
                "interpreter on CPU, set TRITON_INTERPRET=1 before mmpretrain.kernels is imported"
            )
        return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if impl == "auto" and q.is_cuda and not causal:
        reason = triton_unsupported_reason(q)
        if reason is None:
            return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        if reason not in _fallbacks_logged:
            _fallbacks_logged.add(reason)
            _log.warning("attention: Triton kernel does not support %s; using PyTorch SDPA", reason)
    return _sdpa(q, k, v, causal, key_padding_mask, scale)


def _sdpa(q, k, v, causal, key_padding_mask, scale):
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask_B11N = key_padding_mask[:, None, None, :]
    if causal:
        # SDPA refuses is_causal together with attn_mask: fold the top-left causal mask in.
        M, N = q.shape[-2], k.shape[-2]
        mask_B11N = mask_B11N & torch.ones(M, N, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11N, scale=scale)
