"""Hand checkpoints over: our runs -> consolidated safetensors, Hugging Face, OpenCLIP, and back.

    mmpretrain-convert consolidate  outputs/run          outputs/run-fp32
    mmpretrain-convert to-hf        outputs/run          outputs/run-hf --dtype bf16
    mmpretrain-convert to-hf        outputs/run          outputs/run-hf336 --image-size 336
    mmpretrain-convert to-hf        outputs/siglip-run   outputs/run-siglip2 --siglip2
    mmpretrain-convert to-openclip  outputs/run          outputs/run-oc --name my-vit-b-16
    mmpretrain-convert from-hf      ~/clip-vit-base-patch16   outputs/clip-b16
    mmpretrain-convert from-openclip  ~/oc-folder        outputs/oc-b16

The same command as ``python -m mmpretrain.convert`` or, in a checkout, ``python tools/convert_checkpoint.py``.
SRC of consolidate is a run folder (its checkpoints/latest) or a checkpoints/step_<N> folder, of
any ZeRO stage and world size: the run's own hand-off, which reads its DeepSpeed pickles (run it on
runs you trust). SRC of to-hf / to-openclip is any source `read_any` knows (run, step, consolidated,
HF or OpenCLIP folder); a run's pickles are checked weights-only first, and a file that fails needs
--trust-pickles. from-hf / from-openclip write our consolidated layout
(model.safetensors + config.yaml), which `python -m mmpretrain.eval` and these commands read.
Output is written to a temporary folder and renamed into place; an existing non-empty OUT is
refused unless --force. Errors: one line on stderr, exit code 2. Layouts and key maps: docs/formats.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mmpretrain.config import Config
from mmpretrain.convert import hf, load, openclip, resize
from mmpretrain.convert.common import parse_dtype
from mmpretrain.convert.ours import TRUST_HELP, read_run, write_folder
from mmpretrain.model.config import resolve_model_config

PROG = "mmpretrain-convert"

COMMANDS = {
    "consolidate": "DeepSpeed run/step folder -> model.safetensors + config.yaml",
    "to-hf": "any source -> Hugging Face folder (CLIPModel / SiglipModel, tokenizer, preprocessor)",
    "to-openclip": "any CLIP source -> OpenCLIP model-config JSON + open_clip_model.safetensors",
    "from-hf": "Hugging Face CLIP / SigLIP / SigLIP 2 folder -> our consolidated folder",
    "from-openclip": "OpenCLIP folder (model-config JSON + weights) -> our consolidated folder",
}


def parse_args(argv, prog: str = PROG):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("src", help="source folder")
        s.add_argument("out", help="output folder (created; refused if it exists and is not empty, unless --force)")
        s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="dtype of the written floating-point weights (default fp32)")  # fmt: skip
        s.add_argument("--force", action="store_true", help="replace a non-empty OUT, once the new one is complete")
        s.add_argument("--image-size", type=int, default=None,
                           help="resize the position embedding for this input size in pixels (bicubic on the "
                                "patch grid, class token kept), e.g. 336 for a 224 px model")  # fmt: skip
        s.add_argument("--context-length", type=int, default=None,
                       help="resize the text position embedding for this many tokens: longer keeps the first 20 "
                            "positions and stretches the rest (Long-CLIP), shorter keeps the first")  # fmt: skip
        if name in ("to-hf", "to-openclip"):
            s.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
        if name == "to-hf":
            s.add_argument("--siglip2", action="store_true",
                           help="a SigLIP model as transformers' Siglip2Model (NaFlex: the model's grid is its patch "
                                "budget; Siglip2ImageProcessor), instead of SiglipModel")  # fmt: skip
        if name == "to-openclip":
            s.add_argument("--name", default="mmpretrain",
                           help="OpenCLIP model name: config goes to OUT/<name>.json (default mmpretrain)")  # fmt: skip
        if name == "from-openclip":
            s.add_argument("--config", default=None,
                           help="OpenCLIP model-config JSON when SRC is a weights file, not a folder")  # fmt: skip
    return p.parse_args(argv)


def run(args) -> str:
    dtype = parse_dtype(args.dtype)
    if args.command == "consolidate":  # the run's own hand-off: its DeepSpeed pickles are read as DeepSpeed does
        sd, cfg = read_run(args.src, dtype, trust_pickles=True)
    elif args.command == "from-openclip" and args.config is not None:
        sd, model_cfg = openclip.read_openclip(args.config, args.src, dtype)
        cfg = Config(model=model_cfg)
    elif args.command == "from-openclip":
        found = openclip.find_openclip(args.src)
        if found is None:
            raise ValueError(f"{args.src}: not an OpenCLIP folder (a model-config *.json and one weights file)")
        sd, model_cfg = openclip.read_openclip(*found, dtype)
        cfg = Config(model=model_cfg)
    elif args.command == "from-hf":
        sd, model_cfg = hf.read_hf(args.src, dtype)
        cfg = Config(model=model_cfg)
    else:
        sd, cfg = load.read_any(args.src, dtype, trust_pickles=args.trust_pickles)
    model_cfg = cfg.model
    if args.image_size is not None:
        sd, model_cfg = resize.resize_position_embedding(sd, resolve_model_config(model_cfg), args.image_size)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    if args.context_length is not None:
        sd, model_cfg = resize.resize_text_position_embedding(sd, resolve_model_config(model_cfg), args.context_length)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    if args.command == "to-hf":
        return hf.export_hf(sd, resolve_model_config(model_cfg), args.out, dtype, args.force, args.siglip2)
    if args.command == "to-openclip":
        return openclip.export_openclip(sd, resolve_model_config(model_cfg), args.out, args.name, dtype, args.force)
    write_folder(sd, cfg, args.out, args.force)
    return args.out


def main(argv=None, prog: str = PROG) -> int:
    """The console script ``mmpretrain-convert``; ``prog`` names the command in usage and error lines."""
    args = parse_args(argv, prog)
    try:
        out = run(args)
    except ValueError as e:  # user errors: one line, exit code 2
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
