"""Region targets for the caption decoder (LocCa / SigLIP 2): referring expressions and grounded captions.

A train sample may carry regions in its ``<key>.json`` member::

    {"regions": [{"box": [x0, y0, x1, y1], "text": "small red circle"}, ...], ...other keys...}

``box``: corners in [0, 1] of the image's width (x) and height (y), top-left origin; ``text``: what is there. The
synthetic shapes carry one region each (mmpretrain.data.synthetic). With ``data.train.regions.ref_fraction`` or
``gcap_fraction`` above 0 the loader reads the member, and each sample with a region that the train crop keeps
gets one decoder task, drawn from the sample's seed (so a resumed loader draws the same):

    caption  <the caption>                                    (a sample without a usable region: always)
    ref      "find {text} :" -> " {x0} {y0} {x1} {y1}"          referring expression: the box from the words
    gcap     "describe {x0} {y0} {x1} {y1} :" -> " {text}"      grounded caption: the words from the box

The coordinates are integers in [0, bins - 1] (``data.train.regions.box_bins``) written as zero-padded text
("03 17 28 31"), so the decoder predicts them with the text vocabulary (as LocCa does); the loss covers the part
after the prompt (through EOT). The box follows the train crop (the crop's (top, left, h, w) on the original image,
mmpretrain.data.transforms); a region keeping less than half of its area inside the crop is not used (the sample
captions instead). Under data.naflex the whole image is kept, and so is the box.

The collate adds ``decoder_text`` (b, L) ids, ``decoder_prompt`` (b,) the prompt's token count after SOT (0 for a
caption) and ``decoder_task`` (b,) 0 caption, 1 ref, 2 gcap; mmpretrain.objectives.caption reads them.
"""

from __future__ import annotations

import json
import random

TASKS = ("caption", "ref", "gcap")  # decoder_task ids 0, 1, 2
REGION_KEY = "json"  # the tar member holding a sample's regions
MIN_VISIBLE = 0.5  # share of a region's area that must stay inside the train crop


def parse_regions(data: bytes | str | dict | None) -> list[tuple[tuple[float, float, float, float], str]]:
    """The usable regions of a ``<key>.json`` member: [(box, text)]. Entries with a malformed box (not 4 numbers,
    outside [0, 1], empty) or an empty text are left out; a member that is not JSON, or holds no ``regions``
    list, gives none (the sample is still a good image-text pair)."""
    if data is None:
        return []
    try:
        meta = data if isinstance(data, dict) else json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    regions = meta.get("regions") if isinstance(meta, dict) else None
    out = []
    for r in regions if isinstance(regions, list) else ():
        box, text = (r.get("box"), r.get("text")) if isinstance(r, dict) else (None, None)
        if not (isinstance(text, str) and text.strip() and isinstance(box, list) and len(box) == 4):
            continue
        if not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in box):
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 > x0 and y1 > y0:
            out.append(((x0, y0, x1, y1), text.strip()))
    return out


def box_in_crop(box, crop: tuple[int, int, int, int], height: int, width: int):
    """A box (normalized to the original image) in the crop's frame (normalized to the crop), clipped to it; None
    when less than MIN_VISIBLE of its area is inside. ``crop``: (top, left, h, w) in original pixels."""
    top, left, h, w = crop
    x0, y0, x1, y1 = box
    fx0, fy0 = (x0 * width - left) / w, (y0 * height - top) / h
    fx1, fy1 = (x1 * width - left) / w, (y1 * height - top) / h
    cx0, cy0, cx1, cy1 = max(fx0, 0.0), max(fy0, 0.0), min(fx1, 1.0), min(fy1, 1.0)
    if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < MIN_VISIBLE * (fx1 - fx0) * (fy1 - fy0):
        return None
    return cx0, cy0, cx1, cy1


def quantize(box, bins: int) -> list[int]:
    """Each coordinate -> round(v * (bins - 1)), an integer in [0, bins - 1]."""
    return [min(bins - 1, max(0, round(v * (bins - 1)))) for v in box]


def region_sequence(task: int, caption: str, box, text: str, bins: int) -> tuple[str, str]:
    """(prompt, full text) of one sample's decoder sequence; the prompt is "" for a caption."""
    if task == 0:
        return "", caption
    width = len(str(bins - 1))  # zero-padded: CLIP's BPE makes every digit a token of its own, so "2 63" and
    coords = " ".join(f"{v:0{width}d}" for v in quantize(box, bins))  # "26 3" would read alike without it
    if task == 1:
        prompt = f"find {text} :"
        return prompt, f"{prompt} {coords}"
    prompt = f"describe {coords} :"
    return prompt, f"{prompt} {text}"


def choose(regions: list, tasks, seed: int) -> tuple[int, tuple | None, str]:
    """(task, box, text) for a sample whose usable regions (already in the crop's frame) are ``regions``: one
    region and one task drawn from ``seed``; (0, None, "") without a region. ``tasks``: data.train.regions."""
    if not regions:
        return 0, None, ""
    rng = random.Random(seed)
    box, text = regions[rng.randrange(len(regions))]
    u = rng.random()
    task = 1 if u < tasks.ref_fraction else 2 if u < tasks.ref_fraction + tasks.gcap_fraction else 0
    return task, box, text


def decoder_fields(
    tokenizer, captions: list[str], picks: list[tuple[int, tuple | None, str]], bins: int, text=None
) -> dict:
    """The collate's decoder fields (see the module docstring) for a batch's captions and ``choose`` results.
    ``text``: the captions' tokens when the collate has them already (a caption row's sequence is its caption);
    only the region rows are tokenized here."""
    import torch

    tokens = (tokenizer(captions) if text is None else text).clone()
    prompt_len = torch.zeros(len(picks), dtype=torch.long)
    rows = [i for i, (task, _, _) in enumerate(picks) if task != 0]
    if rows:
        seqs = [region_sequence(*picks[i][:1], captions[i], *picks[i][1:], bins) for i in rows]
        tokens[rows] = tokenizer([full for _, full in seqs])
        # the prompt's tokens after SOT (BPE works word by word: they are the first ones of the full sequence)
        limit = tokenizer.context_length - 2
        prompt_len[rows] = torch.tensor([min(len(tokenizer.encode(p)), limit) for p, _ in seqs])
    return {
        "decoder_text": tokens,
        "decoder_prompt": prompt_len,
        "decoder_task": torch.tensor([task for task, _, _ in picks], dtype=torch.long),
    }
