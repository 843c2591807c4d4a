"""OptimConfig and EngineConfig: the optimizer and the DeepSpeed engine (the root config's ``optim`` and ``engine``).
No project imports, so mmpretrain.config composes them without importing the engine (or DeepSpeed)."""

from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "amp_bf16")
COMPILE_MODES = ("auto", "true", "false")
_COMPILE_ALIASES = {"on": "true", "off": "false", "yes": "true", "no": "false"}
SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate after warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine schedule."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to optim.lr."""
    schedule: str = "cosine"
    """cosine | constant (after warmup)."""
    weight_decay: float = 0.2
    """Decoupled AdamW weight decay (CLIP recipe); not applied to biases, norms, embeddings, logit scale/bias."""
    beta1: float = 0.9
    beta2: float = 0.98
    """AdamW second-moment decay (0.98 as in CLIP: more stable at large batch)."""
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 = no clipping."""

    def validate(self, prefix: str) -> None:
        if self.lr <= 0:
            raise ValueError(f"{prefix}.lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"{prefix}.min_lr must be in [0, {prefix}.lr] (got {self.min_lr})")
        if self.warmup_steps < 0:
            raise ValueError(f"{prefix}.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{prefix}.schedule must be one of {SCHEDULES} (got {self.schedule!r})")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key} must be in [0, 1) (got {getattr(self, key)})")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError(f"{prefix}.weight_decay, {prefix}.eps and {prefix}.grad_clip must be >= 0 (eps > 0)")


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+grads), 3 (+params)."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 | amp_bf16. bf16/fp16: DeepSpeed keeps the weights in that dtype (fp32 master copy in
    the optimizer); amp_bf16: fp32 weights, matmuls under torch.autocast(bfloat16) (DeepSpeed's torch_autocast).
    fp16 needs CUDA. Loss, logit scale and LayerNorms compute in fp32 either way."""
    compile: str = "auto"
    """auto | true | false (on/off too): torch.compile each transformer block of the towers (one compiled graph
    shared by all blocks of a shape, as torchtitan does). auto = on for CUDA with ZeRO 0-2, off on CPU (compiling
    costs more than it saves in the short CPU runs) and under ZeRO-3 (its parameter hooks do not trace)."""
    dist_timeout_s: float = 600.0
    """Process-group timeout in seconds: a dead peer ends the run after this long."""
    cpu_threads: int = 0
    """CPU only: torch intra-op threads per rank. 0 = chosen by timing the run's first steps on the cores left
    per rank after the data workers and on all cores per rank (the faster is kept, logged as cpu_threads and
    saved for a resume): whether sharing a data worker's core pays depends on the model and the data."""

    def validate(self, prefix: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{prefix}.zero_stage must be 0, 1, 2 or 3 (got {self.zero_stage})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{prefix}.precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError(f"{prefix}.precision=fp16 needs a CUDA device; use fp32 or bf16 here")
        mode = str(self.compile).lower()  # YAML reads a bare on/true as a bool, which the str field stores as "True"
        self.compile = _COMPILE_ALIASES.get(mode, mode)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"{prefix}.compile must be one of {COMPILE_MODES} (got {self.compile!r})")
        if self.compile == "true" and self.zero_stage == 3:
            raise ValueError(f"{prefix}.compile=true does not work with {prefix}.zero_stage=3 (ZeRO-3's parameter "
                             "hooks do not trace); use auto or off")  # fmt: skip
        if self.cpu_threads < 0:
            raise ValueError(f"{prefix}.cpu_threads must be >= 0 (got {self.cpu_threads})")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"{prefix}.dist_timeout_s must be > 0 (got {self.dist_timeout_s})")
