"""Keep a run going through faults: non-finite steps, stop requests (preemption), injected faults for tests.

Non-finite steps. ``StepGuard`` puts a hook on every parameter's gradient that notes whether it holds
a NaN/inf (the hook sees this rank's full local gradient, before DeepSpeed reduces or partitions
it, so it works the same under ZeRO 0-3). The train loop asks all ranks together (one collective)
whether the loss or any gradient was non-finite; if so, every rank drops the gradients and skips
the optimizer step (``discard_gradients``), and the batch counts as consumed. K skipped steps in
a row raise ``NonFiniteError`` before anything is saved, so the last good checkpoint stays.

Stop requests. ``StopRequest`` turns SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) into a flag (the process keeps
running; a second Ctrl-C exits at once, without a checkpoint), and
rank 0 also looks for a stop file (``<output_dir>/STOP`` unless ``MMPRETRAIN_STOP_FILE`` names
another). After the current step the ranks agree (the same collective as above, so no rank is left
waiting in a collective the others never enter), save a checkpoint, and exit with
``EXIT_STOPPED`` (75, EX_TEMPFAIL: "try again"): rerunning the same command resumes. See
launch/README.md for how SLURM's warning signal reaches the ranks. Data loader workers ignore these
signals (``mmpretrain.signals.ignore_stop_signals``, their worker_init): a signal sent to the whole process
group (Ctrl-C in a terminal, ``kill -- -PGID``, ``timeout``) reaches them too, and the training process shuts
them down after its save.

Injected faults (tests only). ``MMPRETRAIN_INJECT`` is a comma-separated list of ``kind@step`` or
``kind@step:rank`` items, with step 1-based (the step being taken):

    nan_loss@5        the loss of step 5 is NaN (on every rank, or only ``:rank``)
    nan_grad@5        the gradient of one parameter is NaN in step 5, finite loss
    raise@5:1         rank 1 raises RuntimeError in step 5
    slow_save@6       the save at step 6 sleeps 600 s after this rank's files are written, before
                      its part is marked complete and meta.json / ``latest`` are written (to kill a run
                      in the middle of a checkpoint write; with checkpoint.async_save the sleep is in
                      the writer thread and training goes on until the next save waits for it)
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil
import torch

from mmpretrain.signals import STOP_SIGNALS

EXIT_STOPPED = 75  # EX_TEMPFAIL: the run saved a checkpoint on request and stopped; rerun to resume


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


# ---------------------------------------------------------------- non-finite steps


class StepGuard:
    """Notes non-finite gradients as backward produces them; see the module docstring."""

    def __init__(self, module: torch.nn.Module, device: torch.device, injector: Injector | None = None):
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        params = [p for p in module.parameters() if p.requires_grad]
        if injector is not None and injector.has("nan_grad"):
            # registered first: tensor hooks run in registration order, so the guard sees the NaN
            params[0].register_hook(injector.grad_hook)
        for p in params:
            p.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> None:
        # one reduction: a NaN or inf anywhere makes the fp32 sum non-finite (cheaper than isfinite(grad).all())
        self.bad.logical_or_(~torch.isfinite(grad.sum(dtype=torch.float32)))

    def reset(self) -> None:
        self.bad.zero_()


def discard_gradients(engine) -> None:
    """Drop this step's gradients without an optimizer step, under any ZeRO stage.

    Stage 0 keeps them in ``param.grad``; stages 1-3 also hold reduced or partitioned copies in
    the ZeRO optimizer, which DeepSpeed itself clears this way when fp16 overflows. Tested: a run
    that discards step k ends with the same weights as one that never saw batch k.
    """
    engine.zero_grad()
    if engine.zero_optimization_stage() > 0:
        opt = engine.optimizer
        opt.zero_grad(set_to_none=True)
        for key in list(getattr(opt, "averaged_gradients", {}).keys()):
            opt.averaged_gradients[key] = None


@dataclass
class SkipTracker:
    """Counts skipped steps; raises NonFiniteError after ``max_in_a_row`` in a row."""

    max_in_a_row: int
    total: int = 0
    in_a_row: int = 0
    first_step_of_run: int = 0

    def update(self, step: int, skipped: bool, what: str, last_checkpoint: str | None) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_step_of_run = step
        if self.in_a_row >= self.max_in_a_row:
            where = f"checkpoints/{last_checkpoint}" if last_checkpoint else "none was saved yet"
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row had a non-finite {what} (steps {self.first_step_of_run}-{step}; "
                f"train.max_skips_in_a_row={self.max_in_a_row}); stopped without saving. Last good checkpoint: "
                f"{where}. Lower optim.lr, raise optim.warmup_steps or check the data, then rerun to resume"
            )


# ---------------------------------------------------------------- stop requests


class StopRequest:
    """SIGUSR1/SIGTERM and a stop file -> ``requested()``; handlers are installed by ``install()``.

    Install it before the DataLoader starts its workers: they inherit the handler, so a signal sent
    to every process of a job (SLURM does that) does not kill them in the middle of a save.
    """

    def __init__(self, stop_file: str | None):
        self.stop_file = stop_file
        self.signal: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # in a forked DataLoader worker: ignore, the training process decides
            return
        if signum == signal.SIGINT:
            if self.signal == signal.SIGINT:  # the second Ctrl-C: stop now, no checkpoint
                raise KeyboardInterrupt
            if self.stop_file is not None:  # rank 0 says it, once
                print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to exit at once)",
                      flush=True)  # fmt: skip
        self.signal = signum

    def clear_stale_file(self, started_at: float | None = None) -> bool:
        """Remove a stop file left by a run that died before acting on it (rank 0, at start). A file written after
        this process started (``started_at``, default: its creation time) is a request for this run, e.g. the
        SLURM trap's during a long start-up: it stays and is honoured at the first step."""
        if not (self.stop_file and os.path.exists(self.stop_file)):
            return False
        started_at = psutil.Process().create_time() if started_at is None else started_at
        if os.path.getmtime(self.stop_file) >= started_at:
            return False
        os.remove(self.stop_file)
        return True

    def requested(self) -> bool:
        return self.signal is not None or bool(self.stop_file and os.path.exists(self.stop_file))

    def reason(self) -> str:
        if self.signal is not None:
            return signal.Signals(self.signal).name
        return f"stop file {self.stop_file}"

    def acknowledge(self) -> None:
        """After the save: remove the stop file, so the rerun goes on."""
        if self.stop_file and os.path.exists(self.stop_file):
            os.remove(self.stop_file)


# ---------------------------------------------------------------- injected faults (tests)


class Injector:
    """Parses ``MMPRETRAIN_INJECT`` (see the module docstring); inert when it is unset."""

    KINDS = ("nan_loss", "nan_grad", "raise", "slow_save")

    def __init__(self, spec: str | None, rank: int):
        self.rank = rank
        self.items: set[tuple[str, int]] = set()
        self.current_step = 0
        for item in filter(None, (s.strip() for s in (spec or "").split(","))):
            try:
                kind, rest = item.split("@")
                step, _, only_rank = rest.partition(":")
                step = int(step)
            except ValueError:
                msg = f"MMPRETRAIN_INJECT: cannot parse {item!r} (want kind@step or kind@step:rank)"
                raise ValueError(msg) from None
            if kind not in self.KINDS:
                raise ValueError(f"MMPRETRAIN_INJECT: unknown fault {kind!r} (known: {', '.join(self.KINDS)})")
            if not only_rank or int(only_rank) == rank:
                self.items.add((kind, step))

    @classmethod
    def from_env(cls, rank: int) -> Injector:
        return cls(os.environ.get("MMPRETRAIN_INJECT"), rank)

    def has(self, kind: str) -> bool:
        return any(k == kind for k, _ in self.items)

    def at(self, kind: str, step: int | None = None) -> bool:
        return (kind, self.current_step if step is None else step) in self.items

    def begin_step(self, step: int) -> None:
        self.current_step = step
        if self.at("raise"):
            raise RuntimeError(f"injected fault: rank {self.rank} fails in step {step}")

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.at("nan_loss") else loss

    def grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if self.at("nan_grad") else grad

    def during_save(self, step: int) -> None:
        if self.at("slow_save", step):
            time.sleep(600)
