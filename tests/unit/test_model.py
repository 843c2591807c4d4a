"""The two-tower model on its own: shapes, masking, training options, config errors, sizes.

Faithfulness to transformers' CLIPModel / SiglipModel is tested in test_model_hf_parity.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from mmpretrain.kernels import PAD_SEGMENT_ID

import mmpretrain.model.layers as layers
import mmpretrain.model.siglip as siglip
from mmpretrain.model import (
    SIZES,
    ModelConfig,
    ModelOutput,
    TextConfig,
    VisionConfig,
    build_model,
    param_groups,
    resolve_model_config,
)

FAMILIES = ["tiny", "siglip-tiny"]
EOT = 49407


def batch(B=4, image_size=32, L=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, EOT - 1, (B, L), generator=g)
    for b in range(B):  # EOT at 5, 6, ...; zero padding after it
        tokens[b, 5 + b] = EOT
        tokens[b, 6 + b :] = 0
    return images, tokens


def build(name="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, **kw))


def toy_loss(out: ModelOutput) -> torch.Tensor:
    """A CLIP-style loss, enough to drive gradients through both towers and the logit parameters."""
    logits = out.logit_scale * out.image_features @ out.text_features.T
    if out.logit_bias is not None:
        logits = logits + out.logit_bias
    labels = torch.arange(len(logits))
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shapes_and_normalized_features(name):
    model = build(name).eval()
    images, tokens = batch()
    out = model(images, tokens)
    assert type(out) is ModelOutput
    for feats in (out.image_features, out.text_features, model.encode_image(images), model.encode_text(tokens)):
        assert feats.shape == (4, 64) and feats.dtype == torch.float32
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.image_features, model.encode_image(images))
    assert out.logit_scale.shape == ()
    if name == "tiny":
        assert out.logit_bias is None
        torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    else:
        torch.testing.assert_close(out.logit_scale, torch.tensor(10.0))
        torch.testing.assert_close(out.logit_bias, torch.tensor(-10.0))


def test_clip_logit_scale_clamped_at_100():
    model = build()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(*batch()).logit_scale.item() == pytest.approx(100.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_uses_only_tower_parameters(name):
    """ZeRO-3 contract: encode_image/encode_text never read parameters owned by the top-level module."""
    model = build(name).eval()
    images, tokens = batch()
    ref_img, ref_txt = model.encode_image(images), model.encode_text(tokens)
    for pname, _ in list(model.named_parameters(recurse=False)):
        delattr(model, pname)  # logit_scale, logit_bias
    torch.testing.assert_close(model.encode_image(images), ref_img)
    torch.testing.assert_close(model.encode_text(tokens), ref_txt)


@pytest.mark.parametrize("name", FAMILIES)
def test_text_masking(name):
    """CLIP's text tower is causal and pooled at EOT: tokens after EOT cannot matter. SigLIP's sees everything."""
    model = build(name).eval()
    _, tokens = batch()
    after_eot, before_eot = tokens.clone(), tokens.clone()
    after_eot[:, -1] = 123  # every caption's EOT is well before the last position
    before_eot[:, 2] = 123
    ref = model.encode_text(tokens)
    assert not torch.allclose(model.encode_text(before_eot), ref, atol=1e-4)
    if name == "tiny":
        torch.testing.assert_close(model.encode_text(after_eot), ref)
    else:
        assert not torch.allclose(model.encode_text(after_eot), ref, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_impl_and_causality_reach_the_kernel(name, monkeypatch):
    calls = []

    def spy(q, k, v, causal=False, key_padding_mask=None, scale=None, impl="auto", **segments):
        calls.append((impl, causal))
        assert segments.get("segment_ids") is None
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    monkeypatch.setattr(layers, "attention", spy)
    monkeypatch.setattr(siglip, "attention", spy)
    model = build(name, attention="sdpa").eval()
    images, tokens = batch()
    model.encode_image(images)
    num_vision = len(calls)
    model.encode_text(tokens)
    assert num_vision == 2 + (name == "siglip-tiny")  # blocks (+ the pooling head)
    assert {impl for impl, _ in calls} == {"sdpa"}
    assert [c for _, c in calls[num_vision:]] == [name == "tiny"] * 2
    assert not any(c for _, c in calls[:num_vision])


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_packed_equals_one_by_one(causal, rows):
    """A block over a packed sequence (segment ids) gives each sequence's output alone (float64, values and input
    gradients), also when it returns one pooled token per row (rows_B); the padding changes no sequence."""
    torch.manual_seed(0)
    block = layers.EncoderLayer(32, 2, 64, "gelu", 1e-5, causal=causal, impl="sdpa").double()
    lengths = [5, 9, 3]  # then 2 padding tokens
    x_ND = torch.randn(sum(lengths) + 2, 32, dtype=torch.float64, requires_grad=True)
    seg_1N = torch.tensor([[0] * 5 + [1] * 9 + [2] * 3 + [PAD_SEGMENT_ID] * 2], dtype=torch.int32)
    rows_B = torch.tensor([7]) if rows else None  # token 7: inside sequence 1
    packed = block(x_ND[None], rows_B, seg_1N)[0]
    starts = [0, 5, 14]
    alone = [block(x_ND[None, s : s + n])[0] for s, n in zip(starts, lengths)]
    want = alone[1][7 - 5 : 7 - 5 + 1] if rows else torch.cat(alone)
    got = packed if rows else packed[: sum(lengths)]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_packed,) = torch.autograd.grad(got.sin().sum(), x_ND)
    (g_alone,) = torch.autograd.grad(want.sin().sum(), x_ND)
    torch.testing.assert_close(g_packed, g_alone, rtol=1e-12, atol=1e-12)
    assert g_packed[sum(lengths) :].abs().max() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_patch_dropout_only_in_training(name):
    model = build(name, vision=VisionConfig(patch_dropout=0.5))
    images, _ = batch()
    num_prefix = 1 if name == "tiny" else 0  # CLIP's class token is always kept
    model.eval()
    full = model.vision_model(images, output_hidden_states=True).hidden_states[0]
    assert full.shape[1] == num_prefix + 16
    torch.testing.assert_close(model.encode_image(images), model.encode_image(images))
    model.train()
    kept = model.vision_model(images, output_hidden_states=True).hidden_states[0]
    assert kept.shape[1] == num_prefix + 8
    torch.testing.assert_close(kept[:, :num_prefix], full[:, :num_prefix])
    # every kept token is one of the sample's own tokens (the first layer's input is per-token)
    dist = torch.cdist(kept[:, num_prefix:], full[:, num_prefix:])  # (B, 8, 16)
    assert dist.min(dim=-1).values.max() < 1e-4
    assert not torch.allclose(model.encode_image(images), model.encode_image(images))


class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_grad_checkpointing_same_loss_and_grads(name):
    images, tokens = batch()
    results = []
    for ckpt in (False, True):
        model = build(name, grad_checkpointing=ckpt).train()
        layer = model.vision_model.encoder.layers[0]
        layer.forward = CallCounter(layer.forward)  # (module hooks do not fire in checkpoint's recompute)
        loss = toy_loss(model(images, tokens))
        loss.backward()
        assert layer.forward.calls == (2 if ckpt else 1)  # checkpointing re-runs the block in backward
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], msg=n)


@pytest.mark.parametrize("name", FAMILIES)
def test_lock_image_freezes_the_image_tower(name):
    model = build(name, lock_image=True, vision=VisionConfig(patch_dropout=0.5)).train()
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vision_model."))
    assert not model.vision_model.training and model.text_model.training  # eval kept through .train()
    images, tokens = batch()
    torch.testing.assert_close(model.encode_image(images), model.encode_image(images))  # no patch dropout
    toy_loss(model(images, tokens)).backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(p.grad is not None for p in model.text_model.parameters())
    trainable = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", FAMILIES)
def test_param_groups(name):
    model = build(name)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = [names[id(p)] for p in decay["params"]]
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert sorted(decay_names + no_decay_names) == sorted(names.values())  # each parameter exactly once
    # Independent rule by name: matrices of linear/conv layers decay; everything else does not.
    matrices = ("qkv_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight", "projection.weight",
                "head.weight", "patch_embedding.weight", "in_proj_weight")  # fmt: skip
    assert sorted(decay_names) == sorted(n for n in names.values() if n.endswith(matrices))
    must_not_decay = {"logit_scale", "text_model.embeddings.token_embedding.weight",
                      "text_model.embeddings.position_embedding.weight",
                      "vision_model.embeddings.position_embedding.weight"}  # fmt: skip
    must_not_decay |= {"vision_model.embeddings.class_embedding"} if name == "tiny" else {"logit_bias"}
    must_not_decay |= set() if name == "tiny" else {"vision_model.head.probe"}
    assert must_not_decay <= set(no_decay_names)
    assert all(n.endswith(("bias", "weight")) for n in no_decay_names if "norm" in n)


def test_same_seed_same_init():
    for name in FAMILIES:
        a, b = build(name, seed=7).state_dict(), build(name, seed=7).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        c = build(name, seed=8).state_dict()
        key = "text_model.encoder.layers.0.mlp.fc1.weight"
        assert not torch.equal(a[key], c[key])


def test_clip_init_scales():
    """OpenAI CLIP init: class/position embedding std width^-0.5, token embedding 0.02, projection width^-0.5."""
    cfg = ModelConfig(name="tiny", vision=VisionConfig(width=256, heads=4), text=TextConfig(width=256, heads=4))
    torch.manual_seed(0)
    model = build_model(cfg)
    v, t = model.vision_model, model.text_model
    assert v.embeddings.class_embedding.std().item() == pytest.approx(256**-0.5, rel=0.15)
    assert v.embeddings.position_embedding.weight.std().item() == pytest.approx(256**-0.5, rel=0.1)
    assert t.embeddings.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert t.projection.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    fc2 = v.encoder.layers[0].mlp.fc2.weight
    assert fc2.std().item() == pytest.approx(256**-0.5 * (2 * 2) ** -0.5, rel=0.05)


def test_bf16_model_and_autocast():
    images, tokens = batch()
    ref = build().eval()(images, tokens)
    model = build().eval().to(torch.bfloat16)
    out = model(images, tokens)
    assert out.image_features.dtype == torch.float32
    assert F.cosine_similarity(out.image_features, ref.image_features).min() > 0.99
    assert F.cosine_similarity(out.text_features, ref.text_features).min() > 0.99
    # The LayerNorm itself computes in fp32: equal to the fp32 computation rounded once to bf16.
    ln = model.vision_model.pre_layrnorm
    x = (3 + 10 * torch.randn(4, 17, 64)).to(torch.bfloat16)
    expected = F.layer_norm(x.float(), (64,), ln.weight.float(), ln.bias.float(), ln.eps).to(torch.bfloat16)
    assert torch.equal(ln(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = build().eval()(images, tokens)
        assert ln(x.float()).dtype == torch.float32  # LN keeps the input dtype under autocast
    assert auto.image_features.dtype == torch.float32
    assert F.cosine_similarity(auto.image_features, ref.image_features).min() > 0.99


def test_bad_inputs_raise():
    model = build().eval()
    images, tokens = batch()
    with pytest.raises(ValueError, match="expects 32x32"):
        model.encode_image(images[:, :, :16, :16])
    with pytest.raises(ValueError, match="context_length 32"):
        model.encode_text(torch.cat([tokens, tokens], dim=1))


def test_resolve_fills_from_table_and_keeps_overrides():
    cfg = ModelConfig(name="ViT-B-16", vision=VisionConfig(image_size=256, act="quick_gelu"))
    r = resolve_model_config(cfg)
    assert cfg.vision.width is None  # the input is not modified
    assert (r.family, r.embed_dim, r.vision.image_size, r.vision.width) == ("clip", 512, 256, 768)
    assert r.vision.act == "quick_gelu"
    assert (r.text.width, r.text.heads, r.text.context_length, r.text.act) == (512, 8, 77, "gelu")
    assert r.init_logit_scale == pytest.approx(math.log(1 / 0.07)) and r.init_logit_bias is None
    assert resolve_model_config(r) == r
    s = resolve_model_config(ModelConfig(name="siglip-So400m-14"))
    assert (s.vision.width, s.vision.layers, s.vision.heads, s.vision.mlp_dim) == (1152, 27, 16, 4304)
    assert (s.vision.act, s.text.ln_eps, s.init_logit_bias) == ("gelu_tanh", 1e-6, -10.0)
    assert s.init_logit_scale == pytest.approx(math.log(10))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(name="ViT-Z-99"), "model.name: unknown size 'ViT-Z-99'"),
        (dict(family="align"), "model.family"),
        (dict(attention="flash"), "model.attention"),
        (dict(embed_dim=0), "model.embed_dim"),
        (dict(vision=VisionConfig(heads=3)), "model.vision.width must be divisible by model.vision.heads"),
        (dict(text=TextConfig(act="relu")), "model.text.act"),
        (dict(text=TextConfig(context_length=0)), "model.text.context_length"),
        (dict(vision=VisionConfig(patch_dropout=1.0)), "model.vision.patch_dropout"),
        (dict(vision=VisionConfig(image_size=4)), "model.vision.image_size"),
        (dict(init_logit_bias=-10.0), "model.init_logit_bias"),
        (dict(name="siglip-tiny", embed_dim=32), "model.embed_dim must equal model.vision.width"),
    ],
)
def test_validate_names_the_dotted_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig(**kwargs).validate("model")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(ModelConfig(**kwargs))


def test_every_size_entry_is_valid():
    for name in SIZES:
        ModelConfig(name=name).validate("model")


# open_clip 3.3's published counts for its configs of the same name (equal to CLIP(**config) on meta).
OPEN_CLIP_PARAMS = {
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-H-14": 986_109_441,
    "ViT-g-14": 1_366_678_273,
}


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_PARAMS))
def test_clip_sizes_have_open_clip_parameter_counts(name):
    with torch.device("meta"):  # nothing allocated, even for ViT-g
        model = build_model(ModelConfig(name=name))
    assert sum(p.numel() for p in model.parameters()) == OPEN_CLIP_PARAMS[name]


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_pooled_last_block_equals_the_full_towers(name, ckpt):
    """encode_* run the last block on the pooled token only; the full towers (every token through every
    block, pooled afterwards) must give the same features and parameter gradients (float64)."""
    images, tokens = batch()
    model = build(name, grad_checkpointing=ckpt).double().train()
    images = images.double()
    results = []
    for pooled in (True, False):
        model.zero_grad()
        img_BE = model.vision_model(images, pooled_only=pooled).embeds
        txt_BE = model.text_model(tokens, pooled_only=pooled).embeds
        (img_BE.pow(2).sum() + (img_BE @ txt_BE.T).sin().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((img_BE.detach(), txt_BE.detach(), grads))
    (i1, t1, g1), (i0, t0, g0) = results
    torch.testing.assert_close(i1, i0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t1, t0, rtol=1e-10, atol=1e-12)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-8, atol=1e-10, msg=n)
