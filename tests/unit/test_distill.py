"""The distillation term: the chunked KL against a naive float64 full-matrix KL (value and gradients), the teacher's
inputs (context length, image size), loading teachers (consolidated folder, Hugging Face folder) and refusals."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.config import ConfigError, load_config
from mmpretrain.objectives import Objective, StepContext
from mmpretrain.objectives.distill import DistillTerm, distill_kl, fit_context, fit_images

BASE = ["data.synthetic.root=/tmp/unused-shapes"]


def naive_kl(x_BD, y_BD, a, u_BE, v_BE, c):
    """(KL_rows + KL_cols) / 2 over the full B x B matrices, KL(teacher || student), plain autograd."""
    s_BB, t_BB = a * x_BD @ y_BD.T, c * u_BE @ v_BE.T

    def rows(t, s):
        log_p = t.log_softmax(1)
        return (log_p.exp() * (log_p - s.log_softmax(1))).sum(1).mean()

    return 0.5 * (rows(t_BB, s_BB) + rows(t_BB.T, s_BB.T))


def features(B, D, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, u = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, E, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(B, D, generator=g, dtype=torch.float64)  # correlated pairs
    v = u + 0.5 * torch.randn(B, E, generator=g, dtype=torch.float64)
    return [F.normalize(t, dim=-1) for t in (x, y, u, v)]


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_kl_matches_naive_float64_value_and_gradients(chunk):
    x, y, u, v = features(13, 8, 6)
    a, c = torch.tensor(9.0, dtype=torch.float64, requires_grad=True), torch.tensor(14.0, dtype=torch.float64)
    x, y = x.requires_grad_(), y.requires_grad_()
    want = naive_kl(x, y, a, u, v, c)
    want.backward()
    x32, y32, a32 = (t.detach().float().requires_grad_() for t in (x, y, a))
    got = distill_kl(x32, y32, a32, u.float(), v.float(), c.float(), chunk_size=chunk)
    got.backward()
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y32.grad.double(), y.grad, rtol=1e-4, atol=1e-6)
    assert a32.grad.item() == pytest.approx(a.grad.item(), rel=1e-4, abs=1e-7)


def test_kl_is_zero_with_zero_gradient_when_the_student_is_the_teacher():
    x, y, _, _ = features(9, 8, 8)
    xs, ys = x.float().requires_grad_(), y.float().requires_grad_()
    a = torch.tensor(20.0, requires_grad=True)
    loss = distill_kl(xs, ys, a, x.float(), y.float(), torch.tensor(20.0), chunk_size=4)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert xs.grad.abs().max() < 1e-5 and ys.grad.abs().max() < 1e-5 and abs(a.grad.item()) < 1e-5


def test_fixed_temperature_gives_the_scale_no_gradient():
    x, y, u, v = features(6, 4, 5, seed=1)
    scale = torch.tensor(1 / 0.05)
    xs = x.float().requires_grad_()
    got = distill_kl(xs, y.float(), scale, u.float(), v.float(), scale, chunk_size=2)
    got.backward()
    assert got.item() == pytest.approx(naive_kl(x, y, 20.0, u, v, 20.0).item(), rel=1e-5)
    assert scale.grad is None and xs.grad is not None


def test_fit_context_lays_tokens_out_as_the_tokenizer_does_at_the_teachers_length():
    from mmpretrain.data.tokenizer import Tokenizer

    texts = ["a red circle", "", "a very long caption " * 8 + "that certainly does not fit", "two small blue squares"]
    student = Tokenizer(16)(texts)
    assert fit_context(student, 16) is student
    for length in (6, 40):
        want = Tokenizer(length)(texts)
        got = fit_context(student, length)
        if length > 16:  # the long caption lost its tail at the student's length: compare the others
            keep = [0, 1, 3]
            got, want = got[keep], want[keep]
        assert torch.equal(got, want), length


def test_fit_images_resizes_like_resizing_before_normalizing():
    from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD, normalize_images

    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    norm = normalize_images(raw)
    assert torch.equal(fit_images(norm, 32, torch.float32), norm)
    for side in (48, 24):  # up and down (antialiased)
        resized = F.interpolate(raw.float(), size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        want = (resized / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        torch.testing.assert_close(fit_images(norm, side, torch.float32), want, rtol=1e-5, atol=1e-4)
    assert fit_images(norm, 24, torch.bfloat16).shape == (2, 3, 24, 24)


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.terms.distill.weight=1.0", "loss.terms.distill.teacher must be set"),
        ("loss.terms.distill.teacher=/no/such/teacher", "loss.terms.distill.teacher: no such folder"),
        ("loss.terms.distill.precision=fp16", "loss.terms.distill.precision"),
        ("loss.terms.distill.temperature=0", "loss.terms.distill.temperature"),
        ("loss.terms.distill.feature_loss=l1", "loss.terms.distill.feature_loss"),
        ("loss.terms.distill.chunk_size=0", "loss.terms.distill.chunk_size"),
    ],
)
def test_config_errors_name_the_key(override, key, tmp_path):
    extra = [] if "teacher" in override or "weight" in override else [f"loss.terms.distill.teacher={tmp_path}"]
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*BASE, override, *extra])


# ----------------------------------------------------------------------------- teachers


def teacher_model_config(**kw):
    """A tiny CLIP that differs from the student: wider embedding, bigger images, shorter context."""
    from mmpretrain.model import ModelConfig, resolve_model_config

    cfg = ModelConfig(name="tiny", embed_dim=48)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=48, patch_size=16),
                              text=dataclasses.replace(cfg.text, context_length=12), **kw)  # fmt: skip
    return resolve_model_config(cfg)


@pytest.fixture(scope="module")
def consolidated_teacher(tmp_path_factory):
    from mmpretrain.config import Config
    from mmpretrain.convert import write_folder
    from mmpretrain.model import build_model

    torch.manual_seed(1)
    model_cfg = teacher_model_config()
    out = str(tmp_path_factory.mktemp("teacher") / "consolidated")
    write_folder(build_model(model_cfg).state_dict(), Config(model=model_cfg), out)
    return out


def student_batch(run_cfg, b=6, seed=0):
    from mmpretrain.data.tokenizer import Tokenizer
    from mmpretrain.data.transforms import normalize_images

    g = torch.Generator().manual_seed(seed)
    s = run_cfg.model.vision.image_size
    images = normalize_images(torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8))
    colors, kinds = "red green blue pink gray cyan".split(), "circle square star ring cross dot".split()
    texts = [f"a {c} {k} on a plain background" for c, k in zip(colors, kinds)]
    return images, Tokenizer(run_cfg.model.text.context_length)(texts[:b])


def build_term(teacher, *overrides):
    run_cfg = load_config(None, [*BASE, f"loss.terms.distill.teacher={teacher}", *overrides])
    term = Objective(run_cfg).terms[0]
    assert isinstance(term, DistillTerm)
    return term, run_cfg


def test_consolidated_teacher_is_frozen_and_runs_like_the_loaded_model(consolidated_teacher):
    from mmpretrain.convert import load_any

    term, run_cfg = build_term(consolidated_teacher, "loss.terms.distill.precision=fp32")
    term.setup(torch.device("cpu"))
    teacher = term.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images, tokens = student_batch(run_cfg)
    got = term.teacher_forward(images, tokens)
    ref_model, _ = load_any(consolidated_teacher)
    with torch.no_grad():
        want = ref_model(fit_images(images, 48, torch.float32), fit_context(tokens, 12))
    torch.testing.assert_close(got.image_features, want.image_features)
    torch.testing.assert_close(got.text_features, want.text_features)
    # bf16 teacher (the default): the same features up to bf16 rounding
    term16, _ = build_term(consolidated_teacher)
    term16.setup(torch.device("cpu"))
    assert term16.teacher.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert term16.teacher.logit_scale.dtype == torch.float32  # the scale keeps full precision
    got16 = term16.teacher_forward(images, tokens)
    assert F.cosine_similarity(got16.image_features, want.image_features).min() > 0.99
    assert F.cosine_similarity(got16.text_features, want.text_features).min() > 0.99
    assert got16.logit_scale.item() == want.logit_scale.item()


@pytest.mark.parametrize("feature_weight, feature_loss", [(0.0, "cosine"), (0.5, "cosine"), (0.5, "mse")])
def test_term_loss_is_the_kl_of_student_and_teacher_plus_feature_regression(consolidated_teacher, feature_weight,
                                                                           feature_loss):  # fmt: skip
    from mmpretrain.model import build_model

    term, run_cfg = build_term(consolidated_teacher, "loss.terms.distill.precision=fp32",
                               f"loss.terms.distill.feature_weight={feature_weight}",
                               f"loss.terms.distill.feature_loss={feature_loss}")  # fmt: skip
    objective = Objective(run_cfg)
    term = objective.terms[0]
    torch.manual_seed(0)
    student = build_model(run_cfg.model)
    objective.attach_heads(student)
    assert ("distill" in student.heads) == (feature_weight > 0)  # student width 64, teacher 48: projected
    objective.setup(torch.device("cpu"))
    images, tokens = student_batch(run_cfg)
    out = student(images, tokens, **objective.forward_kwargs())
    total, values = objective(StepContext(out, images, tokens, {}, student, None, run_cfg.loss))
    t = term.teacher_forward(images, tokens)
    want = naive_kl(out.image_features.double(), out.text_features.double(), out.logit_scale.double(),
                    t.image_features.double(), t.text_features.double(), t.logit_scale.double())  # fmt: skip
    if feature_weight:
        head = student.heads["distill"]
        pi, pt = head.image(out.image_features), head.text(out.text_features)
        if feature_loss == "cosine":
            cos = [F.cosine_similarity(pi, t.image_features), F.cosine_similarity(pt, t.text_features)]
            reg = 1 - torch.cat(cos)
        else:
            reg = torch.cat([(pi - t.image_features).pow(2).sum(-1), (pt - t.text_features).pow(2).sum(-1)])
        want = want + feature_weight * reg.double().mean()
    assert values["distill"].item() == pytest.approx(want.item(), rel=1e-5)
    total.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert student.logit_scale.grad.abs() > 0  # the student's own scale is distilled too (no temperature set)
    assert not any(p.grad is not None for p in term.teacher.parameters())


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    """A tiny transformers CLIPModel (our tokenizer's vocabulary), saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    def make(vocab_size, name):
        torch.manual_seed(2)
        cfg = CLIPConfig(
            text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=20, eos_token_id=vocab_size - 1),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=40, patch_size=8),
            projection_dim=24,
        )  # fmt: skip
        model = CLIPModel(cfg).eval()
        out = str(tmp_path_factory.mktemp("hf") / name)
        model.save_pretrained(out)
        return out, model

    return {"ours": make(49408, "clip"), "other_vocab": make(1000, "other")}


def test_hf_teacher_loads_and_runs(hf_teacher):
    folder, hf_model = hf_teacher["ours"]
    term, run_cfg = build_term(folder, "loss.terms.distill.precision=fp32")
    term.setup(torch.device("cpu"))
    images, tokens = student_batch(run_cfg)
    got = term.teacher_forward(images, tokens)
    with torch.no_grad():  # transformers itself, on the inputs the term hands the teacher
        pix, ids = fit_images(images, 40, torch.float32), fit_context(tokens, 20)
        want_img = F.normalize(hf_model.get_image_features(pixel_values=pix).pooler_output, dim=-1)
        want_txt = F.normalize(hf_model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    torch.testing.assert_close(got.image_features, want_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.text_features, want_txt, rtol=1e-4, atol=1e-5)
    x, y = F.normalize(torch.randn(6, 64), dim=-1), F.normalize(torch.randn(6, 64), dim=-1)
    out = type("Out", (), dict(image_features=x, text_features=y, logit_scale=torch.tensor(10.0)))()
    loss = term.loss(StepContext(out, images, tokens, {}, None, None, run_cfg.loss))
    assert torch.isfinite(loss) and loss.item() > 0


def test_teacher_with_another_vocabulary_is_refused(hf_teacher):
    term, _ = build_term(hf_teacher["other_vocab"][0])
    with pytest.raises(ValueError, match=r"loss.terms.distill.teacher: its text tower has vocab_size 1000"):
        term.setup(torch.device("cpu"))


def test_teacher_run_objective_heads_are_dropped(consolidated_teacher, monkeypatch):
    """A run folder trained with head-bearing terms (ITM, MIM, distill's projection) keeps heads.<term>.* keys."""
    import mmpretrain.convert as convert

    read_any = convert.read_any

    def with_heads(path, dtype, **kw):
        sd, cfg = read_any(path, dtype, **kw)
        return {**sd, "heads.mim.proj.weight": torch.zeros(3, 3)}, cfg

    monkeypatch.setattr(convert, "read_any", with_heads)
    term, _ = build_term(consolidated_teacher, "loss.terms.distill.precision=fp32")
    term.setup(torch.device("cpu"))
    assert len(term.teacher.heads) == 0
