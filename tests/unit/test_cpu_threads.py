"""engine.cpu_threads=0: the CPU thread count is chosen by timing the run's own steps (mmpretrain.engine)."""

import pytest
import torch

from mmpretrain.engine import CpuThreadTuner, cpu_thread_choices
from mmpretrain.engine_config import EngineConfig
from mmpretrain.train_state import TrainState


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_choices(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert cpu_thread_choices(EngineConfig(cpu_threads=3), ranks_on_node=2, data_workers=2) == [3]
    assert cpu_thread_choices(EngineConfig(), ranks_on_node=2, data_workers=2) == [2, 4]
    assert cpu_thread_choices(EngineConfig(), ranks_on_node=2, data_workers=0) == [4]  # nothing to choose
    assert cpu_thread_choices(EngineConfig(), ranks_on_node=8, data_workers=2) == [1]
    assert cpu_thread_choices(EngineConfig(), ranks_on_node=1, data_workers=16) == [1, 8]


def run(tuner, few_s, many_s):
    """Feed the tuner step times: few_s while it runs on the fewer threads, many_s after; returns what it logged
    and the thread counts torch ran each step with."""
    logged, seen = [], []
    for _ in range(40):
        seen.append(torch.get_num_threads())
        out = tuner.step_done(few_s if torch.get_num_threads() == tuner.choices[0] else many_s)
        if out:
            logged.append(out)
    return logged, seen


@pytest.mark.parametrize("few_s,many_s,want", [(1.0, 0.7, 2), (1.0, 1.3, 1), (1.0, 0.97, 1)])
def test_the_faster_count_is_kept(few_s, many_s, want):
    tuner = CpuThreadTuner([1, 2])
    logged, seen = run(tuner, few_s, many_s)
    n, w = CpuThreadTuner.N, CpuThreadTuner.WARM
    assert logged == [{"cpu_threads": want, "cpu_threads/step_s_1": few_s, "cpu_threads/step_s_2": many_s}]
    # warm-up and the first window on 1 thread, then the second window on 2, then the choice for good
    assert seen[: w + n] == [1] * (w + n) and seen[w + n : w + 2 * n + 1] == [2] * (n + 1)
    assert set(seen[w + 2 * n + 1 :]) == {want} and tuner.threads == want
    assert f"cpu threads: {want}" in tuner.line


def test_a_slow_start_does_not_decide():
    """The warm-up steps (start-up, first batches) are not timed: a slow first step does not count."""
    tuner = CpuThreadTuner([1, 2])
    times = [50.0] * CpuThreadTuner.WARM + [1.0] * CpuThreadTuner.N + [5.0] + [0.8] * CpuThreadTuner.N
    out = [tuner.step_done(t) for t in times]
    assert out[-1]["cpu_threads"] == 2 and out[-1]["cpu_threads/step_s_1"] == 1.0


def test_a_resumed_run_keeps_its_choice():
    state = TrainState(cpu_threads=2)
    meta = state.state_dict({})
    assert meta["cpu_threads"] == 2 and TrainState.from_meta(meta).cpu_threads == 2
    tuner = CpuThreadTuner([1, 2], chosen=TrainState.from_meta(meta).cpu_threads)
    logged, seen = run(tuner, 1.0, 5.0)  # would choose 1 if it timed again
    assert logged == [] and set(seen) == {2}
    assert TrainState.from_meta({k: v for k, v in meta.items() if k != "cpu_threads"}).cpu_threads == 0  # old runs


def test_one_choice_sets_it_and_times_nothing():
    tuner = CpuThreadTuner([1])
    logged, seen = run(tuner, 1.0, 0.1)
    assert logged == [] and set(seen) == {1}
