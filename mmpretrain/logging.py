"""Rank-0 metrics: ``<output_dir>/metrics.jsonl``, a wandb run, and the progress bar.

Off rank 0 every method is a no-op, so the training loop never asks which rank it is on.
A resumed run first moves the lines past its checkpoint's step to ``metrics.dropped.jsonl``,
so ``metrics.jsonl`` reads as one clean run and nothing written before is lost. The wandb run
id lives in the checkpoint: an online run resumes the same wandb run; offline, wandb writes a
new folder with the same id, and ``wandb sync <output_dir>/wandb/offline-run-*`` uploads them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys

from tqdm.auto import tqdm

from mmpretrain.atomic import write_atomic
from mmpretrain.logging_config import LoggingConfig


def new_run_id() -> str:
    return secrets.token_hex(4)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """metrics.jsonl + wandb + tqdm on rank 0; a no-op elsewhere."""

    def __init__(self, cfg: LoggingConfig, output_dir: str, *, is_main: bool, run_id: str, config: dict,
                 start_step: int, total_steps: int):  # fmt: skip
        self.active = is_main
        self.wandb_run = None
        self.bar = None
        if not self.active:
            return
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._drop_lines_after(start_step)
        # wandb starts after the first step (or with the first metrics line): a start interrupted before it leaves
        # no empty wandb folder behind
        self._wandb_args = None
        if cfg.wandb != "disabled":
            self._wandb_args = dict(
                project=cfg.project, name=cfg.run_name or os.path.basename(os.path.abspath(output_dir)), id=run_id,
                resume="allow", dir=output_dir, mode=cfg.wandb, config=config,
            )  # fmt: skip
        # the bar starts after the first step: that step also holds the loader's start (after a resume, its seek),
        # and a clock started before it showed an ETA many times too long
        self._bar_args = dict(total=total_steps, start=start_step) if cfg.progress else None

    def _start_wandb(self) -> None:
        import wandb  # 0.7 s, and its import hooks: only for runs that log to it

        # quiet: the run's own summary says where the offline run is and how to sync it (no 30-line wandb table);
        # offline, not even wandb's three "saved locally" lines (an online run keeps the line with its URL)
        offline = self._wandb_args["mode"] == "offline"
        self.wandb_run = wandb.init(**self._wandb_args, settings=wandb.Settings(quiet=True, silent=offline))
        self._wandb_args = None
        # wandb hooks imports to report which libraries a run uses; a DataLoader worker forked
        # after this point that imports a hooked module then dies with wandb's ForkedError.
        # Those hooks only feed wandb's own telemetry, so remove them.
        unregister = getattr(type(self.wandb_run), "_unregister_telemetry_import_hooks", None)
        if unregister is not None:
            unregister(self.wandb_run.id)

    def _start_bar(self, done: int) -> None:
        # in a log file (CI, SLURM) a redraw per second would be thousands of lines
        interval = 1.0 if sys.stderr.isatty() else 60.0
        args, self._bar_args = self._bar_args, None
        self.bar = tqdm(total=args["total"], initial=args["start"] + done, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=interval)  # fmt: skip

    def _drop_lines_after(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        keep, drop = [], []
        for line in open(self.path):
            if not line.strip():
                continue
            try:
                (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                drop.append(line if line.endswith("\n") else line + "\n")
        if drop:
            with open(os.path.join(os.path.dirname(self.path), "metrics.dropped.jsonl"), "a") as f:
                f.writelines(drop)
            # replaced in one rename: a kill here leaves the old file (its lines are in metrics.dropped.jsonl too),
            # never a half-written one
            write_atomic(self.path, "".join(keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_args is not None:
            self._start_wandb()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics.get('samples_per_s', 0):.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.active and self._wandb_args is not None:
            self._start_wandb()  # after the first step, before the bar: its lines do not cut into the bar
        if self.active and self._bar_args is not None:
            self._start_bar(done=n)

    def write(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
