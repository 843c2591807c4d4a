"""Turn `tools/gpu_check.py`'s results.json into the markdown tables of docs/benchmarks.md.

    python tools/gpu_report.py OUT/results.json [--command "the command the lease ran"] > section.md

Prints one section: the machine (card, driver, versions, measured ceilings), the train-step tables (samples/s,
step time, peak memory, MFU per implementation and stage, with ours / OpenCLIP ratios), the profile summary
(GPU idle fraction, host-device syncs, top kernels), the attention and loss tables, the CUDA kernel tests and
the data stage. Stages that failed or ran out of time are listed with their error, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import sys

TRAIN_STAGES = ("train_compiled", "train_openclip", "train_eager", "batch512", "vit_l14")


def _f(x, fmt="{:.1f}") -> str:
    return "" if x is None else fmt.format(x)


def machine_section(env: dict, results: dict, command: str) -> list:
    lines = [f"Card: {env.get('device', '?')} ({env.get('sms', '?')} SMs, {_f(env.get('memory_gb'), '{:.0f}')} GiB, "
             f"compute capability {env.get('capability', '?')}); `nvidia-smi`: {env.get('nvidia_smi', '?')!s}",
             f"Versions: python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), triton "
             f"{env.get('triton')}, deepspeed {env.get('deepspeed')}, transformers {env.get('transformers')}, "
             f"open_clip {env.get('open_clip')}; {env.get('cpu_count')} CPU cores. Started {results.get('started')}.",
             f"Measured ceilings: bf16 matmul 8192³ {_f(env.get('bf16_matmul_tflops_8192'))} TFLOP/s (random data), "
             f"device-to-device copy {_f(env.get('copy_gb_per_s'), '{:.0f}')} GB/s (read + write)."]  # fmt: skip
    if command:
        lines.append(f"Command: `{command}`")
    return lines


def train_table(results: dict) -> list:
    lines = ["| stage | batch | impl | samples/s | step ms | peak GiB | MFU |", "|---|---:|---|---:|---:|---:|---:|"]
    for stage in TRAIN_STAGES:
        r = results["stages"].get(stage)
        if not r or not r.get("rows"):
            continue
        for impl, row in r["rows"].items():
            mfu = _f(row["mfu"] * 100 if row["mfu"] is not None else None, "{:.1f}%")
            lines.append(f"| {stage} | {r.get('batch')} | {impl} | {row['samples_per_s']:.0f} | {row['step_ms']:.1f} "
                         f"| {row['peak_mem_gb']:.1f} | {mfu} |")  # fmt: skip
        ours = r["rows"].get("mmpretrain (DeepSpeed)")
        for ref in ("open_clip", "open_clip +compile"):
            if ours and ref in r["rows"]:
                ratio = ours["samples_per_s"] / r["rows"][ref]["samples_per_s"]
                lines.append(f"| {stage} | | ours (DeepSpeed) / {ref} | {ratio:.2f}× | | | |")
    return lines


def profile_section(p: dict) -> list:
    lines = [
        f"Profile of {p['impl']} ({p['steps']} steps): {p['wall_ms_per_step']:.1f} ms a step wall, GPU busy "
        f"{p['gpu_busy_ms_per_step']:.1f} ms (idle {_f((p.get('gpu_idle_frac_of_wall') or 0) * 100)}% of the "
        f"wall time), {p['kernels_per_step']:.0f} kernels a step, host-device syncs a step: "
        f"{p.get('syncs_per_step')}.",
        "",
        "| kernel | ms/step | calls/step | share |",
        "|---|---:|---:|---:|",
    ]
    for k in p.get("top_kernels", [])[:15]:
        name = k["name"].replace("|", "/")[:90]
        lines.append(f"| `{name}` | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} | "
                     f"{k['frac_of_device_time']:.1%} |")  # fmt: skip
    return lines


def loss_table(rows: list) -> list:
    lines = ["| B | D | impl | fwd+bwd ms | peak extra GB |", "|---:|---:|---|---:|---:|"]
    for r in rows:
        if "seconds" in r:
            lines.append(f"| {r['B']} | {r['D']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | "
                         f"{r['peak_extra_bytes'] / 1e9:.3f} |")  # fmt: skip
        else:
            lines.append(f"| {r['B']} | {r['D']} | {r['impl']} | {r.get('skipped', 'failed')} | |")
    return lines


def report(results: dict, command: str = "") -> str:
    st = results["stages"]
    out = machine_section(st.get("env", {}), results, command)
    out += ["", "Stages: " + ", ".join(f"{n} {r.get('status')} ({r.get('wall_s')} s)" for n, r in st.items())]
    for name, r in st.items():
        if r.get("status") != "ok":
            out.append(f"- {name}: {r.get('status')}: {str(r.get('error', ''))[:300]}")
    out += ["", "**Train step** (`tools/bench_train.py`, synthetic batches on the device, median step):", ""]
    out += train_table(results)
    prof = st.get("train_compiled", {}).get("profile")
    if prof:
        out += ["", *profile_section(prof)]
    k = st.get("kernels", {})
    if k.get("attention_table"):
        out += ["", "**Attention** (`tools/bench_attention.py`):", "", *k["attention_table"]]
    if k.get("loss_rows"):
        out += ["", "**Contrastive loss** (`tools/bench_kernels.py loss`):", "", *loss_table(k["loss_rows"])]
    t = st.get("tests", {})
    if t.get("counts") is not None:
        out += ["", f"**CUDA kernel tests**: {t['counts']}, ran to the end: {t.get('finished')}; failed: "
                f"{t.get('failed') or 'none'}; timeouts: {t.get('timeouts') or 'none'}."]  # fmt: skip
    d = st.get("data", {})
    if "loader_samples_per_s" in d:
        out += ["", f"**Data**: {d['images']} JPEGs {d['image_size'][0]}×{d['image_size'][1]} "
                f"({d['mb_per_image']:.3f} MB each) in {d['shards']} shards; loader with {d['loader_workers']} "
                f"workers, batch {d['loader_batch']}: {d['loader_samples_per_s']:.0f} samples/s."]  # fmt: skip
        if "run_data_wait_frac" in d:
            out.append(
                f"Real-shard training run: {d['run_samples_per_s']:.0f} samples/s, data_wait_frac "
                f"{d['run_data_wait_frac']:.1%} (windows after the first, which holds the compile)."
            )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_report.py", description=__doc__.split("\n")[0])
    p.add_argument("results", help="results.json written by tools/gpu_check.py")
    p.add_argument("--command", default="", help="the command the lease ran (printed with the tables)")
    args = p.parse_args(argv)
    try:
        with open(args.results) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"gpu_report: error: cannot read {args.results}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(report(results, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
