"""CheckpointConfig: how often a run saves and how many checkpoints it keeps (the root config's ``checkpoint``).
No project imports, so mmpretrain.config composes it without importing the checkpoint code."""

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at the end of the run)."""
    keep_last: int = 2
    """Keep this many newest checkpoints; older step_* folders are deleted after a save."""
    async_save: bool = True
    """Write checkpoints in the background: a thread copies the state to host memory beside the next step's forward
    and backward (the optimizer update waits for the copy) and writes it; one checkpoint's share of host memory per
    rank, kept for the run. ``latest`` moves once every rank's files are durable. false: write and fsync before
    training continues. Each save logs checkpoint/stall_s (seconds the training was blocked by it)."""

    def validate(self, prefix: str) -> None:
        if self.every_steps < 0:
            raise ValueError(f"{prefix}.every_steps must be >= 0 (got {self.every_steps})")
        if self.keep_last < 1:
            raise ValueError(f"{prefix}.keep_last must be >= 1 (got {self.keep_last})")
