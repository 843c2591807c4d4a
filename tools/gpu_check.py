"""One GPU lease, one command: environment, kernel tests, train-step sweep vs OpenCLIP, profile, kernels, data.

    python tools/gpu_check.py --out OUT                 # on one H100/H200 (about 9 minutes)
    python tools/gpu_check.py --out /tmp/gc --dry-run   # every stage on the CPU at tiny shapes (a test runs it)
    python tools/gpu_check.py --out OUT --stages env,train_compiled --budget-s 300

A lent GPU comes rarely and for minutes, so everything it should measure runs from this one script, proven
end to end on the CPU first (`--dry-run`). Each stage runs in a child process of its own session with its own
time limit (a hang or a slow compile fails that stage, not the lease), the stages run in priority order inside
`--budget-s`, and a failed stage does not stop the next. Each stage writes `<stage-dir>/<stage>.json` and
`<stage-dir>/<stage>.log`; after every stage, `<out>/results.json` (every stage's JSON so far, with status and
wall time) and `<out>/gpu_check.log` (every stage's log) are rewritten, so a run cut short still leaves what it
measured. `python tools/gpu_report.py OUT/results.json` turns the results into the tables of docs/benchmarks.md.

Stages, in the order they run (the issue's letters), each inside its own limit (`--help` lists them):
  env             (a) GPU, driver, torch/triton/deepspeed/transformers/open_clip versions; the two ceilings
                  measured: bf16 matmul TFLOP/s on random data and device-to-device copy GB/s
  train_compiled  (c, e) ViT-B/16 CLIP, batch 256, ZeRO 0, compiled blocks: DeepSpeed amp_bf16, DeepSpeed bf16,
                  amp_bf16 without the non-finite guard's hooks, and the same step in plain PyTorch; then a
                  torch.profiler summary of the first (top kernels, GPU idle fraction, host-device syncs per step)
  train_openclip  (d) OpenCLIP's own train step, eager and torch.compile'd, beside ours compiled, same card,
                  model, batch and precision, by the same timer (tools/bench_train.py)
  kernels         (f) attention (Triton vs flash-SDPA vs naive at the towers' shapes) and the tiled loss vs
                  open_clip and the full matrix, timed per call in milliseconds
  data            (g) JPEG shards made on the machine (photo-sized), the loader's samples/s with the machine's
                  cores, and a real-shard ViT-B/16 training run (compiled): samples/s and data_wait_frac
  tests           (b) the CUDA kernel tests (tests/kernels, not the interpreter ones), 8 in parallel, each
                  with its own timeout: a hang or slow compile is that test's failure
  vit_l14         (c) ViT-L/14, batch 256, compiled (activation checkpointing only if it does not fit)
  train_eager     (c) ours (DeepSpeed amp_bf16, bf16, SDPA attention, plain torch) and OpenCLIP, not compiled
  batch512        (c) ViT-B/16 at batch 512, compiled, both precisions

The device image has its own torch and Triton; what it lacks travels as wheels (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


@dataclass
class Stage:
    name: str
    limit_s: float  # on the GPU
    dry_limit_s: float  # in --dry-run on the CPU
    help: str


STAGES = [
    Stage("env", 25, 60, "versions, GPU, matmul and copy ceilings"),
    Stage("train_compiled", 160, 400, "ViT-B/16 compiled: DeepSpeed amp_bf16 / bf16 / no guard / plain torch; profile"),
    Stage("train_openclip", 130, 300, "OpenCLIP eager and compiled beside ours compiled"),
    Stage("kernels", 120, 200, "attention and loss kernel tables"),
    Stage("data", 130, 300, "real JPEG shards: loader throughput, data_wait_frac of a training run"),
    Stage("tests", 60, 200, "CUDA kernel tests with per-test timeouts"),
    Stage("vit_l14", 75, 300, "ViT-L/14 batch 256 compiled"),
    Stage("train_eager", 50, 200, "ours (DeepSpeed amp_bf16 / bf16 / SDPA attention / plain torch) and OpenCLIP eager"),
    Stage("batch512", 45, 300, "ViT-B/16 batch 512 compiled"),
]
STAGE_NAMES = [s.name for s in STAGES]


# ----------------------------------------------------------------------------- helpers for stages


def sh(cmd: list, log, timeout: float | None = None, env: dict | None = None, check: bool = True) -> str:
    """Run a command with its output going straight into the stage log (so a stage cut at its limit keeps what
    the command printed); returns that output. Raises on a non-zero exit, or TimeoutExpired (child killed)."""
    log.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
    log.flush()
    start = log.tell()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **(env or {})})  # fmt: skip
    except subprocess.TimeoutExpired:
        log.write(f"\n[killed at its timeout of {timeout:.0f} s]\n")
        raise
    log.flush()
    with open(log.name, errors="replace") as f:
        f.seek(start)
        text = f.read()
    log.write(f"[exit {proc.returncode} after {time.perf_counter() - t0:.1f} s]\n")
    log.flush()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} exited {proc.returncode}: {text[-800:]}")
    return text


def train_model_args(dry: bool, model: str = "ViT-B-16", batch: int = 256) -> list:
    """bench_train config + overrides: the model at `batch`, ZeRO 0, bf16, no activation checkpointing."""
    if dry:
        return ["configs/demo.yaml", "train.batch_size=8", "engine.precision=amp_bf16"]  # the 3.4 M tiny CLIP
    return ["configs/vit-b-16-laion.yaml", f"model.name={model}", "data.train.urls=null",
            "data.synthetic.root=/tmp/gpu_check_shapes", f"train.batch_size={batch}", "engine.zero_stage=0",
            "engine.precision=amp_bf16", "model.grad_checkpointing=false"]  # fmt: skip


def steps_args(dry: bool, steps: int = 10, warmup: int = 3) -> list:
    return ["--steps", "2", "--warmup", "1"] if dry else ["--steps", str(steps), "--warmup", str(warmup)]


def bench_train(args: list, log, json_path: str, dry: bool, timeout: float | None = None) -> dict:
    sh([sys.executable, os.path.join(TOOLS, "bench_train.py"), *args, "--json", json_path], log, timeout)
    with open(json_path) as f:
        return json.load(f)


def rows(result: dict) -> dict:
    """{impl: {samples_per_s, step_ms, peak_mem_gb, mfu}} of a bench_train result."""
    peak = result.get("peak_tflops")
    out = {}
    for r in result["results"]:
        mfu = result["flops_per_sample"] * r["samples_per_s"] / (peak * 1e12) if peak else None
        out[r["impl"]] = {"samples_per_s": r["samples_per_s"], "step_ms": r["step_ms"],
                          "peak_mem_gb": r["peak_mem_bytes"] / 2**30, "mfu": mfu}  # fmt: skip
    return out


# ----------------------------------------------------------------------------- stages


def stage_env(ctx) -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_count": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    for name in ("triton", "deepspeed", "transformers", "open_clip", "webdataset", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 -- a missing package is a finding, not a failure
            out[name] = f"missing: {type(e).__name__}: {e}"
    try:
        out["nvidia_smi"] = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                                "power.limit,temperature.gpu", "--format=csv"], ctx.log, 30).strip()  # fmt: skip
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    if not torch.cuda.is_available():
        out["device"] = "cpu"
        return out
    p = torch.cuda.get_device_properties(0)
    out.update(device=p.name, sms=p.multi_processor_count, memory_gb=p.total_memory / 2**30,
               capability=f"{p.major}.{p.minor}")  # fmt: skip
    import triton.testing

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    out["bf16_matmul_tflops_8192"] = 2 * n**3 / (ms * 1e-3) / 1e12
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    out["copy_gb_per_s"] = 2 * x.numel() * 2 / (ms * 1e-3) / 1e9  # bytes read + written
    return out


def stage_train_compiled(ctx) -> dict:
    args = [*train_model_args(ctx.dry), "engine.compile=true", *steps_args(ctx.dry), "--torch",
            "--ours-config", "engine.precision=bf16", "--ours-change", "no_guard",
            "--profile", ctx.path("profile_compiled.json")]  # fmt: skip
    res = bench_train(args, ctx.log, ctx.path("train_compiled_bench.json"), ctx.dry)
    with open(ctx.path("profile_compiled.json")) as f:
        profile = json.load(f)
    return {"rows": rows(res), "flops_per_sample": res["flops_per_sample"], "batch": res["batch_size"],
            "profile": profile, "header": res["header"]}  # fmt: skip


def stage_train_openclip(ctx) -> dict:
    args = [*train_model_args(ctx.dry), "engine.compile=true", *steps_args(ctx.dry), "--openclip",
            "--openclip-compile"]  # fmt: skip
    res = bench_train(args, ctx.log, ctx.path("train_openclip_bench.json"), ctx.dry)
    return {"rows": rows(res), "flops_per_sample": res["flops_per_sample"], "batch": res["batch_size"],
            "header": res["header"]}  # fmt: skip


def stage_train_eager(ctx) -> dict:
    args = [*train_model_args(ctx.dry), "engine.compile=false", *steps_args(ctx.dry, 6, 2), "--openclip", "--torch",
            "--ours-config", "engine.precision=bf16", "--ours-config", "model.attention=sdpa"]  # fmt: skip
    res = bench_train(args, ctx.log, ctx.path("train_eager_bench.json"), ctx.dry)
    return {"rows": rows(res), "flops_per_sample": res["flops_per_sample"], "batch": res["batch_size"],
            "header": res["header"]}  # fmt: skip


def stage_vit_l14(ctx) -> dict:
    base = [*train_model_args(ctx.dry, "ViT-L-14"), "engine.compile=true"]
    out = {}
    for ckpt in ("false", "true"):
        try:
            args = [*base, f"model.grad_checkpointing={ckpt}", *steps_args(ctx.dry, 6, 2)]
            res = bench_train(args, ctx.log, ctx.path("vit_l14_bench.json"), ctx.dry)
            return {"grad_checkpointing": ckpt == "true", "rows": rows(res), "batch": res["batch_size"],
                    "flops_per_sample": res["flops_per_sample"], **out}  # fmt: skip
        except RuntimeError as e:
            out[f"failed_with_grad_checkpointing_{ckpt}"] = str(e)[-400:]
    raise RuntimeError(json.dumps(out))


def stage_batch512(ctx) -> dict:
    batch = 16 if ctx.dry else 512
    args = [*train_model_args(ctx.dry, batch=batch), f"train.batch_size={batch}", "engine.compile=true",
            *steps_args(ctx.dry, 6, 2), "--ours-config", "engine.precision=bf16"]  # fmt: skip
    res = bench_train(args, ctx.log, ctx.path("batch512_bench.json"), ctx.dry)
    return {"rows": rows(res), "flops_per_sample": res["flops_per_sample"], "batch": res["batch_size"]}


def stage_kernels(ctx) -> dict:
    out = {}
    attn = [sys.executable, os.path.join(TOOLS, "bench_attention.py")]
    # ViT-B/16, CLIP text (causal), ViT-L/14 and a long sequence; each shape autotunes its own Triton configs
    attn += ["--scale", "0.0078125", "--iters", "1", "--shapes", "0,1"] if ctx.dry else ["--shapes", "0,1,2,4"]
    text = sh(attn, ctx.log)
    out["attention_table"] = [line for line in text.splitlines() if line.startswith("|")]
    loss = [sys.executable, os.path.join(TOOLS, "bench_kernels.py"), "loss", "--json", ctx.path("loss.json")]
    if ctx.dry:
        loss += ["--batch", "512", "--dim", "64", "--impls", "ours", "naive", "--reps", "2"]
    else:
        loss += ["--batch", "16384", "65536", "--dim", "512", "--impls", "ours", "naive", "open_clip", "--reps", "20",
                 "--budget-s", "8"]  # fmt: skip
    sh(loss, ctx.log)
    with open(ctx.path("loss.json")) as f:
        out["loss_rows"] = json.load(f)["rows"]
    return out


TEST_LINE = re.compile(r"(?:\[gw\d+\]\s+(?:\[\s*\d+%\]\s+)?)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)")
TEST_LINE_PLAIN = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def stage_tests(ctx) -> dict:
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rf", "--durations=10"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "30" if ctx.dry else "45"]
    if importlib.util.find_spec("xdist") and not ctx.dry:
        cmd += ["-n", "8"]
    if ctx.dry:  # a few chunked-path tests: the stage's machinery, not the kernels (CUDA tests skip on the CPU)
        cmd += ["tests/kernels/test_contrastive_loss.py", "-k", "chunked and not interp and 64", "-x"]
    else:
        cmd += ["tests/kernels", "-k", "not interp"]
    # pytest runs to its own end or the stage's limit; the outcome of each finished test is parsed from -v lines
    start = ctx.log.tell()
    try:
        text = sh(cmd, ctx.log, timeout=ctx.remaining() - 5, check=False)
        finished = True
    except subprocess.TimeoutExpired:
        ctx.log.flush()
        with open(ctx.log.name, errors="replace") as f:
            f.seek(start)
            text = f.read()
        finished = False
    outcomes = {}
    for line in text.splitlines():
        m = TEST_LINE.search(line)
        if m:
            outcomes[m.group(2)] = m.group(1)
            continue
        m = TEST_LINE_PLAIN.search(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
    counts = {}
    for v in outcomes.values():
        counts[v] = counts.get(v, 0) + 1
    timeouts = [line.strip()[:300] for line in text.splitlines() if "Timeout" in line and "+++" in line]
    return {
        "finished": finished,
        "counts": counts,
        "failed": sorted(k for k, v in outcomes.items() if v in ("FAILED", "ERROR")),
        "timeouts": timeouts,  # fmt: skip
        "durations": [line for line in text.splitlines() if re.match(r"^\d+\.\d+s (call|setup)", line)],
    }


def _photo_shards(folder: str, n_images: int, n_shards: int, size: tuple, workers: int) -> list:
    """JPEG shards of photo-sized images (random crops, flips and colour shifts of scikit-image's photos)."""
    from concurrent.futures import ProcessPoolExecutor

    os.makedirs(folder, exist_ok=True)
    per = n_images // n_shards
    jobs = [(os.path.join(folder, f"{i:05d}.tar"), i * per, per, size) for i in range(n_shards)]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(_write_shard, jobs))


def _write_shard(job) -> str:
    import io
    import tarfile

    import numpy as np
    import skimage.data
    from PIL import Image

    path, start, count, (w, h) = job
    rng = np.random.default_rng(start)
    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        try:  # bundled with scikit-image; a version that would download one is skipped (no network there)
            photo = getattr(skimage.data, name)()
            photos.append(photo if photo.ndim == 3 else np.stack([photo] * 3, -1))
        except Exception:  # noqa: BLE001
            pass
    if not photos:  # smooth random colour fields: still photo-like JPEG sizes
        photos = [np.kron(rng.integers(0, 256, (24, 32, 3)), np.ones((20, 20, 1))).astype(np.uint8)]
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            src = Image.fromarray(photos[i % len(photos)])
            scale = rng.uniform(1.0, 1.6)
            img = src.resize((int(w * scale), int(h * scale)))
            x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
            img = img.crop((int(x), int(y), int(x) + w, int(y) + h))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, size=3)
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo number {i}".encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def stage_data(ctx) -> dict:
    import torch

    cores = os.cpu_count() or 1
    n_images, n_shards, size = (512, 4, (160, 120)) if ctx.dry else (6144, 24, (640, 480))
    folder = os.path.join(ctx.stage_dir, "photo_shards")
    t0 = time.perf_counter()
    _photo_shards(folder, n_images, n_shards, size, max(1, cores))
    urls = os.path.join(folder, f"{{00000..{n_shards - 1:05d}}}.tar")
    out = {
        "shards": n_shards,
        "images": n_images,
        "image_size": list(size),
        "make_s": time.perf_counter() - t0,
        "mb_per_image": sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.tar"))) / n_images / 1e6,
    }
    # a power of two, so that ranks x workers divides data.num_streams (16 here: the largest power of two <= 16
    # dividing the batch and the shards)
    workers = 2 if ctx.dry else 1 << (max(1, cores - 2).bit_length() - 1)
    batch = 32 if ctx.dry else 256
    # the loader alone: samples/s with `workers` processes (224 px train transform, resampled shards)
    from mmpretrain.config import load_config
    from mmpretrain.data import Tokenizer, build_train_loader

    cfg = load_config("configs/vit-b-16-laion.yaml", [f"data.train.urls={urls}", f"data.num_workers={workers}",
                                                       "data.train.resampled=true"])  # fmt: skip
    loader = build_train_loader(cfg.data, tokenizer=Tokenizer(context_length=77), image_size=224, batch_size=batch,
                                rank=0, world_size=1, seed=0, start_batch=0)  # fmt: skip
    it = iter(loader)
    for _ in range(2 if ctx.dry else 4):
        next(it)
    n = 4 if ctx.dry else 30
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(it)
    dt = time.perf_counter() - t0
    del it, loader
    out.update(loader_workers=workers, loader_batch=batch, loader_samples_per_s=n * batch / dt,
               loader_image_shape=list(b["image"].shape))  # fmt: skip
    # a real-shard training run at the compiled step rate: data_wait_frac from its metrics.jsonl
    run_dir = os.path.join(ctx.stage_dir, "data_run")
    steps, log_every = (6, 2) if ctx.dry else (60, 10)
    model = (["model.name=tiny", "model.vision.image_size=224", "model.vision.patch_size=32"] if ctx.dry else
             ["model.grad_checkpointing=false"])  # fmt: skip
    cmd = [sys.executable, "-m", "mmpretrain.train", "configs/vit-b-16-laion.yaml", f"output_dir={run_dir}",
           f"data.train.urls={urls}", f"data.num_workers={workers}", f"train.batch_size={batch}",
           f"train.steps={steps}", "engine.zero_stage=0", "engine.precision=amp_bf16", "engine.compile=true",
           "checkpoint.every_steps=0", "eval.every_steps=0", "logging.wandb=disabled", "logging.progress=false",
           f"logging.log_every={log_every}", "optim.warmup_steps=2", *model]  # fmt: skip
    sh(cmd, ctx.log, timeout=ctx.remaining() - 5)
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"data_wait_frac"' in line]
    out["run_windows"] = [{k: r.get(k) for k in ("step", "samples_per_s", "data_wait_frac", "loss")} for r in lines]
    steady = lines[1:] or lines  # the first window holds the compile
    out["run_samples_per_s"] = sum(r["samples_per_s"] for r in steady) / len(steady)
    out["run_data_wait_frac"] = sum(r["data_wait_frac"] for r in steady) / len(steady)
    out["cuda"] = torch.cuda.is_available()
    return out


STAGE_FNS = {
    "env": stage_env,
    "train_compiled": stage_train_compiled,
    "train_openclip": stage_train_openclip,
    "train_eager": stage_train_eager,
    "kernels": stage_kernels,
    "data": stage_data,
    "tests": stage_tests,
    "vit_l14": stage_vit_l14,
    "batch512": stage_batch512,
}


# ----------------------------------------------------------------------------- the child: one stage


class StageContext:
    def __init__(self, name: str, stage_dir: str, dry: bool, deadline: float, log):
        self.name, self.stage_dir, self.dry, self.deadline, self.log = name, stage_dir, dry, deadline, log

    def path(self, filename: str) -> str:
        return os.path.join(self.stage_dir, filename)

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.time())


def run_stage_child(name: str, stage_dir: str, dry: bool, deadline: float) -> int:
    """Runs in the child process: one stage; writes <stage>.json (result or error)."""
    with open(os.path.join(stage_dir, f"{name}.log"), "a") as log:
        ctx = StageContext(name, stage_dir, dry, deadline, log)
        if dry and os.environ.get("GPU_CHECK_HANG") == name:
            time.sleep(3600)  # tests: a stage that hangs, to be killed at its limit (dry runs only)
        try:
            result = {"status": "ok", **STAGE_FNS[name](ctx)}
        except Exception as e:  # noqa: BLE001 -- any failure is this stage's result
            import traceback

            log.write(traceback.format_exc())
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-2000:]}
    with open(os.path.join(stage_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0 if result["status"] == "ok" else 1


# ----------------------------------------------------------------------------- the parent: every stage


def run_stage(stage: Stage, args, limit: float) -> dict:
    """Start the stage in its own session; kill the whole session at its limit."""
    path = os.path.join(args.stage_dir, f"{stage.name}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage.name, "--stage-dir", args.stage_dir,
           "--deadline", str(time.time() + limit)] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        proc.wait(timeout=limit)
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started
        proc.wait()
        status = "timeout"
    wall = time.perf_counter() - t0
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers (data workers, compile workers)
    except ProcessLookupError:
        pass
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    if status == "timeout":
        result = {**result, "status": "timeout", "error": f"killed at its limit of {limit:.0f} s"}
    elif not result:
        result = {"status": "failed", "error": f"exited {proc.returncode} without a result"}
    result.update(wall_s=round(wall, 1), limit_s=round(limit, 1))
    return result


def write_outputs(args, results: dict, started: str) -> None:
    summary = {"command": " ".join(sys.argv), "started": started, "dry_run": args.dry_run, "budget_s": args.budget_s,
               "stages": results}  # fmt: skip
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "gpu_check.log"), "w") as out:
        for name in results:
            log = os.path.join(args.stage_dir, f"{name}.log")
            out.write(f"===== {name}: {results[name].get('status')} ({results[name].get('wall_s')} s)\n")
            if os.path.exists(log):
                text = open(log, errors="replace").read()
                out.write(text if len(text) < 400_000 else text[:100_000] + "\n[...]\n" + text[-300_000:])


def summary_lines(results: dict) -> list:
    lines = ["| stage | status | wall s | headline |", "|---|---|---:|---|"]
    for name, r in results.items():
        head = ""
        if r.get("rows"):
            best = max(r["rows"].items(), key=lambda kv: kv[1]["samples_per_s"])
            mfu = best[1]["mfu"]
            head = f"best {best[0]}: {best[1]['samples_per_s']:.0f} samples/s" + (f", MFU {mfu:.1%}" if mfu else "")
        elif name == "env":
            head = f"{r.get('device')} torch {r.get('torch')} triton {r.get('triton')}"
        elif name == "tests":
            head = f"{r.get('counts')} finished={r.get('finished')}"
        elif name == "data" and "run_data_wait_frac" in r:
            head = (f"loader {r['loader_samples_per_s']:.0f}/s; run {r['run_samples_per_s']:.0f}/s, "
                    f"data_wait {r['run_data_wait_frac']:.1%}")  # fmt: skip
        elif name == "kernels" and r.get("attention_table"):
            head = f"{len(r['attention_table']) - 2} attention rows, {len(r.get('loss_rows', []))} loss rows"
        if r.get("error"):
            head = (head + " " + r["error"]).strip()[:200]
        lines.append(f"| {name} | {r.get('status')} | {r.get('wall_s')} | {head} |")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stages: " + "; ".join(f"{s.name} ({s.help}, {s.limit_s:.0f} s)"
                                                              for s in STAGES))  # fmt: skip
    p.add_argument("--out", help="folder for results.json and gpu_check.log (required unless --stage)")
    p.add_argument("--stage-dir", default=None, help="folder for each stage's JSON and log (default OUT/stages)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes")
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma list, run in this order")
    p.add_argument("--budget-s", type=float, default=540.0, help="total wall time for all stages (default 540)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage (the child)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage is None and not args.out:
        p.error("--out is required")
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in STAGE_NAMES]
    if unknown:
        p.error(f"--stages: unknown {unknown} (known: {', '.join(STAGE_NAMES)})")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # trace with dynamo but generate no code: the compiled paths are exercised in seconds, not minutes
        os.environ.setdefault("MMPRETRAIN_COMPILE_BACKEND", "eager")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.stage:
        return run_stage_child(args.stage, args.stage_dir, args.dry_run, args.deadline)
    args.stage_dir = args.stage_dir or os.path.join(args.out, "stages")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.stage_dir, exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t_end = time.perf_counter() + args.budget_s
    results = {}
    by_name = {s.name: s for s in STAGES}
    for name in args.stages:
        stage = by_name[name]
        left = t_end - time.perf_counter()
        limit = min(stage.dry_limit_s if args.dry_run else stage.limit_s, left)
        if limit < 10:
            results[name] = {"status": "skipped", "error": f"budget spent ({left:.0f} s left)"}
            continue
        print(f"[gpu_check] {name}: limit {limit:.0f} s ({left:.0f} s of the budget left)", flush=True)
        results[name] = run_stage(stage, args, limit)
        print(f"[gpu_check] {name}: {results[name]['status']} in {results[name]['wall_s']} s", flush=True)
        write_outputs(args, results, started)
    write_outputs(args, results, started)
    print("\n".join(summary_lines(results)), flush=True)
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
