"""Zero-shot classification on a clip_benchmark-layout set, and ImageNet-1k with open_clip's names and templates.

A set: `<root>/classnames.txt`, `<root>/zeroshot_classification_templates.txt` (`{c}` marks the class name) and
`<root>/<split>/*.tar` of `<key>.webp|png|jpg` + `<key>.cls` (read by mmpretrain.data). The classifier is, per
class, the renormalized mean of its prompts' text features; a sample is correct at k when its class ranks
among the k best (mmpretrain.eval.metrics). Classes are dealt over the ranks and the counts all-reduced: every
rank returns the same numbers.

Legend: N images, C classes, T prompts, E embedding width, K number of k values, B images in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from mmpretrain.data.config import DataConfig
from mmpretrain.data.pipeline import ZeroShotSet, build_eval_loader, eval_tar_urls, load_zeroshot_set
from mmpretrain.eval.metrics import topk_correct
from mmpretrain.eval.runner import Ranks, encode_texts, encoded_batches, inference, unwrap


def _prompt(template, classname: str) -> str:
    return template(classname) if callable(template) else template.replace("{c}", classname)


def build_zeroshot_classifier(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence,
    batch_size: int = 64,
    *,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> torch.Tensor:
    """(C, E) float32 class embeddings: per class, the mean of its normalized prompt embeddings, renormalized.

    Prompts are `template.replace("{c}", classname)`, or `template(classname)` for a callable template
    (open_clip's OpenAI ImageNet templates). Under torch.distributed the classes are dealt
    over the ranks (the same forward count on all) and all-reduced: every rank returns the whole classifier.
    """
    model = unwrap(model)
    ranks = Ranks.of(model, rank, world_size, group, device)
    class_ids, real = ranks.deal(len(classnames))
    prompts = [_prompt(t, classnames[c]) for c in class_ids for t in templates]
    with inference(model, ranks.device):
        txt_TE = encode_texts(model, tokenizer, prompts, batch_size, ranks)
    class_cE = F.normalize(txt_TE.view(len(class_ids), len(templates), -1).mean(1), dim=-1)
    classifier_CE = torch.zeros(len(classnames), class_cE.shape[-1], device=ranks.device)
    own = torch.tensor(real, device=ranks.device)
    classifier_CE[torch.tensor(class_ids, device=ranks.device)[own]] = class_cE[own]
    return ranks.sum(classifier_CE)  # each class has one owner: the sum is a gather


def zeroshot_classification(
    model,
    tokenizer: Callable[[list[str]], torch.Tensor],
    root: str,
    *,
    image_size: int,
    split: str = "test",
    batch_size: int = 64,
    top_k: Sequence[int] = (1, 5),
    num_workers: int = 0,
    max_image_pixels: Optional[int] = DataConfig.max_image_pixels,
    classnames: Optional[Sequence[str]] = None,
    templates: Optional[Sequence] = None,
    device=None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    group=None,
) -> dict[str, float]:
    """Zero-shot accuracy on a clip_benchmark-layout set: {"top1": .., "top5": .., "num_samples": N}.

    Images go through the eval transform at `image_size`. Call it on every rank of `group`;
    rank/world_size default to the group's when torch.distributed is initialized.
    `classnames` and `templates` (strings with `{c}` or callables classname -> prompt), when both
    given, replace the root's classnames.txt and zeroshot_classification_templates.txt.
    """
    if classnames is not None and templates is not None:
        zs = ZeroShotSet(list(classnames), list(templates), eval_tar_urls(root, split))
    else:
        zs = load_zeroshot_set(root, split)
    model = unwrap(model)
    ranks = Ranks.of(model, rank, world_size, group, device)
    classifier_CE = build_zeroshot_classifier(
        model, tokenizer, zs.classnames, zs.templates, batch_size, device=ranks.device, rank=ranks.rank,
        world_size=ranks.world_size, group=group,
    )  # fmt: skip
    loader = build_eval_loader(
        zs.urls, task="zeroshot", image_size=image_size, batch_size=batch_size, rank=ranks.rank,
        world_size=ranks.world_size, num_workers=num_workers, max_image_pixels=max_image_pixels,
    )  # fmt: skip
    counts_K2 = torch.zeros(len(top_k) + 2, dtype=torch.long, device=ranks.device)  # correct@k..., seen, bad label
    with inference(model, ranks.device) as dtype:
        for batch, img_BE, _ in encoded_batches(model, loader, ranks, image_size, dtype):
            logits_BC = img_BE @ classifier_CE.T
            labels_B = batch["label"].to(ranks.device)
            ok_B = (labels_B >= 0) & (labels_B < len(zs.classnames))  # a bad label fails below, on every rank
            counts_K2[:-2] += topk_correct(logits_BC[ok_B], labels_B[ok_B], top_k)
            counts_K2[-2] += ok_B.sum()
            counts_K2[-1] += (~ok_B).sum()
    counts = ranks.sum(counts_K2).tolist()
    num_samples, num_bad = counts[-2], counts[-1]
    if num_bad:
        raise ValueError(f"zeroshot: '{root}': {num_bad} samples have a .cls outside [0, {len(zs.classnames)})")
    if num_samples == 0:
        raise ValueError(f"zeroshot: '{root}': no readable samples")
    out = {f"top{k}": c / num_samples for k, c in zip(top_k, counts[:-2])}
    out["num_samples"] = num_samples
    return out


def imagenet_classes_and_templates() -> tuple[list[str], list]:
    """open_clip's 1000 standard ImageNet-1k class names and the 80 OpenAI prompt templates (callables)."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    except ImportError as e:
        raise ValueError(
            f"imagenet: the ImageNet class names and templates come from the package open_clip_torch, "
            f"which is not importable ({e}); pip install open_clip_torch"
        ) from e
    return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)


def imagenet_zeroshot(model, tokenizer: Callable[[list[str]], torch.Tensor], root: str, **kwargs) -> dict[str, float]:
    """Zero-shot ImageNet-1k on a clip_benchmark-layout validation set (`<root>/<split>/*.tar`, `.cls` in [0, 1000)).

    Class names and the 80 OpenAI templates come from open_clip, so the root needs no classnames.txt
    or templates file. kwargs: as zeroshot_classification's (image_size, split, batch_size, ...).
    """
    classnames, templates = imagenet_classes_and_templates()
    return zeroshot_classification(model, tokenizer, root, classnames=classnames, templates=templates, **kwargs)
