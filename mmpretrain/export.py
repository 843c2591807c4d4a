"""Deployment export: the image and the text encoder, each to ONNX and to a `torch.export` program.

    python -m mmpretrain.export outputs/demo --output deploy/                # both formats
    python -m mmpretrain.export hf_clip_folder --output deploy/ --onnx       # ONNX only

CHECKPOINT is anything `mmpretrain.eval` loads (run folder, step folder, consolidated, Hugging Face
or OpenCLIP folder). Writes to --output (new or empty; --force replaces a non-empty one, and only once the
new one is complete: a failed export leaves the old folder as it was):

    image_encoder.onnx   pixel_values (B, 3, S, S) float32, CLIP-normalized -> image_embeds (B, E) float32 unit rows
    text_encoder.onnx    input_ids (B, L) int64, our tokenizer's ids        -> text_embeds (B, E) float32 unit rows
    image_encoder.pt2    the same two functions as torch.export programs (torch.export.load(path).module())
    text_encoder.pt2
    export.json          what a deployment needs beside the graphs (image size, mean/std, context length,
                         logit scale/bias, family) and the verification below

B is dynamic (1 .. 4096) in every file; S (image side) and L (context length) are fixed by the model.
Exports run on CPU in float32 with PyTorch SDPA attention (the Triton kernel is a CUDA training path that
neither exporter can trace). Each file is checked after writing: ONNX files run under onnxruntime, the
programs under PyTorch, at two batch sizes other than the traced one, against the eager model; the max
abs difference per file and batch size goes into export.json and the printed table.

Legend: B batch, S image side, L context length, E embedding width.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mmpretrain.atomic import atomic_folder, check_out_dir
from mmpretrain.convert import load_any
from mmpretrain.convert.ours import TRUST_HELP
from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD

EXPORT_BATCH = 2  # traced with B = 2: torch.export specializes a size-1 dim, so 1 would lose the dynamic axis
VERIFY_BATCHES = (1, 5)  # checked at other batch sizes than the traced one
MAX_BATCH = 4096


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S) CLIP-normalized float32 -> (B, E) unit vectors (= model.encode_image)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_model(pixel_values, pooled_only=True).embeds.float(), dim=-1)


class TextEncoder(nn.Module):
    """input_ids (B, L) int64 -> (B, E) unit vectors (= model.encode_text)."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model.text_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_model(input_ids, pooled_only=True).embeds.float(), dim=-1)


def exportable(model) -> nn.Module:
    """A float32 CPU copy in eval mode whose attention runs PyTorch SDPA (the original is left untouched)."""
    model = copy.deepcopy(getattr(model, "module", model)).float().cpu().eval()
    for m in model.modules():
        if hasattr(m, "impl"):  # layers.Attention and siglip.PoolingAttention pass it to mmpretrain.kernels.attention
            m.impl = "sdpa"
    return model


def example_inputs(model_cfg, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random inputs: {"image": (B, 3, S, S) float32, "text": (B, L) int64}.

    Token rows are SOT-free random ids with the largest id (EOT for our tokenizer) at a random
    position, zero padding after it: CLIP pools at that EOT, SigLIP at the last position.
    """
    g = torch.Generator().manual_seed(seed)
    S, L, V = model_cfg.vision.image_size, model_cfg.text.context_length, model_cfg.text.vocab_size
    images = torch.randn(batch, 3, S, S, generator=g)
    ids = torch.randint(1, V - 1, (batch, L), generator=g)
    eot = torch.randint(1, L, (batch,), generator=g)
    pos = torch.arange(L)[None, :]
    ids = torch.where(pos == eot[:, None], V - 1, ids).masked_fill(pos > eot[:, None], 0)
    return {"image": images, "text": ids}


@dataclass
class _Tower:
    name: str  # "image" | "text"
    module: nn.Module
    input_name: str
    output_name: str


def _towers(model) -> list[_Tower]:
    return [
        _Tower("image", ImageEncoder(model).eval(), "pixel_values", "image_embeds"),
        _Tower("text", TextEncoder(model).eval(), "input_ids", "text_embeds"),
    ]


def _dynamic_batch(tower: _Tower) -> dict:
    return {tower.input_name: {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def export_program(tower: _Tower, example: torch.Tensor, path: Path) -> None:
    """torch.export with a dynamic batch axis, saved as a .pt2 file."""
    ep = torch.export.export(tower.module, (example,), dynamic_shapes=_dynamic_batch(tower))
    torch.export.save(ep, str(path))


def export_onnx(tower: _Tower, example: torch.Tensor, path: Path, opset: Optional[int] = None) -> None:
    """torch.onnx.export (the torch.export-based exporter; needs onnx and onnxscript), dynamic batch axis."""
    # The exporter prints its progress to stdout: keep it out of the command's own output.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            tower.module,
            (example,),
            dynamo=True,
            input_names=[tower.input_name],
            output_names=[tower.output_name],
            dynamic_shapes=_dynamic_batch(tower),
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path))


def onnx_max_abs_diff(path: Path, tower: _Tower, inputs: list[torch.Tensor]) -> list[float]:
    """Run the ONNX file under onnxruntime (CPU) on each input; max |onnx - eager| per input."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    with torch.no_grad():
        for x in inputs:
            (out,) = session.run([tower.output_name], {tower.input_name: x.numpy()})
            diffs.append((torch.from_numpy(out) - tower.module(x)).abs().max().item())
    return diffs


def program_max_abs_diff(path: Path, tower: _Tower, inputs: list[torch.Tensor]) -> list[float]:
    """Load the .pt2 program and run it on each input; max |program - eager| per input."""
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return [(program(x) - tower.module(x)).abs().max().item() for x in inputs]


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(
            f"--onnx needs the packages {', '.join(missing)} (not importable); "
            "pip install 'mmpretrain[export]' or pip install onnx onnxscript onnxruntime"
        )


def export_encoders(
    model,
    model_cfg,
    out_dir: str,
    *,
    onnx: bool = True,
    torch_export: bool = True,
    opset: Optional[int] = None,
    verify_batches: tuple = VERIFY_BATCHES,
    progress: bool = False,
) -> dict:
    """Export both encoders of `model` (a TwoTowerModel; model_cfg: its resolved ModelConfig) into out_dir.

    Returns (and writes as out_dir/export.json) {"files": {name: file}, "max_abs_diff": {file: {batch: diff}},
    "family", "image_size", "context_length", "embed_dim", "image_mean", "image_std", "logit_scale",
    "logit_bias", "inputs", "outputs", "torch", ...}. Verification runs for every file written.
    """
    if not (onnx or torch_export):
        raise ValueError("export: nothing to do (choose --onnx and/or --torch-export)")
    if onnx:
        _require_onnx()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = exportable(model)
    example = example_inputs(model_cfg, EXPORT_BATCH, seed=0)
    checks = [example_inputs(model_cfg, b, seed=1 + i) for i, b in enumerate(verify_batches)]
    with torch.no_grad():
        logit_scale, logit_bias = model.logit_params()
    files, diffs = {}, {}
    steps = [(t, fmt) for t in _towers(model) for fmt, on in (("onnx", onnx), ("pt2", torch_export)) if on]
    for tower, fmt in _progress(steps, progress):
        path = out / f"{tower.name}_encoder.{fmt}"
        inputs = [c[tower.name] for c in checks]
        if fmt == "onnx":
            export_onnx(tower, example[tower.name], path, opset)
            d = onnx_max_abs_diff(path, tower, inputs)
        else:
            export_program(tower, example[tower.name], path)
            d = program_max_abs_diff(path, tower, inputs)
        files[f"{tower.name}_{fmt}"] = path.name
        diffs[path.name] = {str(len(x)): v for x, v in zip(inputs, d)}
    info = {
        "family": model_cfg.family,
        "image_size": model_cfg.vision.image_size,
        "context_length": model_cfg.text.context_length,
        "vocab_size": model_cfg.text.vocab_size,
        "embed_dim": model_cfg.embed_dim,
        "image_mean": list(CLIP_MEAN),  # pixel_values = (rgb / 255 - mean) / std after resize + center crop
        "image_std": list(CLIP_STD),
        "logit_scale": logit_scale.item(),  # exp'd: logits = logit_scale * image_embeds @ text_embeds.T (+ bias)
        "logit_bias": None if logit_bias is None else logit_bias.item(),
        "inputs": {"image": "pixel_values (B, 3, S, S) float32", "text": "input_ids (B, L) int64"},
        "outputs": {"image": "image_embeds (B, E) float32, L2-normalized", "text": "text_embeds (B, E) float32"},
        "files": files,
        "max_abs_diff": diffs,
        "torch": torch.__version__,
    }
    if onnx:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    (out / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _progress(items: list, enabled: bool):
    return tqdm(items, desc="export", unit="file", disable=not enabled)


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.export",
        description="Export the image and text encoders to ONNX (dynamic batch) and torch.export, verified.",
    )
    p.add_argument("checkpoint", help="run, step, consolidated, Hugging Face CLIP/SigLIP or OpenCLIP folder")
    p.add_argument("--output", required=True, help="folder for the exported files and export.json (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output (once the new one is complete)")
    p.add_argument("--onnx", action="store_true", help="write ONNX files (default: both formats when neither flag)")
    p.add_argument("--torch-export", action="store_true", help="write torch.export .pt2 programs")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="fail (exit 1) when a max abs diff exceeds this")
    p.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    onnx, torch_export = (args.onnx, args.torch_export) if (args.onnx or args.torch_export) else (True, True)
    try:
        if not Path(args.checkpoint).is_dir():
            raise ValueError(f"checkpoint: no such folder '{args.checkpoint}'")
        if onnx:
            _require_onnx()  # before loading anything
        check_out_dir(args.output, args.force)
        model, cfg = load_any(args.checkpoint, trust_pickles=args.trust_pickles)
        with atomic_folder(args.output, args.force) as tmp:  # the old --output stays until the new one is complete
            info = export_encoders(model, cfg.model, tmp, onnx=onnx, torch_export=torch_export,
                                   opset=args.opset, progress=True)  # fmt: skip
    except ValueError as e:
        print(f"mmpretrain.export: error: {e}", file=sys.stderr, flush=True)
        return 2
    worst = 0.0
    print(f"{'file':<20}  batch  max_abs_diff")
    for name, per_batch in info["max_abs_diff"].items():
        for batch, diff in per_batch.items():
            print(f"{name:<20}  {batch:>5}  {diff:.2e}")
            worst = max(worst, diff)
    print(f"written to {args.output} (export.json describes the inputs and outputs)")
    if worst > args.tolerance:
        print(f"mmpretrain.export: error: max abs diff {worst:.2e} > --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
