"""VisionLanguageModel: the assistant-only loss against a float64 loop, image features at the image tokens."""

import pytest
import torch
from transformers import LlamaConfig

from mmpretrain.instruct.model import build_language_model, build_vlm, causal_lm_loss, tiny_vlm
from mmpretrain.instruct.template import IGNORE_INDEX
from mmpretrain.model import ModelConfig, VisionConfig, build_model, resolve_model_config

IMG = 5


def tiny_lm(**kw):
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tiny_vlm(ModelConfig(name="tiny"), tiny_lm(), image_token_id=IMG).eval()


def test_loss_counts_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[X := IGNORE_INDEX, X, 3, 4, X, 7], [X, 1, X, X, X, X]])
    loss, count = causal_lm_loss(logits, labels)
    terms = []
    for b in range(2):
        for t in range(1, 6):  # position t - 1 predicts token t
            if labels[b, t] != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
    assert count == len(terms) == 4
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)
    none, zero = causal_lm_loss(logits.requires_grad_(), torch.full_like(labels, IGNORE_INDEX))
    assert zero == 0 and none == 0
    none.backward()  # a batch without targets still has a gradient path (all zeros)


def test_image_features_replace_the_image_tokens_in_order(model):
    P, S = model.num_image_tokens, model.vision_cfg.vision.image_size
    assert P == 16  # tiny: 32 px / 8 px patches, class token dropped
    ids = torch.tensor([[1, 7] + [IMG] * P + [9] + [IMG] * P + [3]])
    images = torch.randn(2, 3, S, S)
    with torch.no_grad():
        embeds = model.embed(ids, images)
        feats = model.image_features(images)
        text = model.language_model.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[0, 2 : 2 + P], feats[0])
    torch.testing.assert_close(embeds[0, 3 + P : 3 + 2 * P], feats[1])
    keep = (ids != IMG)[0]
    torch.testing.assert_close(embeds[0, keep], text[0, keep])


def test_image_token_count_must_match(model):
    S = model.vision_cfg.vision.image_size
    ids = torch.tensor([[1] + [IMG] * 3])
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, torch.randn(1, 3, S, S))
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, None)


def test_answer_loss_trains_projector_and_lm_not_a_frozen_tower(model):
    """The loss reaches the projector (through the image tokens) and the LM; a frozen tower gets nothing."""
    S, P = model.vision_cfg.vision.image_size, model.num_image_tokens
    ids = torch.tensor([[1] + [IMG] * P + [9, 10, 11]])
    labels = torch.tensor([[IGNORE_INDEX] * (P + 2) + [10, 11]])
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    try:
        out = model(ids, torch.randn(1, 3, S, S), labels=labels)
        assert out.num_targets == 2
        out.loss.backward()
        assert model.projector.linear_1.weight.grad.abs().sum() > 0
        assert model.language_model.lm_head.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.vision_tower.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None


@pytest.mark.parametrize("kw, match", [(dict(feature_layer=9), "feature_layer"),
                                       (dict(select_strategy="cls"), "select_strategy")])  # fmt: skip
def test_bad_settings_raise(kw, match):
    cfg = resolve_model_config(ModelConfig(name="tiny"))
    with pytest.raises(ValueError, match=match):
        build_vlm(build_model(cfg), cfg, build_language_model(tiny_lm()), IMG, **kw)


def test_patch_dropout_of_the_tower_never_applies():
    """A tower trained with FLIP patch dropout still gives every patch its image token in training mode."""
    model = tiny_vlm(ModelConfig(name="tiny", vision=VisionConfig(patch_dropout=0.5)), tiny_lm(), IMG).train()
    S = model.vision_cfg.vision.image_size
    assert model.image_features(torch.randn(2, 3, S, S)).shape[:2] == (2, model.num_image_tokens)
