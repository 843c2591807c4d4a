"""The signals that ask a run to stop with a checkpoint, and the data workers' side of them (a leaf module: the
training process acts on them in mmpretrain.faults.StopRequest; data loader workers ignore them)."""

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler first: ours, registered below, runs before it)
import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A data loader worker's init: the stop signals are the training process's to act on. A signal sent to the
    whole process group (Ctrl-C in a terminal, ``kill -- -PGID``, ``timeout``) reaches the workers too; PyTorch's
    worker SIGTERM handler would end the worker, and the trainer's next batch would fail. The trainer shuts its
    workers down itself after the save (and ``_kill_workers_at_exit`` on any other way out)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic children still alive (data loader workers of a run that ended with
    an error: the loader lives on in the traceback, so nobody shut them down). multiprocessing's own exit handler
    ends them with SIGTERM, which they ignore (above), and then waits for them forever."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children or multiprocessing.parent_process() is not None:
        return  # nothing left, or this is itself a child: its parent ends it
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would report each as a crashed worker
    for p in children:
        p.kill()


atexit.register(_kill_workers_at_exit)
