"""A transformers encoder as the text tower (ALIGN: a BERT text tower, [CLS] pooling, linear projection).

`model.text.kind=hf` puts this tower in place of the family's own text tower (CLIP or SigLIP); the image
tower, the logit parameters, `encode_text` / `encode_image` and the objectives are unchanged.

    model.text.hf_config: bert-tiny            a size from mmpretrain.model.sizes.HF_TEXT_SIZES
    model.text.hf_config: /path/to/folder      a folder with a transformers config.json (AutoConfig reads it),
                                               optionally model.safetensors: weights loaded at build time

The encoder is built with `AutoModel.from_config` (nothing is downloaded); its pooler is dropped: the
embedding is `projection(last_hidden_state[:, 0])`, as HF `AlignModel.get_text_features` computes it.

Tokens are ours (CLIP BPE, 49,408 ids: SOT first, EOT = the largest id, then padding with id 0), so the
encoder's vocab_size is `model.text.vocab_size` and position 0 (SOT) plays BERT's [CLS]. The attention mask
keeps the positions up to the first EOT (the argmax of the ids, the rule our CLIP tower pools by), not
`ids != 0`: id 0 is also the token "!", which may appear inside a caption. The config's pad_token_id is
cleared for the same reason (nn.Embedding's padding_idx would freeze the "!" row at zero).
A folder that brings its own tokenizer is refused: the data pipeline tokenizes with ours, whose ids
would index another vocabulary's embedding rows.

Under bf16 the encoder's LayerNorms compute in float32 (they become our LayerNorm, same parameters);
attention is transformers' SDPA path (model.attention applies to our own towers only).

Shapes: B batch, L tokens, D encoder width, E embed_dim.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn

from mmpretrain.model.layers import LayerNorm, TowerOutput
from mmpretrain.model.sizes import CLIP_VOCAB_SIZE, HF_TEXT_SIZES

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")  # fmt: skip
WEIGHTS = "model.safetensors"
# Keys of a saved encoder that this tower does not use: BERT's pooler and the pretraining heads of
# BertForPreTraining / BertForMaskedLM (cls.*).
UNUSED_PREFIXES = ("pooler.", "cls.")


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
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{key}: {path}/config.json unreadable ({why})") from None
    for attr in ("hidden_size", "num_attention_heads"):
        if not isinstance(getattr(cfg, attr, None), int):
            raise ValueError(f"{key}: {path}/config.json ({cfg.model_type}) has no {attr}: not a text encoder config")
    if os.path.isfile(os.path.join(path, WEIGHTS)) and cfg.vocab_size != t.vocab_size:
        raise ValueError(
            f"{key}: {path}/{WEIGHTS} has embeddings for {cfg.vocab_size} ids, {prefix}.vocab_size is {t.vocab_size} "
            "(our tokenizer): those weights were trained with another vocabulary"
        )
    return cfg


def _fp32_layernorms_(module: nn.Module) -> None:
    """Every nn.LayerNorm becomes our LayerNorm (same parameters, computed in float32 under bf16)."""
    for m in module.modules():
        if type(m) is nn.LayerNorm:
            m.__class__ = LayerNorm


class HFTextTower(nn.Module):
    """`hf`: the transformers encoder (keys `text_model.hf.*`); `projection`: (D -> E) with bias, as ALIGN's."""

    def __init__(self, cfg):
        """cfg: a resolved ModelConfig with text.kind == "hf"."""
        super().__init__()
        from transformers import AutoModel

        t = cfg.text
        hf_cfg = hf_text_config(t)
        self.context_length = t.context_length
        try:
            self.hf = AutoModel.from_config(hf_cfg, attn_implementation="sdpa", add_pooling_layer=False)
        except TypeError:  # an encoder class without a pooler switch
            self.hf = AutoModel.from_config(hf_cfg, attn_implementation="sdpa")
        if getattr(self.hf, "pooler", None) is not None:
            self.hf.pooler = None  # unused: no parameter without a gradient (ZeRO would wait for it)
        _fp32_layernorms_(self.hf)
        if cfg.grad_checkpointing:
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        width = hf_cfg.hidden_size
        self.projection = nn.Linear(width, cfg.embed_dim)
        with torch.no_grad():
            nn.init.normal_(self.projection.weight, std=width**-0.5)
            nn.init.zeros_(self.projection.bias)
        weights = os.path.join(t.hf_config, WEIGHTS)
        if t.hf_config not in HF_TEXT_SIZES and os.path.isfile(weights) and not self.projection.weight.is_meta:
            self.load_encoder_weights(weights)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The (vocab_size, D) input embedding (CoOp initializes its context vectors from rows of it)."""
        return self.hf.get_input_embeddings()

    def load_encoder_weights(self, path: str) -> None:
        """The encoder's weights from a safetensors file saved by transformers (with or without the `bert.`
        prefix of a task model); the pooler and pretraining heads are dropped; anything else must match."""
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
        prefix = f"{self.hf.base_model_prefix}."
        if sd and all(k.startswith(prefix) or k.startswith(UNUSED_PREFIXES) for k in sd):
            sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
        unused = sorted(k for k in sd if k.startswith(UNUSED_PREFIXES))
        if unused:
            log.warning("%s: not loading %d keys the text tower does not use (%s ...)", path, len(unused), unused[0])
        sd = {k: v for k, v in sd.items() if not k.startswith(UNUSED_PREFIXES) and not k.endswith(".position_ids")}
        own = self.hf.state_dict()
        missing, extra = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
        bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
               if k in sd and sd[k].shape != v.shape]  # fmt: skip
        if missing or extra or bad:
            raise ValueError(f"model.text.hf_config: {path} does not fit the encoder: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, shape mismatch {bad[:3]}")  # fmt: skip
        self.hf.load_state_dict(sd, strict=True)

    def forward(
        self,
        tokens_BL: torch.Tensor,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        token_embeds_BLD: Optional[torch.Tensor] = None,
    ) -> TowerOutput:
        """-> TowerOutput; `pooled_only` is accepted for the towers' common signature and changes nothing
        (last_hidden_state is every position, (B, L, D)). token_embeds_BLD replaces the token embedding's rows
        (CoOp); position (and BERT's token-type) embeddings are added either way."""
        B, L = tokens_BL.shape
        if L > self.context_length:
            raise ValueError(f"got {L} tokens per caption, more than the model's context_length {self.context_length}")
        # Valid: SOT .. first EOT (EOT is the largest id); after it, padding.
        eot_B = tokens_BL.argmax(dim=-1)
        mask_BL = (torch.arange(L, device=tokens_BL.device)[None, :] <= eot_B[:, None]).long()
        inputs = dict(input_ids=tokens_BL) if token_embeds_BLD is None else dict(inputs_embeds=token_embeds_BLD)
        out = self.hf(attention_mask=mask_BL, output_hidden_states=output_hidden_states, **inputs)
        x_BLD = out.last_hidden_state  # BERT is post-LN: already normalized, no final LayerNorm
        hidden_states = tuple(out.hidden_states) if output_hidden_states else None
        return TowerOutput(self.projection(x_BLD[:, 0]), x_BLD, hidden_states)
