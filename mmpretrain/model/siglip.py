"""SigLIP: a twin of Hugging Face `SiglipModel` (big_vision's SigLIP).

Vision: conv patch embedding with bias, no class token, learned position embedding, pre-LN blocks,
post-LayerNorm on every token, attention-pooling head (a learned probe attends over the tokens,
then LayerNorm + MLP residual) whose output is the embedding (no projection).
Text: token + position embedding, NON-causal blocks, final LayerNorm, pooled at the last position,
then a linear `head` with bias.

Parameter names equal HF's except the fused `self_attn.qkv_proj` in the encoder blocks (HF
q_proj/k_proj/v_proj) (logit_scale / logit_bias have shape (1,) as in HF). The pooling
head keeps nn.MultiheadAttention's names (in_proj_weight, in_proj_bias, out_proj) like HF does.

Shapes: B batch, C channels, N tokens, D width, H heads, Dh head width, E embed_dim (= D here), L text length.
"""

from typing import Optional

import torch
from torch import nn

from mmpretrain.kernels import attention
from mmpretrain.model.base import TwoTowerModel
from mmpretrain.model.hf_text import HFTextTower
from mmpretrain.model.layers import MLP, Encoder, LayerNorm, TextEmbeddings, TowerOutput, patch_dropout
from mmpretrain.model.naflex import PackedImages, packed_positions, query_layout


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2, width)

    def forward(self, images_BCHW) -> torch.Tensor:
        """-> (B, N, D) patch tokens with position embedding added (PackedImages: see packed)."""
        if isinstance(images_BCHW, PackedImages):
            return self.packed(images_BCHW)
        _, _, H, W = images_BCHW.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"images are {H}x{W}, the model expects {self.image_size}x{self.image_size}")
        x_BDhw = self.patch_embedding(images_BCHW.to(self.patch_embedding.weight.dtype))
        x_BND = x_BDhw.flatten(2).transpose(1, 2)
        return x_BND + self.position_embedding(torch.arange(x_BND.shape[1], device=x_BND.device))

    def packed(self, packed: PackedImages) -> torch.Tensor:
        """NaFlex: packed patches (B, N, p*p*3) -> (B, N, D) tokens, each image with its resized position table.
        Called by forward (ZeRO-3 gathers the parameters there)."""
        B, N, _ = packed.patches_BNK.shape
        p = self.patch_embedding.kernel_size[0]
        # Each patch through the conv module itself (one p x p window per patch, the same dot product as a linear
        # layer over the flattened pixels), so ZeRO-3 gathers its weight as in forward.
        pix = packed.patches_BNK.reshape(B * N, p, p, 3).permute(0, 3, 1, 2)  # (row, col, channel) -> (C, p, p)
        x_BND = self.patch_embedding(pix.to(self.patch_embedding.weight.dtype)).reshape(B, N, -1)
        g = self.image_size // p
        grid_ggD = self.position_embedding(torch.arange(g * g, device=x_BND.device)).reshape(g, g, -1)
        return x_BND + packed_positions(grid_ggD, packed.shapes, N).to(x_BND.dtype)


class PoolingAttention(nn.Module):
    """Cross-attention from the probe to the tokens, with nn.MultiheadAttention's parameter layout."""

    def __init__(self, width: int, heads: int, impl: str):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: [q; k; v]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(
        self,
        query_BQD: torch.Tensor,
        x_BND: torch.Tensor,
        segment_ids_BN: Optional[torch.Tensor] = None,
        q_segment_ids_BQ: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """segment_ids_BN / q_segment_ids_BQ (int32): packed images, a query reads only its image's tokens."""
        B, N, D = x_BND.shape
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        q = nn.functional.linear(query_BQD, w_q, b_q)
        q = q.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, Q, Dh)
        kv = nn.functional.linear(x_BND, w_kv, b_kv).view(B, N, 2, self.heads, D // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        out_BHQD = attention(
            q, k, v, causal=False, impl=self.impl, segment_ids=segment_ids_BN, q_segment_ids=q_segment_ids_BQ
        )
        return self.out_proj(out_BHQD.transpose(1, 2).reshape(B, -1, D))


class AttentionPoolingHead(nn.Module):
    """HF SiglipMultiheadAttentionPoolingHead (big_vision "MAP" head)."""

    def __init__(self, v, impl: str):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, v.width))
        self.attention = PoolingAttention(v.width, v.heads, impl)
        self.layernorm = LayerNorm(v.width, eps=v.ln_eps)
        self.mlp = MLP(v.width, v.mlp_dim, v.act)

    def forward(self, x_BND: torch.Tensor, packed: Optional[PackedImages] = None) -> torch.Tensor:
        """-> (B, D); with packed (NaFlex, x_BND its packed tokens) -> (I, D), one per image (see packed)"""
        if packed is not None:
            return self.packed(x_BND, packed)
        h_B1D = self.attention(self.probe.expand(x_BND.shape[0], -1, -1).to(x_BND.dtype), x_BND)
        h_B1D = h_B1D + self.mlp(self.layernorm(h_B1D))
        return h_B1D[:, 0]

    def packed(self, x_BND: torch.Tensor, packed: PackedImages) -> torch.Tensor:
        """Packed NaFlex tokens -> (I, D): the probe once per image, attending over that image's tokens only.
        Called by forward (ZeRO-3 gathers the probe there)."""
        q_seg_BQ, index_I = query_layout(packed.shapes, x_BND.device)
        B, Q = q_seg_BQ.shape
        probe_BQD = self.probe.expand(B, Q, -1).to(x_BND.dtype)
        h_BQD = self.attention(probe_BQD, x_BND, packed.segment_ids_BN, q_seg_BQ)
        h_BQD = h_BQD + self.mlp(self.layernorm(h_BQD))
        return h_BQD.reshape(B * Q, -1)[index_I]  # the queries past a row's images are dropped


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = cfg.vision
        self.patch_dropout = v.patch_dropout
        self.embeddings = SiglipVisionEmbeddings(v.image_size, v.patch_size, v.width)
        self.encoder = Encoder(v, causal=False, impl=cfg.attention, grad_checkpointing=cfg.grad_checkpointing)
        self.post_layernorm = LayerNorm(v.width, eps=v.ln_eps)
        self.head = AttentionPoolingHead(v, cfg.attention)

    def forward(
        self,
        images_BCHW,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        patch_drop: Optional[float] = None,
    ) -> TowerOutput:
        """-> TowerOutput; `pooled_only` is accepted for the towers' common signature and changes nothing:
        the attention-pooling head reads every token of the last block.

        images_BCHW may be a PackedImages (NaFlex, several images per row; mmpretrain.model.naflex): embeds is
        then (I, E), one per image in packing order, and last_hidden_state the packed (B, N, D) tokens."""
        if isinstance(images_BCHW, PackedImages):
            return self.forward_packed(images_BCHW, output_hidden_states, patch_drop)
        x_BND = self.embeddings(images_BCHW)
        drop = self.patch_dropout if patch_drop is None else patch_drop  # patch_drop: MIM's mask ratio
        keep_BK = None
        if self.training and drop > 0:
            x_BND, keep_BK = patch_dropout(x_BND, keep_frac=1 - drop, num_prefix=0)
        x_BND, hidden_states = self.encoder(x_BND, output_hidden_states)
        x_BND = self.post_layernorm(x_BND)  # HF's SigLIP last_hidden_state is after post_layernorm
        return TowerOutput(self.head(x_BND), x_BND, hidden_states, keep_BK)

    def forward_packed(
        self, packed: PackedImages, output_hidden_states: bool = False, patch_drop: Optional[float] = None
    ) -> TowerOutput:
        """NaFlex with sequence packing: block-diagonal attention through the segment ids, per-image pooling."""
        drop = self.patch_dropout if patch_drop is None else patch_drop
        if self.training and drop > 0:
            raise ValueError("model.vision.patch_dropout (or a term's patch_drop) is not supported with packed "
                             "NaFlex images (data.naflex)")  # fmt: skip
        packed.check(self.embeddings.patch_embedding.kernel_size[0])
        x_BND = self.embeddings(packed)
        x_BND, hidden_states = self.encoder(x_BND, output_hidden_states, segment_ids_BN=packed.segment_ids_BN)
        x_BND = self.post_layernorm(x_BND)
        return TowerOutput(self.head(x_BND, packed), x_BND, hidden_states)


class SiglipTextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        t = cfg.text
        self.embeddings = TextEmbeddings(t.vocab_size, t.context_length, t.width)
        self.encoder = Encoder(t, causal=False, impl=cfg.attention, grad_checkpointing=cfg.grad_checkpointing)
        self.final_layer_norm = LayerNorm(t.width, eps=t.ln_eps)
        self.head = nn.Linear(t.width, cfg.embed_dim)

    def forward(
        self,
        tokens_BL: torch.Tensor,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        token_embeds_BLD: Optional[torch.Tensor] = None,
    ) -> TowerOutput:
        """-> TowerOutput; `pooled_only` (what encode_text uses): the last block's out-projection and MLP run
        on the last position alone and last_hidden_state is (B, 1, D), that token (see Encoder.forward)."""
        B, L = tokens_BL.shape
        # SigLIP pools at the last position, whatever token sits there (captions are padded to full length).
        last_B = tokens_BL.new_full((B,), L - 1) if pooled_only and not output_hidden_states else None
        x_BLD, hidden_states = self.encoder(self.embeddings(tokens_BL, token_embeds_BLD), output_hidden_states, last_B)
        x_BLD = self.final_layer_norm(x_BLD)
        return TowerOutput(self.head(x_BLD[:, -1]), x_BLD, hidden_states)


class SigLIP(TwoTowerModel):
    def __init__(self, cfg):
        """cfg: a resolved ModelConfig (see build_model)."""
        super().__init__(cfg.lock_image)
        self.vision_model = SiglipVisionTower(cfg)
        self.text_model = HFTextTower(cfg) if cfg.text.kind == "hf" else SiglipTextTower(cfg)
        # Shape (1,) like HF (and DeepSpeed's parameter broadcast cannot handle 0-dim tensors).
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))  # log of the scale
        self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
        self.init_weights()
        if cfg.lock_image:
            self.lock_image_tower()

    def logit_params(self):
        # clone: hand out a new tensor, never the parameter itself (ZeRO-3 empties a gathered parameter after forward)
        return self.logit_scale.float().exp().squeeze(0), self.logit_bias.float().squeeze(0).clone()

    @torch.no_grad()
    def init_weights(self) -> None:
        """big_vision's SigLIP init (as HF's SiglipPreTrainedModel); deterministic under torch.manual_seed.
        An HF text tower (kind=hf) keeps the init transformers gave it (and the folder's weights, if any)."""
        v, t = self.vision_model, self.text_model
        own_text = isinstance(t, SiglipTextTower)
        width_v = v.post_layernorm.normalized_shape[0]
        _lecun_normal_(v.embeddings.patch_embedding)
        nn.init.normal_(v.embeddings.position_embedding.weight, std=width_v**-0.5)
        if own_text:
            for emb in (t.embeddings.token_embedding, t.embeddings.position_embedding):
                nn.init.normal_(emb.weight, std=emb.embedding_dim**-0.5)  # flax default embed init
        for layer in [*v.encoder.layers, *(t.encoder.layers if own_text else ())]:
            for w in layer.self_attn.qkv_proj.weight.chunk(3):  # HF inits q, k, v as separate matrices
                nn.init.xavier_uniform_(w)
            nn.init.zeros_(layer.self_attn.qkv_proj.bias)
            nn.init.xavier_uniform_(layer.self_attn.out_proj.weight)
            nn.init.zeros_(layer.self_attn.out_proj.bias)
            _init_mlp_(layer.mlp)
        head = v.head
        nn.init.xavier_uniform_(head.probe)
        nn.init.xavier_uniform_(head.attention.in_proj_weight)
        nn.init.zeros_(head.attention.in_proj_bias)
        _lecun_normal_(head.attention.out_proj)
        _init_mlp_(head.mlp)
        if own_text:
            _lecun_normal_(t.head)


def _init_mlp_(mlp: MLP) -> None:
    for fc in (mlp.fc1, mlp.fc2):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.normal_(fc.bias, std=1e-6)


def _lecun_normal_(module: nn.Module) -> None:
    """Truncated normal with variance 1 / fan_in (flax lecun_normal); bias zero."""
    fan_in = module.weight[0].numel()
    std = fan_in**-0.5 / 0.87962566103423978  # std of a standard normal truncated to [-2, 2]
    nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(module.bias)
