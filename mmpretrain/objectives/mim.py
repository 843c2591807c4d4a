"""Masked image modeling as an auxiliary term (MAE target, FLIP-style masking).

The vision tower runs on a random subset of its patches (the same masking as FLIP's patch dropout:
``MimTermConfig.patch_drop`` returns ``mask_ratio``, so the contrastive term of the same step sees this masked view
too); a light decoder (``model.heads["mim"]``) puts a learned mask token at every dropped position, adds fixed
2-D sin-cos position embeddings, runs a few pre-LN blocks and predicts each patch's pixels. The loss is the
MSE on the masked patches only, against MAE's target (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners"): the patch's pixels of the CLIP-normalized image, each patch normalized by its own mean and
(unbiased) variance, ``norm_pix``, as MAE's ``norm_pix_loss``.

The target is computed in float32 from the loader's images (``ctx.batch["image"]``, uint8, normalized here
exactly as the tower input is), not from ``ctx.images``, which is in the engine dtype (bf16 would round the
target to ~3 significant digits).

Gradient contract: a local term, the mean over this rank's masked patches (every sample has the same number,
so this is the mean over this rank's samples); DeepSpeed's gradient average over ranks makes it the global
mean, and the trainer logs the mean over ranks.

Shapes: B batch, P patches (grid x grid, row-major like the conv patch embedding), K kept patches,
N' = prefix tokens (1 class token for CLIP, 0 for SigLIP) + K, Dv encoder width, D decoder width,
X = patch_size^2 * 3 pixels of a patch, ordered (row, column, channel) within the patch.
"""

from __future__ import annotations

import torch
from torch import nn

from mmpretrain.data.transforms import normalize_images
from mmpretrain.model.layers import EncoderLayer, LayerNorm
from mmpretrain.objectives.base import StepContext, Term, register
from mmpretrain.objectives.config import MimTermConfig

NORM_PIX_EPS = 1e-6  # MAE's: added to each patch's pixel variance


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """(grid * grid, width) fixed position embeddings, row-major patches: the first half of the dims encodes the
    patch's row, the second half its column, each as [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (width/4))."""
    quarter = width // 4
    omega_Q = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    ang_GQ = pos[:, None] * omega_Q[None, :]
    emb_GH = torch.cat([ang_GQ.sin(), ang_GQ.cos()], dim=1)  # (grid, width/2): one axis
    rows, cols = emb_GH[:, None, :].expand(grid, grid, -1), emb_GH[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, width)  # float64


def patchify(images_BCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, X): patches row-major, each patch's pixels in (row, column, channel) order (MAE's)."""
    B, C, H, W = images_BCHW.shape
    p = patch_size
    x = images_BCHW.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def pixel_target(images_BCHW: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """(B, 3, H, W) float32 normalized images -> (B, P, X) the reconstruction target of every patch."""
    target_BPX = patchify(images_BCHW, patch_size)
    if norm_pix:
        mean_BP1 = target_BPX.mean(-1, keepdim=True)
        var_BP1 = target_BPX.var(-1, keepdim=True)  # unbiased, as MAE
        target_BPX = (target_BPX - mean_BP1) / (var_BP1 + NORM_PIX_EPS).sqrt()
    return target_BPX


class MimDecoder(nn.Module):
    """MAE's light decoder: encoder tokens of the kept patches -> pixels of every patch."""

    def __init__(self, enc_width, grid, patch_size, width, layers, heads, impl):
        super().__init__()
        self.num_patches = grid * grid
        # The CLIP tower's tokens are its residual stream (its post_layernorm only sees the class token), the
        # SigLIP tower's are already normalized: one LayerNorm here makes the decoder's input alike for both.
        self.norm_in = LayerNorm(enc_width, eps=1e-6)
        self.embed = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        # Fixed, so not in the state dict (rebuilt from the config); prefix tokens get no position (MAE's zeros).
        # Kept in float64 (P x D, small) and cast where used, so a float64 model is exact (the tests).
        self.register_buffer("pos_PD", sincos_2d(width, grid), persistent=False)
        self.blocks = nn.ModuleList(
            EncoderLayer(width, heads, 4 * width, "gelu", 1e-6, causal=False, impl=impl) for _ in range(layers)
        )
        self.norm = LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # MAE: mask token N(0, 0.02), linear layers xavier-uniform with zero bias, LayerNorms (1, 0).
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def unshuffle(self, tokens_BND: torch.Tensor, keep_BK: torch.Tensor) -> torch.Tensor:
        """-> (B, prefix + P, D): the embedded prefix tokens, then every patch position in order holding its
        kept token or the mask token, position embeddings added (the decoder's input)."""
        B, K = keep_BK.shape
        num_prefix = tokens_BND.shape[1] - K
        x_BND = self.embed(self.norm_in(tokens_BND))
        D = x_BND.shape[-1]
        full_BPD = self.mask_token.to(x_BND.dtype).expand(B, self.num_patches, D)
        full_BPD = full_BPD.scatter(1, keep_BK[:, :, None].expand(B, K, D), x_BND[:, num_prefix:])
        full_BPD = full_BPD + self.pos_PD.to(x_BND.dtype)
        return torch.cat([x_BND[:, :num_prefix], full_BPD], dim=1)

    def forward(self, tokens_BND: torch.Tensor, keep_BK: torch.Tensor) -> torch.Tensor:
        """tokens (B, prefix + K, Dv) the encoder's output, keep (B, K) kept patch indices -> (B, P, X) pixels."""
        x_BND = self.unshuffle(tokens_BND, keep_BK)
        for block in self.blocks:
            x_BND = block(x_BND)
        return self.pred(self.norm(x_BND[:, -self.num_patches :]))


def masked_patches(keep_BK: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, K) kept indices -> (B, P) bool, True where the patch was hidden from the encoder."""
    masked_BP = torch.ones(keep_BK.shape[0], num_patches, dtype=torch.bool, device=keep_BK.device)
    return masked_BP.scatter(1, keep_BK, False)


@register
class MimTerm(Term):
    """MSE of the decoder's pixels on the masked patches (a local term: the mean over this rank's samples)."""

    name = "mim"
    config_cls = MimTermConfig
    needs = ("image_tokens",)

    def __init__(self, cfg, run_cfg):
        super().__init__(cfg, run_cfg)
        v = run_cfg.model.vision
        self.patch_size = v.patch_size
        self.num_patches = (v.image_size // v.patch_size) ** 2

    def build_head(self, model):
        c, v = self.cfg, self.run_cfg.model.vision
        grid = v.image_size // v.patch_size
        return MimDecoder(v.width, grid, v.patch_size, c.decoder_width, c.decoder_layers, c.decoder_heads,
                          self.run_cfg.model.attention)  # fmt: skip

    def loss(self, ctx: StepContext) -> torch.Tensor:
        o = ctx.out
        if o.image_keep is None:
            raise RuntimeError("the mim term needs the masked view: the model must be in training mode")
        pred_BPX = ctx.model(head=self.name, tokens_BND=o.image_tokens, keep_BK=o.image_keep)
        dtype = torch.promote_types(pred_BPX.dtype, torch.float32)  # the loss in fp32 (fp64 in the tests)
        pred_BPX = pred_BPX.to(dtype)
        images_BCHW = normalize_images(ctx.batch["image"].to(pred_BPX.device), dtype)
        target_BPX = pixel_target(images_BCHW, self.patch_size, self.cfg.norm_pix)
        masked_BP = masked_patches(o.image_keep, self.num_patches)
        err_BP = (pred_BPX - target_BPX).square().mean(-1)  # per-patch MSE
        # the same number of masked patches in every sample: this is the mean over samples too
        return err_BP[masked_BP].mean()
