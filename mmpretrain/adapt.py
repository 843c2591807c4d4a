"""Few-shot adaptation of a frozen two-tower model: CoOp prompt learning and CLIP-Adapter.

    python -m mmpretrain.adapt outputs/demo --train data/shapes_train --test data/shapes/eval \\
        --method coop --shots 16 --output outputs/coop16
    python -m mmpretrain.adapt hf_clip_folder --train /data/wds_eurosat --test /data/wds_eurosat \\
        --method adapter --shots 4 --output outputs/adapter4

Both roots are clip_benchmark-layout zero-shot sets (`<root>/<split>/*.tar` of image + `.cls`); the test
root also gives `classnames.txt` and `zeroshot_classification_templates.txt`. K images per class are drawn
(seeded) from the train split; the report compares zero-shot (the templates) with the adapted classifier
on the SAME test split. The towers never change: every model parameter is frozen, and the few-shot image
features are computed once (eval transform, no augmentation: a frozen image tower then sees each image
exactly as an uncached loop would).

- CoOp (Zhou et al., 2022, "Learning to Prompt for Vision-Language Models"): the prompt is
  "X X ... X {classname}." with n_ctx placeholder words; their token embeddings are replaced by n_ctx
  learned vectors in the text tower's token-embedding space (shared by all classes), the rest of the prompt
  keeps its frozen embeddings, and the text tower encodes all C prompts at every step (gradients flow
  through the frozen tower into the context). Logits = logit_scale * image @ class_text.T.
- CLIP-Adapter (Gao et al., 2021): a bottleneck MLP (E -> E/r -> E, ReLU after each, no biases) on the
  frozen image feature, mixed in residually, f' = ratio * A(f) + (1 - ratio) * f, renormalized and scored
  against the zero-shot (template) classifier.

Cross-entropy over classes, AdamW or SGD, cosine learning-rate decay, a few epochs over the K-shot set.
Writes `<output>/results.json` (zero-shot and adapted top-1/top-5, counts, the config) and
`<output>/adapted.safetensors`: `classifier` (C, E) for both methods (CoOp: the learned prompts' text
features; adapter: the zero-shot classifier), plus `ctx` (n_ctx, D) or `adapter.fc1.weight` /
`adapter.fc2.weight`; its metadata holds the method, ratio and class names (see docs/adapt.md).

Legend: N images, C classes, E embedding width, D text tower width, L context length, n n_ctx.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from mmpretrain import convert
from mmpretrain.atomic import atomic_folder, check_out_dir
from mmpretrain.convert.ours import TRUST_HELP
from mmpretrain.data import Tokenizer, build_eval_loader, load_zeroshot_set
from mmpretrain.data.config import DataConfig
from mmpretrain.data.decode import ImageTooLargeError
from mmpretrain.data.pipeline import EVAL_IMAGE_KEYS, eval_tar_urls
from mmpretrain.data.shards import read_tar_samples
from mmpretrain.data.transforms import EvalTransform, normalize_images
from mmpretrain.eval.metrics import topk_accuracy
from mmpretrain.eval.zeroshot import build_zeroshot_classifier

METHODS = ("coop", "adapter")
OPTIMIZERS = ("adamw", "sgd")
CTX_WORD = "X"  # placeholder word whose token embeddings the learned context replaces (one BPE token)


@dataclass
class AdaptConfig:
    """Few-shot adaptation settings (the CLI flags, dashes for underscores)."""

    method: str = "coop"
    """coop | adapter"""
    shots: int = 16
    """K: training images per class drawn from the train split (all of a class's images when it has fewer)."""
    seed: int = 0
    """Seeds the K-shot draw, the context / adapter initialization and the batch order."""
    train_split: str = "train"
    """Shard folder under the train root."""
    test_split: str = "test"
    """Shard folder under the test root."""
    n_ctx: int = 4
    """CoOp: number of learned context vectors (the prompt's leading placeholder words)."""
    ctx_init: str = ""
    """CoOp: initialize the context from these words' token embeddings (e.g. "a photo of a"; sets n_ctx to
    their token count); empty: random N(0, 0.02^2), as CoOp."""
    csc: bool = False
    """CoOp: class-specific context (C sets of n_ctx vectors) instead of one context shared by all classes."""
    ratio: float = 0.2
    """Adapter: weight of the adapter output in the residual mix (CLIP-Adapter's alpha)."""
    reduction: int = 4
    """Adapter: bottleneck width is E / reduction."""
    optimizer: str = "adamw"
    """adamw | sgd (momentum 0.9)"""
    lr: float = 2e-3
    """Peak learning rate (cosine decay to 0 over the run)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay on the learned parameters."""
    epochs: int = 20
    """Passes over the K-shot training set."""
    batch_size: int = 32
    """Images per optimizer step."""
    eval_batch_size: int = 64
    """Images per forward pass when computing features."""
    max_image_pixels: int = DataConfig.max_image_pixels
    """Images whose header declares more pixels than this are skipped and counted, never decoded (as
    data.max_image_pixels in training; taken from this flag, not from the checkpoint folder's config)."""

    def validate(self, prefix: str) -> None:
        if self.method not in METHODS:
            raise ValueError(f"{prefix}.method must be one of {METHODS} (got {self.method!r})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{prefix}.optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        for name in ("shots", "n_ctx", "reduction", "epochs", "batch_size", "eval_batch_size", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"{prefix}.ratio must be in [0, 1] (got {self.ratio})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"{prefix}.lr must be a positive number (got {self.lr})")
        if self.weight_decay < 0:
            raise ValueError(f"{prefix}.weight_decay must be >= 0 (got {self.weight_decay})")


# ----------------------------------------------------------------------------- data: K-shot draw, features


def _labels(urls: Sequence[str], on_fault) -> list[tuple[str, str, int]]:
    """(url, key, label) of every sample with an image and a `.cls`, in tar order (nothing decoded)."""
    out = []
    for url in urls:
        for s in read_tar_samples(url, on_fault):
            if "cls" in s and any(k in s for k in EVAL_IMAGE_KEYS):
                try:
                    out.append((url, s["__key__"], int(s["cls"].decode("ascii").strip())))
                except ValueError:
                    on_fault("bad_label", url, s["__key__"])
    return out


def draw_k_shot(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """Indices into `labels`: min(shots, count) per class, drawn without replacement by a seeded RNG; sorted."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    chosen = []
    for y in sorted(by_class):
        members = by_class[y]
        chosen += members if len(members) <= shots else rng.sample(members, shots)
    return sorted(chosen)


def k_shot_images(
    root: str, split: str, shots: int, seed: int, num_classes: int, image_size: int, max_image_pixels: int | None = None
):
    """The K-shot training draw of `<root>/<split>`: ((N, 3, S, S) uint8 eval-transformed images, (N,) labels,
    {"num_available": .., "num_skipped": .., "short_classes": {class: count}}).

    Two passes over the tars: labels first (no decoding), then only the drawn images are decoded.
    """
    where = f"{root}/{split}"
    urls = eval_tar_urls(root, split)
    faults: list[str] = []
    samples = _labels(urls, lambda reason, url, detail: faults.append(f"{reason}: {url}: {detail}"))
    if not samples:
        raise ValueError(f"--train: '{where}': no readable samples with an image and a .cls label")
    bad = [(u, k, y) for u, k, y in samples if not 0 <= y < num_classes]
    if bad:
        u, k, y = bad[0]
        raise ValueError(f"--train: '{where}': {len(bad)} samples have a .cls outside [0, {num_classes}) "
                         f"(first: {u} key {k}: {y}); the class names come from --test")  # fmt: skip
    chosen = draw_k_shot([y for _, _, y in samples], shots, seed)
    wanted = {(samples[i][0], samples[i][1]): samples[i][2] for i in chosen}
    transform = EvalTransform(image_size, max_pixels=max_image_pixels)
    images, labels = [], []
    for url in sorted({u for u, _ in wanted}, key=urls.index):
        for s in read_tar_samples(url, lambda *a: None):  # faults were counted in the first pass
            y = wanted.get((url, s["__key__"]))
            if y is None:
                continue
            try:
                images.append(transform.from_bytes(s[next(k for k in EVAL_IMAGE_KEYS if k in s)]))
                labels.append(y)
            except ImageTooLargeError as exn:  # nothing decoded (decompression-bomb guard)
                faults.append(f"oversized_image: {url}: {s['__key__']}: {exn}")
            except Exception as exn:  # noqa: BLE001 -- an undecodable image: skipped and counted, as in eval
                faults.append(f"corrupt_image: {url}: {s['__key__']}: {type(exn).__name__}: {exn}")
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes)
    short = {c: int(n) for c, n in enumerate(counts.tolist()) if n < shots}
    stats = {"num_available": len(samples), "num_skipped": len(faults), "short_classes": short}
    if not images:
        raise ValueError(f"--train: '{where}': none of the {len(wanted)} drawn images could be used ({faults[-1]})")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), stats


@torch.no_grad()
def encode_images(model, images_NCHW: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, E) float32 unit vectors (on device), in chunks."""
    dtype = next(model.parameters()).dtype
    feats = [
        model.encode_image(normalize_images(images_NCHW[i : i + batch_size].to(device), dtype)).float()
        for i in range(0, len(images_NCHW), batch_size)
    ]
    return F.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def split_features(
    model, root: str, split: str, *, image_size: int, batch_size: int, device, progress: bool = False,
    max_image_pixels: int | None = None,
):  # fmt: skip
    """((N, E) unit image features, (N,) labels) of a whole split, in sample order (oversized or broken images
    skipped, counted in the loader's log)."""

    loader = build_eval_loader(eval_tar_urls(root, split), task="zeroshot", image_size=image_size,
                               batch_size=batch_size, max_image_pixels=max_image_pixels)  # fmt: skip
    dtype = next(model.parameters()).dtype
    feats, labels = [], []
    for batch in tqdm(loader, desc="test features", unit="batch", disable=not progress):
        feats.append(model.encode_image(normalize_images(batch["image"].to(device), dtype)).float())
        labels.append(batch["label"])
    if not feats:
        raise ValueError(f"--test: '{root}/{split}': no readable samples")
    return F.normalize(torch.cat(feats), dim=-1), torch.cat(labels).to(device)


# ----------------------------------------------------------------------------- the two methods


class CoOpPrompts(nn.Module):
    """Learned context shared by all classes: `forward()` -> (C, E) unit text features of the C prompts.

    The prompt tokens are SOT, n placeholder tokens, the class name's tokens, ".", EOT (then padding); the
    placeholders' embeddings are replaced by `ctx` (n, D) and the text tower (frozen) runs on the result.
    """

    def __init__(
        self, text_model, tokenizer, classnames: Sequence[str], n_ctx: int, ctx_init: str, seed: int, csc: bool = False
    ):
        super().__init__()
        self.text_model = [text_model]  # a list: not a submodule, so state_dict / parameters() hold ctx alone
        if ctx_init:
            init_ids = tokenizer.encode(ctx_init)
            n_ctx = len(init_ids)
        tokens_CL = tokenizer([f"{' '.join([CTX_WORD] * n_ctx)} {name}." for name in classnames])
        placeholder = tokenizer.encode(CTX_WORD)
        assert len(placeholder) == 1 and (tokens_CL[:, 1 : 1 + n_ctx] == placeholder[0]).all(), "prompt layout"
        embedding = text_model.embeddings.token_embedding
        device = embedding.weight.device
        self.register_buffer("tokens_CL", tokens_CL.to(device), persistent=False)
        with torch.no_grad():
            self.register_buffer("embeds_CLD", embedding(self.tokens_CL).float(), persistent=False)  # frozen rest
            if ctx_init:
                ctx_nD = embedding(torch.tensor(init_ids, device=device)).float()
            else:
                g = torch.Generator().manual_seed(seed)
                ctx_nD = torch.randn(n_ctx, embedding.embedding_dim, generator=g).mul_(0.02).to(device)
        if csc:  # every class starts from the same context and learns its own
            ctx_nD = ctx_nD.expand(len(classnames), -1, -1).clone()
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx_nD)  # (n, D), or (C, n, D) with csc; float32

    def forward(self) -> torch.Tensor:
        C, n = self.tokens_CL.shape[0], self.n_ctx
        embeds_CLD = torch.cat([self.embeds_CLD[:, :1], self.ctx.expand(C, n, -1), self.embeds_CLD[:, 1 + n :]], 1)
        text_model = self.text_model[0]
        dtype = text_model.embeddings.token_embedding.weight.dtype
        out = text_model(self.tokens_CL, pooled_only=True, token_embeds_BLD=embeds_CLD.to(dtype))
        return F.normalize(out.embeds.float(), dim=-1)


class Adapter(nn.Module):
    """CLIP-Adapter on image features: f' = normalize(ratio * relu(fc2(relu(fc1(f)))) + (1 - ratio) * f)."""

    def __init__(self, embed_dim: int, reduction: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.fc1 = nn.Linear(embed_dim, max(1, embed_dim // reduction), bias=False)
        self.fc2 = nn.Linear(max(1, embed_dim // reduction), embed_dim, bias=False)

    def forward(self, feats_NE: torch.Tensor) -> torch.Tensor:
        adapted_NE = F.relu(self.fc2(F.relu(self.fc1(feats_NE))))
        return F.normalize(self.ratio * adapted_NE + (1 - self.ratio) * feats_NE, dim=-1)


# ----------------------------------------------------------------------------- training


def _optimizer(params, cfg: AdaptConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_classifier(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    feats_NE: torch.Tensor,
    labels_N: torch.Tensor,
    cfg: AdaptConfig,
    progress: bool = False,
) -> list[float]:
    """Minimize cross-entropy of logits_fn(features) over shuffled batches; returns the per-step losses.

    logits_fn: (B, E) image features -> (B, C) logits, differentiable in `params` (everything else frozen).
    """
    steps_per_epoch = -(-len(feats_NE) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = _optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with torch.enable_grad(), tqdm(total=total, desc=f"{cfg.method}", unit="step", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(feats_NE), generator=g).to(feats_NE.device)
            for i in range(steps_per_epoch):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                loss = F.cross_entropy(logits_fn(feats_NE[idx]), labels_N[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update()
    return losses


def _topk(logits_NC: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    ks = [k for k in (1, 5) if k <= logits_NC.shape[1]]
    return {f"top{k}": v for k, v in topk_accuracy(logits_NC, labels_N, ks).items()}


def adapt(
    model,
    tokenizer,
    train_root: str,
    test_root: str,
    cfg: AdaptConfig,
    *,
    image_size: int,
    device=None,
    progress: bool = False,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """Draw the K-shot set, train `cfg.method`, evaluate zero-shot and adapted on the test split.

    Returns (results, tensors, metadata): results as written to results.json; tensors and metadata as
    written to adapted.safetensors. The model's parameters are frozen for the call (requires_grad restored
    after) and never updated.
    """
    cfg.validate("adapt")
    for flag, root in (("--train", train_root), ("--test", test_root)):
        if not Path(root).is_dir():
            raise ValueError(f"{flag}: no such folder '{root}'")
    zs = load_zeroshot_set(test_root, cfg.test_split)
    train_names = Path(train_root) / "classnames.txt"
    if train_names.is_file() and [s.strip() for s in train_names.read_text().splitlines() if s.strip()] != list(
        zs.classnames
    ):
        raise ValueError(f"--train: '{train_names}' differs from the test set's classnames.txt ('{test_root}')")
    model = getattr(model, "module", model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training, grad_flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        torch.manual_seed(cfg.seed)  # the adapter's init
        images, train_y_N, stats = k_shot_images(
            train_root, cfg.train_split, cfg.shots, cfg.seed, len(zs.classnames), image_size, cfg.max_image_pixels
        )
        train_x_NE = encode_images(model, images, cfg.eval_batch_size, device)
        train_y_N = train_y_N.to(device)
        test_x_ME, test_y_M = split_features(
            model,
            test_root,
            cfg.test_split,
            image_size=image_size,
            batch_size=cfg.eval_batch_size,
            device=device,
            progress=progress,
            max_image_pixels=cfg.max_image_pixels,
        )
        if test_y_M.min() < 0 or test_y_M.max() >= len(zs.classnames):
            raise ValueError(f"--test: '{test_root}/{cfg.test_split}': a .cls is outside [0, {len(zs.classnames)})")
        zs_classifier_CE = build_zeroshot_classifier(
            model, tokenizer, zs.classnames, zs.templates, cfg.eval_batch_size, device=device, rank=0, world_size=1
        )
        scale, bias = model.logit_params()  # exp'd scale; SigLIP's bias shifts every class alike (CE ignores it)
        scale = scale.detach().float()

        metadata = {"method": cfg.method, "classnames": json.dumps(list(zs.classnames))}
        if cfg.method == "coop":
            prompts = CoOpPrompts(
                model.text_model, tokenizer, zs.classnames, cfg.n_ctx, cfg.ctx_init, cfg.seed, cfg.csc
            )
            losses = train_classifier(lambda x: scale * x @ prompts().T, [prompts.ctx], train_x_NE, train_y_N, cfg,
                                      progress)  # fmt: skip
            with torch.no_grad():
                classifier_CE = prompts()
                adapted_ME = test_x_ME
            tensors = {"ctx": prompts.ctx.detach(), "classifier": classifier_CE}
            metadata.update(n_ctx=str(prompts.n_ctx), prompt=f"{' '.join([CTX_WORD] * prompts.n_ctx)} {{c}}.")
        else:
            adapter = Adapter(train_x_NE.shape[1], cfg.reduction, cfg.ratio).to(device)
            classifier_CE = zs_classifier_CE
            losses = train_classifier(lambda x: scale * adapter(x) @ classifier_CE.T, list(adapter.parameters()),
                                      train_x_NE, train_y_N, cfg, progress)  # fmt: skip
            with torch.no_grad():
                adapted_ME = adapter(test_x_ME)
            tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
            tensors["classifier"] = classifier_CE
            metadata.update(ratio=str(cfg.ratio), reduction=str(cfg.reduction))
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)

    zeroshot = _topk(test_x_ME @ zs_classifier_CE.T, test_y_M)
    adapted = _topk(adapted_ME @ classifier_CE.T, test_y_M)
    results = {
        **{f"zeroshot/{k}": v for k, v in zeroshot.items()},
        **{f"{cfg.method}/{k}": v for k, v in adapted.items()},
        "num_train": len(train_y_N),
        "num_train_available": stats["num_available"],
        "num_train_skipped": stats["num_skipped"],
        "short_classes": stats["short_classes"],
        "num_test": len(test_y_M),
        "num_classes": len(zs.classnames),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "num_steps": len(losses),
        "config": asdict(cfg),
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    return results, tensors, metadata


# ----------------------------------------------------------------------------- CLI

_HELP = {  # short forms of AdaptConfig's field docs
    "method": "coop | adapter",
    "shots": "training images per class (K)",
    "seed": "seeds the K-shot draw, the initialization and the batch order",
    "train_split": "shard folder under --train",
    "test_split": "shard folder under --test",
    "n_ctx": "CoOp: learned context vectors",
    "ctx_init": "CoOp: initialize the context from these words (e.g. 'a photo of a'); empty: random",
    "csc": "CoOp: class-specific context instead of one shared by all classes",
    "ratio": "adapter: weight of the adapter output in the residual mix (alpha)",
    "reduction": "adapter: bottleneck width is E / reduction",
    "optimizer": "adamw | sgd",
    "lr": "peak learning rate (cosine decay)",
    "weight_decay": "weight decay on the learned parameters",
    "epochs": "passes over the K-shot set",
    "batch_size": "images per optimizer step",
    "eval_batch_size": "images per forward pass when computing features",
    "max_image_pixels": "skip (and count) images declaring more pixels than this; nothing of them is decoded",
}


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.adapt",
        description="Few-shot CoOp prompt learning or CLIP-Adapter on a frozen model; zero-shot vs adapted.",
    )
    p.add_argument("checkpoint", help="run, step, consolidated, Hugging Face CLIP/SigLIP or OpenCLIP folder")
    p.add_argument("--train", required=True, help="clip_benchmark-layout set the K shots are drawn from")
    p.add_argument("--test", required=True, help="clip_benchmark-layout set (with classnames and templates)")
    p.add_argument("--output", required=True, help="folder for results.json and adapted.safetensors (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output (once the new one is complete)")
    p.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    for name, value in asdict(AdaptConfig()).items():  # one flag per AdaptConfig field: --n-ctx sets n_ctx
        flag, doc = f"--{name.replace('_', '-')}", _HELP[name]
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true", help=doc)
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"{doc} (default: {value!r})")
    return p.parse_args(argv)


def _run(args) -> dict:
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint: no such folder '{args.checkpoint}'")
    cfg = AdaptConfig(**{k: getattr(args, k) for k in asdict(AdaptConfig())})
    cfg.validate("adapt")
    check_out_dir(args.output, args.force)  # before the work: a refusal costs nothing
    model, run_cfg = convert.load_any(args.checkpoint, trust_pickles=args.trust_pickles)  # module attr: tests swap it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    results, tensors, metadata = adapt(
        model, Tokenizer(run_cfg.model.text.context_length), args.train, args.test, cfg,
        image_size=run_cfg.model.vision.image_size, device=device, progress=True,
    )  # fmt: skip
    results.update(checkpoint=str(args.checkpoint), train=str(args.train), test=str(args.test))
    metadata["checkpoint"] = str(args.checkpoint)
    with atomic_folder(args.output, args.force) as tmp:  # the old --output stays until the new one is complete
        out = Path(tmp)
        save_file(tensors, str(out / "adapted.safetensors"), metadata=metadata)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def results_table(results: dict, method: str) -> list[str]:
    """Zero-shot vs adapted accuracy, one row each; top-5 only where there are at least 5 classes."""
    ks = [k for k in (1, 5) if f"zeroshot/top{k}" in results]
    lines = [f"{'':<10}" + "".join(f"  {f'top{k}':<6}" for k in ks).rstrip()]
    for name in ("zeroshot", method):
        lines.append(f"{name:<10}" + "".join(f"  {results[f'{name}/top{k}']:.4f}" for k in ks))
    if ks == [1]:
        lines.append(f"(no top-5 with {results['num_classes']} classes)")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        results = _run(args)
    except ValueError as e:
        print(f"mmpretrain.adapt: error: {e}", file=sys.stderr, flush=True)
        return 2
    method = args.method
    if results["short_classes"]:
        print(f"note: {len(results['short_classes'])} classes have fewer than {args.shots} training images")
    print("\n".join(results_table(results, method)))
    print(f"{results['num_train']} training images ({args.shots} shots), {results['num_test']} test images; "
          f"written to {args.output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
