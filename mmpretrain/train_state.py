"""What a run knows besides its weights: the step, the samples seen, the data position and stats, skipped steps,
the run id. ``TrainState.state_dict()`` is what each checkpoint's meta.json holds (with the resolved config), and
``TrainState.from_meta`` reads it back, so a restart continues from exactly this.

meta.json keys (unchanged since the first release; converters and tools read ``config``)::

    step, samples_seen, config, world_size, wandb_run_id, data_stats, skipped_steps,
    data: {batches_consumed_per_rank, num_streams, streams}

``data.streams`` is the data position as state: every virtual stream's position (mmpretrain/data/streams.py),
gathered over ranks when the checkpoint is written, so that any world size resumes from it by seeking (it is
absent with data.num_streams=0 and in older checkpoints: those resume by replaying ``batches_consumed_per_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped steps count: each consumed a batch)
    samples_seen: int = 0  # global samples consumed
    run_id: str = ""  # the wandb run id, kept so an online resumed run continues the same wandb run
    world_size: int = 1  # ranks of the launch that wrote this state
    data_stats: dict = field(default_factory=dict)  # samples read / skipped by reason and shard, per source
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run
    data_position: dict = field(default_factory=dict)  # {"num_streams": V, "streams": {index: state}}, or {}
    cpu_threads: int = 0  # CPU runs: the intra-op threads engine.cpu_threads=0 chose by timing (0: not yet chosen)

    @property
    def batches_consumed_per_rank(self) -> int:
        """The data position: each rank's loader resumes after this many of its batches."""
        return self.step

    def advance(self, global_batch: int) -> None:
        self.step += 1
        self.samples_seen += global_batch

    def state_dict(self, config: dict) -> dict:
        """meta.json's content: this state plus the run's resolved config."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "config": config,
            "world_size": self.world_size,
            "wandb_run_id": self.run_id,
            "data_stats": self.data_stats,
            "skipped_steps": self.skipped_steps,
            "cpu_threads": self.cpu_threads,
            "data": {"batches_consumed_per_rank": self.batches_consumed_per_rank, **self.data_position},
        }

    @classmethod
    def from_meta(cls, meta: dict) -> TrainState:
        return cls(
            step=meta["step"],
            samples_seen=meta["samples_seen"],
            run_id=meta["wandb_run_id"],
            world_size=meta["world_size"],
            data_stats=meta.get("data_stats", {}),
            skipped_steps=meta.get("skipped_steps", 0),
            cpu_threads=meta.get("cpu_threads", 0),
            data_position={k: v for k, v in meta.get("data", {}).items() if k in ("num_streams", "streams")},
        )
