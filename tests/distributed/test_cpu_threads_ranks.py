"""engine.cpu_threads=0 on 2 gloo ranks: every rank takes the same thread count, which the slower rank's step
times decide; and when one rank has nothing to choose, no rank times anything (the tuner's collectives stay in
step)."""

import torch

from mmpretrain.engine import CpuThreadTuner
from tests.distributed.harness import run_on_ranks


def tune(rank, choices_by_rank, few_by_rank, many_by_rank):
    before = torch.get_num_threads()
    tuner = CpuThreadTuner(choices_by_rank[rank])
    logged = []
    for _ in range(CpuThreadTuner.WARM + 2 * CpuThreadTuner.N + 5):
        fewer = torch.get_num_threads() == tuner.choices[0]
        out = tuner.step_done(few_by_rank[rank] if fewer else many_by_rank[rank])
        if out:
            logged.append(out)
    chosen = tuner.threads
    torch.set_num_threads(before)
    return chosen, logged


def test_ranks_agree_and_the_slower_rank_decides():
    # rank 0 alone would keep 2 threads (0.5 s < 1.0 s); rank 1 is slower on 2 (1.4 s): the worst medians decide
    results = run_on_ranks(tune, [[1, 2], [1, 2]], [1.0, 1.2], [0.5, 1.4])
    assert [r[0] for r in results] == [1, 1]
    assert all(r[1] == [{"cpu_threads": 1, "cpu_threads/step_s_1": 1.2, "cpu_threads/step_s_2": 1.4}] for r in results)


def test_a_rank_without_a_choice_means_no_rank_times():
    results = run_on_ranks(tune, [[1, 2], [2]], [1.0, 1.0], [0.1, 0.1])
    assert results[0] == (1, []) and results[1] == (2, [])
