"""LoggingConfig: where a run's metrics go (the root config's ``logging``). No project imports, so
mmpretrain.config composes it without importing the logger."""

from dataclasses import dataclass

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    """offline | online | disabled. Offline runs are synced later with `wandb sync`."""
    project: str = "mmpretrain"
    """wandb project name."""
    run_name: str = ""
    """wandb run name; empty = the output folder's name."""
    log_every: int = 10
    """Write a metrics line every N optimizer steps (and at the last step)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    sample_keys: bool = False
    """Audit the data order: every rank appends ``{"step", "keys"}`` per step to ``sample_keys_rank<R>.jsonl``
    (keys are ``<shard url>:<sample key>``). A step replayed after a crash is written again."""

    def validate(self, prefix: str) -> None:
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"{prefix}.wandb must be one of {WANDB_MODES} (got {self.wandb!r})")
        if self.log_every < 1:
            raise ValueError(f"{prefix}.log_every must be >= 1 (got {self.log_every})")
