"""Kernels of the hot path, each with a plain torch reference.

``attention(q, k, v, causal=..., key_padding_mask=None, scale=None, impl="auto", segment_ids=None)`` is the one
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

Sequence packing: ``segment_ids`` (B, N) int32 tags each token with its image; query i sees key j
only when their ids are equal (block-diagonal), so packed images never see each other. The queries
share the keys' ids unless ``q_segment_ids`` (B, M) int32 gives theirs (needed when M != N, e.g. one
pooling query per packed image). Convention: the images of a row are numbered 0, 1, 2 ... in packing
order and the padding at the end takes ``PAD_SEGMENT_ID`` (2**31 - 1), so the ids never decrease
along a row; padding then attends only among itself (finite outputs, zero gradient into any image);
with key_padding_mask False there as well its rows see no key and give 0. Any int32 ids in any order
give the same result; non-decreasing ones let the Triton kernel skip every key block that shares no
id with the query block. SDPA gets the materialised bool mask (B, 1, M, N). All masks combine.

Note: ``mmpretrain.kernels.attention`` is this function; import the kernel module's names
with ``from mmpretrain.kernels.attention import flash_attention``.
"""

import logging

import torch.nn.functional as F

# Imported before `attention` is defined below: importing the submodule sets the package
# attribute `attention` to the module, and the function must win.
from .attention import INTERPRET as TRITON_INTERPRET
from .attention import (
    PAD_SEGMENT_ID,
    attention_keep_mask,
    attention_reference,
    check_attention_inputs,
    flash_attention,
    triton_unsupported_reason,
)

__all__ = [
    "ATTENTION_IMPLS",
    "PAD_SEGMENT_ID",
    "TRITON_INTERPRET",
    "attention",
    "attention_reference",
    "flash_attention",
]

ATTENTION_IMPLS = ("auto", "triton", "sdpa")
_log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def attention(
    q, k, v, causal=False, key_padding_mask=None, scale=None, impl="auto", segment_ids=None, q_segment_ids=None
):
    """Scaled dot-product attention over (B, H, N, D) tensors; returns (B, H, M, D). See the module docstring."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS} (got {impl!r})")
    check_attention_inputs(q, k, v, key_padding_mask, segment_ids, q_segment_ids)
    masks = dict(key_padding_mask=key_padding_mask, segment_ids=segment_ids, q_segment_ids=q_segment_ids)
    if impl == "triton":
        if not q.is_cuda and not TRITON_INTERPRET:
            raise ValueError(
                f"model.attention=triton needs CUDA tensors (got device {q.device}); to run the Triton "
                "interpreter on CPU, set TRITON_INTERPRET=1 before mmpretrain.kernels is imported"
            )
        return flash_attention(q, k, v, causal=causal, scale=scale, **masks)
    if impl == "auto" and q.is_cuda and not causal:
        reason = triton_unsupported_reason(q)
        if reason is None:
            return flash_attention(q, k, v, causal=causal, scale=scale, **masks)
        if reason not in _fallbacks_logged:
            _fallbacks_logged.add(reason)
            _log.warning("attention: Triton kernel does not support %s; using PyTorch SDPA", reason)
    return _sdpa(q, k, v, causal, scale, **masks)


def _sdpa(q, k, v, causal, scale, key_padding_mask=None, segment_ids=None, q_segment_ids=None):
    if key_padding_mask is None and segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    # SDPA refuses is_causal together with attn_mask: the top-left causal mask is folded into the bool mask,
    # (B, 1, 1, N) for key padding alone, (B, 1, M, N) with segments. Rows that see no key give 0 (as ours).
    keep = attention_keep_mask(q, k, causal, key_padding_mask, segment_ids, q_segment_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
