"""Captioning as an auxiliary term (CoCa / LocCa / CapPa; SigLIP 2's decoder loss).

    loss:
      terms:
        siglip: {weight: 1.0}
        caption: {weight: 1.0, layers: 2, parallel_fraction: 0.5}

The head (``model.heads["caption"]``, CaptionDecoder): the caption's tokens (its own token embedding, learned
positions) through ``layers`` pre-LN blocks of causal self-attention, cross-attention to the vision tower's tokens
(LayerNorm'd and projected to the decoder width) and an MLP (objectives/itm.py's FusionBlock, causal), a final
LayerNorm and a linear layer to the vocabulary. Teacher forcing: the input is the caption from SOT up to the
token before the last, the target the caption from its first word through EOT; positions after EOT (padding)
are not predicted. The image tokens are ``last_hidden_state`` of the tower (all tokens; under MIM/FLIP masking,
the kept ones).

Parallel prediction (CapPa, Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners"): a share
``parallel_fraction`` of the samples gets a learned mask token at every input position instead of the caption,
so each token is predicted from the image and its position alone, which forces the decoder to read the image. We
keep the causal mask for them: their inputs carry no caption, so the mask hides nothing but positions. Which
samples: objectives.base.step_generator (train.seed, step, stream 1) draws them for the GLOBAL batch, and each
rank takes its own rows, so N ranks choose what one rank holding the whole batch chooses.

Loss: cross-entropy summed over every predicted token of the global batch, divided by their number (a token
mean over the global batch). Gradient contract: this rank returns N x its tokens' sum / the global count (the
count all-reduced, without gradient), so DeepSpeed's average over ranks gives the global token mean's gradient
whatever the caption lengths on each rank.

Legend: b samples on this rank, G global, L context length, T = L - 1 predicted positions, V vocabulary,
N' image tokens, Dv vision width, D decoder width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.data.regions import TASKS
from mmpretrain.distributed import all_reduce, all_reduce_number, world_rank
from mmpretrain.model.layers import LayerNorm
from mmpretrain.objectives.base import StepContext, Term, register, step_generator
from mmpretrain.objectives.config import CaptionTermConfig
from mmpretrain.objectives.itm import FusionBlock


def caption_targets(tokens_BL: torch.Tensor, prompt_B: torch.Tensor | None = None):
    """(inputs (B, T), targets (B, T), predicted (B, T) bool): teacher forcing up to and including EOT (the
    largest id: the tokenizer's; the first one on ties). ``prompt_B``: tokens after SOT that are given, not
    predicted (a region task's prompt, mmpretrain.data.regions); the targets start after them."""
    inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    eot_B = tokens_BL.argmax(dim=-1)
    pos_T = torch.arange(targets_BT.shape[1], device=tokens_BL.device)
    predicted_BT = pos_T[None, :] < eot_B[:, None]  # target t is token t + 1: through EOT
    if prompt_B is not None:
        predicted_BT &= pos_T[None, :] >= prompt_B[:, None]
    return inputs_BT, targets_BT, predicted_BT


def parallel_rows(seed: int, step: int, fraction: float, global_batch: int, rank: int, b: int) -> torch.Tensor:
    """(b,) bool: this rank's rows of the global batch that predict in parallel (see the module docstring)."""
    if fraction <= 0:
        return torch.zeros(b, dtype=torch.bool)
    chosen_G = torch.rand(global_batch, generator=step_generator(seed, step, stream=1)) < fraction
    return chosen_G[rank * b : (rank + 1) * b]


class CaptionDecoder(nn.Module):
    """(inputs (B, T) ids, parallel (B,) bool, image tokens (B, N', Dv)) -> logits (B, T, V)."""

    def __init__(self, vocab_size, length, image_width, width, layers, heads, mlp_dim, impl="auto"):
        super().__init__()
        self.image_width, self.length = image_width, length  # (ZeRO-3 partitions the weights: their shapes are 0)
        # the tower's tokens: CLIP's before its post_layernorm, SigLIP's normalized; one LayerNorm makes them alike
        self.image_ln = LayerNorm(image_width)
        self.image_proj = nn.Linear(image_width, width) if image_width != width else nn.Identity()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(length, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(FusionBlock(width, heads, mlp_dim, impl, causal=True) for _ in range(layers))
        self.ln = LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, inputs_BT, parallel_B, image_tokens, predicted_BT=None, prompt_B=None) -> torch.Tensor:
        """-> logits (B, T, V); with ``predicted_BT`` (B, T) bool, only those positions' logits (n, V) in row-major
        order: the vocabulary projection is most of the head's cost, and padding needs none. A parallel row's
        inputs from position ``prompt_B`` on (0: all) are the mask token: its prompt stays visible."""
        img_BND = self.image_proj(self.image_ln(image_tokens))
        x_BTD = self.token_embedding(inputs_BT)
        masked_BT = parallel_B[:, None].expand(inputs_BT.shape)
        if prompt_B is not None:
            pos_T = torch.arange(inputs_BT.shape[1], device=inputs_BT.device)
            masked_BT = masked_BT & (pos_T[None, :] >= prompt_B[:, None])
        x_BTD = torch.where(masked_BT[..., None], self.mask_token.to(x_BTD.dtype), x_BTD)
        x_BTD = x_BTD + self.position_embedding[: inputs_BT.shape[1]].to(x_BTD.dtype)
        for block in self.blocks:
            x_BTD = block(x_BTD, None, img_BND)
        x = self.ln(x_BTD)
        return self.lm_head(x if predicted_BT is None else x[predicted_BT])

    @torch.no_grad()
    def greedy(self, image_tokens, prefixes: list[list[int]], steps: int) -> list[list[int]]:
        """``steps`` greedy tokens after each prefix (SOT and a prompt), teacher-forcing style: each step runs the
        whole (n, T) sequence again (no cache: the decoder is small) and reads the logits at each row's last
        token; exactly ``steps`` forwards (mmpretrain.eval.grounding's RegionReader). A row that fills the
        context stops growing."""
        n, T = len(prefixes), self.length
        device = image_tokens.device
        inputs_BT = torch.zeros(n, T, dtype=torch.long, device=device)
        for i, p in enumerate(prefixes):
            inputs_BT[i, : len(p)] = torch.tensor(p[:T], dtype=torch.long)
        length_B = torch.tensor([min(len(p), T) for p in prefixes], device=device)
        parallel_B = torch.zeros(n, dtype=torch.bool, device=device)
        rows, out = torch.arange(n, device=device), [[] for _ in range(n)]
        for _ in range(steps):
            logits_BTV = self(inputs_BT, parallel_B, image_tokens)
            next_B = logits_BTV[rows, length_B - 1].argmax(dim=-1)
            room_B = length_B < T
            inputs_BT[rows[room_B], length_B[room_B]] = next_B[room_B]
            for i in rows[room_B].tolist():
                out[i].append(int(next_B[i]))
            length_B = length_B + room_B.long()
        return out

    def dummy_greedy(self, device, steps: int) -> None:
        """greedy's forward calls on one dummy row (a rank with nothing left to read keeps ZeRO-3 in step)."""
        image = torch.zeros(1, 1, self.image_width, dtype=self.image_ln.weight.dtype, device=device)
        self.greedy(image, [[0]], steps)


@register
class CaptionTerm(Term):
    """Token-mean cross-entropy of the decoder's next-token predictions over the global batch."""

    name = "caption"
    config_cls = CaptionTermConfig
    needs = ("image_tokens",)

    def build_head(self, model):
        c, m = self.cfg, self.run_cfg.model
        width = c.width or m.text.width
        heads = c.heads or m.text.heads
        return CaptionDecoder(m.text.vocab_size, m.text.context_length - 1, m.vision.width, width, c.layers, heads,
                              int(width * c.mlp_ratio), m.attention)  # fmt: skip

    def __init__(self, cfg, run_cfg):
        super().__init__(cfg, run_cfg)
        self._parts: dict = {}

    def parts(self) -> dict:
        return self._parts

    def loss(self, ctx: StepContext) -> torch.Tensor:
        world, rank = world_rank(ctx.group)
        tokens_BL, prompt_B, task_B = ctx.tokens, None, None
        if "decoder_text" in ctx.batch:  # data.train.regions: captions, referring expressions, grounded captions
            device = ctx.tokens.device
            tokens_BL = ctx.batch["decoder_text"].to(device)
            prompt_B, task_B = ctx.batch["decoder_prompt"].to(device), ctx.batch["decoder_task"].to(device)
        inputs_BT, targets_BT, predicted_BT = caption_targets(tokens_BL, prompt_B)
        b = inputs_BT.shape[0]
        parallel_B = parallel_rows(self.run_cfg.train.seed, ctx.step, self.cfg.parallel_fraction, world * b, rank, b)
        logits_nV = ctx.model(head=self.name, inputs_BT=inputs_BT, parallel_B=parallel_B.to(inputs_BT.device),
                              image_tokens=ctx.out.image_tokens, predicted_BT=predicted_BT,
                              prompt_B=prompt_B)  # fmt: skip
        dtype = torch.promote_types(logits_nV.dtype, torch.float32)  # the loss in fp32 (fp64 in the tests)
        nll_n = F.cross_entropy(logits_nV.to(dtype), targets_BT[predicted_BT], reduction="none")
        if task_B is None:
            count = all_reduce_number(int(predicted_BT.sum()), group=ctx.group)  # collective
            self._parts = {}
            return nll_n.sum() * (world / max(count, 1.0))
        # one collective for the token counts of all tokens and of each task; each task's token mean is logged
        task_n = task_B[:, None].expand(predicted_BT.shape)[predicted_BT]
        counts = torch.stack([predicted_BT.sum(), *((task_n == k).sum() for k in range(len(TASKS)))]).double()
        counts = all_reduce(counts.cpu(), group=ctx.group).tolist()  # collective
        with torch.no_grad():
            self._parts = {name: nll_n[task_n == k].sum().detach() * (world / counts[1 + k])
                           for k, name in enumerate(TASKS) if counts[1 + k] > 0}  # fmt: skip
        return nll_n.sum() * (world / max(counts[0], 1.0))
