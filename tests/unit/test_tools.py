"""mmpretrain-plot (mmpretrain/tools/plot_metrics.py) and tools/bench_train.py: plots, errors, the FLOP count, a 2-step
benchmark run; every command's --help exits 0."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mmpretrain.tools import plot_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench_train = load_tool("bench_train")


# ----------------------------------------------------------------------------- plot_metrics


def write_run(folder, records, extra_lines=()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(folder)


def train_record(step, loss):
    return {"step": step, "samples_seen": 16 * step, "loss": loss, "lr": 1e-3 * step, "logit_scale": 14.3,
            "samples_per_s": 100.0, "data_wait_frac": 0.1, "grad_norm": 2.0, "skipped_samples": 0}  # fmt: skip


def test_plot_metrics_writes_png_with_one_plot_per_key(tmp_path, capsys):
    a = write_run(
        tmp_path / "a",
        [train_record(s, 5.0 - 0.1 * s) for s in range(1, 6)]
        + [{"step": 5, "zeroshot/shapes/top1": 0.4, "zeroshot/shapes/num_samples": 64}],
        extra_lines=['{"step": 6, "loss": 4.'],
    )  # fmt: skip  (a line cut by a kill)
    b = write_run(tmp_path / "b", [train_record(s, 5.2 - 0.1 * s) for s in range(1, 4)])
    out = str(tmp_path / "plots" / "cmp.png")

    assert plot_metrics.main([a, b, "--out", out]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[0] > 100
    err = capsys.readouterr().err
    assert "skipped 1 unreadable line" in err
    records, bad = plot_metrics.read_metrics(a)
    assert (len(records), bad) == (6, 1)
    # the eval metric is plotted, its sample count is not
    assert plot_metrics.default_keys({"a": records}) == [*plot_metrics.TRAIN_KEYS, "zeroshot/shapes/top1"]
    present = plot_metrics.plot({"a": records}, ["loss", "zeroshot/shapes/top1", "nothing"], str(tmp_path / "k.png"))
    assert present == ["loss", "zeroshot/shapes/top1"]


@pytest.mark.parametrize("case", ["no_folder", "no_metrics", "no_values"])
def test_plot_metrics_errors_in_one_line(tmp_path, capsys, case):
    if case == "no_folder":
        args, expected = [str(tmp_path / "missing")], "no such run folder"
    elif case == "no_metrics":
        args, expected = [str(tmp_path)], "no metrics.jsonl"
    else:
        args, expected = [write_run(tmp_path / "r", [train_record(1, 5.0)]), "--keys", "foo"], "has a value"
    assert plot_metrics.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpretrain-plot: error:") and expected in err and "\n" not in err


# ----------------------------------------------------------------------------- bench_train FLOPs


def small_clip_config(**model_overrides):
    from mmpretrain.model import ModelConfig, TextConfig, VisionConfig, resolve_model_config

    cfg = ModelConfig(
        name="tiny",
        embed_dim=4,
        vision=VisionConfig(image_size=16, patch_size=8, width=8, layers=1, heads=2, mlp_dim=16),
        text=TextConfig(vocab_size=100, context_length=4, width=8, layers=1, heads=2, mlp_dim=16),
        **model_overrides,
    )
    return resolve_model_config(cfg)


def test_flops_hand_computed_small_clip():
    m = small_clip_config()
    # vision: 4 patches (+1 class token = 5 tokens), D 8, F 16, E 4; text: 4 tokens; batch 2.
    patch_embed = 2 * 4 * (3 * 8 * 8) * 8  # 12288
    block_weights = 4 * 8 * 8 + 2 * 8 * 16  # 512 weights per layer
    vision = patch_embed + 2 * 5 * block_weights + 4 * 5 * 5 * 8 + 2 * 8 * 4  # 12288 + 5120 + 800 + 64
    text = 2 * 4 * block_weights + 4 * 4 * 4 * 8 + 2 * 8 * 4  # 4096 + 512 + 64
    loss = 2 * 2 * 4
    assert (vision, text, loss) == (18272, 4672, 16)
    assert bench_train.forward_flops_per_sample(m, batch_size=2) == {"vision": vision, "text": text, "loss": loss}
    assert bench_train.train_flops_per_sample(m, batch_size=2) == 3 * (18272 + 4672 + 16)


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_flops_match_torch_flop_counter(monkeypatch, name):
    """Towers' forward FLOPs == torch's FlopCounterMode on the real model (attention as plain matmuls)."""
    from mmpretrain.kernels.attention import attention_reference
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain.model import ModelConfig, build_model, resolve_model_config

    def matmul_attention(q, k, v, causal=False, key_padding_mask=None, scale=None, impl="auto", **segments):
        return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **segments)

    # CPU SDPA has no FLOP formula in the counter: route attention through two counted matmuls.
    monkeypatch.setattr("mmpretrain.model.layers.attention", matmul_attention)
    monkeypatch.setattr("mmpretrain.model.siglip.attention", matmul_attention)
    cfg = resolve_model_config(ModelConfig(name=name))
    model = build_model(cfg).eval().requires_grad_(False)  # (torch.no_grad trips the counter's module hooks)
    B = 3
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, 1000, (B, cfg.text.context_length))
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_image(images)
        model.encode_text(tokens)
    expected = bench_train.forward_flops_per_sample(cfg, batch_size=B, training=False, pooled=True)
    assert counter.get_total_flops() == B * (expected["vision"] + expected["text"])


def test_flops_patch_dropout_counts_kept_tokens():
    full = bench_train.forward_flops_per_sample(small_clip_config(), 2)
    m = small_clip_config()
    m.vision.patch_dropout = 0.5  # 4 patches -> 2 kept + class token = 3 tokens
    dropped = bench_train.forward_flops_per_sample(m, 2)
    assert full["vision"] - dropped["vision"] == 2 * 2 * 512 + 4 * (25 - 9) * 8
    assert bench_train.forward_flops_per_sample(m, 2, training=False) == full


def test_peak_tflops_is_none_on_cpu():
    assert bench_train.peak_tflops(torch.device("cpu"), "bf16") is None


# ----------------------------------------------------------------------------- bench_train end to end


def test_bench_train_two_steps_against_openclip(monkeypatch, capsys):
    """Both implementations run, the table prints, and the OpenCLIP twin has exactly our parameter count."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # restored after the test: init_distributed sets them
    overrides = ["train.batch_size=8", "model.vision.layers=1", "model.text.layers=1", "model.text.vocab_size=1000"]
    result = bench_train.main([os.path.join(ROOT, "configs", "bench-tiny.yaml"), *overrides,
                               "--steps", "2", "--warmup", "1", "--openclip"])  # fmt: skip
    out = capsys.readouterr().out
    ours, oc = result["results"]
    assert ours["impl"].startswith("mmpretrain") and oc["impl"] == "open_clip"
    assert ours["num_params"] == oc["num_params"]
    assert "| impl | params | samples/s | step ms | peak memory MiB | MFU |" in out
    assert f"| {ours['num_params']:,} |" in out and "ratio ours/openclip" in out and "(equal;" in out
    assert "n/a" in out  # CPU: no MFU
    assert all(r["samples_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in result["results"])


def test_bench_train_rejects_openclip_for_siglip(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        bench_train.main([os.path.join(ROOT, "configs", "bench-tiny.yaml"), "model.family=siglip", "loss.name=siglip",
                          "model.embed_dim=128", "--openclip"])  # fmt: skip
    assert e.value.code == 2
    assert "bench_train: error: --openclip: model.family must be clip" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every command's --help

# Runs each command's --help in one child process (torch is imported once): a script by path, a module as `-m`.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
results = {}
for kind, target in json.loads(sys.argv[1]):
    sys.argv, out, code = [target, "--help"], io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out):
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code or 0
    except BaseException as e:
        code = f"{type(e).__name__}: {e}"
    results[target] = [code, out.getvalue()]
print("\n" + json.dumps(results))
"""


def commands() -> list[tuple[str, str]]:
    """Every tools/*.py script, and every module of the package that runs as `python -m` (a __main__ guard or a
    package's __main__.py), found in the source tree."""
    found = [("path", path) for path in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))]
    for folder, package in ((os.path.join(ROOT, "mmpretrain"), "mmpretrain"), (os.path.join(ROOT, "kernels"), None)):
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.py"), recursive=True)):
            rel = os.path.relpath(path, folder)[: -len(".py")].split(os.sep)
            name = ".".join([package or "mmpretrain.kernels", *rel])
            if rel[-1] == "__main__":
                found.append(("module", name.rsplit(".", 1)[0]))
            elif 'if __name__ == "__main__":' in open(path).read():
                found.append(("module", name))
    return found


def test_every_command_prints_its_help_and_exits_0():
    found = commands()
    assert ("module", "mmpretrain.convert") in found and ("module", "mmpretrain.tools.make_shards") in found
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(found)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {target: code for target, (code, out) in results.items() if code != 0 or "usage:" not in out}
    assert not failed, failed
    assert len(results) == len(found)


def test_plot_orders_recall_at_k_by_k():
    keys = ["retrieval/s/image_to_text_R@10", "retrieval/s/image_to_text_R@1", "retrieval/s/image_to_text_R@5",
            "zeroshot/s/top5", "zeroshot/s/top1", "retrieval/s/num_images"]  # fmt: skip
    records = [{"step": 1, **dict.fromkeys(keys, 0.5)}]
    assert plot_metrics.default_keys({"a": records})[len(plot_metrics.TRAIN_KEYS) :] == [
        "retrieval/s/image_to_text_R@1", "retrieval/s/image_to_text_R@5", "retrieval/s/image_to_text_R@10",
        "zeroshot/s/top1", "zeroshot/s/top5",
    ]  # fmt: skip
