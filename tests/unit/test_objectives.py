"""The objective layer: loss.terms validation, composition, logging names, heads through forward(head=...)."""

import pytest
import torch
from torch import nn

from mmpretrain.config import ConfigError, load_config
from mmpretrain.model import ModelConfig, build_model
from mmpretrain.objectives import REGISTRY, TERM_CONFIGS, Objective, StepContext, Term, TermConfig


def cfg_with(*overrides):
    return load_config(None, ["data.synthetic.root=/tmp/unused", *overrides], world_size=1)


def test_default_is_the_one_contrastive_term_of_loss_name():
    cfg = cfg_with()
    assert list(cfg.loss.active()) == ["clip"] and cfg.loss.terms is None
    cfg = cfg_with("model.name=siglip-tiny", "loss.name=siglip")
    assert list(cfg.loss.active()) == ["siglip"]


def test_terms_compose_with_their_own_options():
    cfg = cfg_with("loss.terms.clip.weight=0.5", "loss.terms.clip.label_smoothing=0.1")
    (name, term_cfg), *rest = cfg.loss.active().items()
    assert name == "clip" and not rest
    assert term_cfg.weight == 0.5 and term_cfg.label_smoothing == 0.1


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.terms.nope.weight=1", "loss.terms.nope: unknown key"),
        ("loss.terms.clip.nope=1", "loss.terms.clip.nope: unknown key"),
        ("loss.terms.clip.weight=-1", "loss.terms.clip.weight must be a finite number >= 0"),
        ("loss.terms.clip.label_smoothing=1.5", "loss.terms.clip.label_smoothing must be in [0, 1)"),
        ("loss.terms.siglip.weight=1", "loss.terms.siglip: the 'siglip' term needs a siglip model"),
    ],
)
def test_bad_terms_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        cfg_with(override)


def test_grad_cache_refuses_terms_it_cannot_run():
    with pytest.raises(ConfigError, match="label_smoothing is not supported with train.accum_steps > 1"):
        cfg_with("loss.terms.clip.label_smoothing=0.1", "train.accum_steps=2", "train.batch_size=8")


class _Probe(Term):
    """A test-only term (not registered): a head and a need, to check the plumbing."""

    name = "probe"
    needs = ("image_tokens",)

    def build_head(self, model):
        return nn.Linear(model.vision_model.post_layernorm.normalized_shape[0], 1)

    def loss(self, ctx):
        return ctx.model(head=self.name, input=ctx.out.image_tokens).float().pow(2).mean()


def test_objective_sums_weighted_terms_and_runs_heads_through_forward():
    cfg = cfg_with("loss.terms.clip.weight=0.25")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny"))
    obj = Objective(cfg)
    obj.terms.append(_Probe(TermConfig(weight=2.0), cfg))
    obj.attach_heads(model)
    assert list(model.heads) == ["probe"] and "heads.probe.weight" in model.state_dict()
    assert obj.forward_kwargs() == {"need": ("image_tokens",)}
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 8))
    tokens[:, -1] = 49407
    out = model(images, tokens, **obj.forward_kwargs())
    assert out.image_tokens.shape[:2] == (4, 17) and out.text_tokens is None
    total, values = obj(StepContext(out, images, tokens, {}, model, None, cfg.loss))
    assert list(values) == ["clip", "probe"]
    torch.testing.assert_close(total, 0.25 * values["clip"] + 2.0 * values["probe"])
    total.backward()
    assert model.heads["probe"].weight.grad is not None and model.logit_scale.grad is not None
    with pytest.raises(KeyError, match="no head 'nope'"):
        model(head="nope")


def test_need_and_patch_drop_give_the_kept_tokens_in_training():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny")).train()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 8))
    out = model(images, tokens, need=("image_tokens", "text_tokens"), patch_drop=0.75)
    assert out.image_keep.shape == (2, 4) and out.image_tokens.shape[1] == 1 + 4  # class token + kept patches
    assert out.text_tokens.shape[:2] == (2, 8)
    assert (out.image_keep.diff(dim=1) > 0).all()  # ascending patch indices
    # pooled features of the full-token path equal the default path's (same tower, same masking RNG)
    torch.manual_seed(1)
    a = model(images, tokens, patch_drop=0.5)
    torch.manual_seed(1)
    b = model(images, tokens, need=("image_tokens",), patch_drop=0.5)
    torch.testing.assert_close(a.image_features, b.image_features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.image_keep, b.image_keep)


def test_every_registered_term_has_a_validating_config():
    for name, cls in REGISTRY.items():
        assert issubclass(cls.config_cls, TermConfig), name
        cls.config_cls().validate(f"loss.terms.{name}")  # defaults are valid


def test_each_term_uses_its_config_class_from_objectives_config():
    """loss.terms is built from TERM_CONFIGS without importing the terms: the two must name the same classes."""
    assert set(REGISTRY) == set(TERM_CONFIGS)
    for name, cls in REGISTRY.items():
        assert cls.config_cls is TERM_CONFIGS[name], name
