"""Ours <-> Hugging Face transformers `CLIPModel` / `SiglipModel` folders (local disk, no hub).

Key map (everything else has the same name on both sides):

    ours                                           HF
    <tower>.encoder.layers.<i>.self_attn.qkv_proj  q_proj, k_proj, v_proj (split in three on dim 0)
    vision_model.projection.weight   (CLIP)        visual_projection.weight
    text_model.projection.weight     (CLIP)        text_projection.weight
    logit_scale (1,)                 (CLIP)        logit_scale ()
    logit_scale, logit_bias (1,)     (SigLIP)      same, (1,)

An exported folder holds config.json, model.safetensors, the tokenizer files (ours, CLIP BPE; a
SigLIP export carries it too, padding with id 0 as ours: see write_tokenizer) and preprocessor_config.json
(CLIPImageProcessor: resize shorter side bicubic, center crop, CLIP mean/std, as our eval transform).
It loads with `CLIPModel` / `SiglipModel` / `CLIPVisionModel` / `SiglipVisionModel.from_pretrained(folder)`.

CLIP text pooling: ours takes the argmax of the ids (the EOT token is the largest id); HF takes the
first `eos_token_id`, which we set to vocab_size - 1, the same position whenever the row holds EOT.
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch

from mmpretrain.convert.common import (
    atomic_folder,
    cast,
    check_exportable,
    check_state_dict,
    drop_heads,
    load_safetensors,
    load_torch_weights,
    save_safetensors,
)
from mmpretrain.convert.ours import expected_shapes
from mmpretrain.data.tokenizer import Tokenizer
from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD
from mmpretrain.model.config import ModelConfig, TextConfig, VisionConfig, resolve_model_config

HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
OUR_ACT = {v: k for k, v in HF_ACT.items()} | {"gelu_new": "gelu_tanh"}  # gelu_new is the same tanh formula
CLIP_RENAMES = {"vision_model.projection.weight": "visual_projection.weight",
                "text_model.projection.weight": "text_projection.weight"}  # fmt: skip
QKV = ".self_attn.qkv_proj."
PAD_TOKEN = "!"  # id 0 of the CLIP BPE vocabulary: our tokenizer pads with 0


# ---------------------------------------------------------------- configs


def hf_config(model_cfg, dtype: torch.dtype = torch.float32, siglip2: bool = False):
    """A transformers CLIPConfig / SiglipConfig (Siglip2Config with ``siglip2``) for a resolved ModelConfig (kind=hf
    text towers raise)."""
    from transformers import CLIPConfig, Siglip2Config, SiglipConfig

    if siglip2 and model_cfg.family != "siglip":
        raise ValueError("--siglip2 exports SigLIP models only (this one is CLIP)")
    check_exportable(model_cfg, "Hugging Face CLIPModel" if model_cfg.family == "clip" else "Hugging Face SiglipModel")
    v, t = model_cfg.vision, model_cfg.text

    def tower(c):
        return dict(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.layers,
                    num_attention_heads=c.heads, hidden_act=HF_ACT[c.act], layer_norm_eps=c.ln_eps)  # fmt: skip

    vision = dict(tower(v), image_size=v.image_size, patch_size=v.patch_size)
    # EOT is the largest id (49407 for our tokenizer), SOT the one below
    pad = 0 if model_cfg.family == "siglip" else t.vocab_size - 1  # as the exported tokenizer pads
    ids = dict(eos_token_id=t.vocab_size - 1, bos_token_id=t.vocab_size - 2, pad_token_id=pad)
    text = dict(tower(t), vocab_size=t.vocab_size, max_position_embeddings=t.context_length, **ids)
    if model_cfg.family == "clip":
        text["projection_dim"] = vision["projection_dim"] = model_cfg.embed_dim
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg.embed_dim,
                         logit_scale_init_value=model_cfg.init_logit_scale)  # fmt: skip
        cfg.architectures = ["CLIPModel"]
    elif siglip2:
        # NaFlex: a patch budget instead of an image size; our fixed grid is its g x g position table, which
        # transformers resizes to each image's patch grid (the identity at g x g)
        vision.pop("image_size")
        vision["num_patches"] = (v.image_size // v.patch_size) ** 2
        text["projection_size"] = model_cfg.embed_dim
        cfg = Siglip2Config(text_config=text, vision_config=vision)
        cfg.architectures = ["Siglip2Model"]
    else:
        text["projection_size"] = model_cfg.embed_dim
        cfg = SiglipConfig(text_config=text, vision_config=vision)
        cfg.architectures = ["SiglipModel"]
    cfg.dtype = dtype
    return cfg


def model_config_from_hf(hf_cfg, source: str):
    """A resolved ModelConfig from a transformers CLIPConfig / SiglipConfig; unsupported settings raise."""
    family = {"clip": "clip", "siglip": "siglip", "siglip2": "siglip"}.get(hf_cfg.model_type)
    if family is None:
        raise ValueError(f"{source}: model_type {hf_cfg.model_type!r} is not clip, siglip or siglip2")
    hv, ht = hf_cfg.vision_config, hf_cfg.text_config
    if hf_cfg.model_type == "siglip2":  # NaFlex: its g x g position table is our fixed grid
        grid = math.isqrt(hv.num_patches)
        if grid * grid != hv.num_patches:
            raise ValueError(f"{source}: vision_config.num_patches {hv.num_patches} is not a square grid")
        hv = copy.copy(hv)
        hv.image_size = grid * hv.patch_size

    def act(c, key):
        if c.hidden_act not in OUR_ACT:
            raise ValueError(f"{source}: {key}.hidden_act {c.hidden_act!r} is not one of {sorted(OUR_ACT)}")
        return OUR_ACT[c.hidden_act]

    def tower(c, key):
        return dict(width=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                    mlp_dim=c.intermediate_size, act=act(c, key), ln_eps=c.layer_norm_eps)  # fmt: skip

    for key, c in (("vision_config", hv), ("text_config", ht)):
        for dim in ("image_size", "patch_size"):
            if isinstance(getattr(c, dim, 0), (list, tuple)):
                raise ValueError(f"{source}: {key}.{dim} must be one int (non-square is not supported)")
    vision = VisionConfig(image_size=hv.image_size, patch_size=hv.patch_size, **tower(hv, "vision_config"))
    text = TextConfig(vocab_size=ht.vocab_size, context_length=ht.max_position_embeddings, **tower(ht, "text_config"))
    if family == "clip":
        if ht.eos_token_id not in (2, ht.vocab_size - 1):
            # HF pools at the first eos_token_id (2: legacy argmax); ours at the argmax of the ids
            raise ValueError(
                f"{source}: text_config.eos_token_id {ht.eos_token_id} is not the largest id {ht.vocab_size - 1}: "
                "our CLIP text tower pools at the argmax of the ids"
            )
        embed_dim = hf_cfg.projection_dim
        name, bias = "tiny", None
    else:
        if not getattr(hv, "vision_use_head", True):
            raise ValueError(f"{source}: vision_config.vision_use_head false is not supported")
        embed_dim = ht.projection_size if ht.projection_size is not None else ht.hidden_size
        name, bias = "siglip-tiny", -10.0
    # every size field is given, so the table entry only names the family
    cfg = ModelConfig(name=name, family=family, embed_dim=embed_dim, vision=vision, text=text, init_logit_bias=bias)
    try:
        cfg.validate("model")
    except ValueError as e:
        raise ValueError(f"{source}: gives an invalid model config ({e})") from None
    return resolve_model_config(cfg)


# ---------------------------------------------------------------- key maps


PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"


def to_hf_state_dict(sd: dict[str, torch.Tensor], family: str, siglip2: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names and shapes (no copy of the unchanged tensors). ``siglip2``: the patch embedding
    as Siglip2's linear layer over flattened patches, pixels in (row, column, channel) order."""
    out = {}
    for key, value in sd.items():
        if siglip2 and key == PATCH_KEY:
            out[key] = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # (D, C, p, p) -> (D, p * p * C)
        elif QKV in key:
            stem, kind = key.split(QKV)
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{stem}.self_attn.{name}_proj.{kind}"] = part
        elif family == "clip" and key == "logit_scale":
            out[key] = value.reshape(())
        else:
            out[CLIP_RENAMES.get(key, key) if family == "clip" else key] = value
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], family: str, source: str) -> dict[str, torch.Tensor]:
    """HF state dict -> ours. q/k/v must come in complete triples; anything else passes to the strict check."""
    back = {v: k for k, v in CLIP_RENAMES.items()} if family == "clip" else {}
    out, triples = {}, {}
    for key, value in hf_sd.items():
        parts = key.split(".self_attn.")
        if key == PATCH_KEY and value.ndim == 2:  # Siglip2: (D, p * p * C) over (row, column, channel) pixels
            p = math.isqrt(value.shape[1] // 3)
            out[key] = value.reshape(value.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()
        elif len(parts) == 2 and parts[1][:7] in ("q_proj.", "k_proj.", "v_proj."):
            triples.setdefault((parts[0], parts[1][7:]), {})[parts[1][0]] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(1)  # (1,) here (DeepSpeed cannot broadcast 0-dim parameters)
        else:
            out[back.get(key, key)] = value
    for (stem, kind), qkv in triples.items():
        missing = [f"{stem}.self_attn.{p}_proj.{kind}" for p in "qkv" if p not in qkv]
        if missing:
            raise ValueError(f"{source}: missing keys {', '.join(missing)}")
        out[f"{stem}{QKV}{kind}"] = torch.cat([qkv[p] for p in "qkv"], dim=0)
    return out


def hf_expected_shapes(hf_cfg) -> dict[str, torch.Size]:
    from transformers import CLIPModel, Siglip2Model, SiglipModel

    with torch.device("meta"):
        model = {"clip": CLIPModel, "siglip": SiglipModel, "siglip2": Siglip2Model}[hf_cfg.model_type](hf_cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- folders


def write_tokenizer(out_dir: str, context_length: int, family: str) -> None:
    """Our CLIP BPE tokenizer as HF files, model_max_length = context_length.

    CLIP keeps HF's padding with EOT: the text tower is causal and pools at the first EOT, so what follows
    never matters. SigLIP pools at the last position, so the pad id changes the features: it pads with
    id 0 ("!") like our tokenizer. That makes "!" an added token; `single_word` keeps it from matching
    inside words ("snow!" is unchanged), but a "!" after a space or another "!" ("wow!!") becomes id 0, not
    256 or 748 (our `mmpretrain.data.Tokenizer` gives the exact ids for any text).
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    Tokenizer(context_length).save_pretrained(out_dir)
    extra = {}
    if family == "siglip":
        extra["pad_token"] = AddedToken(PAD_TOKEN, special=True, single_word=True, normalized=False)
    tok = AutoTokenizer.from_pretrained(out_dir, model_max_length=context_length, trust_remote_code=False, **extra)
    tok.save_pretrained(out_dir)


def write_preprocessor(out_dir: str, image_size: int) -> None:
    """CLIPImageProcessor settings of our eval transform: shorter side -> S bicubic, center crop S, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    proc.save_pretrained(out_dir)


def write_siglip2_preprocessor(out_dir: str, image_size: int, patch_size: int) -> None:
    """Siglip2ImageProcessor with our fixed grid as its patch budget and our normalization (bicubic resize)."""
    from transformers import Siglip2ImageProcessor

    grid = image_size // patch_size
    proc = Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=grid * grid, resample=3,
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    proc.save_pretrained(out_dir)


def export_hf(sd: dict[str, torch.Tensor], model_cfg, out_dir: str, dtype: torch.dtype = torch.float32,
              force: bool = False, siglip2: bool = False) -> str:  # fmt: skip
    """Our (checked) state dict + resolved ModelConfig -> an HF folder at out_dir (objective heads dropped);
    ``siglip2``: a Siglip2Model folder (NaFlex) of a SigLIP model."""
    hf_cfg = hf_config(model_cfg, dtype, siglip2)  # refuses what HF CLIPModel / SiglipModel cannot hold
    sd = drop_heads(sd, "HF export")
    hf_sd = cast(to_hf_state_dict(sd, model_cfg.family, siglip2), dtype)
    check_state_dict(hf_sd, hf_expected_shapes(hf_cfg), "HF export")
    with atomic_folder(out_dir, force) as tmp:
        save_safetensors(hf_sd, os.path.join(tmp, "model.safetensors"))
        hf_cfg.to_json_file(os.path.join(tmp, "config.json"))
        write_tokenizer(tmp, model_cfg.text.context_length, model_cfg.family)
        if siglip2:
            write_siglip2_preprocessor(tmp, model_cfg.vision.image_size, model_cfg.vision.patch_size)
        else:
            write_preprocessor(tmp, model_cfg.vision.image_size)
    return out_dir


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_safetensors(single)
    if os.path.isfile(index):
        try:
            files = sorted(set(json.load(open(index))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{index}: unreadable ({e})") from None
        sd = {}
        for f in files:
            sd.update(load_safetensors(os.path.join(path, f)))
        return sd
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return load_torch_weights(os.path.join(path, "pytorch_model.bin"))
    raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_hf(path: str, dtype: torch.dtype | None = torch.float32):
    """(our state dict, resolved ModelConfig) from a local HF CLIP / SigLIP folder; strict keys and shapes."""
    from transformers import AutoConfig

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path}: no such file (not a Hugging Face model folder)")
    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"{cfg_path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model_cfg = model_config_from_hf(hf_cfg, cfg_path)
    # older transformers saved the position_ids buffer (an arange), not a weight
    hf_sd = {k: v for k, v in _read_hf_weights(path).items() if not k.endswith(".position_ids")}
    check_state_dict(hf_sd, hf_expected_shapes(hf_cfg), path)
    sd = from_hf_state_dict(hf_sd, model_cfg.family, path)
    check_state_dict(sd, expected_shapes(model_cfg), path)
    return (cast(sd, dtype) if dtype is not None else sd), model_cfg
