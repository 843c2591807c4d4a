"""Ours (CLIP family) <-> an OpenCLIP state dict + model-config JSON.

An exported folder holds `<name>.json` (the model config OpenCLIP reads after
`open_clip.add_model_config(folder)`) and `open_clip_model.safetensors`::

    open_clip.add_model_config(folder)
    model = open_clip.create_model(name, pretrained=f"{folder}/open_clip_model.safetensors")

Key map (i: block index; <tower>: vision_model -> `visual.`, text_model -> `` (top level)):

    ours                                                 OpenCLIP
    vision_model.embeddings.class_embedding              visual.class_embedding
    vision_model.embeddings.position_embedding.weight    visual.positional_embedding
    vision_model.embeddings.patch_embedding.weight       visual.conv1.weight
    vision_model.pre_layrnorm                            visual.ln_pre
    vision_model.post_layernorm                          visual.ln_post
    vision_model.projection.weight (E, D)                visual.proj (D, E), transposed
    text_model.embeddings.token_embedding.weight         token_embedding.weight
    text_model.embeddings.position_embedding.weight      positional_embedding
    text_model.final_layer_norm                          ln_final
    text_model.projection.weight (E, D)                  text_projection (D, E), transposed
    <tower>.encoder.layers.i.layer_norm1 / layer_norm2   <tower>transformer.resblocks.i.ln_1 / ln_2
    <tower>.encoder.layers.i.self_attn.qkv_proj.weight   ...resblocks.i.attn.in_proj_weight (same [q; k; v] rows)
    <tower>.encoder.layers.i.self_attn.qkv_proj.bias     ...resblocks.i.attn.in_proj_bias
    <tower>.encoder.layers.i.self_attn.out_proj          ...resblocks.i.attn.out_proj
    <tower>.encoder.layers.i.mlp.fc1 / fc2               ...resblocks.i.mlp.c_fc / c_proj
    logit_scale (1,)                                     logit_scale ()

OpenCLIP's SigLIP models use a timm image tower and an HF text tower: not supported here (use
the Hugging Face export for SigLIP).
"""

from __future__ import annotations

import json
import os
import re

import torch

from mmpretrain.convert.common import (
    atomic_folder,
    cast,
    check_exportable,
    check_state_dict,
    drop_heads,
    load_weights,
    save_safetensors,
)
from mmpretrain.convert.ours import expected_shapes
from mmpretrain.model.config import ModelConfig, TextConfig, VisionConfig, resolve_model_config

WEIGHTS = "open_clip_model.safetensors"
TOWERS = {"vision_model.": "visual.", "text_model.": ""}
RENAMES = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "vision_model.projection.weight": "visual.proj",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_model.projection.weight": "text_projection",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {"visual.proj", "text_projection"}  # OpenCLIP stores projections as (D, E) and computes x @ proj
BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.qkv_proj.weight": "attn.in_proj_weight",
         "self_attn.qkv_proj.bias": "attn.in_proj_bias", "self_attn.out_proj": "attn.out_proj",
         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
OUR_BLOCK_RE = re.compile(r"^(vision_model\.|text_model\.)encoder\.layers\.(\d+)\.(.+)$")
OC_BLOCK_RE = re.compile(r"^(visual\.|)transformer\.resblocks\.(\d+)\.(.+)$")
DEFAULT_EPS = 1e-5  # torch LayerNorm default, what OpenCLIP uses unless norm_kwargs says otherwise


def _rename_block(rest: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return None


def to_openclip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP state dict -> OpenCLIP names and shapes; a key without a mapping raises."""
    out = {}
    for key, value in sd.items():
        if m := OUR_BLOCK_RE.match(key):
            new = _rename_block(m.group(3), BLOCK)
            name = None if new is None else f"{TOWERS[m.group(1)]}transformer.resblocks.{m.group(2)}.{new}"
        else:
            name = RENAMES.get(key)
        if name is None:
            raise ValueError(f"OpenCLIP export: no mapping for key {key}")
        if name in TRANSPOSED:
            value = value.T
        out[name] = value.reshape(()) if name == "logit_scale" else value
    return out


def from_openclip_state_dict(oc_sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    back_block = {v: k for k, v in BLOCK.items()}
    back = {v: k for k, v in RENAMES.items()}
    back_tower = {v: k for k, v in TOWERS.items()}
    if oc_sd and all(k.startswith("module.") for k in oc_sd):  # saved from DDP, as OpenCLIP's trainer does
        oc_sd = {k[len("module.") :]: v for k, v in oc_sd.items()}
    out = {}
    for key, value in oc_sd.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # the causal mask buffer some OpenCLIP versions saved
        if m := OC_BLOCK_RE.match(key):
            new = _rename_block(m.group(3), back_block)
            name = None if new is None else f"{back_tower[m.group(1)]}encoder.layers.{m.group(2)}.{new}"
        else:
            name = back.get(key)
        if name is None:
            raise ValueError(f"{source}: unexpected key {key} (not in the OpenCLIP key map)")
        if key in TRANSPOSED:
            value = value.T
        out[name] = value.reshape(1) if key == "logit_scale" else value
    return out


def openclip_config(model_cfg) -> dict:
    """OpenCLIP model-config JSON for a resolved CLIP ModelConfig; features OpenCLIP lacks raise."""
    v, t = model_cfg.vision, model_cfg.text
    if model_cfg.family != "clip":
        raise ValueError("model.family: OpenCLIP export supports clip only (use the Hugging Face export for siglip)")
    check_exportable(model_cfg, "OpenCLIP")
    if v.act != t.act or v.act not in ("gelu", "quick_gelu"):
        raise ValueError(
            f"model.vision.act / model.text.act: OpenCLIP needs one activation, gelu or quick_gelu, for both towers "
            f"(got {v.act} and {t.act})"
        )
    vision = dict(image_size=v.image_size, layers=v.layers, width=v.width, patch_size=v.patch_size,
                  head_width=v.width // v.heads, mlp_ratio=v.mlp_dim / v.width)  # fmt: skip
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                layers=t.layers, mlp_ratio=t.mlp_dim / t.width)  # fmt: skip
    for cfg, tower, key in ((vision, v, "vision"), (text, t, "text")):
        if int(tower.width * cfg["mlp_ratio"]) != tower.mlp_dim:
            raise ValueError(f"model.{key}.mlp_dim {tower.mlp_dim} is not expressible as an OpenCLIP mlp_ratio")
        if tower.ln_eps != DEFAULT_EPS:
            cfg["norm_kwargs"] = {"eps": tower.ln_eps}
    out = {"embed_dim": model_cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if v.act == "quick_gelu":
        out["quick_gelu"] = True
    return out


SUPPORTED = {
    "vision_cfg": {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "norm_kwargs"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs"},
}
# Keys that may appear when set to their default (OpenCLIP configs sometimes spell defaults out)
DEFAULTS = {"patch_dropout": 0.0, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
            "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": None, "embed_cls": False,
            "no_causal_mask": False, "proj_bias": False, "proj_type": "linear", "pad_id": 0, "output_tokens": False,
            "act_kwargs": None, "block_type": None, "tokenizer_kwargs": None, "hf_tokenizer_name": None}  # fmt: skip


def model_config_from_openclip(raw: dict, source: str):
    """A resolved ModelConfig from an OpenCLIP model-config dict; unsupported options raise, naming them."""
    for key in raw:
        if key not in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"):
            raise ValueError(f"{source}: unsupported OpenCLIP model option {key!r}")
    towers = {}
    for part in ("vision_cfg", "text_cfg"):
        c = dict(raw.get(part, {}))
        for key, value in c.items():
            if key in SUPPORTED[part]:
                continue
            ok = key in DEFAULTS and (value == DEFAULTS[key] or (key == "pool_type" and value in ("tok", "argmax")))
            if not ok:
                raise ValueError(f"{source}: unsupported OpenCLIP option {part}.{key}={value!r}")
        eps = (c.get("norm_kwargs") or {}).get("eps", DEFAULT_EPS)
        towers[part] = (c, eps)
    act = "quick_gelu" if raw.get("quick_gelu", False) else "gelu"
    (vc, veps), (tc, teps) = towers["vision_cfg"], towers["text_cfg"]
    try:
        v_width, t_width = vc.get("width", 768), tc.get("width", 512)
        vision = VisionConfig(
            image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16), width=v_width,
            layers=vc.get("layers", 12), heads=v_width // vc.get("head_width", 64),
            mlp_dim=int(v_width * vc.get("mlp_ratio", 4.0)), act=act, ln_eps=veps,
        )  # fmt: skip
        text = TextConfig(
            vocab_size=tc.get("vocab_size", 49408), context_length=tc.get("context_length", 77), width=t_width,
            layers=tc.get("layers", 12), heads=tc.get("heads", 8), mlp_dim=int(t_width * tc.get("mlp_ratio", 4.0)),
            act=act, ln_eps=teps,
        )  # fmt: skip
        cfg = ModelConfig(name="tiny", family="clip", embed_dim=raw["embed_dim"], vision=vision, text=text)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{source}: malformed OpenCLIP model config ({e})") from None
    try:
        cfg.validate("model")
    except ValueError as e:
        raise ValueError(f"{source}: gives an invalid model config ({e})") from None
    return resolve_model_config(cfg)


def export_openclip(sd: dict[str, torch.Tensor], model_cfg, out_dir: str, name: str = "mmpretrain",
                    dtype: torch.dtype = torch.float32, force: bool = False) -> str:  # fmt: skip
    """Our (checked) CLIP state dict -> out_dir/{name}.json + open_clip_model.safetensors (objective heads dropped)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"--name must be letters, digits, '-', '_' or '.' (got {name!r})")
    oc_cfg = openclip_config(model_cfg)  # refuses what OpenCLIP cannot hold
    sd = drop_heads(sd, "OpenCLIP export")
    oc_sd = cast(to_openclip_state_dict(sd), dtype)
    with atomic_folder(out_dir, force) as tmp:
        save_safetensors(oc_sd, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, f"{name}.json"), "w") as f:
            json.dump(oc_cfg, f, indent=2)
    return out_dir


HUB_CONFIG = "open_clip_config.json"  # the Hugging Face hub layout: {"model_cfg": ..., "preprocess_cfg": ...}
NOT_MODEL_CONFIGS = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "vocab.json", "added_tokens.json", "preprocessor_config.json"}  # fmt: skip


def find_openclip(path: str) -> tuple[str, str] | None:
    """(model-config json, weights file) of an OpenCLIP folder, else None.

    Config: open_clip_config.json if present, else the one *.json that is not a tokenizer / HF file.
    Weights: the one *.safetensors if there is one (hub folders also carry a .bin twin), else the one .bin/.pt/.pth.
    """
    if not os.path.isdir(path):
        return None
    files = sorted(os.listdir(path))
    jsons = [f for f in files if f.endswith(".json") and f not in NOT_MODEL_CONFIGS]
    if HUB_CONFIG in files:
        jsons = [HUB_CONFIG]
    weights = [f for f in files if f.endswith(".safetensors")]
    weights = weights or [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    if len(jsons) == 1 and len(weights) == 1:
        return os.path.join(path, jsons[0]), os.path.join(path, weights[0])
    return None


def read_openclip(config_path: str, weights_path: str, dtype: torch.dtype | None = torch.float32):
    """(our state dict, resolved ModelConfig) from an OpenCLIP model-config JSON + weights file; strict."""
    try:
        raw = json.load(open(config_path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: unreadable ({e})") from None
    if "model_cfg" in raw:  # open_clip's hub layout (open_clip_config.json) nests the model config
        raw = raw["model_cfg"]
    model_cfg = model_config_from_openclip(raw, config_path)
    sd = from_openclip_state_dict(load_weights(weights_path), weights_path)
    check_state_dict(sd, expected_shapes(model_cfg), weights_path)
    return (cast(sd, dtype) if dtype is not None else sd), model_cfg
