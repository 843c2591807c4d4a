"""The training loop: ``train(cfg)`` builds (or resumes) a run and trains it; ``run`` is the command's body.

``python -m mmpretrain.train`` (mmpretrain/train.py) parses the command line and calls ``run``; this module holds
everything after that, read top to bottom: check the restart, start the process group and the output folder,
build or resume the engine (mmpretrain.engine) and its TrainState, then the loop of TrainStep calls (mmpretrain.step)
with logging, checkpoints (mmpretrain.checkpoint) and evaluation (mmpretrain.eval).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from mmpretrain import checkpoint
from mmpretrain.config import Config, ConfigError, diff_configs, from_yaml_file, load_config, to_dict, to_yaml
from mmpretrain.convert import read_any
from mmpretrain.convert.resize import fit_position_embeddings
from mmpretrain.data import Tokenizer, build_train_loader, check_bad_fraction, merge_data_stats, with_synthetic_data
from mmpretrain.data.config import expand_shard_spec, is_remote
from mmpretrain.data.pipeline import DataFaultError
from mmpretrain.data.shards import count_samples
from mmpretrain.distributed import all_gather_object, barrier, destroy, env_rank_world, init_distributed, print0
from mmpretrain.engine import build_engine, release_engine, set_cpu_threads
from mmpretrain.eval.suite import evaluate_all
from mmpretrain.faults import EXIT_STOPPED, Injector, NonFiniteError, SkipTracker, StopRequest
from mmpretrain.logging import MetricsLogger, new_run_id
from mmpretrain.model import ModelConfig, build_model, resolve_model_config
from mmpretrain.objectives import Objective
from mmpretrain.step import StepResult, TrainStep
from mmpretrain.train_state import TrainState

# Keys that may change between a run and its restart: they do not touch weights or data order.
RESTART_MAY_CHANGE = ("logging.",)


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
    d = cfg.data
    if d.synthetic.root and None in (d.train.urls if d.train.sources is None else 1, d.eval.zeroshot, d.eval.retrieval):
        if is_main:
            with_synthetic_data(cfg.data)
        barrier()
        cfg.data = with_synthetic_data(cfg.data)


def init_weights(model, path: str, trust_pickles: bool = False, model_cfg: ModelConfig | None = None) -> None:
    """Load a whole model's weights (our runs, consolidated, HF or OpenCLIP folders) strictly; a run's DeepSpeed
    pickles only with ``trust_pickles`` (model.trust_pickles). With ``model_cfg`` (the model's), weights of
    another image size or text length get their position embeddings resized to fit."""
    try:
        sd, _ = read_any(path, trust_pickles=trust_pickles)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    # Objective heads (model.heads.*) are training-only: a run without them may start from weights with them, and
    # a run with new heads starts them fresh.
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("heads.") or k in model.state_dict()}
    # another image size or text length than this model's: the position embeddings are resized to fit
    sd, resized = fit_position_embeddings(sd, own, model_cfg) if model_cfg is not None else (sd, [])
    if resized:
        print0(f"model.init_from: {path}: " + "; ".join(resized))
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


def gather_data_stats(window: dict) -> dict:
    """This log window's data stats summed over ranks (a collective)."""
    parts = all_gather_object(window)  # collective
    if len(parts) == 1:
        return window
    total: dict = {}
    for part in parts:
        total = merge_data_stats(total, part)
    return total


def gather_data_position(local: dict | None) -> dict:
    """Every stream's state, for the checkpoint: each rank's loader holds its own streams' (a collective)."""
    if not local:
        return {}  # the per-rank loader (data.num_streams=0) has no state: it resumes by replay
    streams: dict = {}
    for part in all_gather_object(local):  # collective
        streams.update(part["streams"])
    return {"num_streams": local["num_streams"], "streams": streams}


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
        max_image_pixels=cfg.data.max_image_pixels, box_bins=box_bins(cfg),
    )  # fmt: skip


def box_bins(cfg: Config) -> int | None:
    """The coordinate bins of a model trained on region tasks (its grounding is evaluated), else None."""
    return cfg.data.train.regions.box_bins if cfg.data.train.regions.enabled else None


class LogWindow:
    """What the loop accumulates between two log steps; ``metrics`` turns it into one metrics.jsonl line."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.wait = 0.0  # seconds spent waiting for the loader
        self.loss_sum, self.good_steps, self.batches = 0.0, 0, 0
        self.term_sums: dict = {}  # {term: sum of its unweighted values over this window's good steps}
        self.term_steps: dict = {}  # {term: good steps that gave it} (a term's part, e.g. a region task, may skip one)
        self.data: dict = {}  # the loader's data stats of this window's batches (this rank)

    def add(self, res: StepResult, batch: dict) -> None:
        self.data = merge_data_stats(self.data, batch["data_stats"])
        self.batches += 1
        if not res.skipped:
            self.loss_sum += res.loss.item()  # on the host already: no sync
            self.good_steps += 1
            for name, value in res.terms.items():
                self.term_sums[name] = self.term_sums.get(name, 0.0) + value
                self.term_steps[name] = self.term_steps.get(name, 0) + 1

    def metrics(self, state: TrainState, res: StepResult, lr: float, global_batch: int, data_window: dict) -> dict:
        elapsed = time.perf_counter() - self.t0
        n = self.good_steps
        return {
            "samples_seen": state.samples_seen,
            "loss": self.loss_sum / n if n else float("nan"),
            **{f"loss/{name}": v / self.term_steps[name] for name, v in self.term_sums.items()},
            "lr": lr,
            "logit_scale": res.logit_scale.float().item(),
            "samples_per_s": self.batches * global_batch / elapsed,
            "data_wait_frac": self.wait / elapsed,
            "grad_norm": res.grad_norm,
            **data_metrics(state.data_stats, data_window),
            "skipped_steps": state.skipped_steps,
        }


def build_model_and_objective(cfg: Config):
    """The two-tower model with the objective's heads attached (before the engine: ZeRO shards them too) and the
    weights of model.init_from loaded; identical on every rank (seeded)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    if cfg.model.init_from:
        init_weights(model, cfg.model.init_from, trust_pickles=cfg.model.trust_pickles,
                     model_cfg=resolve_model_config(cfg.model))  # fmt: skip
    return model, objective


def start_output_dir(cfg: Config, is_main: bool) -> None:
    """output_dir with the run's config.yaml (first start only), and the synthetic demo data if asked for."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    if is_main and not os.path.isfile(os.path.join(cfg.output_dir, "config.yaml")):
        # written before synthetic data paths are filled in, so a restart compares like with like
        checkpoint.write_atomic(os.path.join(cfg.output_dir, "config.yaml"), to_yaml(cfg))
    resolve_data_paths(cfg, is_main)
    if is_main and (warning := small_data_warning(cfg)):
        print(f"mmpretrain.train: warning: {warning}", file=sys.stderr, flush=True)


def train_shard_urls(cfg: Config) -> list[str]:
    """Every shard of data.train.urls or data.train.sources, brace-expanded."""
    train = cfg.data.train
    specs = [train.urls] if train.sources is None else [source.urls for source in train.sources]
    return [url for spec in specs if spec for group in expand_shard_spec(spec) for url in group]


def missing_train_shards(cfg: Config) -> list[str]:
    """The local shards of the train spec that do not exist (a run skips them as unreadable_shard)."""
    return [u for u in train_shard_urls(cfg) if not is_remote(u) and not os.path.isfile(u.removeprefix("file://"))]


def samples_below_batch(cfg: Config) -> int | None:
    """The number of train samples when the shards hold fewer than one global batch, else None (counted from the
    tar headers, no further than one batch; remote shards are not counted)."""
    num = count_samples(train_shard_urls(cfg), stop_at=cfg.train.batch_size)
    return num if num is not None and num < cfg.train.batch_size else None


def small_data_warning(cfg: Config) -> str | None:
    num = samples_below_batch(cfg)
    if num is None:
        return None
    return (
        f"the train shards hold {num} samples, fewer than one batch (train.batch_size={cfg.train.batch_size}): "
        "every batch repeats images, and a repeated image is a false negative for the contrastive loss (its copy's "
        "caption counts as a wrong match). Use more data or a train.batch_size of at most the number of samples."
    )


def build_or_resume(cfg: Config, dist_info):
    """(engine, objective, TrainState, resumed): the engine of a fresh run, or of the run's latest checkpoint."""
    rank, world = dist_info.rank, dist_info.world_size
    model, objective = build_model_and_objective(cfg)
    tag, universal = checkpoint.prepare_resume(cfg.output_dir, world_size=world, zero_stage=cfg.engine.zero_stage,
                                               rank=rank)  # fmt: skip
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=cfg.train.batch_size // world,
                          total_steps=cfg.train.steps, load_universal=universal)  # fmt: skip
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank stream for dropout / patch dropout
    objective.setup(dist_info.device)  # e.g. load a distillation teacher
    meta = checkpoint.resume(engine, cfg.output_dir, rank, tag=tag, objective=objective)
    state = TrainState.from_meta(meta) if meta else TrainState(run_id=new_run_id(), world_size=world)
    return engine, objective, state, meta is not None


def open_log(cfg: Config, state: TrainState, resumed: bool, dist_info, cfg_dict: dict):
    """The MetricsLogger (rank 0 writes), saying where a resumed run continues from."""
    earlier = os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl"))  # a start that saved no checkpoint
    log = MetricsLogger(cfg.logging, cfg.output_dir, is_main=dist_info.is_main, run_id=state.run_id,
                        config=cfg_dict, start_step=state.step, total_steps=cfg.train.steps)  # fmt: skip
    if resumed:
        log.write(f"resumed from {checkpoint.checkpoint_root(cfg.output_dir)}/step_{state.step}")
        if state.data_position:
            log.write(f"data: each of the {state.data_position['num_streams']} streams continues at its recorded "
                      "position (its shuffle buffer is read back; nothing is replayed)")  # fmt: skip
        elif state.step:
            log.write(f"data: the checkpoint has no stream positions (data.num_streams=0 or an older version): "
                      f"replaying {state.step} batches per rank to get there")  # fmt: skip
        if state.world_size != dist_info.world_size and state.data_position:
            log.write(f"the checkpoint was written by {state.world_size} ranks, this launch has "
                      f"{dist_info.world_size}: weights, optimizer state and the data order continue (the global "
                      f"order of {state.data_position['num_streams']} data streams)")  # fmt: skip
        elif state.world_size != dist_info.world_size:
            log.write(f"the checkpoint was written by {state.world_size} ranks, this launch has "
                      f"{dist_info.world_size}: weights and optimizer state continue; the data order from here on "
                      "is that of the new world size")  # fmt: skip
        state.world_size = dist_info.world_size
    elif earlier:
        log.write(f"no checkpoint in {checkpoint.checkpoint_root(cfg.output_dir)}: an earlier start of this run "
                  "saved none, so this one starts from step 0")  # fmt: skip
    return log


def install_stopper(cfg: Config, is_main: bool, log) -> StopRequest:
    """Signals and the stop file; before the loader forks its workers (they inherit the handlers and so survive a
    job-wide signal). Rank 0 looks at the stop file; the step's collective tells the others."""
    stop_file = os.environ.get("MMPRETRAIN_STOP_FILE") or os.path.join(cfg.output_dir, "STOP")
    stopper = StopRequest(stop_file if is_main else None).install()
    if stopper.clear_stale_file():
        log.write(f"removed a stale stop file {stop_file} (its run ended before acting on it)")
    return stopper


def train_loader(cfg: Config, tokenizer, dist_info, state: TrainState):
    """This rank's loader from the run's data position: seeking to the streams' states where the checkpoint has
    them, else replaying the batches consumed so far."""
    world = dist_info.world_size
    return build_train_loader(cfg.data, tokenizer=tokenizer, image_size=cfg.model.vision.image_size,
                              batch_size=cfg.train.batch_size // world, rank=dist_info.rank, world_size=world,
                              seed=cfg.train.seed, start_batch=state.batches_consumed_per_rank,
                              data_state=state.data_position,
                              patch_size=resolve_model_config(cfg.model).vision.patch_size)  # fmt: skip


def log_window(cfg: Config, state: TrainState, window: LogWindow, res: StepResult, log, lr: float) -> dict:
    """A log step (a collective): the window's data stats joined over ranks, the bad-data check, one line."""
    data_window = gather_data_stats(window.data)  # collective: every rank logs at the same steps
    state.data_stats = merge_data_stats(state.data_stats, data_window)
    # every rank holds the same totals, so every rank stops alike (no rank left in a collective)
    check_bad_fraction(state.data_stats, max_bad_fraction=cfg.data.max_bad_fraction,
                       min_samples=cfg.data.bad_min_samples)  # fmt: skip
    metrics = window.metrics(state, res, lr, cfg.train.batch_size, data_window)
    log.log(state.step, metrics)
    return metrics


def final_eval(engine, tokenizer, cfg: Config, dist_info, log, step: int) -> dict:
    """The end-of-training evaluation, logged and written to eval.json (rank 0)."""
    results = run_eval(engine, tokenizer, cfg, dist_info)
    if results:
        log.log(step, results)
        if dist_info.is_main:
            text = json.dumps({"step": step, **results}, indent=1)
            checkpoint.write_atomic(os.path.join(cfg.output_dir, "eval.json"), text)  # an earlier eval.json or this
    return results


def train(cfg: Config, stop_after_steps: int = 0, saver: checkpoint.BackgroundSaver | None = None) -> dict:
    """Run (or resume) training; returns the final metrics of this invocation. ``saver``: the background checkpoint
    writer (made here under checkpoint.async_save when not given; ``run`` gives one so that it can wait for it)."""
    check_restart(cfg)
    dist_info = init_distributed(cfg.engine.dist_timeout_s)
    start_output_dir(cfg, dist_info.is_main)
    engine, objective, state, resumed = build_or_resume(cfg, dist_info)
    try:
        return train_loop(cfg, dist_info, engine, objective, state, resumed, stop_after_steps, saver)
    finally:
        release_engine(engine)


def train_loop(
    cfg: Config,
    dist_info,
    engine,
    objective,
    state: TrainState,
    resumed: bool,
    stop_after_steps: int,
    saver: checkpoint.BackgroundSaver | None,
) -> dict:
    """train()'s loop over a built (or resumed) engine: steps, logs, checkpoints, the final evaluation."""
    rank, world = dist_info.rank, dist_info.world_size
    threads = set_cpu_threads(cfg.engine, ranks_on_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                              data_workers=cfg.data.num_workers, chosen=state.cpu_threads)  # fmt: skip
    cfg_dict = to_dict(cfg)
    log = open_log(cfg, state, resumed, dist_info, cfg_dict)
    stopper = install_stopper(cfg, dist_info.is_main, log)
    injector = Injector.from_env(rank)
    train_step = TrainStep(engine, objective, cfg.engine, accum_steps=cfg.train.accum_steps,
                           grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss, device=dist_info.device,
                           injector=injector)  # fmt: skip
    tokenizer = Tokenizer(context_length=cfg.model.text.context_length)
    batches = iter(train_loader(cfg, tokenizer, dist_info, state))
    data_state = None  # this rank's streams' states after the last batch it consumed
    key_path = os.path.join(cfg.output_dir, f"sample_keys_rank{rank}.jsonl")
    key_log = open(key_path, "a") if cfg.logging.sample_keys else None
    skips = SkipTracker(cfg.train.max_skips_in_a_row, total=state.skipped_steps)

    if saver is None and cfg.checkpoint.async_save:
        saver = checkpoint.BackgroundSaver(cfg.engine.dist_timeout_s)

    def save() -> str:  # a collective: every rank writes its part (in the background with checkpoint.async_save)
        state.data_position = gather_data_position(data_state)  # collective
        tag, stall_s = checkpoint.save(engine, cfg.output_dir, state.step, state.state_dict(cfg_dict), rank,
                                       cfg.checkpoint.keep_last, before_commit=injector.during_save, saver=saver,
                                       world_size=world, objective_state=objective.state_dict())  # fmt: skip
        if saver is None:
            log.log(state.step, {"checkpoint/stall_s": stall_s})  # how long the training waited for this save
        else:
            train_step.before_update = saver.wait_staged  # the update after the save waits for its host copy
        return tag

    def log_stall() -> None:  # a background save's stall, once its copy is done: the save's time + the update's wait
        if saver is not None and (done := saver.pop_stall()):
            log.log(done[0], {"checkpoint/stall_s": done[1]})

    last, window = {}, LogWindow()
    start_step, saved_at, stop = state.step, (f"step_{state.step}" if resumed else None), False
    while state.step < cfg.train.steps and not stop:
        t0 = time.perf_counter()
        batch = next(batches)
        data_state = batch.get("data_state")
        window.wait += time.perf_counter() - t0
        injector.begin_step(state.step + 1)
        res = train_step(batch, state.step + 1, stopper.requested())
        log_stall()
        state.advance(cfg.train.batch_size)  # skipped steps count too: the data position stays step x batch
        if threads is not None and (chosen := threads.step_done(time.perf_counter() - t0)):
            state.cpu_threads = chosen["cpu_threads"]
            log.log(state.step, chosen)
            log.write(threads.line)
        if key_log is not None:
            key_log.write(json.dumps({"step": state.step, "keys": batch["keys"]}) + "\n")
            key_log.flush()
        window.add(res, batch)
        skips.update(state.step, res.skipped, "loss or gradient", saved_at)
        state.skipped_steps = skips.total
        log.advance()
        stop = res.stop or bool(stop_after_steps and state.step - start_step >= stop_after_steps)
        if state.step % cfg.logging.log_every == 0 or state.step == cfg.train.steps or stop:
            last = log_window(cfg, state, window, res, log, engine.get_lr()[0])
            window = LogWindow()
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0 and not skips.in_a_row:
            saved_at = save()  # never in a run of skipped steps: the last checkpoint stays a good one
        if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < cfg.train.steps:
            if not stop:
                log.log(state.step, run_eval(engine, tokenizer, cfg, dist_info))

    if saved_at != f"step_{state.step}" and state.step > start_step:
        saved_at = save()
    if saver is not None:
        saver.wait()  # the last checkpoint is durable and `latest` names it (a second Ctrl-C abandons it)
        log_stall()
    stopped_on_request = stop and res.stop
    if stopped_on_request:
        log.write(f"stopped on request ({stopper.reason() if stopper.requested() else 'another rank'}) after step "
                  f"{state.step}; checkpoint {saved_at} saved; rerun the same command to resume")  # fmt: skip
        stopper.acknowledge()
    stopper.uninstall()
    if key_log is not None:
        key_log.close()
    del batches  # shut the loader's workers down now, while signals are ours again
    results = final_eval(engine, tokenizer, cfg, dist_info, log, state.step) if state.step >= cfg.train.steps else {}
    log.close()
    if dist_info.is_main:
        _print_summary(cfg, state.step, saved_at, results, stopped=state.step < cfg.train.steps,
                       data_stats=state.data_stats)  # fmt: skip
    return {**last, **results, "step": state.step, "stopped_on_request": stopped_on_request}


def _print_summary(cfg: Config, step: int, tag: str | None, results: dict, stopped: bool, data_stats: dict) -> None:
    print("\n".join(summary_lines(cfg, step, tag, results, stopped, data_stats)), flush=True)


def summary_lines(cfg: Config, step: int, tag: str | None, results: dict, stopped: bool, data_stats: dict) -> list:
    """What the run wrote and where, then what happened to the data and which evaluations did not run."""
    out = cfg.output_dir
    lines = [f"\n{'stopped' if stopped else 'finished'} at step {step}/{cfg.train.steps}. Outputs in {out}/:"]
    lines.append("  config.yaml     resolved config of this run")
    lines.append("  metrics.jsonl   one JSON line per log step (plot: mmpretrain-plot " + out + ")")
    if tag:
        lines.append(f"  checkpoints/{tag}  DeepSpeed state + meta.json (latest: checkpoints/latest)")
    if cfg.logging.wandb == "offline" and os.path.isdir(os.path.join(out, "wandb")):
        lines.append(f"  wandb/          offline wandb runs (upload: wandb sync {out}/wandb/offline-run-*)")
    if results:
        lines.append("  eval.json       final evaluation:")
        lines += [f"    {k:40s} {v:.4f}" for k, v in results.items() if isinstance(v, float)]
    # the data: every skipped sample by reason, the shards that do not exist, a dataset smaller than a batch
    skipped = {reason: n for reason, n in data_stats.get("skipped", {}).items() if n}
    read = data_stats.get("read", 0)
    if skipped:
        by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        lines.append(f"data: {read} samples read, {sum(skipped.values())} skipped: {by_reason} "
                     "(data/skipped/<reason> in metrics.jsonl)")  # fmt: skip
    else:
        lines.append(f"data: {read} samples read, none skipped")
    missing = missing_train_shards(cfg)
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        lines.append(f"  {plural(len(missing), 'train shard')} missing (skipped as unreadable_shard): {shown}")
    if (num := samples_below_batch(cfg)) is not None:
        lines.append(f"  the train shards hold {num} samples, fewer than one batch ({cfg.train.batch_size}): every "
                     "batch repeated images (false negatives for the contrastive loss)")  # fmt: skip
    unset = [name for name in ("zeroshot", "retrieval") if not getattr(cfg.data.eval, name)]
    if len(unset) == 2:
        lines.append("eval: no eval set configured (data.eval.zeroshot and data.eval.retrieval are unset): "
                     "nothing was evaluated")  # fmt: skip
    elif unset:
        lines.append(f"eval: data.eval.{unset[0]} is not set: no {unset[0]} evaluation")
    if stopped:
        lines.append("rerun the same command to resume.")
    return lines


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def finish_save(saver) -> None:
    """Wait for a background checkpoint write in flight (bounded: no collective inside); a failure is printed."""
    if saver is None:
        return
    try:
        saver.wait()
    except RuntimeError as e:
        print(f"mmpretrain.train: {e}", file=sys.stderr, flush=True)


# Errors every rank raises alike (decided by a collective): one line from rank 0, exit 1, no traceback.
AGREED_ERRORS = (NonFiniteError, DataFaultError)


def run(config: str, overrides: list[str], stop_after_steps: int = 0) -> int:
    """The command: load the config, train; returns the exit code (see mmpretrain.train). Rank 0 prints."""
    rank, code, saver = env_rank_world()[0], 1, None  # 1 until an outcome is known (the teardown watchdog uses it)
    try:
        cfg = load_config(config, overrides)
        saver = checkpoint.BackgroundSaver(cfg.engine.dist_timeout_s) if cfg.checkpoint.async_save else None
        result = train(cfg, stop_after_steps=stop_after_steps, saver=saver)
        code = EXIT_STOPPED if result.get("stopped_on_request") else 0
    except ConfigError as e:
        if rank == 0:
            print(f"mmpretrain.train: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except AGREED_ERRORS as e:
        finish_save(saver)  # the last good checkpoint, which the message names, is committed before the exit
        if rank == 0:
            print(f"mmpretrain.train: error: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:  # the second Ctrl-C (the first stops after the step with a checkpoint)
        if rank == 0:
            print(
                "mmpretrain.train: interrupted (second Ctrl-C, or before training began): exited without saving",
                file=sys.stderr,
                flush=True,
            )
        code = 130
    finally:
        destroy(exit_code=code)
    return code
