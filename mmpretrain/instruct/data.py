"""LLaVA's conversation JSON + an image folder -> training items; bad records skipped and counted by reason.

    items, skipped = read_llava_json("llava_instruct.json", "images/", encoder, image_size=336)

Each item is (input_ids, labels, images uint8 (K, 3, S, S)) with K = the record's images in placeholder order
(K = 0 for a text-only conversation). Images go through the eval transform (shorter side -> S bicubic, center crop:
what LLaVA-1.5's "pad" does not do; its "resize"/"center crop" option is this) and `collate` CLIP-normalizes them.

Reasons counted: every BadConversation reason of mmpretrain.instruct.template, plus `missing_image` (no such file,
or a path outside the image folder), `unreadable_image` (not a decodable image), `oversized_image` (more pixels
than max_image_pixels, nothing decoded). A record that is not a JSON object is `bad_record`.

Not yet: WebDataset shards of conversations (samples with a .json conversation beside their images), streaming
instead of reading the whole JSON list, the train-time augmentation.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from mmpretrain.data.decode import ImageTooLargeError
from mmpretrain.data.transforms import EvalTransform, normalize_images
from mmpretrain.instruct.template import IGNORE_INDEX, BadConversation, ConversationEncoder, record_images


def load_image(root: str, name: str, transform: EvalTransform) -> torch.Tensor:
    """uint8 (3, S, S) of root/name; BadConversation("missing_image" | "unreadable_image" | "oversized_image")."""
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, name))
    if os.path.commonpath([root_real, path]) != root_real or not os.path.isfile(path):
        raise BadConversation("missing_image", f"{name!r} is not a file inside {root}")
    try:
        with open(path, "rb") as f:
            return transform.from_bytes(f.read())
    except ImageTooLargeError as e:
        raise BadConversation("oversized_image", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types for a corrupt file
        raise BadConversation("unreadable_image", f"{name}: {type(e).__name__}") from None


def read_llava_json(
    json_path: str,
    image_root: str,
    encoder: ConversationEncoder,
    image_size: int,
    max_image_pixels: int | None = 50_000_000,
) -> tuple[list[tuple], Counter]:
    """(items, skipped reasons) from a LLaVA JSON list; a file that is not a JSON list raises ValueError."""
    try:
        records = json.load(open(json_path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{json_path}: unreadable ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of conversation records")
    transform = EvalTransform(image_size, max_pixels=max_image_pixels)
    items, skipped = [], Counter()
    for record in records:
        try:
            if not isinstance(record, dict):
                raise BadConversation("bad_record", "not a JSON object")
            enc = encoder.encode(record)  # checks the conversation and the image count first: no decode wasted
            images = [load_image(image_root, name, transform) for name in record_images(record)]
        except BadConversation as e:
            skipped[e.reason] += 1
            continue
        stacked = torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        items.append((enc.input_ids, enc.labels, stacked))
    return items, skipped


def collate(items: list[tuple], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (B, L); images (N, 3, S, S) float, CLIP-normalized,
    every item's images in order (what VisionLanguageModel.forward takes), or None when there are none."""
    L = max(len(it[0]) for it in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    for i, (x, y, *_) in enumerate(items):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    images = torch.cat([it[2] for it in items])
    images = normalize_images(images) if len(images) else None
    return dict(input_ids=ids, attention_mask=mask, labels=labels, images=images)
