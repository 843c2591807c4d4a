"""TrainState <-> meta.json: the data position travels with the checkpoint, and older checkpoints still read."""

import json

from mmpretrain.train_state import TrainState


def test_data_position_round_trips_through_meta_json():
    position = {"num_streams": 2, "streams": {"0": {"position": 5}, "1": {"position": 5}}}
    state = TrainState(step=5, samples_seen=40, run_id="r", world_size=2, data_position=position)
    meta = json.loads(json.dumps({"step": 5, **state.state_dict({"a": 1})}))
    assert meta["data"] == {"batches_consumed_per_rank": 5, **position}
    again = TrainState.from_meta(meta)
    assert again == state and again.batches_consumed_per_rank == 5


def test_a_checkpoint_without_stream_states_resumes_by_replay():
    meta = {"step": 7, "samples_seen": 56, "config": {}, "world_size": 1, "wandb_run_id": "r",
            "data": {"batches_consumed_per_rank": 7}}  # fmt: skip
    state = TrainState.from_meta(meta)
    assert state.data_position == {} and state.batches_consumed_per_rank == 7
