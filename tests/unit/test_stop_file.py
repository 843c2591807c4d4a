"""StopRequest's stop file: one left by an earlier run is stale (removed at start); one written after this
process started (the SLURM trap's, during a long start-up) is a request for this run and is honoured."""

import os
import time

from mmpretrain.faults import StopRequest


def test_a_stop_file_older_than_the_process_is_removed(tmp_path):
    path = tmp_path / "STOP"
    path.write_text("")
    old = time.time() - 3600
    os.utime(path, (old, old))
    stopper = StopRequest(str(path))
    assert stopper.clear_stale_file() and not path.exists() and not stopper.requested()


def test_a_stop_file_written_after_the_start_is_honoured(tmp_path):
    path = tmp_path / "STOP"
    started = time.time() - 5
    path.write_text("")  # written during this run's start-up
    stopper = StopRequest(str(path))
    assert not stopper.clear_stale_file(started_at=started) and path.exists()
    assert stopper.requested() and stopper.reason() == f"stop file {path}"
    stopper.acknowledge()
    assert not path.exists()


def test_no_stop_file_for_other_ranks(tmp_path):
    assert not StopRequest(None).clear_stale_file() and not StopRequest(None).requested()
