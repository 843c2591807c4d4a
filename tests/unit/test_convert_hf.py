"""Ours <-> Hugging Face transformers folders, checked against the real CLIPModel / SiglipModel (no download).

Each test builds a tiny random model on one side (every parameter perturbed, so zero-initialized
biases and LayerNorm affines matter), converts through a folder on disk, loads it on the other side
with `from_pretrained`, and compares features, logits and hidden states in fp32.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    SiglipModel,
    SiglipVisionModel,
)

from mmpretrain.convert import export_hf, hf_config, read_any, read_hf
from mmpretrain.convert.common import atomic_folder
from mmpretrain.convert.resize import resize_position_embedding
from mmpretrain.data import Tokenizer
from mmpretrain.model import ModelConfig, TextConfig, VisionConfig, build_model, resolve_model_config

VOCAB = 1000  # small vocab keeps the models tiny; the EOT token is the largest id, VOCAB - 1
CASES = {"clip-gelu": ("tiny", "gelu"), "clip-quickgelu": ("tiny", "quick_gelu"), "siglip": ("siglip-tiny", None)}
ATOL = 1e-5


def tiny_cfg(name, act=None, vocab=VOCAB):
    return resolve_model_config(
        ModelConfig(name=name, text=TextConfig(vocab_size=vocab, act=act), vision=VisionConfig(act=act))
    )


def perturb_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def our_model(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_(build_model(cfg), seed + 100)


def inputs(cfg, B=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    V, L = cfg.text.vocab_size, cfg.text.context_length
    tokens = torch.randint(1, V - 1, (B, L), generator=g)
    for b, eot in enumerate([5, 11, L - 1][:B]):  # EOT at different places, zero padding after it
        tokens[b, eot] = V - 1
        tokens[b, eot + 1 :] = 0
    return images, tokens


def hf_classes(family):
    return (CLIPModel, CLIPVisionModel) if family == "clip" else (SiglipModel, SiglipVisionModel)


def assert_same_outputs(ours, hf, cfg):
    images, tokens = inputs(cfg)
    with torch.no_grad():
        out = ours(images, tokens)
        ref = hf(input_ids=tokens, pixel_values=images)
    torch.testing.assert_close(out.image_features, ref.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.text_features, ref.text_embeds, atol=ATOL, rtol=0)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    if out.logit_bias is not None:
        logits = logits + out.logit_bias
    torch.testing.assert_close(logits, ref.logits_per_image, atol=ATOL * out.logit_scale.item(), rtol=0)


@pytest.mark.parametrize("name,act", list(CASES.values()), ids=list(CASES))
def test_export_loads_in_transformers_with_same_outputs(tmp_path, name, act):
    cfg = tiny_cfg(name, act)
    ours = our_model(cfg)
    export_hf(ours.state_dict(), cfg, str(tmp_path / "hf"))
    model_cls, vision_cls = hf_classes(cfg.family)
    hf = model_cls.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.dtype == torch.float32
    assert_same_outputs(ours, hf, cfg)

    # what a LLaVA-style projector reads: the vision tower's second-to-last hidden state
    vision = vision_cls.from_pretrained(str(tmp_path / "hf")).eval()
    images, _ = inputs(cfg)
    with torch.no_grad():
        ref = vision(pixel_values=images, output_hidden_states=True)
        mine = ours.vision_model(images, output_hidden_states=True)
    assert len(ref.hidden_states) == len(mine.hidden_states) == cfg.vision.layers + 1
    torch.testing.assert_close(mine.hidden_states[-2], ref.hidden_states[-2], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,act", list(CASES.values()), ids=list(CASES))
def test_import_from_transformers_folder_same_outputs(tmp_path, name, act):
    """The reverse direction: a random HF model saved by transformers itself -> ours."""
    cfg = tiny_cfg(name, act)
    model_cls, _ = hf_classes(cfg.family)
    torch.manual_seed(5)
    hf = perturb_(model_cls(hf_config(cfg)), 7)
    hf.save_pretrained(str(tmp_path / "hf"))
    sd, got_cfg = read_hf(str(tmp_path / "hf"))
    assert got_cfg == cfg
    ours = build_model(got_cfg).eval()
    ours.load_state_dict(sd, strict=True)
    assert_same_outputs(ours, hf, cfg)


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ours_to_hf_to_ours_is_bit_exact(tmp_path, name, dtype):
    cfg = tiny_cfg(name)
    sd = our_model(cfg).state_dict()
    export_hf(sd, cfg, str(tmp_path / "hf"), dtype=dtype)
    back, back_cfg = read_hf(str(tmp_path / "hf"), dtype=None)
    assert back_cfg == cfg and back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v.to(dtype)), k


TEXTS = ["a photo of a cat.", "Two dogs, playing in the SNOW!", "x", "a very long caption " * 20, "über café", "snow!"]


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_exported_tokenizer_gives_our_ids(tmp_path, name):
    """AutoTokenizer on the folder gives our ids; SigLIP (pooled at the last position) pads with 0 as we do."""
    cfg = resolve_model_config(ModelConfig(name=name))  # the real 49408-token vocabulary
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    export_hf(ours.state_dict(), cfg, str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    L = cfg.text.context_length
    assert tok.model_max_length == L
    hf_ids = tok(TEXTS, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    our_ids = Tokenizer(L)(TEXTS)
    if cfg.family == "siglip":
        assert torch.equal(hf_ids.input_ids, our_ids)
    else:  # HF pads CLIP with EOT: same ids up to EOT, and the same text features (causal, pooled at EOT)
        mask = hf_ids.attention_mask.bool()
        assert torch.equal(hf_ids.input_ids[mask], our_ids[mask]) and torch.equal(mask, our_ids.ne(0))
        hf = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
        with torch.no_grad():
            ref = hf.get_text_features(input_ids=hf_ids.input_ids)
            ref = getattr(ref, "pooler_output", ref)
            torch.testing.assert_close(ours.encode_text(our_ids), torch.nn.functional.normalize(ref, dim=-1),
                                       atol=ATOL, rtol=0)  # fmt: skip


def test_preprocessor_matches_our_eval_transform(tmp_path):
    from PIL import Image

    from mmpretrain.data.transforms import EvalTransform, normalize_images

    cfg = tiny_cfg("tiny")
    export_hf(our_model(cfg).state_dict(), cfg, str(tmp_path / "hf"))
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    img = Image.fromarray((torch.rand(45, 70, 3) * 255).to(torch.uint8).numpy())  # non-square: resize + crop
    ref = proc(images=img, return_tensors="pt").pixel_values[0]
    ours = normalize_images(EvalTransform(cfg.vision.image_size)(img)[None])[0]  # uint8 -> the model's input
    assert ref.shape == ours.shape == (3, 32, 32)
    # PIL vs tensor bicubic resampling may differ by a grey level; normalized, that is ~1/255/0.26
    torch.testing.assert_close(ref, ours, atol=0.05, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_image_size_resize_matches_hf_interpolation(tmp_path, name):
    """32 px model -> 48 px export equals HF's own bicubic position-embedding interpolation at 48 px."""
    cfg = tiny_cfg(name)
    ours = our_model(cfg)
    export_hf(ours.state_dict(), cfg, str(tmp_path / "hf32"))
    sd48, cfg48 = resize_position_embedding(ours.state_dict(), cfg, 48)
    export_hf(sd48, cfg48, str(tmp_path / "hf48"))
    _, vision_cls = hf_classes(cfg.family)
    hf32 = vision_cls.from_pretrained(str(tmp_path / "hf32")).eval()
    hf48 = vision_cls.from_pretrained(str(tmp_path / "hf48")).eval()
    assert hf48.config.image_size == 48
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf32(pixel_values=images, interpolate_pos_encoding=True, output_hidden_states=True)
        got = hf48(pixel_values=images, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_states[-2], ref.hidden_states[-2], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- refusals


@pytest.fixture
def exported(tmp_path):
    cfg = tiny_cfg("tiny")
    export_hf(our_model(cfg).state_dict(), cfg, str(tmp_path / "hf"))
    return str(tmp_path / "hf")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("text_projection.weight"), "missing keys text_projection.weight"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected keys extra"),
        (lambda sd: sd.update({"logit_scale": torch.zeros(2)}), r"shape mismatch: logit_scale \(2,\)"),
    ],
    ids=["missing", "leftover", "shape"],
)
def test_import_refuses_bad_keys_naming_them(exported, edit, match):
    path = os.path.join(exported, "model.safetensors")
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)
    with pytest.raises(ValueError, match=match):
        read_hf(exported)


def test_truncated_weights_and_mismatched_config_are_one_line_errors(exported):
    cfg_path = os.path.join(exported, "config.json")
    raw = json.load(open(cfg_path))
    raw["text_config"]["hidden_size"] = 32  # config no longer matches the weights
    json.dump(raw, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="shape mismatch"):
        read_hf(exported)
    path = os.path.join(exported, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file") as e:
        read_hf(exported)
    assert "\n" not in str(e.value)


def test_wrong_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a run folder"):
        read_any(str(tmp_path))
    with pytest.raises(ValueError, match="config.json: no such file"):
        read_hf(str(tmp_path))


def test_output_folder_is_atomic_and_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        with atomic_folder(str(out)):
            pass
    with pytest.raises(RuntimeError):  # a failure mid-write leaves neither the folder nor a temp folder
        with atomic_folder(str(tmp_path / "new")) as tmp:
            open(os.path.join(tmp, "half.bin"), "w").write("partial")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with atomic_folder(str(out), force=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("y")
    assert os.listdir(out) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_evaluate_cli_on_an_hf_folder_through_load_any(tmp_path, shapes_dataset, monkeypatch, capsys):
    """The hook wanted in mmpretrain.eval (load_any in place of load_model_from_run): an exported HF
    folder evaluates to exactly our model's numbers."""
    import mmpretrain.checkpoint
    from mmpretrain.convert import load_any
    from mmpretrain.data.config import EvalDataConfig
    from mmpretrain.eval.cli import main
    from mmpretrain.eval.config import EvalConfig
    from mmpretrain.eval.suite import evaluate_all

    cfg = resolve_model_config(ModelConfig(name="tiny"))  # the real vocabulary: the eval sets use our tokenizer
    ours = our_model(cfg)
    export_hf(ours.state_dict(), cfg, str(tmp_path / "hf"))
    data_cfg = EvalDataConfig(zeroshot=shapes_dataset.zeroshot_root, retrieval=shapes_dataset.retrieval_root)
    ref = evaluate_all(ours, Tokenizer(cfg.text.context_length), data_cfg, EvalConfig(num_workers=0),
                       image_size=cfg.vision.image_size)  # fmt: skip
    monkeypatch.setattr(mmpretrain.checkpoint, "load_model_from_run", load_any)
    out = tmp_path / "results.json"
    args = [str(tmp_path / "hf"), "--zeroshot", shapes_dataset.zeroshot_root, "--retrieval",
            shapes_dataset.retrieval_root, "--num-workers", "0", "--output", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    got = json.load(open(out))
    assert got.keys() == ref.keys() and all(got[k] == pytest.approx(ref[k], abs=1e-9) for k in ref)
