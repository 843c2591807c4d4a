"""Model config: a size name from the table plus optional per-field overrides.

Every size field defaults to None, meaning "take it from `SIZES[name]`";
`resolve_model_config` returns a copy with every None filled in. With `model.text.kind=hf`,
`hf_text_config` reads the transformers config of the text tower (a size or a local folder).
No project imports but the size table: mmpretrain.config composes this without importing the model.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from mmpretrain.model.sizes import CLIP_VOCAB_SIZE, HF_TEXT_SIZES, SIZES

ATTENTION_IMPLS = ("auto", "triton", "sdpa")  # mmpretrain.kernels.attention's `impl` (tests/unit/test_config.py)
FAMILIES = ("clip", "siglip")
TEXT_KINDS = ("clip", "hf")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


@dataclass
class VisionConfig:
    image_size: Optional[int] = None  # input side in pixels (square images)
    patch_size: Optional[int] = None  # patch side in pixels; (image_size // patch_size)^2 patches
    width: Optional[int] = None  # transformer hidden size
    layers: Optional[int] = None  # number of transformer blocks
    heads: Optional[int] = None  # attention heads; width must be a multiple
    mlp_dim: Optional[int] = None  # hidden size of the block MLP
    act: Optional[str] = None  # MLP activation: gelu | quick_gelu | gelu_tanh
    ln_eps: Optional[float] = None  # LayerNorm epsilon
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training (class token kept)

    def validate(self, prefix: str) -> None:
        _check_tower(self, prefix)
        if self.image_size < self.patch_size:
            # A remainder is allowed: the strided conv drops it (SigLIP So400m: 384 px, 14 px patches -> 27 x 27).
            raise ValueError(
                f"{prefix}.image_size must be at least {prefix}.patch_size "
                f"(got {self.image_size} and {self.patch_size})"
            )
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"{prefix}.patch_dropout must be in [0, 1) (got {self.patch_dropout})")


# With model.text.kind=hf these come from model.text.hf_config and must stay unset (None).
HF_OWNED_FIELDS = ("width", "layers", "heads", "mlp_dim", "act", "ln_eps")


@dataclass
class TextConfig:
    kind: str = "clip"  # clip: the family's own text tower | hf: a transformers encoder (ALIGN's BERT), [CLS] pooled
    hf_config: Optional[str] = None  # kind=hf: a size in HF_TEXT_SIZES (bert-tiny ... bert-large) or a local folder
    # holding a transformers config.json (and optionally model.safetensors: initial weights); see model/hf_text.py
    vocab_size: Optional[int] = None  # token embedding rows; must cover the tokenizer's ids
    context_length: Optional[int] = None  # max tokens per caption (position embedding rows; the tokenizer's length)
    width: Optional[int] = None  # transformer hidden size
    layers: Optional[int] = None  # number of transformer blocks
    heads: Optional[int] = None  # attention heads; width must be a multiple
    mlp_dim: Optional[int] = None  # hidden size of the block MLP
    act: Optional[str] = None  # MLP activation: gelu | quick_gelu | gelu_tanh
    ln_eps: Optional[float] = None  # LayerNorm epsilon

    def validate(self, prefix: str) -> None:
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"{prefix}.kind must be one of {TEXT_KINDS} (got {self.kind!r})")
        if self.kind == "clip":
            if self.hf_config is not None:
                raise ValueError(f"{prefix}.hf_config is only used with {prefix}.kind=hf (kind is clip)")
            _check_tower(self, prefix)
            return
        for key in ("vocab_size", "context_length"):
            if getattr(self, key) is None or getattr(self, key) <= 0:
                raise ValueError(f"{prefix}.{key} must be positive (got {getattr(self, key)})")
        for key in HF_OWNED_FIELDS:
            if getattr(self, key) is not None:
                raise ValueError(
                    f"{prefix}.{key}: with {prefix}.kind=hf the text tower's sizes come from {prefix}.hf_config; "
                    f"unset {prefix}.{key} (got {getattr(self, key)!r})"
                )
        hf_text_config(self, prefix)  # reads the size table or the folder; raises ValueError naming the key


@dataclass
class ModelConfig:
    name: str = "tiny"  # key into the size table (mmpretrain/model/sizes.py)
    family: Optional[str] = None  # clip | siglip; None: from the table
    embed_dim: Optional[int] = None  # shared image-text embedding width; siglip: must equal vision.width
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    attention: str = "auto"  # attention implementation: auto | triton | sdpa (see mmpretrain.kernels)
    grad_checkpointing: bool = False  # recompute each transformer block in backward (saves activation memory)
    lock_image: bool = False  # LiT: freeze the whole image tower (no grads, kept in eval mode)
    init_from: Optional[str] = None  # start a fresh run from these weights: a run, step, consolidated, HF or
    # OpenCLIP folder (read with safetensors / weights_only); sizes must match. Ignored when resuming.
    trust_pickles: bool = False  # model.init_from is a run folder trusted like code: its DeepSpeed pickles may be
    # unpickled without the weights-only check (needed only where that check refuses a file)
    init_logit_scale: Optional[float] = None  # log of the initial logit scale; None: log(1/0.07) clip, log(10) siglip
    init_logit_bias: Optional[float] = None  # initial logit bias, siglip only (clip: must stay None); None: -10

    def validate(self, prefix: str) -> None:
        cfg = resolve_model_config(self, prefix)
        if cfg.family not in FAMILIES:
            raise ValueError(f"{prefix}.family must be one of {FAMILIES} (got {cfg.family!r})")
        if cfg.attention not in ATTENTION_IMPLS:
            raise ValueError(f"{prefix}.attention must be one of {ATTENTION_IMPLS} (got {cfg.attention!r})")
        if cfg.embed_dim <= 0:
            raise ValueError(f"{prefix}.embed_dim must be positive (got {cfg.embed_dim})")
        cfg.vision.validate(f"{prefix}.vision")
        cfg.text.validate(f"{prefix}.text")
        if cfg.family == "siglip" and cfg.embed_dim != cfg.vision.width:
            # SigLIP's attention-pool head has no projection: its output width is the vision width.
            raise ValueError(
                f"{prefix}.embed_dim must equal {prefix}.vision.width for siglip "
                f"(got {cfg.embed_dim} and {cfg.vision.width})"
            )
        for key in ("init_logit_scale", "init_logit_bias"):
            value = getattr(cfg, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{prefix}.{key} must be finite (got {value})")
        if cfg.family == "clip" and cfg.init_logit_bias is not None:
            raise ValueError(f"{prefix}.init_logit_bias is only used by siglip (family is clip)")


def resolve_model_config(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Return a copy of cfg with every None field filled from `SIZES[cfg.name]` (or the family default)."""
    if cfg.name not in SIZES:
        raise ValueError(f"{prefix}.name: unknown size {cfg.name!r} (choose from {', '.join(SIZES)})")
    entry = SIZES[cfg.name]

    def fill(obj, defaults):
        return dataclasses.replace(
            obj, **{k: defaults[k] for k, v in dataclasses.asdict(obj).items() if v is None and k in defaults}
        )

    family = cfg.family if cfg.family is not None else entry["family"]
    text_defaults = entry["text"]
    if cfg.text.kind == "hf":  # the tower's sizes come from text.hf_config; the tokenizer's fields from the table
        text_defaults = {k: v for k, v in text_defaults.items() if k in ("vocab_size", "context_length")}
    # Family defaults: CLIP 1/0.07 and no bias (OpenAI); SigLIP 10 and -10 (the SigLIP paper).
    default_scale, default_bias = (math.log(10.0), -10.0) if family == "siglip" else (math.log(1 / 0.07), None)
    return dataclasses.replace(
        cfg,
        family=family,
        embed_dim=cfg.embed_dim if cfg.embed_dim is not None else entry["embed_dim"],
        vision=fill(cfg.vision, entry["vision"]),
        text=fill(cfg.text, text_defaults),
        init_logit_scale=cfg.init_logit_scale if cfg.init_logit_scale is not None else default_scale,
        init_logit_bias=cfg.init_logit_bias if cfg.init_logit_bias is not None else default_bias,
    )


def _check_tower(tower, prefix: str) -> None:
    for f in dataclasses.fields(tower):
        value = getattr(tower, f.name)
        if f.name in ("act", "patch_dropout", "kind", "hf_config"):
            continue
        if value is None or value <= 0:
            raise ValueError(f"{prefix}.{f.name} must be positive (got {value})")
    if tower.act not in ACTIVATIONS:
        raise ValueError(f"{prefix}.act must be one of {ACTIVATIONS} (got {tower.act!r})")
    if tower.width % tower.heads:
        raise ValueError(f"{prefix}.width must be divisible by {prefix}.heads (got {tower.width} and {tower.heads})")


# ----------------------------------------------------------------------------- model.text.kind=hf

# A folder of model.text.hf_config holding any of these brings its own tokenizer (refused: see model/hf_text.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")  # fmt: skip
HF_TEXT_WEIGHTS = "model.safetensors"  # optional initial weights beside the folder's config.json


def hf_text_config(t, prefix: str = "model.text"):
    """A transformers config for a resolved kind=hf TextConfig `t`; a bad setting raises ValueError naming the key."""
    from transformers import AutoConfig

    name = t.hf_config
    if name is None:
        sizes = ", ".join(HF_TEXT_SIZES)
        raise ValueError(f"{prefix}.hf_config must be set when {prefix}.kind=hf (a size: {sizes}; or a folder "
                         "holding a transformers config.json)")  # fmt: skip
    if t.vocab_size < CLIP_VOCAB_SIZE:
        raise ValueError(f"{prefix}.vocab_size must cover our tokenizer's {CLIP_VOCAB_SIZE} ids (got {t.vocab_size})")
    if name in HF_TEXT_SIZES:
        kw = dict(HF_TEXT_SIZES[name])
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, t.context_length)
    elif os.path.isdir(name):
        cfg = _folder_config(name, t, prefix)
    else:
        raise ValueError(f"{prefix}.hf_config: {name!r} is neither a size ({', '.join(HF_TEXT_SIZES)}) nor a folder")
    if cfg.is_encoder_decoder or getattr(cfg, "is_decoder", False):
        raise ValueError(f"{prefix}.hf_config: {name!r} is a {cfg.model_type} decoder; the text tower needs an encoder")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and max_pos < t.context_length:
        raise ValueError(f"{prefix}.context_length {t.context_length} is longer than {prefix}.hf_config's "
                         f"max_position_embeddings {max_pos}")  # fmt: skip
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{prefix}.hf_config: hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")  # fmt: skip
    cfg.vocab_size = t.vocab_size
    cfg.pad_token_id = None  # our pad id 0 is also the token "!" (see the module docstring)
    return cfg


def _folder_config(path: str, t, prefix: str):
    from transformers import AutoConfig

    key = f"{prefix}.hf_config"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{key}: {path} has no config.json (a folder written by a transformers save_pretrained)")
    own = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if own:
        raise ValueError(
            f"{key}: {path} brings its own tokenizer ({', '.join(own)}); the data pipeline tokenizes with our CLIP "
            f"BPE tokenizer ({CLIP_VOCAB_SIZE} ids), so that tokenizer would not be used and pretrained embedding "
            "rows would be read with the wrong ids. Use a folder with config.json only (trained from scratch with "
            "our tokenizer), or a size name"
        )
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{key}: {path}/config.json unreadable ({why})") from None
    for attr in ("hidden_size", "num_attention_heads"):
        if not isinstance(getattr(cfg, attr, None), int):
            raise ValueError(f"{key}: {path}/config.json ({cfg.model_type}) has no {attr}: not a text encoder config")
    if os.path.isfile(os.path.join(path, HF_TEXT_WEIGHTS)) and cfg.vocab_size != t.vocab_size:
        raise ValueError(
            f"{key}: {path}/{HF_TEXT_WEIGHTS} has embeddings for {cfg.vocab_size} ids, {prefix}.vocab_size is "
            f"{t.vocab_size} (our tokenizer): those weights were trained with another vocabulary"
        )
    return cfg
