"""EvalConfig: when to evaluate and what to report. No project imports, so mmpretrain.config composes it
without importing the evaluation code."""

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """When to evaluate and what to report (the root config composes it as `eval`).

    The eval sets themselves (roots, names, split, per-rank batch size) are data: `data.eval.*`.
    """

    every_steps: int = 0
    """Evaluate every this many optimizer steps during training; 0 = only at the end."""
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    """Zero-shot accuracies reported, as `top<k>`."""
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Retrieval recalls reported, as `image_to_text_R@<k>` and `text_to_image_R@<k>`."""
    num_workers: int = 2
    """Image decoding worker processes per rank during eval (0 = decode in the main process)."""
    itm_rerank_k: int = 16
    """Models with an ITM head (loss.terms.itm): its match score re-ranks the top this many retrieval candidates of
    each query, reported as `retrieval/<set>/itm_rerank/...` beside plain retrieval; 0 = off."""

    def validate(self, prefix: str) -> None:
        if self.every_steps < 0:
            raise ValueError(f"{prefix}.every_steps must be >= 0 (got {self.every_steps})")
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers must be >= 0 (got {self.num_workers})")
        if self.itm_rerank_k < 0:
            raise ValueError(f"{prefix}.itm_rerank_k must be >= 0 (got {self.itm_rerank_k})")
        for name in ("top_k", "recall_k"):
            ks = getattr(self, name)
            if not ks or any(k <= 0 for k in ks):
                raise ValueError(f"{prefix}.{name} must be a non-empty list of positive ints (got {list(ks)})")
