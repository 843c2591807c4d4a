"""ALIGN: label-smoothed CLIP term, the transformers (BERT) text tower, and what converters do with it.

References: the label-smoothed term against F.cross_entropy(label_smoothing=eps) on the full float64 B x B
matrix; the text tower against transformers' own ALIGN text model (AlignTextModel + [CLS] + projection, as
AlignModel.get_text_features computes it) holding the same weights. The 2-rank check of the term is in
tests/distributed/test_align_distributed.py.
"""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.data import Tokenizer
from mmpretrain.model import ModelConfig, TextConfig, build_model, resolve_model_config
from mmpretrain.model.layers import LayerNorm
from mmpretrain.objectives import LossConfig, StepContext
from mmpretrain.objectives.contrastive import ClipTerm, ClipTermConfig

CAPTIONS = ["a red circle", "wow!% a big blue square!;", "!", "a small green triangle on the left of a yellow star"]


def align_cfg(hf_config="bert-tiny", **text_kw):
    return ModelConfig(name="tiny", text=TextConfig(kind="hf", hf_config=hf_config, **text_kw))


def build(cfg=None, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg or align_cfg()).eval()


# ----------------------------------------------------------------------------- label smoothing


def smoothed_reference(img_BD, txt_BD, scale, eps):
    logits_BB = scale * img_BD @ txt_BD.T
    labels_B = torch.arange(img_BD.shape[0])
    ce = lambda z: F.cross_entropy(z, labels_B, label_smoothing=eps)  # noqa: E731
    return 0.5 * (ce(logits_BB) + ce(logits_BB.T))


def term_loss(img_bD, txt_bD, scale, eps, impl="chunked", group=None):
    out = SimpleNamespace(image_features=img_bD, text_features=txt_bD, logit_scale=scale, logit_bias=None)
    ctx = StepContext(out=out, images=None, tokens=None, batch={}, model=None, group=group,
                      loss_cfg=LossConfig(impl=impl, chunk_size=5))  # fmt: skip
    return ClipTerm(ClipTermConfig(label_smoothing=eps), run_cfg=None).loss(ctx)


def smoothing_inputs(B=13, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)  # correlated pairs
    return img, txt, torch.tensor(7.5, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["chunked", "naive"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_value_and_grads_match_cross_entropy(impl, eps):
    img, txt, scale = smoothing_inputs()
    leaves64 = [t.clone().requires_grad_() for t in (img, txt, scale)]
    want = smoothed_reference(*leaves64, eps)
    want.backward()
    leaves32 = [t.float().requires_grad_() for t in (img, txt, scale)]
    got = term_loss(*leaves32, eps, impl)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for name, a, b in zip(("d_image", "d_text", "d_scale"), leaves32, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_label_smoothing_changes_the_loss():
    img, txt, scale = smoothing_inputs()
    assert smoothed_reference(img, txt, scale, 0.1) != pytest.approx(smoothed_reference(img, txt, scale, 0.0))


# ----------------------------------------------------------------------------- the text tower


def reference_text_features(tower, tokens_BL, mask_BL):
    """transformers' ALIGN text path with our tower's weights: AlignTextModel -> [CLS] -> text_projection."""
    from transformers import AlignTextConfig, AlignTextModel

    c = tower.hf.config
    ref_cfg = AlignTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                              num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                              max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=None)  # fmt: skip
    ref = AlignTextModel(ref_cfg, add_pooling_layer=False).eval()
    missing, unexpected = ref.load_state_dict(tower.hf.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    hidden = ref(input_ids=tokens_BL, attention_mask=mask_BL).last_hidden_state
    return tower.projection(hidden[:, 0]), hidden


def true_lengths(tokenizer, texts):
    return [min(len(tokenizer.encode(t)) + 2, tokenizer.context_length) for t in texts]


def test_text_tower_matches_transformers_align_text_model():
    model = build()
    tok = Tokenizer(32)
    tokens_BL = tok(CAPTIONS)
    # the mask from each caption's true length (SOT + body + EOT); "!%" and "!;" hold id 0, the pad id
    lengths = true_lengths(tok, CAPTIONS)
    assert (tokens_BL == 0).sum() > sum(32 - n for n in lengths), "the captions hold '!' tokens (id 0)"
    mask_BL = (torch.arange(32)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        want_BE, want_hidden = reference_text_features(model.text_model, tokens_BL, mask_BL)
        out = model.text_model(tokens_BL)
    torch.testing.assert_close(out.embeds, want_BE, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, want_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_text(tokens_BL), F.normalize(want_BE, dim=-1), rtol=1e-5, atol=1e-6)


def test_padding_is_masked_and_pooling_is_the_first_token():
    model = build()
    tokens_BL = Tokenizer(32)(CAPTIONS)
    with torch.no_grad():
        full = model.encode_text(tokens_BL)
        for i, n in enumerate(true_lengths(Tokenizer(32), CAPTIONS)):
            alone = model.encode_text(tokens_BL[i : i + 1, :n])  # no padding at all
            torch.testing.assert_close(full[i : i + 1], alone, rtol=1e-5, atol=1e-6)
            noisy = tokens_BL[i : i + 1].clone()
            noisy[0, n:] = 1234  # whatever sits after EOT changes nothing
            torch.testing.assert_close(model.encode_text(noisy), full[i : i + 1], rtol=1e-5, atol=1e-6)


def test_tower_contract_hidden_states_token_embeds_and_model_forward():
    model = build()
    tokens_BL = Tokenizer(32)(CAPTIONS)
    t = model.text_model
    with torch.no_grad():
        out = t(tokens_BL, output_hidden_states=True)
        assert out.keep_BK is None and out.embeds.shape == (4, 64) and out.last_hidden_state.shape == (4, 32, 128)
        assert len(out.hidden_states) == 2 + 1 and all(h.shape == (4, 32, 128) for h in out.hidden_states)
        torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
        # CoOp's path: the token embedding's rows given as embeddings give the same output
        via_embeds = t(tokens_BL, token_embeds_BLD=t.token_embedding(tokens_BL))
        torch.testing.assert_close(via_embeds.embeds, out.embeds)
        torch.testing.assert_close(t(tokens_BL, pooled_only=True).embeds, out.embeds)
        images = torch.randn(4, 3, 32, 32)
        o = model(images, tokens_BL, need=("text_tokens",))
    assert o.text_tokens.shape == (4, 32, 128) and o.logit_bias is None
    torch.testing.assert_close(o.text_features, model.encode_text(tokens_BL))
    torch.testing.assert_close(o.image_features, model.encode_image(images))
    with pytest.raises(ValueError, match="context_length 32"):
        t(torch.zeros(1, 33, dtype=torch.long))


def test_gradients_reach_every_parameter_and_init_is_seeded():
    model = build().train()
    tokens_BL = Tokenizer(32)(CAPTIONS)
    out = model(torch.randn(4, 3, 32, 32), tokens_BL)
    (out.image_features @ out.text_features.T * out.logit_scale).logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # every parameter gets a gradient (no pooler left without one: ZeRO would wait for it)
    assert no_grad == [], no_grad
    again = build()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not any(k.startswith("text_model.hf.pooler") for k in model.state_dict())


def test_grad_checkpointing_same_loss_and_grads():
    tokens_BL, images = Tokenizer(32)(CAPTIONS), torch.randn(4, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        cfg = align_cfg()
        cfg.grad_checkpointing = ckpt
        model = build(cfg).train()
        assert model.text_model.hf.is_activation_checkpointing == ckpt
        out = model(images, tokens_BL)
        (out.image_features @ out.text_features.T).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.text_model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


def test_bf16_layernorms_compute_in_fp32():
    model = build()
    assert any(isinstance(m, LayerNorm) for m in model.text_model.hf.modules())
    assert not any(type(m) is torch.nn.LayerNorm for m in model.modules())
    tokens_BL = Tokenizer(32)(CAPTIONS)
    with torch.no_grad():
        want = model.encode_text(tokens_BL)
        got = model.to(torch.bfloat16).encode_text(tokens_BL)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got * want).sum(-1).min() > 0.99  # bf16 rounding only


def test_siglip_family_takes_the_hf_text_tower_too():
    cfg = ModelConfig(name="siglip-tiny", text=TextConfig(kind="hf", hf_config="bert-tiny"))
    model = build(cfg)
    with torch.no_grad():
        feats = model.encode_text(Tokenizer(32)(CAPTIONS))
    assert feats.shape == (4, 64) and type(model.text_model).__name__ == "HFTextTower"


def test_bert_base_size():
    from mmpretrain.model.hf_text import HFTextTower

    cfg = resolve_model_config(ModelConfig(name="ViT-B-16", text=TextConfig(kind="hf", hf_config="bert-base")))
    with torch.device("meta"):
        tower = HFTextTower(cfg)
    c = tower.hf.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (12, 768, 12, 3072)
    # BERT-base is 109.5M with its 30,522-word vocabulary and pooler; ours: 49,408 rows, no pooler, + projection
    n = sum(p.numel() for p in tower.parameters())
    bert_base = 109_482_240
    assert n == bert_base + (49408 - 30522) * 768 - (768 * 768 + 768) + (768 * 512 + 512)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "text_kw, match",
    [
        (dict(kind="bert"), "model.text.kind must be one of"),
        (dict(kind="hf"), "model.text.hf_config must be set when model.text.kind=hf"),
        (dict(kind="hf", hf_config="bert-huge"), "model.text.hf_config: 'bert-huge' is neither a size"),
        (dict(kind="hf", hf_config="bert-tiny", width=256), "model.text.width: with model.text.kind=hf"),
        (dict(kind="hf", hf_config="bert-tiny", vocab_size=30522), "model.text.vocab_size must cover"),
        (dict(hf_config="bert-tiny"), "model.text.hf_config is only used with model.text.kind=hf"),
    ],
)
def test_config_errors_name_the_key(text_kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(name="tiny", text=TextConfig(**text_kw)).validate("model")


def test_resolved_hf_config_keeps_tokenizer_fields_only():
    cfg = resolve_model_config(align_cfg())
    t = cfg.text
    assert (t.vocab_size, t.context_length, t.width, t.layers, t.act) == (49408, 32, None, None, None)
    cfg.validate("model")  # a resolved config validates again (a run's config.yaml is re-read)


# ----------------------------------------------------------------------------- config folders


def save_bert(folder, vocab_size=49408, with_weights=False, task_model=False, max_pos=64, seed=1):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    c = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=max_pos, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(seed)
    m = (BertForMaskedLM if task_model else BertModel)(c).eval()
    m.save_pretrained(folder)
    if not with_weights:
        os.remove(os.path.join(folder, "model.safetensors"))
    return m


def test_folder_config_without_weights_builds_with_our_vocabulary(tmp_path):
    save_bert(tmp_path, vocab_size=30522)
    model = build(align_cfg(hf_config=str(tmp_path)))
    c = model.text_model.hf.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.pad_token_id) == (49408, 32, 1, None)
    assert model.encode_text(Tokenizer(32)(CAPTIONS)).shape == (4, 64)


@pytest.mark.parametrize("task_model", [False, True])
def test_folder_weights_are_loaded(tmp_path, task_model, caplog):
    src = save_bert(tmp_path, with_weights=True, task_model=task_model)
    with caplog.at_level(logging.WARNING):
        model = build(align_cfg(hf_config=str(tmp_path)))
    enc = src.bert if task_model else src
    for k, v in enc.state_dict().items():
        if not k.startswith("pooler."):
            torch.testing.assert_close(model.text_model.hf.state_dict()[k], v, msg=k)
    if task_model:
        assert "does not use" in caplog.text  # the MLM head (cls.*) is named as not loaded
    tokens_BL = Tokenizer(32)(CAPTIONS[:1])
    with torch.no_grad():
        want = enc(input_ids=tokens_BL, attention_mask=(tokens_BL != 0).long()).last_hidden_state[:, 0]
        torch.testing.assert_close(model.text_model(tokens_BL).embeds, model.text_model.projection(want))


@pytest.mark.parametrize(
    "setup, match",
    [
        ("tokenizer", "brings its own tokenizer \\(vocab.txt\\)"),
        ("vocab", "has embeddings for 30522 ids"),
        ("short", "model.text.context_length 32 is longer than model.text.hf_config's max_position_embeddings 16"),
        ("empty", "has no config.json"),
    ],
)
def test_folder_refusals(tmp_path, setup, match):
    if setup == "tokenizer":
        save_bert(tmp_path)
        (tmp_path / "vocab.txt").write_text("[PAD]\n")
    elif setup == "vocab":
        save_bert(tmp_path, vocab_size=30522, with_weights=True)
    elif setup == "short":
        save_bert(tmp_path, max_pos=16)
    with pytest.raises(ValueError, match=match):
        align_cfg(hf_config=str(tmp_path)).validate("model")


# ----------------------------------------------------------------------------- converters


def test_exports_refuse_an_hf_text_tower(tmp_path):
    from mmpretrain.convert import export_hf, export_openclip

    cfg = resolve_model_config(align_cfg())
    sd = build(cfg).state_dict()
    for export in (export_hf, export_openclip):
        with pytest.raises(ValueError, match="model.text.kind=hf: the .* export needs our CLIP text tower"):
            export(sd, cfg, str(tmp_path / export.__name__))
        assert not os.path.exists(tmp_path / export.__name__)


def test_objective_heads_are_dropped_with_a_warning(tmp_path, caplog):
    from mmpretrain.config import Config
    from mmpretrain.convert import export_hf, load_any, read_consolidated, write_folder

    clip_cfg = resolve_model_config(ModelConfig(name="tiny"))
    sd = build(clip_cfg).state_dict()
    with_heads = {**sd, "heads.itm.fc.weight": torch.zeros(2, 4), "heads.itm.fc.bias": torch.zeros(2)}
    with caplog.at_level(logging.WARNING):
        export_hf(with_heads, clip_cfg, str(tmp_path / "hf"))
    assert "dropped 2 keys of training-only objective heads (heads.itm.*)" in caplog.text

    # our consolidated folder: an ALIGN model with a head loads back strictly, without it
    cfg = resolve_model_config(align_cfg())
    model = build(cfg)
    sd = model.state_dict()
    write_folder({**sd, "heads.itm.fc.weight": torch.zeros(2, 4)}, Config(model=cfg), str(tmp_path / "ours"))
    back, _ = read_consolidated(str(tmp_path / "ours"))
    assert back.keys() == sd.keys()
    loaded, _ = load_any(str(tmp_path / "ours"))
    tokens_BL = Tokenizer(32)(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens_BL), model.encode_text(tokens_BL))
