"""The objective's config: ``loss``, its ``loss.terms`` (one dataclass per term) and the checks a term needs across
config sections. No project imports and no torch, so mmpretrain.config composes it without importing the terms.

    loss:
      terms:
        clip: {weight: 1.0}
        mim: {weight: 0.5, mask_ratio: 0.75}

A term's config subclasses TermConfig: its options, each with a default and a comment; ``validate(prefix)`` for its
own fields; and, where the term has them, what it needs from the rest of the run: the model family, whether it runs
under GradCache, ``check_run`` for the other sections, ``patch_drop`` for the masking it asks of the vision tower.
TERM_CONFIGS names each term's config class under its key in ``loss.terms``; the term itself
(``mmpretrain/objectives/<file>.py``) points at the same class with ``config_cls``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

LOSS_NAMES = ("clip", "siglip")
LOSS_IMPLS = ("auto", "triton", "chunked", "naive")


@dataclass
class TermConfig:
    """What every term has; a term's own config subclasses this and adds its options (with defaults)."""

    family: ClassVar[str | None] = None  # model family the term requires ("clip" | "siglip"), None = any
    grad_cache: ClassVar[bool] = False  # runs under train.accum_steps > 1 (GradCache): the plain contrastive terms

    weight: float = 1.0  # multiplies this term in the summed loss (its unweighted value is logged as loss/<name>)

    def validate(self, prefix: str) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"{prefix}.weight must be a finite number >= 0 (got {self.weight})")

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        """Checks against the other sections of the run's config (raise ValueError naming the key)."""

    def patch_drop(self) -> float | None:
        """Patch-dropout fraction this term needs the vision tower to apply in training (MIM), else None."""
        return None


# ----------------------------------------------------------------------------- one config per term


@dataclass
class ClipTermConfig(TermConfig):
    family: ClassVar[str | None] = "clip"
    grad_cache: ClassVar[bool] = True

    label_smoothing: float = 0.0  # ALIGN: eps of the target put evenly on every column (0 = plain CLIP)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{prefix}.label_smoothing must be in [0, 1) (got {self.label_smoothing})")

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        if self.label_smoothing and run_cfg.train.accum_steps > 1:
            raise ValueError(f"{prefix}.label_smoothing is not supported with train.accum_steps > 1 (GradCache)")


@dataclass
class SiglipTermConfig(TermConfig):
    family: ClassVar[str | None] = "siglip"
    grad_cache: ClassVar[bool] = True


DISTILL_PRECISIONS = ("bf16", "fp32")
FEATURE_LOSSES = ("cosine", "mse")


@dataclass
class DistillTermConfig(TermConfig):
    teacher: str = ""  # teacher folder: our run / checkpoints/step_N / consolidated folder, HF CLIP|SigLIP, OpenCLIP
    precision: str = "bf16"  # dtype of the teacher's weights and forward: bf16 | fp32
    temperature: Optional[float] = None  # both distributions at scale 1/T; None: teacher's own scale, student's own
    feature_weight: float = 0.0  # weight of the feature regression inside this term (0 = KL only)
    feature_loss: str = "cosine"  # cosine (1 - cos) | mse (squared distance); projected when widths differ
    chunk_size: Optional[int] = None  # rows per chunk of the KL (memory ~ 16 * chunk * B bytes); None: loss.chunk_size
    trust_pickles: bool = False  # the teacher is a run folder trusted like code: its DeepSpeed pickles may be
    # unpickled without the weights-only check (needed only where that check refuses a file)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.precision not in DISTILL_PRECISIONS:
            raise ValueError(f"{prefix}.precision must be one of {DISTILL_PRECISIONS} (got {self.precision!r})")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{prefix}.temperature must be a positive number or null (got {self.temperature})")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise ValueError(f"{prefix}.feature_weight must be a finite number >= 0 (got {self.feature_weight})")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"{prefix}.feature_loss must be one of {FEATURE_LOSSES} (got {self.feature_loss!r})")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"{prefix}.chunk_size must be >= 1 or null (got {self.chunk_size})")

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        if not self.teacher:
            raise ValueError(f"{prefix}.teacher must be set (a run, step, consolidated, HF or OpenCLIP folder)")
        if not os.path.isdir(self.teacher):
            raise ValueError(f"{prefix}.teacher: no such folder {self.teacher!r}")


@dataclass
class ITMTermConfig(TermConfig):
    layers: int = 2  # fusion blocks (self-attention, cross-attention to the image, MLP), at the text tower's width
    heads: int = 0  # attention heads of the fusion blocks; 0 = the text tower's model.text.heads
    mlp_ratio: float = 4.0  # MLP hidden size / text width in the fusion blocks
    exclude_same_label: bool = True  # samples with the same class label (<key>.cls, as UniCL's) are never each
    # other's negatives (paraphrased captions of one class would be false negatives); unlabeled (-1): by caption

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.layers < 1:
            raise ValueError(f"{prefix}.layers must be >= 1 (got {self.layers})")
        if self.heads < 0:
            raise ValueError(f"{prefix}.heads must be >= 0 (got {self.heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"{prefix}.mlp_ratio must be > 0 (got {self.mlp_ratio})")

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        heads = self.heads or run_cfg.model.text.heads
        width = run_cfg.model.text.width
        if width is not None and heads and width % heads:
            raise ValueError(f"{prefix}.heads must divide model.text.width (got {heads} and {width})")
        if run_cfg.train.batch_size < 2:
            raise ValueError(f"{prefix}: needs train.batch_size >= 2 for negatives (got {run_cfg.train.batch_size})")


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the tower keeps (mmpretrain.model.layers.patch_dropout's count)."""
    return max(1, int(num_patches * (1 - mask_ratio)))


@dataclass
class MimTermConfig(TermConfig):
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder and reconstructed (MAE: 0.75)
    decoder_width: int = 512  # decoder token width (MAE: 512); a multiple of 4 (2-D sin-cos) and of decoder_heads
    decoder_layers: int = 4  # decoder blocks (MAE: 8; its Table 1a: 1 block already works for fine-tuning)
    decoder_heads: int = 16  # decoder attention heads (MAE: 16)
    norm_pix: bool = True  # target: each patch's pixels normalized by its own mean/std (MAE's norm_pix_loss)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"{prefix}.mask_ratio must be in (0, 1) (got {self.mask_ratio})")
        for key in ("decoder_width", "decoder_layers", "decoder_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key} must be >= 1 (got {getattr(self, key)})")
        if self.decoder_width % 4 or self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"{prefix}.decoder_width must be a multiple of 4 (2-D sin-cos positions) and of "
                f"{prefix}.decoder_heads (got {self.decoder_width} and {self.decoder_heads})"
            )

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        v = run_cfg.model.vision
        if v.patch_dropout:
            raise ValueError(
                f"{prefix}.mask_ratio sets the patch masking; model.vision.patch_dropout must be 0 "
                f"(got {v.patch_dropout})"
            )
        if run_cfg.model.lock_image:
            raise ValueError(f"{prefix}: masked image modeling trains the image tower; model.lock_image must be false")
        num_patches = (v.image_size // v.patch_size) ** 2
        if num_kept(num_patches, self.mask_ratio) >= num_patches:
            raise ValueError(
                f"{prefix}.mask_ratio={self.mask_ratio} masks no patch of the {num_patches} (model.vision)"
            )

    def patch_drop(self) -> float:
        return self.mask_ratio


UNICL_LABEL_SOURCES = ("auto", "cls", "caption")


@dataclass
class UniclTermConfig(TermConfig):
    family: ClassVar[str | None] = "clip"
    grad_cache: ClassVar[bool] = True  # labels come from the whole batch, in the order GradCache concatenates them

    label_source: str = "auto"  # auto | cls | caption: where a sample's label comes from (objectives/unicl.py)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.label_source not in UNICL_LABEL_SOURCES:
            raise ValueError(f"{prefix}.label_source must be one of {UNICL_LABEL_SOURCES} (got {self.label_source!r})")


@dataclass
class CaptionTermConfig(TermConfig):
    layers: int = 2  # decoder blocks (causal self-attention, cross-attention to the image tokens, MLP)
    width: int = 0  # decoder width; 0 = the text tower's model.text.width
    heads: int = 0  # decoder attention heads; 0 = the text tower's model.text.heads
    mlp_ratio: float = 4.0  # MLP hidden size / decoder width
    parallel_fraction: float = 0.0  # CapPa: this share of each global batch predicts every token from mask-token
    # inputs (no teacher forcing); SigLIP 2 / LocCa train with 0.5 of it; 0 = plain captioning (CoCa, LocCa)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        for key in ("layers",):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key} must be >= 1 (got {getattr(self, key)})")
        for key in ("width", "heads"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key} must be >= 0 (got {getattr(self, key)})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"{prefix}.mlp_ratio must be > 0 (got {self.mlp_ratio})")
        if not 0.0 <= self.parallel_fraction <= 1.0:
            raise ValueError(f"{prefix}.parallel_fraction must be in [0, 1] (got {self.parallel_fraction})")

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        width = self.width or run_cfg.model.text.width
        heads = self.heads or run_cfg.model.text.heads
        if width is not None and heads and width % heads:
            raise ValueError(f"{prefix}.heads must divide the decoder width (got {heads} and {width})")


@dataclass
class SelfDistillTermConfig(TermConfig):
    """SigLIP 2's self-distillation (SILC) and masked prediction (TIPS) against an EMA teacher (self_distill.py)."""

    family: ClassVar[str | None] = "siglip"

    start_fraction: float = 0.8  # the term is off for the first start_fraction x train.steps steps (SigLIP 2: 0.8)
    momentum: float = 0.996  # EMA momentum of the teacher at the first active step
    momentum_end: float = 0.996  # ... and at the last, along a half cosine; = momentum: fixed (SILC's choice: a
    # momentum reaching 1 stops the teacher following the image-text loss late in training); 1.0: DINO's schedule
    prototypes: int = 1024  # K: outputs of the projection heads (DINO-style prototypes)
    head_width: int = 256  # hidden and bottleneck width of the projection heads
    student_temp: float = 0.1  # temperature of the student's softmax (DINO: 0.1)
    teacher_temp: float = 0.04  # temperature of the teacher's softmax (DINO: 0.04)
    center_momentum: float = 0.9  # EMA momentum of the teacher's centers (global-batch mean of its outputs)
    silc_weight: float = 1.0  # weight of the local-to-global consistency inside this term
    tips_weight: float = 1.0  # weight of the masked prediction inside this term
    mask_ratio: float = 0.5  # fraction of patches the student sees as the mask token (the same count per image)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not 0.0 <= self.start_fraction < 1.0:
            raise ValueError(f"{prefix}.start_fraction must be in [0, 1) (got {self.start_fraction})")
        for key in ("momentum", "momentum_end", "center_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{prefix}.{key} must be in [0, 1] (got {getattr(self, key)})")
        for key in ("prototypes", "head_width"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key} must be >= 1 (got {getattr(self, key)})")
        for key in ("student_temp", "teacher_temp"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{prefix}.{key} must be a positive number (got {getattr(self, key)})")
        for key in ("silc_weight", "tips_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"{prefix}.{key} must be a finite number >= 0 (got {getattr(self, key)})")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"{prefix}.mask_ratio must be in (0, 1) (got {self.mask_ratio})")

    def check_run(self, run_cfg: Any, prefix: str) -> None:
        if self.silc_weight and run_cfg.data.train.local_crops < 1:
            raise ValueError(
                f"{prefix}.silc_weight > 0 needs local crops from the loader: set data.train.local_crops >= 1 "
                f"(got {run_cfg.data.train.local_crops})"
            )
        if run_cfg.model.lock_image:
            raise ValueError(f"{prefix}: self-distillation trains the image tower; model.lock_image must be false")
        v = run_cfg.model.vision
        num_patches = (v.image_size // v.patch_size) ** 2
        if self.tips_weight and num_kept(num_patches, self.mask_ratio) >= num_patches:
            raise ValueError(
                f"{prefix}.mask_ratio={self.mask_ratio} masks no patch of the {num_patches} (model.vision)"
            )

    def first_step(self, total_steps: int) -> int:
        """The first (1-based) optimizer step the term is on: after start_fraction x total_steps steps."""
        return int(self.start_fraction * total_steps) + 1


# ----------------------------------------------------------------------------- loss.terms and loss

# Term name (its key under loss.terms) -> its config class. Alphabetical: the order terms are summed and logged.
TERM_CONFIGS: dict[str, type[TermConfig]] = {
    "caption": CaptionTermConfig,
    "clip": ClipTermConfig,
    "distill": DistillTermConfig,
    "itm": ITMTermConfig,
    "mim": MimTermConfig,
    "self_distill": SelfDistillTermConfig,
    "siglip": SiglipTermConfig,
    "unicl": UniclTermConfig,
}

# One Optional field per term: OmegaConf then checks names and option types like any section.
TermsConfig = dataclasses.make_dataclass(
    "TermsConfig", [(name, Optional[cls], field(default=None)) for name, cls in TERM_CONFIGS.items()]
)
TermsConfig.__module__ = __name__
TermsConfig.__doc__ = "loss.terms: each field is one objective's config; unset (None) terms are off."


@dataclass
class LossConfig:
    """The training objective; the root config composes it as ``loss``."""

    name: str = "clip"  # the contrastive loss when `terms` is unset: clip | siglip (must match the model family)
    impl: str = "auto"  # auto | triton | chunked | naive; auto = triton on CUDA, chunked elsewhere
    chunk_size: int = 1024  # rows of the similarity matrix per chunk on the chunked path (memory ~ 8 * chunk * B bytes)
    terms: Optional[TermsConfig] = None  # objectives summed, e.g. {clip: {}, mim: {weight: 0.5}}; unset: {name: {}}

    def validate(self, prefix: str) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"{prefix}.name must be one of {LOSS_NAMES} (got {self.name!r})")
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"{prefix}.impl must be one of {LOSS_IMPLS} (got {self.impl!r})")
        if self.chunk_size < 1:
            raise ValueError(f"{prefix}.chunk_size must be >= 1 (got {self.chunk_size})")
        if self.terms is not None and not self.active():
            raise ValueError(f"{prefix}.terms: no term is set (known: {', '.join(TERM_CONFIGS)})")

    def active(self) -> dict[str, TermConfig]:
        """{term name: its config} of the terms in use, in TERM_CONFIGS order."""
        if self.terms is None:
            return {self.name: TERM_CONFIGS[self.name]()}
        return {n: getattr(self.terms, n) for n in TERM_CONFIGS if getattr(self.terms, n) is not None}


def check_run(run_cfg: Any) -> None:
    """Cross-section checks of every active term (ValueError naming the key); the root config calls this."""
    family = run_cfg.model.family
    for name, tcfg in run_cfg.loss.active().items():
        prefix = f"loss.terms.{name}" if run_cfg.loss.terms is not None else "loss.name"
        if tcfg.family is not None and tcfg.family != family:
            raise ValueError(f"{prefix}: the {name!r} term needs a {tcfg.family} model; "
                             f"model.name={run_cfg.model.name!r} is {family}")  # fmt: skip
        if run_cfg.train.accum_steps > 1 and not tcfg.grad_cache:
            raise ValueError(f"{prefix}: the {name!r} term does not run under train.accum_steps > 1 (GradCache)")
        tcfg.check_run(run_cfg, prefix)
    if run_cfg.data.train.regions.enabled and "caption" not in run_cfg.loss.active():
        raise ValueError("data.train.regions: region tasks train the caption decoder; add loss.terms.caption (or set "
                         "data.train.regions.ref_fraction and gcap_fraction to 0)")  # fmt: skip
    masking = [n for n, c in run_cfg.loss.active().items() if c.patch_drop() is not None]
    if len(masking) > 1:
        raise ValueError(f"loss.terms: {masking} each set the patch masking; at most one term may")
