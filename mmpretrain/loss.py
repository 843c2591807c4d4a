"""CLIP and SigLIP losses over the global batch, and GradCache accumulation.

The math and the collectives live in ``mmpretrain.kernels.contrastive_loss`` (see its docstring:
tiled, never a B x B matrix; all-gather of texts + one all-reduce + a reduce-scatter in backward).
This module picks the implementation, resolves the process group, and runs GradCache.

Gradient contract: on N ranks, every gradient the loss returns is N x this rank's share, so that
DeepSpeed's averaging over ranks yields exactly the gradient of one rank holding the whole batch.

Shapes: b local (per-rank) batch, B global batch, D feature dim.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmpretrain.distributed import resolve_group
from mmpretrain.kernels.contrastive_loss import tiled_clip_loss, tiled_siglip_loss, tiled_unicl_loss
from mmpretrain.objectives.config import LOSS_IMPLS, LossConfig


def _resolve(img_bD, group, impl):
    """The group resolved (None: the world's when torch.distributed is up; the kernels read None as no communication);
    'auto' -> triton on CUDA, chunked elsewhere."""
    group = resolve_group(group)
    if impl == "auto":
        impl = "triton" if img_bD.is_cuda else "chunked"
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss.impl must be one of {LOSS_IMPLS} (got {impl!r})")
    return group, impl


def clip_loss(img_BD, txt_BD, logit_scale, *, group=None, impl="auto", chunk_size=1024) -> torch.Tensor:
    """Symmetric CLIP loss over the global batch (0-dim fp32, the same on every rank).

    img_BD, txt_BD: this rank's normalized features (b, D); logit_scale: exp'd scale (0-dim tensor).
    """
    group, impl = _resolve(img_BD, group, impl)
    return tiled_clip_loss(img_BD, txt_BD, logit_scale, group=group, impl=impl, chunk_size=chunk_size)


def siglip_loss(img_BD, txt_BD, logit_scale, logit_bias, *, group=None, impl="auto", chunk_size=1024) -> torch.Tensor:
    """SigLIP loss: -sum over all global pairs of log sigmoid(z_ij (s x_i.y_j + b)), divided by B."""
    group, impl = _resolve(img_BD, group, impl)
    return tiled_siglip_loss(img_BD, txt_BD, logit_scale, logit_bias, group=group, impl=impl, chunk_size=chunk_size)


def unicl_loss(img_BD, txt_BD, logit_scale, labels_B, *, group=None, impl="auto", chunk_size=1024) -> torch.Tensor:
    """UniCL: CLIP's loss with every same-label pair a positive; labels_B (b,) int64 keys of this rank's pairs."""
    group, impl = _resolve(img_BD, group, impl)
    return tiled_unicl_loss(img_BD, txt_BD, logit_scale, labels_B, group=group, impl=impl, chunk_size=chunk_size)


def compute_loss(cfg: LossConfig, out, group=None) -> torch.Tensor:
    """Loss of a model output (``.image_features``, ``.text_features``, ``.logit_scale``, ``.logit_bias``) for
    ``cfg.name``."""
    kw = dict(group=group, impl=cfg.impl, chunk_size=cfg.chunk_size)
    if cfg.name == "clip":
        return clip_loss(out.image_features, out.text_features, out.logit_scale, **kw)
    return siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias, **kw)


# ----------------------------------------------------------------------------- GradCache


@dataclass
class Features:
    """What GradCache hands the loss: features of all micro-batches, concatenated (leaves with grad)."""

    image_features: torch.Tensor  # (k * b, D)
    text_features: torch.Tensor  # (k * b, D)
    logit_scale: torch.Tensor  # 0-dim
    logit_bias: torch.Tensor | None = None  # 0-dim (SigLIP) or None (CLIP)


def _rng_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def grad_cache_step(
    forward_fn: Callable[[Any], Any],
    micro_batches: Sequence[Any],
    loss_fn: Callable[[Features], torch.Tensor],
    backward_fn: Callable[[torch.Tensor, bool], None] | None = None,
) -> torch.Tensor:
    """One accumulated step whose gradients equal one step at the full batch (every negative kept).

    forward_fn(micro_batch) -> output with .image_features, .text_features, .logit_scale, .logit_bias
    loss_fn(Features) -> scalar loss over the concatenated batch, e.g. ``partial(compute_loss, cfg.loss, group=g)``
    backward_fn(surrogate, last) runs backward of a scalar; default ``surrogate.backward()``. ``last`` is True
        for the final micro-batch (DeepSpeed: set the accumulation boundary there, see below).
    Returns the loss (detached).

    1. Features of every micro-batch without a graph, recording the RNG state before each.
    2. The loss over all of them once, and its gradients w.r.t. the features, scale and bias.
    3. Each micro-batch again with its graph, the RNG state replayed (dropout and patch dropout draw
       the same masks), and backward of sum(features * feature_grad) (+ scale / bias terms once),
       which gives that micro-batch's exact share of the full-batch parameter gradient.
    The RNG stream after the step is the one after pass 1 (as if the batch had run once).

    With DeepSpeed (gradient_accumulation_steps = 1, so engine.backward does not scale by 1/k)::

        def ds_backward(surrogate, last):
            engine.set_gradient_accumulation_boundary(last)  # ZeRO-0/1 all-reduce once, after the last
            engine.backward(surrogate)

        loss = grad_cache_step(lambda mb: engine(*mb), micro_batches,
                               partial(compute_loss, cfg.loss, group=group), ds_backward)
        engine.step()
    """
    backward_fn = backward_fn or (lambda surrogate, last: surrogate.backward())
    states, img_parts, txt_parts = [], [], []
    with torch.no_grad():  # pass 1: features only
        for mb in micro_batches:
            states.append(_rng_state())
            out = forward_fn(mb)
            img_parts.append(out.image_features)
            txt_parts.append(out.text_features)
    leaf = lambda t: None if t is None else t.detach().requires_grad_()
    img, txt = leaf(torch.cat(img_parts)), leaf(torch.cat(txt_parts))
    feats = Features(img, txt, leaf(out.logit_scale), leaf(out.logit_bias))
    del img_parts, txt_parts
    loss = loss_fn(feats)  # pass 2: loss over the whole accumulated batch (collectives inside)
    inputs = [feats.image_features, feats.text_features, feats.logit_scale]
    inputs += [feats.logit_bias] if feats.logit_bias is not None else []
    dimg, dtxt, dscale, *dbias = torch.autograd.grad(loss, inputs, allow_unused=True)
    dbias = dbias[0] if dbias else None

    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):  # pass 3: replay each micro-batch with its graph
        row = 0
        for k, mb in enumerate(micro_batches):
            _set_rng_state(states[k])
            out = forward_fn(mb)
            b = out.image_features.shape[0]
            surrogate = (out.image_features.float() * dimg[row : row + b].float()).sum()
            surrogate = surrogate + (out.text_features.float() * dtxt[row : row + b].float()).sum()
            if k == 0:  # scale and bias are shared by all micro-batches: their gradient enters once
                if dscale is not None:
                    surrogate = surrogate + (out.logit_scale.float() * dscale.float()).sum()
                if dbias is not None:
                    surrogate = surrogate + (out.logit_bias.float() * dbias.float()).sum()
            backward_fn(surrogate, k == len(micro_batches) - 1)
            row += b
    return loss.detach()
