"""Running a model over an eval set on every rank: who holds what, lockstep, inference mode, batched encoding.

The train loop evaluates on every rank. Under ZeRO-3 each rank holds a slice of the weights and every forward
gathers them (a collective), so every rank must make the same sequence of forward calls. The loader gives rank
r the samples r, r + W, ... (broken ones skipped), so ranks may hold different batch counts: the image loop runs
in lockstep (mmpretrain.distributed.lockstep: one tiny all-reduce per batch says whether any rank still has one)
and a rank that has run out feeds a one-image dummy batch; text chunks are counted up front and padded the same
way. The collectives are mmpretrain.distributed's; with one rank there are none.

Legend: B images in a batch, T texts, L context length, E embedding width, N' image tokens, Dv vision width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from mmpretrain.data.transforms import normalize_images
from mmpretrain.distributed import all_reduce, all_reduce_number, gather_rows, lockstep, world_rank


@dataclass
class Ranks:
    """This rank among `world_size` in `group` (None: the world when torch.distributed is up), and the device
    the model and every collective's tensors live on."""

    rank: int
    world_size: int
    group: Optional[object]
    device: torch.device

    @classmethod
    def of(cls, model, rank=None, world_size=None, group=None, device=None) -> Ranks:
        """Explicit rank/world_size, else the group's (the world's when torch.distributed is up, else (0, 1));
        the device: explicit, else the model's."""
        group_world, group_rank = world_rank(group)
        if rank is None or world_size is None:
            rank, world_size = group_rank, group_world
        assert world_size == group_world, f"world_size {world_size} on a group of {group_world} rank(s)"
        assert 0 <= rank < world_size, (rank, world_size)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        return cls(rank, world_size, group, device)

    def deal(self, num_items: int) -> tuple[list[int], list[bool]]:
        """Round-robin share of range(num_items) for this rank, padded to ceil(N / W) entries.

        Returns (indices, real): padding repeats this rank's first index (or 0) with real=False.
        """
        per_rank = -(-num_items // self.world_size)
        own = list(range(self.rank, num_items, self.world_size))
        num_pad = per_rank - len(own)
        return own + [own[0] if own else 0] * num_pad, [True] * len(own) + [False] * num_pad

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a collective)."""
        return all_reduce(t, "sum", self.group)

    def max(self, value: int) -> int:
        """The largest value any rank holds (a collective)."""
        return int(all_reduce_number(value, "max", self.group, self.device))

    def gather_rows(self, rows_nE: torch.Tensor, index_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' rows and their global indices, sorted by index: ((M, E), (M,)), M = sum of n (a collective)."""
        return gather_rows(rows_nE, index_n.to(self.device), self.group)

    def lockstep(self, items: Iterable) -> Iterator:
        """This rank's items, then None until every rank has run out (a collective per item)."""
        return lockstep(items, self.group, self.device)


def unwrap(model):
    """The plain model inside a DeepSpeed engine or DDP wrapper (ZeRO-3's hooks live on its submodules)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def inference(model, device: torch.device):
    """no_grad + eval mode (the previous mode is restored) + autocast to the model's dtype when half precision.

    Yields the dtype images must be cast to (the model's), so the first layer sees matching inputs.
    """
    was_training = model.training
    dtype = next(model.parameters()).dtype
    half = dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            yield dtype if half else torch.float32
    finally:
        model.train(was_training)


def chunks(n: int, batch_size: int, ranks: Ranks) -> Iterator[tuple[slice, bool]]:
    """(slice, real) over this rank's n items in batch_size chunks, as many as the rank with the most has: a
    rank with fewer gets (empty slice, False) and runs a dummy forward (ZeRO-3 keeps its collectives in step)."""
    for c in range(ranks.max(-(-n // batch_size))):
        yield slice(c * batch_size, (c + 1) * batch_size), c * batch_size < n


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, ranks: Ranks) -> torch.Tensor:
    """(T, E) float32 normalized features; every rank makes as many forward calls as the rank with most texts."""
    tokens_TL = tokenizer(list(texts)) if texts else None
    feats = []
    for sl, real in chunks(len(texts), batch_size, ranks):
        if real:
            feats.append(model.encode_text(tokens_TL[sl].to(ranks.device)).float())
        else:  # this rank has run out: a dummy forward keeps ZeRO-3's collectives in step
            model.encode_text(tokenizer([""]).to(ranks.device))
    return torch.cat(feats) if feats else torch.zeros(0, 0, device=ranks.device)


def dummy_images(image_size: int, dtype, device) -> torch.Tensor:
    return torch.zeros(1, 3, image_size, image_size, dtype=dtype, device=device)


def encoded_batches(
    model, loader, ranks: Ranks, image_size: int, dtype, tokens: bool = False
) -> Iterator[tuple[dict, torch.Tensor, Optional[torch.Tensor]]]:
    """(batch, image features (B, E) float32, image token states (B, N', Dv) or None) for this rank's batches,
    in lockstep with every rank; the token states (the vision tower's last_hidden_state) only with `tokens`.

    A rank that has run out still encodes a dummy image while others go on (ZeRO-3 gathers weights in
    collectives inside the forward); loader images (uint8) are normalized on the device here.
    """

    def encode(images):
        if not tokens:
            return model.encode_image(images).float(), None
        v = model.vision_model(images)
        return F.normalize(v.embeds.float(), dim=-1), v.last_hidden_state

    for batch in ranks.lockstep(loader):
        if batch is None:
            encode(dummy_images(image_size, dtype, ranks.device))
            continue
        yield batch, *encode(normalize_images(batch["image"].to(ranks.device), dtype))
