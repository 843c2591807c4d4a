"""Building blocks shared by both towers and both families.

Shape legend: B batch, N tokens, D width, H heads, Dh head width (D / H), F MLP hidden size,
E embedding width.

Attribute names mirror Hugging Face's CLIP/SigLIP modules (layer_norm1, self_attn, mlp.fc1 ...)
so the converters are a key map; the one structural difference is the fused `self_attn.qkv_proj`
(HF keeps q_proj, k_proj, v_proj: ours is their concatenation along the output dim, in that order).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.kernels import attention


@dataclass
class TowerOutput:
    """What a tower's forward returns (one type, whatever the flags)."""

    embeds: torch.Tensor  # (B, E) pooled and projected, NOT normalized
    last_hidden_state: torch.Tensor  # (B, N, D) as HF defines it for this tower
    hidden_states: Optional[tuple] = None  # L + 1 tensors (B, N, D): encoder input, then each block's output
    keep_BK: Optional[torch.Tensor] = None  # vision, patch dropout / MIM masking on: indices (0..P-1) of the K kept
    # patches per sample, ascending; last_hidden_state then holds the prefix tokens and those patches in that order


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (under bf16 autocast or on a bf16 model), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU (HF "quick_gelu")
    return x * torch.sigmoid(1.702 * x)


ACT_FNS = {
    "gelu": F.gelu,  # exact erf GELU (HF "gelu")
    "quick_gelu": quick_gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_pytorch_tanh" (SigLIP)
}


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection; the math runs in `mmpretrain.kernels.attention`."""

    def __init__(self, width: int, heads: int, causal: bool, impl: str):
        super().__init__()
        self.heads, self.causal, self.impl = heads, causal, impl
        self.qkv_proj = nn.Linear(width, 3 * width)  # rows: [q; k; v]
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x_BND: torch.Tensor, rows_B: Optional[torch.Tensor] = None, segment_ids_BN: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with `rows_B` (one token index per sample) -> (B, 1, D), those tokens' outputs.

        segment_ids_BN: (B, N) int32 for packed sequences: a token attends only to tokens with its id
        (conventions in mmpretrain.kernels.attention). None: every token sees every token (and the causal mask).
        """
        B, N, D = x_BND.shape
        # qkv_proj runs on every token even when one query row is wanted: k and v need them all, and
        # slicing its weight here would read a parameter outside its module's forward (ZeRO-3 gathers there).
        qkv = self.qkv_proj(x_BND).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        q_seg_BM = None
        if rows_B is not None and not self.causal:
            q = q[torch.arange(B, device=q.device), :, rows_B].unsqueeze(2)  # (B, H, 1, Dh)
            if segment_ids_BN is not None:
                q_seg_BM = segment_ids_BN[torch.arange(B, device=q.device), rows_B].unsqueeze(1)  # (B, 1)
        out_BHMD = attention(
            q, k, v, causal=self.causal, impl=self.impl, segment_ids=segment_ids_BN, q_segment_ids=q_seg_BM
        )
        if rows_B is not None and self.causal:
            # One causal query row would need a per-sample mask; at text lengths the full causal attention
            # is cheap, so keep it and take the rows after (the kernel still sees causal=True).
            out_BHMD = out_BHMD[torch.arange(B, device=q.device), :, rows_B].unsqueeze(2)
        return self.out_proj(out_BHMD.transpose(1, 2).reshape(B, -1, D))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.act = ACT_FNS[act]
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width, heads, mlp_dim, act, ln_eps, causal, impl):
        super().__init__()
        self.layer_norm1 = LayerNorm(width, eps=ln_eps)
        self.self_attn = Attention(width, heads, causal, impl)
        self.layer_norm2 = LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(
        self, x_BND: torch.Tensor, rows_B: Optional[torch.Tensor] = None, segment_ids_BN: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with `rows_B` (B,) token indices -> (B, 1, D): the block's output at those
        tokens only (attention still reads every token), skipping the out-projection and MLP elsewhere.
        segment_ids_BN: (B, N) int32, packed sequences (see Attention.forward)."""
        if rows_B is None:
            x_BND = x_BND + self.self_attn(self.layer_norm1(x_BND), segment_ids_BN=segment_ids_BN)
            return x_BND + self.mlp(self.layer_norm2(x_BND))
        x_B1D = x_BND[torch.arange(x_BND.shape[0], device=x_BND.device), rows_B].unsqueeze(1)
        x_B1D = x_B1D + self.self_attn(self.layer_norm1(x_BND), rows_B, segment_ids_BN)
        return x_B1D + self.mlp(self.layer_norm2(x_B1D))


class Encoder(nn.Module):
    """A stack of blocks; each is recomputed in backward when `grad_checkpointing` is set."""

    def __init__(self, tower_cfg, causal: bool, impl: str, grad_checkpointing: bool):
        super().__init__()
        c = tower_cfg
        self.grad_checkpointing = grad_checkpointing
        self.layers = nn.ModuleList(
            EncoderLayer(c.width, c.heads, c.mlp_dim, c.act, c.ln_eps, causal, impl) for _ in range(c.layers)
        )

    def forward(
        self,
        x_BND: torch.Tensor,
        output_hidden_states: bool = False,
        pool_B: Optional[torch.Tensor] = None,
        segment_ids_BN: Optional[torch.Tensor] = None,
    ):
        """Returns (last block output (B, N, D), hidden states tuple or None).

        pool_B: (B,) index of the one token per sample the caller reads (class / EOT token). Given, the
        last block runs its out-projection and MLP on that token only and the output is (B, 1, D): the same
        values as the full output at those tokens (up to float rounding), about 3/4 of a block cheaper.
        Ignored when output_hidden_states is set (every token of every block is returned then).
        segment_ids_BN: (B, N) int32 for packed sequences, handed to every block's attention (see Attention).
        """
        hidden_states = [x_BND] if output_hidden_states else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows_B = pool_B if i == last and not output_hidden_states else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_BND = checkpoint(layer, x_BND, rows_B, segment_ids_BN, use_reentrant=False)
            else:
                x_BND = layer(x_BND, rows_B, segment_ids_BN)
            if output_hidden_states:
                hidden_states.append(x_BND)
        return x_BND, (tuple(hidden_states) if output_hidden_states else None)


class TextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding (HF CLIPTextEmbeddings / SiglipTextEmbeddings)."""

    def __init__(self, vocab_size: int, context_length: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)

    def forward(self, tokens_BL: torch.Tensor, token_embeds_BLD: Optional[torch.Tensor] = None) -> torch.Tensor:
        """token_embeds_BLD: use these instead of the token embedding's rows (CoOp's learned context
        vectors sit in some positions); position embeddings are added either way."""
        L = tokens_BL.shape[1]
        if L > self.position_embedding.num_embeddings:
            raise ValueError(
                f"got {L} tokens per caption, more than the model's context_length "
                f"{self.position_embedding.num_embeddings}"
            )
        # Call the embedding modules (never read .weight here) so ZeRO-3 gathers their parameters.
        positions = torch.arange(L, device=tokens_BL.device)
        tok_BLD = self.token_embedding(tokens_BL) if token_embeds_BLD is None else token_embeds_BLD
        return tok_BLD + self.position_embedding(positions)


def patch_dropout(x_BND: torch.Tensor, keep_frac: float, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLIP: keep a random subset of the patch tokens per sample; the first num_prefix (class) tokens always stay.

    Returns ((B, num_prefix + K, D), keep_BK) with K = max(1, int(num_patches * keep_frac)): the kept
    patches in their original order and their indices among the patches (MAE-style masking reads them).
    """
    prefix, patches = x_BND[:, :num_prefix], x_BND[:, num_prefix:]
    B, P, D = patches.shape
    K = max(1, int(P * keep_frac))
    keep_BK = torch.rand(B, P, device=x_BND.device).topk(K, dim=1).indices.sort(dim=1).values
    patches = patches.gather(1, keep_BK[:, :, None].expand(B, K, D))
    return torch.cat([prefix, patches], dim=1), keep_BK


def init_linear_(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
