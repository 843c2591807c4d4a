"""A vision-language model, LLaVA-style: our vision tower -> MLP projector -> a causal LM.

    images (N, 3, S, S) -> vision tower, hidden_states[feature_layer] (N, 1 + P, D_v)
        -> "default": drop the class token (N, P, D_v); "full": keep it (N, 1 + P, D_v)
        -> projector: linear_1 (D_v -> D), GELU, linear_2 (D -> D)  (LLaVA-1.5's mlp2x_gelu)
        -> written over the LM's input embeddings at the image-token positions, in order
    input embeddings (B, L, D) -> causal LM -> logits (B, L, V); loss on the shifted labels (-100 ignored)

The same semantics as transformers' LlavaForConditionalGeneration (vision_feature_layer,
vision_feature_select_strategy, image_token_index, multi_modal_projector.linear_1/linear_2), so export is a key map
(mmpretrain.instruct.export). The input ids hold one image token per patch feature: the template expands each
`<image>` (mmpretrain.instruct.template), as LlavaProcessor does.

The vision tower is ours (a CLIP tower, as `mmpretrain.checkpoint.load_model` gives it from any folder evaluation
reads); the LM is any transformers causal LM (`AutoModelForCausalLM.from_config` / `from_pretrained`).

Shapes: B batch, L sequence, N images, P patches, D_v vision width, D LM width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.instruct.template import IGNORE_INDEX
from mmpretrain.model import ModelConfig, build_model, resolve_model_config
from mmpretrain.model.clip import CLIPVisionTower

SELECT_STRATEGIES = ("default", "full")  # transformers' names: "default" drops the class token
PROJECTOR_ACTS = {"gelu": F.gelu}  # transformers ACT2FN["gelu"] is the exact erf GELU


@dataclass
class InstructOutput:
    """What `model(input_ids, images, ...)` returns."""

    logits: torch.Tensor  # (B, L, V) in the LM's dtype
    loss: Optional[torch.Tensor] = None  # () float32: mean cross-entropy over the target tokens (labels given)
    num_targets: Optional[torch.Tensor] = None  # () long: how many tokens the loss counted


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: Linear(D_v, D), GELU, Linear(D, D); names as transformers' multi_modal_projector."""

    def __init__(self, vision_width: int, lm_width: int, act: str = "gelu"):
        super().__init__()
        if act not in PROJECTOR_ACTS:
            raise ValueError(f"projector act {act!r} is not one of {sorted(PROJECTOR_ACTS)}")
        self.act_name = act
        self.linear_1 = nn.Linear(vision_width, lm_width)
        self.linear_2 = nn.Linear(lm_width, lm_width)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        return self.linear_2(PROJECTOR_ACTS[self.act_name](self.linear_1(x_NPD)))


def token_loss_sum(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the float32 cross-entropies over positions whose next label is not IGNORE_INDEX, their count as a
    long tensor); position t predicts label t + 1. The trainer divides the sum by the global batch's count."""
    targets_BL = labels_BL[:, 1:]
    flat = logits_BLV[:, :-1].float().reshape(-1, logits_BLV.shape[-1])
    total = F.cross_entropy(flat, targets_BL.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets_BL != IGNORE_INDEX).sum()


def causal_lm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy in float32 over this batch's target tokens, their count): token_loss_sum / count.
    A batch without any target gives loss 0 (with a gradient path), not NaN."""
    total, count = token_loss_sum(logits_BLV, labels_BL)
    return total / count.clamp(min=1), count


class VisionLanguageModel(nn.Module):
    """vision_tower (ours) + projector + language_model (a transformers causal LM)."""

    def __init__(
        self,
        vision_cfg: ModelConfig,
        vision_tower: CLIPVisionTower,
        language_model: nn.Module,
        image_token_id: int,
        feature_layer: int = -2,
        select_strategy: str = "default",
        projector_act: str = "gelu",
    ):
        """vision_cfg: the resolved config of the two-tower model the tower comes from (export reads it)."""
        super().__init__()
        if vision_cfg.family != "clip":
            raise ValueError(f"the vision tower must be a CLIP tower (got family {vision_cfg.family!r})")
        if select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"select_strategy {select_strategy!r} is not one of {SELECT_STRATEGIES}")
        num_layers = vision_cfg.vision.layers
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(f"feature_layer {feature_layer} is outside the tower's hidden states (0..{num_layers})")
        if not 0 <= image_token_id < language_model.config.vocab_size:
            raise ValueError(f"image_token_id {image_token_id} is not in the LM's vocabulary")
        self.vision_cfg = vision_cfg
        self.image_token_id, self.feature_layer, self.select_strategy = image_token_id, feature_layer, select_strategy
        self.vision_tower = vision_tower
        self.projector = Projector(vision_cfg.vision.width, language_model.config.hidden_size, projector_act)
        self.language_model = language_model

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image occupies in input_ids."""
        v = self.vision_cfg.vision
        patches = (v.image_size // v.patch_size) ** 2
        return patches if self.select_strategy == "default" else patches + 1

    def image_features(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_image_tokens, D): projected patch features."""
        # every block runs (hidden_states holds them all); a layer past feature_layer is wasted work, kept simple
        # patch_drop=0: every patch has its image token (a run's FLIP patch dropout must not apply here)
        out = self.vision_tower(images_NCHW, output_hidden_states=True, patch_drop=0.0)
        hidden = out.hidden_states[self.feature_layer]
        if self.select_strategy == "default":
            hidden = hidden[:, 1:]  # drop the class token
        return self.projector(hidden)

    def embed(self, input_ids_BL: torch.Tensor, images_NCHW: Optional[torch.Tensor]) -> torch.Tensor:
        """Input embeddings (B, L, D) with the image features at the image-token positions (row-major order)."""
        embeds_BLD = self.language_model.get_input_embeddings()(input_ids_BL)
        mask_BL = input_ids_BL == self.image_token_id
        num_slots = int(mask_BL.sum())
        num_feats = 0 if images_NCHW is None else images_NCHW.shape[0] * self.num_image_tokens
        if num_slots != num_feats:
            raise ValueError(f"input_ids hold {num_slots} image tokens but the images give {num_feats} features")
        if images_NCHW is None or num_feats == 0:
            return embeds_BLD
        feats_ND = self.image_features(images_NCHW).reshape(-1, embeds_BLD.shape[-1]).to(embeds_BLD.dtype)
        return embeds_BLD.masked_scatter(mask_BL[..., None], feats_ND)

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> InstructOutput:
        """input_ids (B, L) with image tokens expanded, images (N, 3, S, S) in placeholder order, attention_mask
        (B, L) 1 = real token (right padding), labels (B, L) IGNORE_INDEX where no loss is taken."""
        embeds_BLD = self.embed(input_ids, images)
        logits_BLV = self.language_model(inputs_embeds=embeds_BLD, attention_mask=attention_mask).logits
        if labels is None:
            return InstructOutput(logits_BLV)
        loss, count = causal_lm_loss(logits_BLV, labels)
        return InstructOutput(logits_BLV, loss, count)

    @torch.no_grad()
    def generate(
        self, input_ids_1L: torch.Tensor, images: Optional[torch.Tensor], max_new_tokens: int, eos_id: int
    ) -> list[int]:
        """Greedy decoding of one prompt (B = 1): the new ids, ending at eos (included) or max_new_tokens.

        No KV cache: each step reruns the whole sequence (the image features are computed once). Plain and
        independent of transformers' generate, which the export parity test compares it against.
        """
        if input_ids_1L.shape[0] != 1:
            raise ValueError("generate takes one prompt (input_ids of shape (1, L))")
        embeds_1LD = self.embed(input_ids_1L, images)
        embed_tokens = self.language_model.get_input_embeddings()
        new = []
        for _ in range(max_new_tokens):
            logits_1LV = self.language_model(inputs_embeds=embeds_1LD).logits
            next_id = int(logits_1LV[0, -1].argmax())
            new.append(next_id)
            if next_id == eos_id:
                break
            next_1 = torch.tensor([[next_id]], device=input_ids_1L.device)
            embeds_1LD = torch.cat([embeds_1LD, embed_tokens(next_1)], dim=1)
        return new


def build_language_model(config_or_path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from a config object (fresh weights) or a local folder (its weights, safetensors
    preferred; no remote code, nothing downloaded)."""
    from transformers import AutoModelForCausalLM

    if isinstance(config_or_path, str):
        return AutoModelForCausalLM.from_pretrained(
            config_or_path, local_files_only=True, trust_remote_code=False, dtype=dtype
        )
    return AutoModelForCausalLM.from_config(config_or_path, dtype=dtype)


def build_vlm(
    two_tower: nn.Module,
    two_tower_cfg: ModelConfig,
    language_model: nn.Module,
    image_token_id: int,
    feature_layer: int = -2,
    select_strategy: str = "default",
) -> VisionLanguageModel:
    """Take the vision tower of a two-tower model (from `mmpretrain.checkpoint.load_model(path)` or
    `build_model(cfg)`) and join it to a causal LM; the text tower is dropped."""
    return VisionLanguageModel(
        two_tower_cfg, two_tower.vision_model, language_model, image_token_id, feature_layer, select_strategy
    )


def tiny_vlm(vision_cfg: ModelConfig, lm_config, image_token_id: int, seed: int = 0) -> VisionLanguageModel:
    """A freshly initialized VLM from our (tiny) tower config and an LM config: tests and the tiny twin."""
    torch.manual_seed(seed)
    cfg = resolve_model_config(vision_cfg)
    return build_vlm(build_model(cfg), cfg, build_language_model(lm_config), image_token_id)
