"""CLIP: a twin of Hugging Face `CLIPModel` (OpenAI CLIP / OpenCLIP ViT architecture).

Vision: bias-free conv patch embedding, class token, learned position embedding, pre-LayerNorm,
pre-LN blocks, post-LayerNorm on the class token, bias-free projection.
Text: token + position embedding, causal blocks, final LayerNorm, pooled at the EOT token (the
largest token id, as OpenAI and HF's legacy `eos_token_id == 2` path do), bias-free projection.

Parameter names equal HF's except: fused `self_attn.qkv_proj` (HF q_proj/k_proj/v_proj), and
`vision_model.projection` / `text_model.projection` (HF `visual_projection` / `text_projection`,
top-level there; ours live in the towers so that `lock_image` freezes the projection too and
ZeRO-3 gathers it with the tower), and logit_scale's shape: (1,) here, () in HF.

Shapes: B batch, C channels, N tokens, P patches, D width, E embed_dim, L text length.
"""

from typing import Optional

import torch
from torch import nn

from mmpretrain.model.base import TwoTowerModel
from mmpretrain.model.hf_text import HFTextTower
from mmpretrain.model.layers import Encoder, LayerNorm, TextEmbeddings, TowerOutput, init_linear_, patch_dropout

LOGIT_SCALE_MAX = 100.0  # exp(logit_scale) is clamped here, as OpenAI/OpenCLIP do


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Embedding(1 + (image_size // patch_size) ** 2, width)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """-> (B, 1 + P, D): class token then patches, position embedding added."""
        B, _, H, W = images_BCHW.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"images are {H}x{W}, the model expects {self.image_size}x{self.image_size}")
        x_BDhw = self.patch_embedding(images_BCHW.to(self.patch_embedding.weight.dtype))
        x_BPD = x_BDhw.flatten(2).transpose(1, 2)
        x_BND = torch.cat([self.class_embedding.expand(B, 1, -1).to(x_BPD.dtype), x_BPD], dim=1)
        return x_BND + self.position_embedding(torch.arange(x_BND.shape[1], device=x_BND.device))


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = cfg.vision
        self.patch_dropout = v.patch_dropout
        self.embeddings = CLIPVisionEmbeddings(v.image_size, v.patch_size, v.width)
        self.pre_layrnorm = LayerNorm(v.width, eps=v.ln_eps)  # (sic) HF's spelling, so the keys match
        self.encoder = Encoder(v, causal=False, impl=cfg.attention, grad_checkpointing=cfg.grad_checkpointing)
        self.post_layernorm = LayerNorm(v.width, eps=v.ln_eps)
        self.projection = nn.Linear(v.width, cfg.embed_dim, bias=False)

    def forward(
        self,
        images_BCHW: torch.Tensor,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        patch_drop: Optional[float] = None,
    ) -> TowerOutput:
        """-> TowerOutput; `pooled_only` (what encode_image uses): the last block runs on the class token
        alone and last_hidden_state is (B, 1, D), that token (see Encoder.forward)."""
        x_BND = self.embeddings(images_BCHW)
        drop = self.patch_dropout if patch_drop is None else patch_drop  # patch_drop: MIM's mask ratio
        keep_BK = None
        if self.training and drop > 0:
            x_BND, keep_BK = patch_dropout(x_BND, keep_frac=1 - drop, num_prefix=1)
        x_BND = self.pre_layrnorm(x_BND)
        pool_B = x_BND.new_zeros(x_BND.shape[0], dtype=torch.long) if pooled_only else None  # the class token
        x_BND, hidden_states = self.encoder(x_BND, output_hidden_states, pool_B)
        embeds_BE = self.projection(self.post_layernorm(x_BND[:, 0]))
        # HF's CLIP vision last_hidden_state is the encoder output before post_layernorm.
        return TowerOutput(embeds_BE, x_BND, hidden_states, keep_BK)


class CLIPTextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        t = cfg.text
        self.embeddings = TextEmbeddings(t.vocab_size, t.context_length, t.width)
        self.encoder = Encoder(t, causal=True, impl=cfg.attention, grad_checkpointing=cfg.grad_checkpointing)
        self.final_layer_norm = LayerNorm(t.width, eps=t.ln_eps)
        self.projection = nn.Linear(t.width, cfg.embed_dim, bias=False)

    def forward(
        self,
        tokens_BL: torch.Tensor,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        token_embeds_BLD: Optional[torch.Tensor] = None,
    ) -> TowerOutput:
        """-> TowerOutput; `pooled_only` (what encode_text uses): the last block's out-projection and MLP run
        on the EOT token alone and last_hidden_state is (B, 1, D), that token (see Encoder.forward)."""
        # Pool at the EOT token: the tokenizer gives it the largest id, so argmax finds it (first one on ties).
        eot_B = tokens_BL.argmax(dim=-1)
        pooled = pooled_only and not output_hidden_states
        x_BLD = self.embeddings(tokens_BL, token_embeds_BLD)
        x_BLD, hidden_states = self.encoder(x_BLD, output_hidden_states, eot_B if pooled else None)
        x_BLD = self.final_layer_norm(x_BLD)
        pooled_BD = x_BLD[:, 0] if pooled else x_BLD[torch.arange(x_BLD.shape[0], device=x_BLD.device), eot_B]
        return TowerOutput(self.projection(pooled_BD), x_BLD, hidden_states)


class CLIP(TwoTowerModel):
    def __init__(self, cfg):
        """cfg: a resolved ModelConfig (see build_model)."""
        super().__init__(cfg.lock_image)
        self.vision_model = CLIPVisionTower(cfg)
        self.text_model = HFTextTower(cfg) if cfg.text.kind == "hf" else CLIPTextTower(cfg)  # hf: ALIGN's BERT
        # Shape (1,), not () as in HF CLIP: DeepSpeed's parameter broadcast views each parameter as bytes,
        # which fails on 0-dim tensors. Converters reshape.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))  # log of the scale
        self.init_weights()
        if cfg.lock_image:
            self.lock_image_tower()

    def logit_params(self):
        # Clamp here (not on the parameter in the loop) so it holds under ZeRO-sharded parameters too.
        return self.logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX).squeeze(0), None

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI CLIP's init (as OpenCLIP), applied to both towers; deterministic under torch.manual_seed.
        An HF text tower (kind=hf) keeps the init transformers gave it (and the folder's weights, if any)."""
        v, t = self.vision_model, self.text_model
        width_v = v.post_layernorm.normalized_shape[0]
        emb = v.embeddings
        patch = emb.patch_embedding
        fan_in = patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1]
        nn.init.normal_(patch.weight, std=fan_in**-0.5)
        nn.init.normal_(emb.class_embedding, std=width_v**-0.5)
        nn.init.normal_(emb.position_embedding.weight, std=width_v**-0.5)
        towers = (v,)
        if isinstance(t, CLIPTextTower):
            nn.init.normal_(t.embeddings.token_embedding.weight, std=0.02)
            nn.init.normal_(t.embeddings.position_embedding.weight, std=0.01)
            towers = (v, t)
        for tower in towers:
            init_clip_encoder_(tower.encoder)
            nn.init.normal_(tower.projection.weight, std=tower.projection.in_features**-0.5)


def init_clip_encoder_(encoder: Encoder) -> None:
    """OpenAI CLIP: attention in-proj std D^-0.5, residual out-projections D^-0.5 (2L)^-0.5, fc1 (2D)^-0.5."""
    num_layers = len(encoder.layers)
    for layer in encoder.layers:
        width = layer.mlp.fc1.in_features
        proj_std = width**-0.5 * (2 * num_layers) ** -0.5
        init_linear_(layer.self_attn.qkv_proj, width**-0.5)
        init_linear_(layer.self_attn.out_proj, proj_std)
        init_linear_(layer.mlp.fc1, (2 * width) ** -0.5)
        init_linear_(layer.mlp.fc2, proj_std)
