"""The end-of-run summary says what happened: skipped samples by reason, missing shards, eval sets not configured,
a dataset smaller than one batch; count_samples reads the tar headers only."""

import os

import pytest

from mmpretrain.config import load_config
from mmpretrain.data.shards import count_samples
from mmpretrain.loop import small_data_warning, summary_lines


def shard(shapes, i: int) -> str:
    return os.path.join(shapes.root, "train", f"shard-{i:06d}.tar")


def config(tmp_path, urls: str, *overrides: str):
    return load_config(None, [f"data.train.urls={urls}", f"output_dir={tmp_path / 'run'}", *overrides])


def stats(read: int, **skipped: int) -> dict:
    return {"read": read, "skipped": {"unreadable_shard": 0, "corrupt_image": 0, **skipped}, "bad_shards": {}}


def test_count_samples_reads_keys_from_headers(shapes_dataset, tmp_path):
    urls = [shard(shapes_dataset, i) for i in range(shapes_dataset.num_train_shards)]
    assert count_samples(urls, stop_at=10**6) == shapes_dataset.num_train
    assert count_samples(urls, stop_at=200) == 200  # stops at one batch
    assert count_samples(urls[:1] + [str(tmp_path / "missing.tar")], stop_at=10**6) == 128  # a missing shard: 0
    assert count_samples(["pipe:cat a.tar"], stop_at=10) is None  # not counted: remote


def test_summary_lists_skips_by_reason_missing_shards_and_unset_eval(shapes_dataset, tmp_path):
    # shards 0-3 exist, 4 and 5 do not
    spec = os.path.join(shapes_dataset.root, "train", "shard-{000000..000005}.tar")
    cfg = config(tmp_path, spec, "train.batch_size=64")
    lines = summary_lines(cfg, 10, "step_10", {}, stopped=False, data_stats=stats(642, corrupt_image=3,
                                                                                   unreadable_shard=2))  # fmt: skip
    text = "\n".join(lines)
    assert "finished at step 10/" in text
    assert "data: 642 samples read, 5 skipped: corrupt_image 3, unreadable_shard 2" in text
    assert f"2 train shards missing (skipped as unreadable_shard): {shard(shapes_dataset, 4)}, " in text
    assert shard(shapes_dataset, 5) in text
    assert "eval: no eval set configured (data.eval.zeroshot and data.eval.retrieval are unset)" in text
    assert "fewer than one batch" not in text


def test_summary_of_a_clean_run_with_one_eval_set(shapes_dataset, tmp_path):
    cfg = config(tmp_path, shard(shapes_dataset, 0), "train.batch_size=64",
                 f"data.eval.zeroshot={shapes_dataset.zeroshot_root}")  # fmt: skip
    text = "\n".join(summary_lines(cfg, 3, None, {"zeroshot/x/top1": 0.5}, stopped=True, data_stats=stats(192)))
    assert "stopped at step 3/" in text and "rerun the same command to resume." in text
    assert "data: 192 samples read, none skipped" in text
    assert "missing" not in text
    assert "eval: data.eval.retrieval is not set: no retrieval evaluation" in text
    assert "zeroshot/x/top1" in text and "0.5000" in text


@pytest.mark.parametrize("batch,warned", [(512, False), (513, True)])
def test_data_smaller_than_a_batch_is_warned(shapes_dataset, tmp_path, batch, warned):
    cfg = config(tmp_path, shapes_dataset.train_urls, f"train.batch_size={batch}")
    warning = small_data_warning(cfg)
    text = "\n".join(summary_lines(cfg, 1, None, {}, stopped=False, data_stats=stats(batch)))
    if warned:
        assert warning.startswith(f"the train shards hold 512 samples, fewer than one batch (train.batch_size={batch})")
        assert "false negative" in warning
        assert f"the train shards hold 512 samples, fewer than one batch ({batch})" in text
    else:
        assert warning is None and "fewer than one batch" not in text
