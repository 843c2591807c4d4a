"""`python -m mmpretrain.eval` (also `mmpretrain-eval`, and the older `python -m mmpretrain.evaluate`).

    python -m mmpretrain.eval outputs/demo --config configs/demo.yaml   # the eval sets of your config (data.eval)
    python -m mmpretrain.eval outputs/demo/checkpoints/step_500 --zeroshot data/shapes/eval --output r.json
    torchrun --nproc_per_node=8 -m mmpretrain.eval RUN --retrieval /data/flickr30k
    python -m mmpretrain.eval RUN --imagenet /data/wds_imagenet1k --linear-probe /data/wds_cifar10

Loads any checkpoint mmpretrain.convert reads (a run folder with its objective heads, a step folder, a
consolidated, Hugging Face or OpenCLIP folder), evaluates on every rank and prints a table on rank 0.
Trust: the eval sets (and the eval settings) come only from the command line and from --config, a YAML of your
own; the loaded folder supplies the model alone (its data paths, and any `pipe:` command in them, are never used).
A run folder's DeepSpeed pickles are unpickled only with --trust-pickles (mmpretrain/convert/ours.py).
Keys: mmpretrain.eval.suite; `zeroshot/imagenet1k/...` for --imagenet, `linear_probe/<folder>/...` for
--linear-probe. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmpretrain import checkpoint
from mmpretrain.atomic import write_atomic
from mmpretrain.config import Config, merge_config
from mmpretrain.convert.ours import TRUST_HELP
from mmpretrain.data import with_synthetic_data
from mmpretrain.data.config import DataConfig
from mmpretrain.data.tokenizer import Tokenizer
from mmpretrain.distributed import destroy, env_rank_world, init_distributed
from mmpretrain.eval import linear_probe, zeroshot
from mmpretrain.eval.suite import evaluate_all, set_name


def format_table(results: dict[str, float]) -> str:
    width = max([len(k) for k in results] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, value in results.items():
        lines.append(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.eval",
        description="Zero-shot classification and image-text retrieval of a trained run or checkpoint.",
    )
    p.add_argument(
        "checkpoint",
        help="run folder (uses checkpoints/latest), checkpoints/step_<N> folder, consolidated folder, "
        "Hugging Face CLIP/SigLIP folder or OpenCLIP folder",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="your config (e.g. the one you trained with): its data.eval sets and eval settings are used; the "
        "checkpoint folder's own data paths never are",
    )
    p.add_argument("--zeroshot", help="zero-shot set root; replaces the data.eval sets of --config")
    p.add_argument("--retrieval", help="retrieval set root; replaces the data.eval sets of --config")
    p.add_argument(
        "--imagenet",
        help="ImageNet-1k validation set root (tars with .cls only): zero-shot with open_clip's class names "
        "and 80 OpenAI templates; replaces the data.eval sets of --config",
    )
    p.add_argument(
        "--linear-probe",
        metavar="ROOT",
        help="labeled set with ROOT/train and ROOT/test: logistic-regression probe on frozen image features; "
        "replaces the data.eval sets of --config",
    )
    p.add_argument("--split", help="shard folder under each root (default: data.eval.split of --config)")
    p.add_argument("--batch-size", type=int, help="images per forward pass per rank (default: data.eval.batch_size)")
    p.add_argument("--num-workers", type=int, help="image decoding workers per rank (default: eval.num_workers)")
    p.add_argument(
        "--max-image-pixels", type=int, default=DataConfig.max_image_pixels, metavar="N",
        help="skip (and count) images whose header declares more pixels than N, decoding nothing of them "
        f"(default {DataConfig.max_image_pixels:,}; the checkpoint folder's data settings are not used for this)",
    )  # fmt: skip
    p.add_argument("--output", help="also write the results here as JSON (replaced in one rename)")
    p.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    return p.parse_args(argv)


def run(args) -> dict[str, float]:
    """Load, evaluate, return the results (on every rank); user errors raise ValueError."""
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint: no such folder '{args.checkpoint}'")
    model, cfg = checkpoint.load_model(args.checkpoint, trust_pickles=args.trust_pickles)
    # the sets come from the user's own config or flags, never from the loaded folder (it supplies cfg.model)
    own = merge_config(args.config) if args.config is not None else Config()
    data_cfg, eval_cfg = with_synthetic_data(own.data).eval, own.eval
    named = (args.zeroshot, args.retrieval, args.imagenet, args.linear_probe)
    if any(r is not None for r in named):  # sets named here replace the config's (and their names)
        data_cfg.zeroshot, data_cfg.retrieval = args.zeroshot, args.retrieval
        data_cfg.zeroshot_name = data_cfg.retrieval_name = None
    if args.split is not None:
        data_cfg.split = args.split
    if args.batch_size is not None:
        data_cfg.batch_size = args.batch_size
    if args.num_workers is not None:
        eval_cfg.num_workers = args.num_workers
    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels: must be >= 1 (got {args.max_image_pixels})")
    if all(r is None for r in (data_cfg.zeroshot, data_cfg.retrieval, args.imagenet, args.linear_probe)):
        raise ValueError(
            "no eval set named: pass --zeroshot, --retrieval, --imagenet or --linear-probe, or --config with your "
            f"YAML's data.eval (the sets of {args.checkpoint}'s own config are not used)"
        )
    data_cfg.validate("data.eval")  # missing folders and files, named
    eval_cfg.validate("eval")
    for flag, root in (("--imagenet", args.imagenet), ("--linear-probe", args.linear_probe)):
        if root is not None and not Path(root).is_dir():
            raise ValueError(f"{flag}: no such folder '{root}'")
    if args.imagenet is not None:
        zeroshot.imagenet_classes_and_templates()  # fail early, before evaluating anything, without open_clip

    if env_rank_world()[1] > 1:  # launched by torchrun / srun: shard the sets over the ranks
        device = init_distributed().device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer = Tokenizer(cfg.model.text.context_length)
    image_size = cfg.model.vision.image_size
    regions = cfg.data.train.regions  # how the loaded run wrote box coordinates, if it trained region tasks
    results = evaluate_all(model, tokenizer, data_cfg, eval_cfg, image_size=image_size, device=device,
                           max_image_pixels=args.max_image_pixels,
                           box_bins=regions.box_bins if regions.enabled else None)  # fmt: skip
    common = dict(
        image_size=image_size, batch_size=data_cfg.batch_size, num_workers=eval_cfg.num_workers, device=device,
        max_image_pixels=args.max_image_pixels,
    )  # fmt: skip
    if args.imagenet is not None:  # --split applies to it (default data.eval.split); the probe reads train/test
        r = zeroshot.imagenet_zeroshot(
            model, tokenizer, args.imagenet, split=data_cfg.split, top_k=eval_cfg.top_k, **common
        )
        results.update({f"zeroshot/imagenet1k/{k}": v for k, v in r.items()})
    if args.linear_probe is not None:
        r = linear_probe.linear_probe(model, args.linear_probe, **common)
        results.update({f"linear_probe/{set_name(args.linear_probe)}/{k}": v for k, v in r.items()})
    return results


def main(argv=None) -> int:
    """`python -m mmpretrain.eval RUN [--zeroshot ROOT] [--retrieval ROOT] [--imagenet ROOT]
    [--linear-probe ROOT] [--output results.json]`."""
    args = parse_args(argv)
    is_main = env_rank_world()[0] == 0
    try:
        results = run(args)
    except ValueError as e:  # user errors: one line, exit code 2, no traceback
        if is_main:
            print(f"mmpretrain.eval: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy()
    if is_main:
        print(format_table(results), flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.output, json.dumps(results, indent=1) + "\n")  # an earlier file stays whole until then
            print(f"results written to {args.output}", flush=True)
    return 0
