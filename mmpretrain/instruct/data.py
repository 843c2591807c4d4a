"""LLaVA's conversation JSON + an image folder -> training items; bad records skipped and counted by reason.

    items, skipped = read_llava_json("llava_instruct.json", "images/", encoder, image_size=336)

Each item is (input_ids, labels, images uint8 (K, 3, S, S)) with K = the record's images in placeholder order
(K = 0 for a text-only conversation). Images go through the eval transform (shorter side -> S bicubic, center crop:
what LLaVA-1.5's "pad" does not do; its "resize"/"center crop" option is this) and `collate` CLIP-normalizes them.

Reasons counted: every BadConversation reason of mmpretrain.instruct.template, plus `missing_image` (no such file,
or a path outside the image folder), `unreadable_image` (not a decodable image), `oversized_image` (more pixels
than max_image_pixels, nothing decoded). A record that is not a JSON object is `bad_record`.

WebDataset shards of conversations (`read_conversation_shards`; `mmpretrain-make-shards llava` writes them from a
LLaVA JSON): a sample is `<key>.json`, the LLaVA record whose "image" names the sample's own members by extension
("jpg" for `<key>.jpg`; ["0.jpg", "1.png"] for `<key>.0.jpg`, `<key>.1.png`), beside those images. Counted there
too: `missing_image` (no such member), `unreadable_image`, `oversized_image` (a member over max_image_bytes, never
read), `bad_record` (a .json that is not a JSON object, or no .json), and the shard faults of
mmpretrain.data.shards.read_tar_samples (`unreadable_shard`, `truncated_tar`, `compressed_tar`).

Not yet: streaming (both readers hold every item, images decoded, in memory), the train-time augmentation.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from mmpretrain.data.config import expand_shard_spec
from mmpretrain.data.decode import ImageTooLargeError
from mmpretrain.data.shards import OVERSIZED, read_tar_samples
from mmpretrain.data.transforms import EvalTransform, normalize_images
from mmpretrain.instruct.template import IGNORE_INDEX, BadConversation, ConversationEncoder, record_images


def load_image(root: str, name: str, transform: EvalTransform) -> torch.Tensor:
    """uint8 (3, S, S) of root/name; BadConversation("missing_image" | "unreadable_image" | "oversized_image")."""
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, name))
    if os.path.commonpath([root_real, path]) != root_real or not os.path.isfile(path):
        raise BadConversation("missing_image", f"{name!r} is not a file inside {root}")
    with open(path, "rb") as f:
        return decode_image(f.read(), name, transform)


def decode_image(data: bytes, name: str, transform: EvalTransform) -> torch.Tensor:
    """uint8 (3, S, S) of encoded image bytes; BadConversation("unreadable_image" | "oversized_image")."""
    try:
        return transform.from_bytes(data)
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
        items.append((enc.input_ids, enc.labels, stack_images(images, image_size)))
    return items, skipped


def stack_images(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """(K, 3, S, S) uint8; K = 0 for a text-only conversation."""
    return torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)


def read_conversation_shards(
    spec: str,
    encoder: ConversationEncoder,
    image_size: int,
    max_image_pixels: int | None = 50_000_000,
    max_image_bytes: int | None = 64 << 20,
) -> tuple[list[tuple], Counter]:
    """(items, skipped reasons) from WebDataset shards of conversations (a brace spec, "::" between sources; see the
    module docstring), in shard order; items as read_llava_json gives them."""
    transform = EvalTransform(image_size, max_pixels=max_image_pixels)
    items, skipped = [], Counter()

    def on_fault(reason: str, url: str, detail: str) -> None:
        skipped[reason] += 1

    for url in [u for group in expand_shard_spec(spec) for u in group]:
        for sample in read_tar_samples(
            url, on_fault, max_member_bytes=max_image_bytes, member_limits={"json": 1 << 24}
        ):
            try:
                if "json" not in sample or (OVERSIZED in sample and sample[OVERSIZED][0] == "json"):
                    raise BadConversation("bad_record", f"{sample['__key__']}: no (readable) .json conversation")
                try:
                    record = json.loads(sample["json"])
                except ValueError:
                    raise BadConversation("bad_record", f"{sample['__key__']}.json is not JSON") from None
                if not isinstance(record, dict):
                    raise BadConversation("bad_record", f"{sample['__key__']}.json is not a JSON object")
                enc = encoder.encode(record)
                images = []
                for name in record_images(record):
                    if OVERSIZED in sample and sample[OVERSIZED][0] == name:
                        raise BadConversation("oversized_image", f"{sample['__key__']}.{name}: {sample[OVERSIZED]}")
                    if name.startswith("__") or name not in sample:
                        raise BadConversation("missing_image", f"{sample['__key__']} has no member .{name}")
                    images.append(decode_image(sample[name], name, transform))
            except BadConversation as e:
                skipped[e.reason] += 1
                continue
            items.append((enc.input_ids, enc.labels, stack_images(images, image_size)))
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
