"""Our CLIP / SigLIP are twins of transformers' CLIPModel / SiglipModel.

Each test builds a tiny randomly initialized HF model (no download), copies its weights into ours
through a key map written here (the only structural change: HF's q/k/v projections are our fused
qkv_proj, concatenated in that order), and checks features, logits and hidden states agree in fp32.
"""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from mmpretrain.convert.hf import from_hf_state_dict
from mmpretrain.model import SIZES, ModelConfig, TextConfig, VisionConfig, build_model, resolve_model_config

HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
VOCAB = 1000  # small vocab keeps the test fast; the EOT token is the largest id, VOCAB - 1


def hf_model(cfg: ModelConfig, attn="eager"):
    """A randomly initialized HF twin of a resolved config (eager attention: an independent reference)."""
    v, t = cfg.vision, cfg.text
    tower = lambda c: dict(  # noqa: E731
        hidden_size=c.width,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        hidden_act=HF_ACT[c.act],
        layer_norm_eps=c.ln_eps,
    )
    vision = dict(tower(v), image_size=v.image_size, patch_size=v.patch_size)
    text = dict(tower(t), vocab_size=t.vocab_size, max_position_embeddings=t.context_length)
    if cfg.family == "clip":
        # eos_token_id == 2 selects HF's legacy pooling: argmax of the token ids, i.e. our rule.
        text.update(eos_token_id=2, bos_token_id=t.vocab_size - 2, pad_token_id=0)
        hf_cfg = CLIPConfig(vision_config=vision, text_config=text, projection_dim=cfg.embed_dim)
        hf_cfg._attn_implementation = attn
        return CLIPModel(hf_cfg)
    text.update(projection_size=cfg.embed_dim, eos_token_id=t.vocab_size - 1, bos_token_id=None, pad_token_id=0)
    hf_cfg = SiglipConfig(vision_config=vision, text_config=text)
    hf_cfg._attn_implementation = attn
    return SiglipModel(hf_cfg)


def hf_to_ours(hf_sd: dict, family: str) -> dict:
    """HF CLIPModel / SiglipModel state dict -> ours: the key map the converter ships (mmpretrain.convert.hf)."""
    return from_hf_state_dict(hf_sd, family, source="test")


def tiny_cfg(name, act=None):
    return resolve_model_config(
        ModelConfig(name=name, text=TextConfig(vocab_size=VOCAB, act=act), vision=VisionConfig(act=act))
    )


def paired_models(cfg: ModelConfig, seed=0):
    torch.manual_seed(seed)
    hf = hf_model(cfg).eval()
    with torch.no_grad():  # perturb every parameter so LayerNorm affines, biases, logit bias all matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = build_model(cfg).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), cfg.family), strict=True)
    return hf, ours


def inputs(cfg: ModelConfig, B=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    L = cfg.text.context_length
    tokens = torch.randint(1, VOCAB - 1, (B, L), generator=g)
    for b, eot in enumerate([5, 11, L - 1][:B]):  # EOT at different places, zero padding after it
        tokens[b, eot] = VOCAB - 1
        tokens[b, eot + 1 :] = 0
    return images, tokens


CASES = {"clip-gelu": ("tiny", "gelu"), "clip-quickgelu": ("tiny", "quick_gelu"), "siglip": ("siglip-tiny", None)}


@pytest.mark.parametrize("name,act", list(CASES.values()), ids=list(CASES))
def test_features_and_logits_match_hf(name, act):
    cfg = tiny_cfg(name, act)
    hf, ours = paired_models(cfg)
    images, tokens = inputs(cfg)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=images)
        out = ours(images, tokens)
    torch.testing.assert_close(out.image_features, ref.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_features, ref.text_embeds, atol=1e-5, rtol=1e-5)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    if out.logit_bias is not None:
        logits = logits + out.logit_bias
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-5, rtol=1e-5)
    if cfg.family == "siglip":
        assert out.logit_bias is not None
    else:
        assert out.logit_bias is None


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_hidden_states_match_hf(name):
    """Per-layer hidden states (LLaVA reads vision hidden_states[-2]) and last_hidden_state."""
    cfg = tiny_cfg(name)
    hf, ours = paired_models(cfg, seed=3)
    images, tokens = inputs(cfg)
    with torch.no_grad():
        ref_v = hf.vision_model(pixel_values=images, output_hidden_states=True)
        ref_t = hf.text_model(input_ids=tokens, output_hidden_states=True)
        v = ours.vision_model(images, output_hidden_states=True)
        t = ours.text_model(tokens, output_hidden_states=True)
    for mine, ref, layers in [(v, ref_v, cfg.vision.layers), (t, ref_t, cfg.text.layers)]:
        assert len(mine.hidden_states) == len(ref.hidden_states) == layers + 1
        for a, b in zip(mine.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_every_hf_key_is_mapped():
    """Our state dict and the mapped HF state dict have exactly the same keys and shapes, both families."""
    for name in ("tiny", "siglip-tiny"):
        cfg = tiny_cfg(name)
        with torch.device("meta"):
            hf, ours = hf_model(cfg), build_model(cfg)
        mapped = {k: v.shape for k, v in hf_to_ours(hf.state_dict(), cfg.family).items()}
        assert mapped == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_count_matches_hf(name):
    """Every size-table entry has exactly the parameter count of its HF twin (built on the meta device)."""
    cfg = resolve_model_config(ModelConfig(name=name))
    with torch.device("meta"):
        hf, ours = hf_model(cfg), build_model(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
