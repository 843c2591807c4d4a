"""What the planner (mmpretrain.plan) is checked against: the bytes each torch.distributed collective call
moves, and the CPU allocator's peak as torch's profiler records it. Used by tests/distributed/plan_worker.py and
tools/bench_plan.py.

    counter = CollectiveCounter().install()   # before DeepSpeed is imported: its backend keeps these functions
    with counter.counting():
        train_step(...)
    counter.counted  # {"all_reduce": bytes, "all_gather": bytes, ...}
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch.distributed as dist


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


# torch.distributed function -> (op, the buffer's bytes from the call's arguments), as mmpretrain.plan counts them:
# all-reduce: the tensor; all-gather: the output; reduce-scatter: the input.
SIZES = {
    "all_reduce": ("all_reduce", lambda *a, **k: _nbytes(k.get("tensor", a[0] if a else None))),
    "all_gather_into_tensor": ("all_gather", lambda *a, **k: _nbytes(k.get("output_tensor", a[0] if a else None))),
    "all_gather": ("all_gather", lambda *a, **k: sum(_nbytes(t) for t in k.get("tensor_list", a[0] if a else []))),
    "reduce_scatter_tensor": ("reduce_scatter", lambda *a, **k: _nbytes(k.get("input", a[1] if len(a) > 1 else None))),
    "reduce_scatter": ("reduce_scatter", lambda *a, **k: sum(_nbytes(t) for t in k.get("input_list", a[1]))),
    "broadcast": ("broadcast", lambda *a, **k: _nbytes(k.get("tensor", a[0] if a else None))),
}


class CollectiveCounter:
    """Wraps torch.distributed's collectives (once per process) and adds up their bytes while counting."""

    def __init__(self):
        self.counted: Counter = Counter()
        self.active = False

    def install(self) -> CollectiveCounter:
        for name, (op, size) in SIZES.items():
            setattr(dist, name, self._wrap(getattr(dist, name), op, size))
        return self

    def _wrap(self, orig, op, size):
        def counted(*args, **kwargs):
            if self.active:
                self.counted[op] += size(*args, **kwargs)
            return orig(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def counting(self):
        """Count the calls inside (the bytes of earlier ones are dropped)."""
        self.counted.clear()
        self.active = True
        try:
            yield self.counted
        finally:
            self.active = False


def peak_allocated(prof) -> int:
    """The highest running total of a torch.profiler run's memory events (allocations +, frees -) in time
    order (``profile(activities=[ProfilerActivity.CPU], profile_memory=True)``)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak
