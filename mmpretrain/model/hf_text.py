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
from safetensors.torch import load_file
from torch import nn

from mmpretrain.model.config import HF_TEXT_WEIGHTS, hf_text_config
from mmpretrain.model.layers import LayerNorm, TowerOutput
from mmpretrain.model.sizes import HF_TEXT_SIZES

log = logging.getLogger(__name__)

# Keys of a saved encoder that this tower does not use: BERT's pooler and the pretraining heads of
# BertForPreTraining / BertForMaskedLM (cls.*).
UNUSED_PREFIXES = ("pooler.", "cls.")


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
            self.hf = AutoModel.from_config(
                hf_cfg, attn_implementation="sdpa", add_pooling_layer=False, trust_remote_code=False
            )
        except TypeError:  # an encoder class without a pooler switch
            self.hf = AutoModel.from_config(hf_cfg, attn_implementation="sdpa", trust_remote_code=False)
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
        weights = os.path.join(t.hf_config, HF_TEXT_WEIGHTS)
        if t.hf_config not in HF_TEXT_SIZES and os.path.isfile(weights) and not self.projection.weight.is_meta:
            self.load_encoder_weights(weights)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The (vocab_size, D) input embedding (CoOp initializes its context vectors from rows of it)."""
        return self.hf.get_input_embeddings()

    def load_encoder_weights(self, path: str) -> None:
        """The encoder's weights from a safetensors file saved by transformers (with or without the `bert.`
        prefix of a task model); the pooler and pretraining heads are dropped; anything else must match."""
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
