"""Benchmarks of the kernels against their references.

    python tools/bench_kernels.py loss                       # B = 4096, 16384, 65536 x D = 512, 768
    python tools/bench_kernels.py loss --skip-slow           # leave out B >= 65536 (minutes per row on CPU)
    python tools/bench_kernels.py loss --batch 16384 --dim 512 --md docs/bench_loss.md --plot docs/bench_loss_memory.png
    python tools/bench_kernels.py attention [...]            # tools/bench_attention.py (its own flags)

loss: forward + backward of the CLIP loss for ours (impl auto: the chunked torch path on CPU,
Triton on CUDA), the naive full-matrix loss (kernels.contrastive_loss.clip_loss_reference) and
open_clip's ClipLoss, side by side. Each row runs in its own subprocess: Linux overcommits memory,
so an out-of-memory kill cannot be caught in-process, and a fresh process gives a clean peak.
A row whose predicted memory exceeds the machine is printed as "OOM (predicted N GB)".

Peak extra memory = peak - baseline, the baseline taken after the inputs exist and one warm-up
call at a small batch. CPU: the kernel's resident-set high-water mark (VmHWM, reset by writing 5
to /proc/self/clear_refs) minus VmRSS at the baseline: everything the process really touched
(torch's allocations, BLAS workspaces, allocator slack), which is what the OOM killer sees.
CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the baseline.
Both include the gradients of the features (2 x B x D x 4 bytes), which every implementation needs.
Time: median of the repetitions in a row's process (the first included), wall clock, synchronized
on CUDA; with --rounds, the fastest round. "load" is the 1-minute load average when each round of
the row started: on a shared machine, timings are only comparable at similar load.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

GB = 1e9
OPEN_CLIP_B2 = 4.1  # peak bytes of the full-matrix losses in units of 4 * B^2 (fitted on CPU, docs/bench_loss.md)
NAIVE_B2 = 4.1


# ----------------------------------------------------------------------------- one row (in a subprocess)


def _proc_status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _loss_fn(impl, chunk_size):
    if impl == "ours":
        from mmpretrain.loss import clip_loss

        return lambda img, txt, s: clip_loss(img, txt, s, impl="auto", chunk_size=chunk_size)
    if impl == "naive":
        from mmpretrain.kernels.contrastive_loss import clip_loss_reference

        return clip_loss_reference
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    raise ValueError(f"unknown impl {impl!r}")


def run_row(impl, B, D, device, dtype, chunk_size, max_reps, budget_s):
    """Time and peak extra memory of forward + backward; runs in its own process."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    fn = _loss_fn(impl, chunk_size)

    def inputs(n):
        img = F.normalize(torch.randn(n, D), dim=-1).to(device, dtype).requires_grad_()
        txt = F.normalize(img.detach().float() + torch.randn(n, D, device=device), dim=-1).to(dtype).requires_grad_()
        return img, txt, torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def step(img, txt, scale):
        for t in (img, txt, scale):
            t.grad = None
        loss = fn(img, txt, scale)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    step(*inputs(256))  # warm-up: BLAS, thread pools, imports
    img, txt, scale = inputs(B)
    if device == "cuda":
        step(img, txt, scale)  # Triton autotunes at the real shape
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status_kb("VmRSS") * 1024
    times, t_start = [], time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        loss = step(img, txt, scale)
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status_kb("VmHWM") * 1024
    times.sort()
    return dict(impl=impl, B=B, D=D, device=device, dtype=str(dtype).replace("torch.", ""),
                seconds=times[len(times) // 2], reps=len(times), peak_extra_bytes=peak - base, loss=loss)  # fmt: skip


# ----------------------------------------------------------------------------- the table


def predict_bytes(impl, B, D, chunk_size, device):
    """Memory model used to skip rows that cannot fit (and to extrapolate; see fit_memory)."""
    if impl == "open_clip":
        return OPEN_CLIP_B2 * 4 * B * B
    if impl == "naive":
        return NAIVE_B2 * 4 * B * B
    grads = 2 * B * D * 4  # fp32 feature gradients (+ the gathered/cast copies are the same order)
    if device == "cuda":
        return 3 * grads
    return 2 * 4 * min(chunk_size, B) * B + 2 * grads  # two chunk x B fp32 buffers


def available_bytes(device):
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def run_table(args):
    """Every (D, B, impl) row in its own subprocess; --rounds repeats the grid (impls interleaved, so that load
    from other processes hits them alike) and keeps each row's fastest round. Slow rows (B >= 65536) run once."""
    device = args.device
    limit = 0.9 * available_bytes(device)
    grid = [(D, B, impl) for D in args.dim for B in args.batch for impl in args.impls]
    rows = {}
    for rnd in range(args.rounds):
        for D, B, impl in grid:
            pred = predict_bytes(impl, B, D, args.chunk_size, device)
            row = rows.setdefault((D, B, impl), dict(impl=impl, B=B, D=D, device=device, predicted_bytes=pred))
            if rnd > 0 and ("skipped" in row or B >= 65536):
                continue
            if pred > limit:
                row["skipped"] = f"OOM (predicted {pred / GB:.0f} GB)"
            elif args.skip_slow and B >= 65536:
                row["skipped"] = "slow row (--skip-slow)"
            else:
                spec = dict(impl=impl, B=B, D=D, device=device, dtype=args.dtype, chunk_size=args.chunk_size,
                            max_reps=args.reps, budget_s=args.budget_s)  # fmt: skip
                cmd = [sys.executable, os.path.abspath(__file__), "loss", "--row", json.dumps(spec)]
                load = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    row["skipped"] = f"failed (exit {proc.returncode})"
                    print(proc.stderr[-2000:], file=sys.stderr)
                else:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    res["load"] = row.get("load", []) + [round(load, 1)]
                    if "seconds" in row and row["seconds"] <= res["seconds"]:
                        res["seconds"], res["reps"] = row["seconds"], row["reps"]
                    res["peak_extra_bytes"] = max(res["peak_extra_bytes"], row.get("peak_extra_bytes", 0))
                    row.update(res)
            print(_row_line(row, list(rows.values())) + (f"  (round {rnd + 1})" if args.rounds > 1 else ""), flush=True)
    return list(rows.values())


def _ref(rows, row):
    return next((r for r in rows if r["impl"] == "open_clip" and r["B"] == row["B"] and r["D"] == row["D"]), None)


def _row_line(row, rows):
    if "skipped" in row:
        return f"| {row['B']} | {row['D']} | {row['impl']} | {row['skipped']} | | | | | |"
    ref = _ref(rows, row)
    ratio_t = f"{row['seconds'] / ref['seconds']:.2f}x" if ref and "seconds" in ref else ""
    ratio_m = f"{ref['peak_extra_bytes'] / row['peak_extra_bytes']:.0f}x less" if ref and "seconds" in ref else ""
    if row["impl"] == "open_clip":
        ratio_t, ratio_m = "1.00x", ""
    return (
        f"| {row['B']} | {row['D']} | {row['impl']} | {row['seconds'] * 1e3:.2f} | {row['peak_extra_bytes'] / GB:.3f} "
        f"| {ratio_t} | {ratio_m} | {row['loss']:.6f} | {', '.join(map(str, row.get('load', [])))} |"
    )


def fit_memory(rows, impl, predict_B):
    """Least squares peak = a + b * x, x = B (ours) or B^2 (full-matrix losses), per D; predictions at predict_B."""
    out = {}
    for D in sorted({r["D"] for r in rows}):
        pts = [(r["B"], r["peak_extra_bytes"]) for r in rows if r["impl"] == impl and r["D"] == D and "seconds" in r]
        if len(pts) < 2:
            continue
        power = 1 if impl == "ours" else 2
        xs, ys = [b**power for b, _ in pts], [y for _, y in pts]
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - slope * mx
        out[D] = dict(intercept=a, slope=slope, power=power, points=n,
                      predicted={B: a + slope * B**power for B in predict_B})  # fmt: skip
    return out


def machine_line(device):
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown(rows, args, fits):
    lines = [
        f"Loss benchmark (CLIP, forward + backward), {datetime.date.today()}: {machine_line(args.device)}, "
        f"dtype {args.dtype}, chunk_size {args.chunk_size}. `python tools/bench_kernels.py loss` "
        "(each row in its own process).",
        "",
        "| B | D | impl | fwd+bwd ms | peak extra GB | time vs open_clip | memory vs open_clip | loss | load |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_row_line(r, rows[:i]) for i, r in enumerate(rows)]
    for impl, fit in fits.items():
        for D, f in fit.items():
            x = "B" if f["power"] == 1 else "B^2"
            pred = ", ".join(f"B={B}: {v / GB:.2f} GB" for B, v in f["predicted"].items())
            lines.append("")
            lines.append(
                f"Memory model, {impl}, D={D} (least squares over {f['points']} measured rows): peak extra = "
                f"{f['intercept'] / 1e6:.1f} MB + {f['slope']:.4g} bytes x {x}; predicted {pred}."
            )
    return "\n".join(lines) + "\n"


def plot(rows, fits, path):
    """Peak extra memory vs batch size (log-log), one line per impl and D; matplotlib, else Pillow."""
    series = {}
    for r in rows:
        if "seconds" in r:
            series.setdefault(f"{r['impl']} D={r['D']}", []).append((r["B"], r["peak_extra_bytes"] / GB))
    for impl, fit in fits.items():
        for D, f in fit.items():
            series.setdefault(f"{impl} D={D} (model)", []).extend((B, v / GB) for B, v in f["predicted"].items())
    for pts in series.values():
        pts.sort()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in series.items():
            ax.loglog(*zip(*pts), "--" if "model" in label else "-o", label=label)
        ax.set(xlabel="global batch B", ylabel="peak extra memory (GB)", title="CLIP loss fwd+bwd memory")
        ax.legend(fontsize=8)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return "matplotlib"
    except ImportError:
        _plot_pillow(series, path)
        return "pillow (matplotlib is not installed)"


def _plot_pillow(series, path, W=900, H=560, pad=70):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log10(b) for pts in series.values() for b, _ in pts]
    ys = [math.log10(max(v, 1e-3)) for pts in series.values() for _, v in pts]
    x0, x1, y0, y1 = math.floor(min(xs)), math.ceil(max(xs)), math.floor(min(ys)), math.ceil(max(ys))
    px = lambda x: pad + (x - x0) / (x1 - x0) * (W - 2 * pad)
    py = lambda y: H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for e in range(x0, x1 + 1):
        d.line([px(e), H - pad, px(e), H - pad + 5], fill="black")
        d.text((px(e) - 12, H - pad + 8), f"1e{e}", fill="black")
    for e in range(y0, y1 + 1):
        d.line([pad - 5, py(e), W - pad, py(e)], fill=(225, 225, 225))
        d.text((8, py(e) - 6), f"{10.0**e:g} GB", fill="black")
    d.text((W / 2 - 60, H - 30), "global batch B (log)", fill="black")
    d.text((pad, 20), "CLIP loss fwd+bwd: peak extra memory (GB, log) vs batch", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (label, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        xy = [(px(math.log10(b)), py(math.log10(max(v, 1e-3)))) for b, v in pts]
        if len(xy) > 1:
            d.line(xy, fill=c, width=1 if "model" in label else 3)
        for x, y in xy:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=c)
        d.text((W - pad - 230, pad + 10 + 16 * i), ("- - " if "model" in label else "--- ") + label, fill=c)
    img.save(path)


def loss_main(argv):
    p = argparse.ArgumentParser(prog="bench_kernels.py loss", description="CLIP loss: ours vs full matrix vs open_clip")
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--dim", type=int, nargs="+", default=[512, 768])
    p.add_argument("--impls", nargs="+", default=["open_clip", "naive", "ours"], choices=["ours", "naive", "open_clip"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked path")
    p.add_argument("--skip-slow", action="store_true", help="skip B >= 65536 (minutes per row on a CPU)")
    p.add_argument("--rounds", type=int, default=1, help="run the grid this many times, keep each row's fastest")
    p.add_argument("--reps", type=int, default=5, help="at most this many timed repetitions per row")
    p.add_argument("--budget-s", type=float, default=60.0, help="no new repetition after this many seconds")
    p.add_argument("--predict", type=int, nargs="+", default=[65536, 262144], help="batches the memory model predicts")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the raw rows here")
    p.add_argument("--plot", default=None, help="write the memory-vs-batch PNG here")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(**json.loads(args.row))))
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"{machine_line(args.device)}; dtype {args.dtype}\n")
    print("| B | D | impl | fwd+bwd ms | peak extra GB | time vs open_clip | memory vs open_clip | loss | load |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|", flush=True)
    rows = run_table(args)
    fits = {impl: fit_memory(rows, impl, args.predict) for impl in ("ours", "open_clip")}
    md = markdown(rows, args, {k: v for k, v in fits.items() if v})
    print("\n" + md.split("\n\n", 2)[-1] if fits else "")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, fits=fits, machine=machine_line(args.device)), f, indent=1)
    if args.plot:
        print(f"plot: {args.plot} ({plot(rows, {k: v for k, v in fits.items() if v}, args.plot)})")


def attention_main(argv):
    """Delegates to tools/bench_attention.py (imported only for this subcommand)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


SUBCOMMANDS = {"loss": loss_main, "attention": attention_main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: bench_kernels.py {{{','.join(SUBCOMMANDS)}}} [flags]  (-h after a subcommand for its flags)"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__}")
        return
    if not argv or argv[0] not in SUBCOMMANDS:
        sys.exit(usage)
    SUBCOMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
