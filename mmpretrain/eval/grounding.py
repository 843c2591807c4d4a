"""Grounding on a retrieval set whose samples carry regions: the caption decoder's region tasks, read greedily.

A retrieval set (clip_benchmark layout) whose samples also hold ``<key>.json`` with ``regions`` (the train format,
mmpretrain/data/regions.py; the synthetic shapes' retrieval set has them) is read once more for a model whose
heads include a ``RegionReader`` (the caption decoder of loss.terms.caption) trained with region tasks
(data.train.regions: its ``box_bins`` say how coordinates are written). For every region that the eval crop keeps
(resize the shorter side, center crop; mmpretrain.data.transforms.EvalTransform), two greedy readings:

    ref   "find {text} :"                   -> the box; a hit when its IoU with the true box is >= 0.5
    gcap  "describe {x0} {y0} {x1} {y1} :"  -> the words; a hit when they equal the region's text

Keys: ``grounding/<set>/ref_acc@0.5``, ``ref_miou`` (mean IoU; an unreadable box counts 0), ``gcap_exact`` and
``num_regions``. Each rank reads its share of the images (the retrieval loader's) and keeps their token states;
the readings run in chunks counted up front, every rank making as many decoder calls as the rank with the most
(ZeRO-3 gathers the head's weights in each), and the hits are summed over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Protocol, runtime_checkable

import torch

from mmpretrain.data.config import DataConfig
from mmpretrain.data.pipeline import build_eval_loader, load_retrieval_set, read_first_sample_members
from mmpretrain.data.regions import REGION_KEY, region_sequence
from mmpretrain.eval.runner import Ranks, chunks, encoded_batches, inference, unwrap


@runtime_checkable
class RegionReader(Protocol):
    """Greedy decoding of a token sequence from image token states: what grounding needs from a decoder head.

    Implemented by mmpretrain.objectives.caption.CaptionDecoder; found among the model's heads."""

    def greedy(self, image_tokens: torch.Tensor, prefixes: list[list[int]], steps: int) -> list[list[int]]:
        """``steps`` greedy tokens after each prefix (SOT and a prompt's ids) from image token states (n, N', Dv);
        exactly ``steps`` forward calls whatever is generated."""
        ...

    def dummy_greedy(self, device: torch.device, steps: int) -> None:
        """The forward calls of ``greedy`` on a dummy input, for a rank that has run out (ZeRO-3 lockstep)."""
        ...


def find_region_reader(model) -> Optional[RegionReader]:
    heads = getattr(unwrap(model), "heads", {})
    return next((head for head in heads.values() if isinstance(head, RegionReader)), None)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def read_box(text: str, bins: int) -> Optional[tuple[float, float, float, float]]:
    """The box a ref reading wrote (four zero-padded integers, as mmpretrain.data.regions writes them), or None."""
    width = len(str(bins - 1))
    digits = "".join(ch for ch in text if ch.isdigit())
    if len(digits) < 4 * width:
        return None
    x0, y0, x1, y1 = (min(bins - 1, int(digits[k * width : (k + 1) * width])) / (bins - 1) for k in range(4))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def prefix_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """SOT and each prompt's tokens (its EOT left out)."""
    tokens = tokenizer(prompts)
    return [row[: int(row.argmax())].tolist() for row in tokens]


def grounding(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    image_size: int,
    box_bins: int,
    split: str = "test",
    batch_size: int = 64,
    num_workers: int = 0,
    max_image_pixels: Optional[int] = DataConfig.max_image_pixels,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """The module docstring's metrics; {} when the model has no RegionReader head or the set's first sample has no
    ``<key>.json``. Every rank returns the same numbers."""
    urls = load_retrieval_set(root, split).urls
    model = unwrap(model)
    reader = find_region_reader(model)
    if reader is None or REGION_KEY not in read_first_sample_members(urls):
        return {}
    ranks = Ranks.of(model, rank, world_size, group, device)
    loader = build_eval_loader(
        urls, task="grounding", image_size=image_size, batch_size=batch_size, rank=ranks.rank,
        world_size=ranks.world_size, num_workers=num_workers, max_image_pixels=max_image_pixels,
    )  # fmt: skip
    tokens, boxes, texts = [], [], []  # one entry a region: its image's token states (N', Dv), box, words
    with inference(model, ranks.device) as dtype:
        for batch, _, tokens_BND in encoded_batches(model, loader, ranks, image_size, dtype, tokens=True):
            for b, regions in enumerate(batch["regions"]):
                for box, text in regions:
                    tokens.append(tokens_BND[b])
                    boxes.append(box)
                    texts.append(text)
        width = len(str(box_bins - 1))
        ref_steps = 4 * width + 1  # the coordinates' digits (one token each), then EOT
        gcap_steps = ranks.max(max((len(tokenizer.encode(t)) for t in texts), default=0)) + 1
        sums = torch.zeros(4, dtype=torch.float64)  # ref hits, ref IoU sum, gcap exact, regions
        for sl, real in chunks(len(texts), batch_size, ranks):
            if not real:
                reader.dummy_greedy(ranks.device, ref_steps)
                reader.dummy_greedy(ranks.device, gcap_steps)
                continue
            img = torch.stack(tokens[sl])
            pairs = list(zip(boxes[sl], texts[sl]))
            refs = prefix_ids(tokenizer, [region_sequence(1, "", b, t, box_bins)[0] for b, t in pairs])
            gcaps = prefix_ids(tokenizer, [region_sequence(2, "", b, t, box_bins)[0] for b, t in pairs])
            for ids, box in zip(reader.greedy(img, refs, ref_steps), boxes[sl]):
                got = read_box(tokenizer.decode(ids), box_bins)
                iou = box_iou(got, box) if got is not None else 0.0
                sums[0] += iou >= 0.5
                sums[1] += iou
            for ids, text in zip(reader.greedy(img, gcaps, gcap_steps), texts[sl]):
                sums[2] += " ".join(tokenizer.decode(ids).split()) == " ".join(text.lower().split())
            sums[3] += len(texts[sl])
    total = ranks.sum(sums.to(ranks.device)).tolist()  # collective
    if total[3] == 0:
        return {}
    n = total[3]
    return {"ref_acc@0.5": total[0] / n, "ref_miou": total[1] / n, "gcap_exact": total[2] / n, "num_regions": n}
