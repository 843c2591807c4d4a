"""Train a CLIP or SigLIP model on WebDataset shards under DeepSpeed.

    python -m mmpretrain.train configs/demo.yaml [key=value ...]
    torchrun --nproc_per_node=2 -m mmpretrain.train configs/demo.yaml engine.zero_stage=3
    mmpretrain-train demo                # installed package, no checkout: the bundled configs/demo.yaml

Restarting the same command resumes from ``<output_dir>/checkpoints/latest``.
``--stop-after-steps N`` ends this invocation after N steps with a checkpoint (for time-sliced
jobs); the next invocation of the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from mmpretrain import checkpoint
from mmpretrain.config import Config, ConfigError, diff_configs, from_yaml_file, load_config, to_dict, to_yaml
from mmpretrain.data.pipeline import DataFaultError
from mmpretrain.distributed import all_gather_object, all_reduce, barrier, env_rank_world, init_distributed, world_rank
from mmpretrain.eval.suite import evaluate_all
from mmpretrain.faults import EXIT_STOPPED, Injector, NonFiniteError, SkipTracker, StepGuard, StopRequest

# Keys that may change between a run and its restart: they do not touch weights or data order.
RESTART_MAY_CHANGE = ("logging.",)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mmpretrain.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML file, or the name of a bundled config (configs/): demo, recipes/clip-tiny ...")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.name=tiny")
    p.add_argument("--stop-after-steps", type=int, default=0, help="checkpoint and exit after N steps (0 = run on)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def check_restart(cfg: Config) -> None:
    """Refuse to mix settings: a restart must use the config its run folder was started with."""
    path = os.path.join(cfg.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    old = to_dict(from_yaml_file(path))
    changed = [c for c in diff_configs(old, to_dict(cfg)) if not c.startswith(RESTART_MAY_CHANGE)]
    if changed:
        raise ConfigError(
            f"output_dir {cfg.output_dir} holds a run started with other settings ({'; '.join(changed)}); "
            f"its config.yaml is kept. Restore those settings to resume, or choose a new output_dir"
        )


def resolve_data_paths(cfg: Config, is_main: bool) -> None:
    """Generate the synthetic demo shards if the config asks for them (rank 0), then point data at them."""
    from mmpretrain.data import with_synthetic_data

    d = cfg.data
    if d.synthetic.root and None in (d.train.urls if d.train.sources is None else 1, d.eval.zeroshot, d.eval.retrieval):
        if is_main:
            with_synthetic_data(cfg.data)
        barrier()
        cfg.data = with_synthetic_data(cfg.data)


def init_weights(model, path: str) -> None:
    """Load a whole model's weights (our runs, consolidated, HF or OpenCLIP folders) strictly."""
    from mmpretrain.convert import read_any

    try:
        sd, _ = read_any(path)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    # Objective heads (model.heads.*) are training-only: a run without them may start from weights with them, and
    # a run with new heads starts them fresh.
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("heads.") or k in model.state_dict()}
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ConfigError(
            f"model.init_from: {path} does not fit this model (check model.name and sizes): "
            f"{len(missing)} missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]}, "
            f"{len(wrong)} of other shape e.g. {wrong[:2]}"
        )
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all(k.startswith("heads.") for k in result.missing_keys), result


@dataclass
class StepResult:
    loss: torch.Tensor  # global-batch loss: the summed terms, mean over ranks (the same on every rank)
    grad_norm: float | None  # before clipping; None for a skipped step
    logit_scale: torch.Tensor
    skipped: bool  # the loss or a gradient was non-finite on some rank: no optimizer step
    stop: bool  # some rank was asked to stop (signal or stop file)
    terms: dict  # {term name: unweighted value, mean over ranks} (floats)


def train_step(
    engine, batch, cfg: Config, device, guard=None, injector=None, stop_requested: bool = False, objective=None,
    step: int = 0,
) -> StepResult:  # fmt: skip
    """One optimizer step on this rank's batch, or none if any rank saw a non-finite loss or gradient.

    One collective per step decides, on every rank alike, whether to skip the update and whether to stop
    (it also averages the terms' values over ranks, for the log).
    ``guard`` (a StepGuard on engine.module) adds the check of every gradient; without it only the loss
    is checked. ``injector`` injects test faults (None: none). ``objective``: the run's
    mmpretrain.objectives.Objective (heads attached, set up); None builds one from cfg (terms without heads).
    """
    from mmpretrain.data.transforms import normalize_images
    from mmpretrain.engine import grad_norm_after_step, grad_norm_before_step, input_dtype
    from mmpretrain.faults import discard_gradients
    from mmpretrain.objectives import Objective, StepContext

    objective = objective or Objective(cfg)
    # (B, 3, H, W), B per rank, in the weights' dtype
    images = normalize_images(batch["image"].to(device, non_blocking=True), input_dtype(cfg.engine))
    tokens = batch["text"].to(device, non_blocking=True)  # (B, L)
    injector = injector or Injector(None, rank=0)
    if guard is not None:
        guard.reset()
    if cfg.train.accum_steps > 1:
        from mmpretrain.loss import grad_cache_step

        def backward(surrogate, last):
            engine.set_gradient_accumulation_boundary(last)  # ZeRO-0/1/2 reduce once, after the last
            engine.backward(surrogate)

        k = cfg.train.accum_steps
        micro = list(zip(images.chunk(k), tokens.chunk(k)))
        scales = []

        def forward(mb):
            out = engine(*mb)
            scales.append(out.logit_scale.detach())
            return out

        gc_values = {}

        def loss_fn(features):  # the concatenated features of all micro-batches (one contrastive term)
            total, vals = objective(StepContext(features, None, None, batch, engine, None, cfg.loss, step))
            gc_values.update(vals)
            return injector.loss(total)

        loss = grad_cache_step(forward, micro, loss_fn, backward)
        logit_scale = scales[-1]
        values = {n: v.detach() for n, v in gc_values.items()}
    else:
        out = engine(images, tokens, **objective.forward_kwargs())
        ctx = StepContext(out, images, tokens, batch, engine, None, cfg.loss, step)  # group None: the world
        loss, values = objective(ctx)  # loss over the global batch, same value on every rank
        loss = injector.loss(loss)
        engine.backward(loss)
        logit_scale = out.logit_scale.detach()
    bad = ~torch.isfinite(loss.detach()).all()
    if guard is not None:
        bad = bad | guard.bad
    world, _ = world_rank()
    names = list(values)
    # values / world, summed over ranks: the mean over ranks (a per-rank term such as MIM differs between ranks)
    means = [t.detach().float().reshape(()).to(bad.device) / world for t in (loss, *(values[n] for n in names))]
    flags = torch.stack([bad.float(), torch.tensor(float(stop_requested), device=bad.device), *means])
    all_reduce(flags)  # the one collective of the step: every rank decides alike (sum; none on one rank)
    flags = flags.tolist()  # one device-to-host copy for every decision and logged value of the step
    skipped, stop = flags[0] > 0, flags[1] > 0
    mean_loss = torch.tensor(flags[2])  # on the host: the loop's .item() costs no further sync
    terms = dict(zip(names, flags[3:]))
    if skipped:
        discard_gradients(engine)
        return StepResult(mean_loss, None, logit_scale, True, stop, terms)
    norm = grad_norm_before_step(engine, cfg.optim.grad_clip)
    engine.step()
    if norm is None:
        norm = grad_norm_after_step(engine)
    return StepResult(mean_loss, norm, logit_scale, False, stop, terms)


def gather_data_stats(window: dict) -> dict:
    """This log window's data stats summed over ranks (a collective)."""
    from mmpretrain.data import merge_data_stats

    parts = all_gather_object(window)  # collective
    if len(parts) == 1:
        return window
    total: dict = {}
    for part in parts:
        total = merge_data_stats(total, part)
    return total


def data_metrics(total: dict, window: dict) -> dict:
    """Flat metrics: samples read and skipped (run totals, by reason) and this window's share of each source."""
    skipped = total.get("skipped", {})
    out = {"skipped_samples": sum(skipped.values()), "data/read": total.get("read", 0)}
    out.update({f"data/skipped/{reason}": n for reason, n in skipped.items()})
    good = sum(window.get("sources", {}).values())
    out.update({f"data/source/{name}": n / good for name, n in window.get("sources", {}).items() if good})
    return out


def run_eval(engine, tokenizer, cfg: Config, dist_info) -> dict:
    """Zero-shot / retrieval on every rank (ZeRO-3 holds the weights in parts), reduced; rank 0 logs."""
    return evaluate_all(
        engine.module, tokenizer, cfg.data.eval, cfg.eval, image_size=cfg.model.vision.image_size,
        rank=dist_info.rank, world_size=dist_info.world_size, device=dist_info.device,
    )  # fmt: skip


def train(cfg: Config, stop_after_steps: int = 0) -> dict:
    """Run (or resume) training; returns the final metrics of this invocation."""
    from mmpretrain.data import Tokenizer, build_train_loader, check_bad_fraction, merge_data_stats
    from mmpretrain.engine import build_engine, set_cpu_threads
    from mmpretrain.logging import MetricsLogger, new_run_id
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective

    check_restart(cfg)
    dist_info = init_distributed(cfg.engine.dist_timeout_s)
    rank, world, device, is_main = dist_info.rank, dist_info.world_size, dist_info.device, dist_info.is_main
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    set_cpu_threads(cfg.engine, ranks_on_node=ranks_on_node, data_workers=cfg.data.num_workers)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if is_main and not os.path.isfile(os.path.join(cfg.output_dir, "config.yaml")):
        # written before synthetic data paths are filled in, so a restart compares like with like
        checkpoint.write_atomic(os.path.join(cfg.output_dir, "config.yaml"), to_yaml(cfg))
    resolve_data_paths(cfg, is_main)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)  # before the engine: ZeRO shards the heads and the optimizer steps them
    if cfg.model.init_from:
        init_weights(model, cfg.model.init_from)
    per_rank_batch = cfg.train.batch_size // world
    load_tag, universal = checkpoint.prepare_resume(
        cfg.output_dir, world_size=world, zero_stage=cfg.engine.zero_stage, rank=rank
    )
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=per_rank_batch, total_steps=cfg.train.steps,
                          load_universal=universal)  # fmt: skip
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank stream for dropout / patch dropout
    objective.setup(device)  # e.g. load a distillation teacher

    meta = checkpoint.resume(engine, cfg.output_dir, rank, tag=load_tag)
    step = meta["step"] if meta else 0
    samples_seen = meta["samples_seen"] if meta else 0
    data_total = meta.get("data_stats", {}) if meta else {}  # broken samples by reason and shard, sources
    skips = SkipTracker(cfg.train.max_skips_in_a_row, total=meta.get("skipped_steps", 0) if meta else 0)
    run_id = meta["wandb_run_id"] if meta else new_run_id()
    cfg_dict = to_dict(cfg)
    log = MetricsLogger(cfg.logging, cfg.output_dir, is_main=is_main, run_id=run_id, config=cfg_dict,
                        start_step=step, total_steps=cfg.train.steps)  # fmt: skip
    if meta:
        log.write(f"resumed from {checkpoint.checkpoint_root(cfg.output_dir)}/step_{step}")
        if meta["world_size"] != world:
            log.write(
                f"the checkpoint was written by {meta['world_size']} ranks, this launch has {world}: weights and "
                "optimizer state continue; the data order from here on is that of the new world size"
            )

    # before the loader forks its workers (they inherit the handlers and so survive a job-wide signal)
    # rank 0 looks at the stop file; the step's collective tells the others
    stop_file = os.environ.get("MMPRETRAIN_STOP_FILE") or os.path.join(cfg.output_dir, "STOP")
    stopper = StopRequest(stop_file if is_main else None).install()
    if stopper.clear_stale_file():
        log.write(f"removed a stale stop file {stop_file} (its run ended before acting on it)")
    injector = Injector.from_env(rank)
    guard = StepGuard(engine.module, device, injector)

    tokenizer = Tokenizer(context_length=cfg.model.text.context_length)
    loader = build_train_loader(
        cfg.data, tokenizer=tokenizer, image_size=cfg.model.vision.image_size, batch_size=per_rank_batch,
        rank=rank, world_size=world, seed=cfg.train.seed, start_batch=step,
    )  # fmt: skip
    batches = iter(loader)
    key_log = None
    if cfg.logging.sample_keys:
        key_log = open(os.path.join(cfg.output_dir, f"sample_keys_rank{rank}.jsonl"), "a")

    def save(at_step: int) -> str:
        extra = {"samples_seen": samples_seen, "config": cfg_dict, "world_size": world, "wandb_run_id": run_id,
                 "data_stats": data_total, "skipped_steps": skips.total,
                 "data": {"batches_consumed_per_rank": at_step}}  # fmt: skip
        return checkpoint.save(engine, cfg.output_dir, at_step, extra, rank, cfg.checkpoint.keep_last,
                               before_commit=injector.during_save)  # fmt: skip

    last: dict = {}
    t_last, wait, loss_sum, steps_in_window, batches_in_window = time.perf_counter(), 0.0, 0.0, 0, 0
    data_window: dict = {}
    term_sums: dict = {}  # {term: sum of its unweighted values over this window's good steps}
    start_step, saved_at, stop = step, (f"step_{step}" if meta else None), False
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        injector.begin_step(step + 1)
        res = train_step(engine, batch, cfg, device, guard, injector, stopper.requested(), objective, step + 1)
        step += 1  # a batch consumed: skipped steps count too, so the data position stays step x batch
        if key_log is not None:
            key_log.write(json.dumps({"step": step, "keys": batch["keys"]}) + "\n")
            key_log.flush()
        samples_seen += cfg.train.batch_size
        data_window = merge_data_stats(data_window, batch["data_stats"])
        batches_in_window += 1
        if not res.skipped:
            loss_sum += res.loss.item()
            steps_in_window += 1
            for name, value in res.terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value
        skips.update(step, res.skipped, "loss or gradient", saved_at)
        log.advance()

        stop = res.stop or bool(stop_after_steps and step - start_step >= stop_after_steps)
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps or stop:
            window = gather_data_stats(data_window)  # collective: every rank logs at the same steps
            data_total = merge_data_stats(data_total, window)
            # every rank holds the same totals, so every rank stops alike (no rank left in a collective)
            check_bad_fraction(data_total, max_bad_fraction=cfg.data.max_bad_fraction,
                               min_samples=cfg.data.bad_min_samples)  # fmt: skip
            elapsed = time.perf_counter() - t_last
            last = {
                "samples_seen": samples_seen,
                "loss": loss_sum / steps_in_window if steps_in_window else float("nan"),
                **{f"loss/{n}": v / steps_in_window for n, v in term_sums.items()},
                "lr": engine.get_lr()[0],
                "logit_scale": res.logit_scale.float().item(),
                "samples_per_s": batches_in_window * cfg.train.batch_size / elapsed,
                "data_wait_frac": wait / elapsed,
                "grad_norm": res.grad_norm,
                **data_metrics(data_total, window),
                "skipped_steps": skips.total,
            }
            log.log(step, last)
            t_last, wait, loss_sum, steps_in_window, batches_in_window = time.perf_counter(), 0.0, 0.0, 0, 0
            data_window, term_sums = {}, {}

        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not skips.in_a_row:
            saved_at = save(step)  # never in a run of skipped steps: the last checkpoint stays a good one
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.steps and not stop:
            log.log(step, run_eval(engine, tokenizer, cfg, dist_info))
        if stop:
            break

    if saved_at != f"step_{step}" and step > start_step:
        saved_at = save(step)
    stopped_on_request = stop and res.stop
    if stopped_on_request:
        log.write(f"stopped on request ({stopper.reason() if stopper.requested() else 'another rank'}) after "
                  f"step {step}; checkpoint {saved_at} saved; rerun the same command to resume")  # fmt: skip
        stopper.acknowledge()
    stopper.uninstall()
    if key_log is not None:
        key_log.close()
    del batches  # shut the loader's workers down now, while signals are ours again
    results = {}
    if step >= cfg.train.steps:
        results = run_eval(engine, tokenizer, cfg, dist_info)
        if results:
            log.log(step, results)
            if is_main:
                with open(os.path.join(cfg.output_dir, "eval.json"), "w") as f:
                    json.dump({"step": step, **results}, f, indent=1)
    log.close()
    if is_main:
        _print_summary(cfg, step, saved_at, results, stopped=step < cfg.train.steps)
    return {**last, **results, "step": step, "stopped_on_request": stopped_on_request}


def _print_summary(cfg: Config, step: int, tag: str | None, results: dict, stopped: bool) -> None:
    out = cfg.output_dir
    lines = [f"\n{'stopped' if stopped else 'finished'} at step {step}/{cfg.train.steps}. Outputs in {out}/:"]
    lines.append("  config.yaml     resolved config of this run")
    lines.append("  metrics.jsonl   one JSON line per log step (plot: mmpretrain-plot " + out + ")")
    if tag:
        lines.append(f"  checkpoints/{tag}  DeepSpeed state + meta.json (latest: checkpoints/latest)")
    if results:
        lines.append("  eval.json       final evaluation:")
        lines += [f"    {k:40s} {v:.4f}" for k, v in results.items() if isinstance(v, float)]
    if stopped:
        lines.append("rerun the same command to resume.")
    print("\n".join(lines), flush=True)


# Errors every rank raises alike (decided by a collective): one line from rank 0, exit 1, no traceback.
AGREED_ERRORS = (NonFiniteError, DataFaultError)


@record  # under torchrun: an exception on any rank is written where the launcher reports it as the root cause
def main(argv=None) -> None:
    """Exit codes: 0 finished (or --stop-after-steps), 2 bad config, 75 stopped on request with a checkpoint
    saved (rerun to resume), 1 any other error. An unexpected error on one rank ends the others: torchrun
    stops the remaining workers, and a rank waiting on a dead peer fails within engine.dist_timeout_s."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = env_rank_world()[0]
    code = 0
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, stop_after_steps=args.stop_after_steps)
        code = EXIT_STOPPED if result.get("stopped_on_request") else 0
    except ConfigError as e:
        if rank == 0:
            print(f"mmpretrain.train: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except AGREED_ERRORS as e:
        if rank == 0:
            print(f"mmpretrain.train: error: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        from mmpretrain.distributed import destroy

        destroy()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
