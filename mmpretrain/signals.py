"""The signals that ask a run to stop with a checkpoint, and the data workers' side of them (a leaf module: the
training process acts on them in mmpretrain.faults.StopRequest; data loader workers ignore them)."""

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A data loader worker's init: the stop signals are the training process's to act on. A signal sent to the
    whole process group (Ctrl-C in a terminal, ``kill -- -PGID``, ``timeout``) reaches the workers too; PyTorch's
    worker SIGTERM handler would end the worker, and the trainer's next batch would fail. The trainer shuts its
    workers down itself after the save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
