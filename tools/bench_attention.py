"""Benchmark the fused attention against PyTorch SDPA and the naive torch reference.

    python tools/bench_attention.py                      # CUDA: triton, sdpa, naive in bf16
    python tools/bench_attention.py --scale 0.03125      # CPU: sdpa and naive, batch scaled down

Prints a markdown table: latency (ms) and TFLOP/s of the forward and of forward+backward, and
each implementation's forward+backward latency as a ratio of SDPA's measured in the same run.
On CUDA, SDPA is pinned to its flash backend where that backend takes the inputs, else left to
pick. On CPU only the reference paths run (the Triton kernel needs a GPU), and the batch is
multiplied by --scale (default 1/32 there, at least 1) and calls over a second are timed once,
so that the table finishes in a few minutes; the output says so.

FLOPs follow the FlashAttention papers: forward 4*B*H*M*N*D (two matmuls), halved when causal;
forward+backward 3.5x the forward (the backward does 2.5x the forward's matmul work).
`tools/bench_kernels.py attention` calls `run_attention_bench(args)` with the flags of `add_arguments`.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from mmpretrain.kernels.attention import attention_reference, flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class Shape:
    B: int
    H: int
    N: int
    D: int
    causal: bool = False

    def label(self, B=None) -> str:
        return f"B={self.B if B is None else B} H={self.H} N={self.N} D={self.D}" + (" causal" if self.causal else "")


# The towers' shapes: ViT-B/16 image (197), CLIP text (77, causal), ViT-?/14 at 224 (257),
# ViT-L/14 at 336 px with head dim 80 (577), and one long sequence.
SHAPES = [
    Shape(256, 12, 197, 64),
    Shape(256, 8, 77, 64, causal=True),
    Shape(128, 16, 257, 64),
    Shape(32, 16, 577, 80),
    Shape(8, 16, 4096, 128),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_DEFAULT_SCALE = 1 / 32


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--scale", type=float, default=None, help=f"batch multiplier (default 1 on CUDA, {CPU_DEFAULT_SCALE} on CPU)"
    )
    parser.add_argument("--impls", default=None, help="comma list of triton,sdpa,naive (default: all the device runs)")
    parser.add_argument("--shapes", default=None, help="comma list of shape indices into SHAPES (default: all)")
    parser.add_argument("--iters", type=int, default=None, help="CPU: timed runs (default 3); CUDA: do_bench")
    return parser


def _sdpa_flash(q, k, v, causal):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa_any(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def pick_impl(impl: str, q, k, v, causal: bool):
    """(fn(q, k, v, causal), label): SDPA pinned to flash when flash takes these inputs (tried once)."""
    if impl == "triton":
        return (lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)), "triton"
    if impl == "naive":
        return (lambda q, k, v, causal: attention_reference(q, k, v, causal=causal)), "naive"
    try:
        _sdpa_flash(q[:1], k[:1], v[:1], causal)
        return _sdpa_flash, "sdpa (flash)"
    except RuntimeError:
        return _sdpa_any, "sdpa (default)"


IMPLS = ("triton", "sdpa", "naive")


def _time_cpu(fn, iters: int, slow_s: float = 1.0) -> float:
    """Median wall time in ms of `iters` calls after a warm-up call; a first call over slow_s is the measurement."""
    t0 = time.perf_counter()
    fn()
    first_s = time.perf_counter() - t0
    if first_s > slow_s:  # seconds-long calls (N=4096): warm-up effects are noise, keep the CPU table short
        return first_s * 1e3
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda(fn, grads) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")


def bench_one(impl: str, shape: Shape, B: int, device: str, dtype: torch.dtype, iters: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(B, shape.H, shape.N, shape.D, generator=g).to(device, dtype) for _ in range(4))
    fn, label = pick_impl(impl, q, k, v, shape.causal)
    fwd_flops = 4 * B * shape.H * shape.N * shape.N * shape.D * (0.5 if shape.causal else 1.0)
    row = {"shape": shape.label(B), "impl": impl, "label": label}
    try:
        with torch.no_grad():
            fwd = lambda: fn(q, k, v, shape.causal)
            row["fwd_ms"] = _time_cuda(fwd, None) if device == "cuda" else _time_cpu(fwd, iters)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def fwd_bwd():
            for x in (qg, kg, vg):
                x.grad = None
            fn(qg, kg, vg, shape.causal).backward(do)

        row["fwd_bwd_ms"] = _time_cuda(fwd_bwd, [qg, kg, vg]) if device == "cuda" else _time_cpu(fwd_bwd, iters)
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
        return row
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
    return row


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.machine()


def machine_line(device: str) -> str:
    if device == "cuda":
        what = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        what = f"{_cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| shape | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd / sdpa |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    sdpa_ms = {r["shape"]: r.get("fwd_bwd_ms") for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['shape']} | {r['label']} | {r['note']} | | | | |")
            continue
        base = sdpa_ms.get(r["shape"])
        ratio = f"{r['fwd_bwd_ms'] / base:.2f}" if base else "-"
        lines.append(
            f"| {r['shape']} | {r['label']} | {r['fwd_ms']:.3g} | {r['fwd_tflops']:.3g} | "
            f"{r['fwd_bwd_ms']:.3g} | {r['fwd_bwd_tflops']:.3g} | {ratio} |"
        )
    return "\n".join(lines)


def run_attention_bench(args: argparse.Namespace) -> list[dict]:
    """Run the table for the parsed flags of `add_arguments`; prints it and returns its rows."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    scale = args.scale if args.scale is not None else (1.0 if device == "cuda" else CPU_DEFAULT_SCALE)
    if scale <= 0:
        raise ValueError(f"--scale must be positive (got {scale})")
    default_impls = ["triton", "sdpa", "naive"] if device == "cuda" else ["sdpa", "naive"]
    impls = args.impls.split(",") if args.impls else default_impls
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"--impls: unknown implementation {impl!r} (choose from {', '.join(IMPLS)})")
    if device == "cpu" and "triton" in impls:
        raise ValueError("--impls triton needs a CUDA device (on CPU only the reference paths run)")
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    iters = args.iters or 3

    print(f"# attention benchmark: {machine_line(device)}; dtype {str(dtype).removeprefix('torch.')}")
    if device == "cpu":
        print("CPU: reference paths only (SDPA and naive torch); the Triton kernel needs a GPU.")
    if scale != 1.0:
        print(f"Batch sizes scaled by {scale:g} (at least 1): the B column is the batch actually run.")
    rows = []
    for shape in shapes:
        B = max(1, math.floor(shape.B * scale))
        for impl in impls:
            rows.append(bench_one(impl, shape, B, device, dtype, iters))
    print()
    print(format_table(rows))
    return rows


def main(argv=None) -> list[dict]:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return run_attention_bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()
