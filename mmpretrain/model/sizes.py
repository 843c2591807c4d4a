"""Model sizes by name: the one table that `model.name` selects from.

Each entry gives the family, the shared embedding width and every vision/text field; any of
them can still be overridden from the config (`model.vision.image_size=384`).

Sources (checked against the files shipped with the installed packages):
- CLIP entries: open_clip's `model_configs/<name>.json` (open_clip_torch 3.3). We default to
  `act: gelu` like OpenCLIP's LAION models; OpenAI's released CLIP weights (open_clip's
  `-quickgelu` configs) use QuickGELU: set `model.vision.act=quick_gelu model.text.act=quick_gelu`.
  mlp_dim = 4 * width except ViT-g-14 (open_clip: mlp_ratio 4.3637 -> 6144); heads come from
  open_clip's head_width (64, or 80 for H, 88 for g). Parameter counts (equal to open_clip's):
  ViT-B-32 151,277,313; ViT-B-16 149,620,737; ViT-L-14 427,616,513; ViT-H-14 986,109,441;
  ViT-g-14 1,366,678,273.
- SigLIP entries: big_vision / transformers' google/siglip-* configs (image tower, text tower,
  LayerNorm eps 1e-6, gelu_tanh, text context 64). The released models use a 32,000-token
  SentencePiece vocabulary; we train with our CLIP BPE tokenizer, so vocab_size is 49,408
  (parameter counts therefore differ from the released checkpoints by (49408-32000) * text width).
  SigLIP has no image projection: the attention-pool output is the embedding, so embed_dim equals
  the vision width.
- `tiny` / `siglip-tiny`: CPU-sized twins for tests and the demo (seconds on 2 cores).

`HF_TEXT_SIZES`: BERT encoders for `model.text.kind=hf` (ALIGN), by `model.text.hf_config` name; the fields
are transformers `BertConfig` arguments. Sizes from the BERT paper (base, large) and Google's compact
BERTs (Turc et al. 2019: tiny 2x128, mini 4x256, small 4x512, medium 8x512). Dropout is off, as in our
own towers (a config folder keeps its own); vocab_size and max position come from `model.text`.
"""

CLIP_VOCAB_SIZE = 49408  # our CLIP BPE tokenizer; the EOT token is the largest id (49407)


def _clip(embed_dim, image_size, patch_size, width, layers, heads, mlp_dim, t_width, t_layers, t_heads):
    return dict(
        family="clip",
        embed_dim=embed_dim,
        vision=dict(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=mlp_dim,
            act="gelu",
            ln_eps=1e-5,
        ),
        text=dict(
            vocab_size=CLIP_VOCAB_SIZE,
            context_length=77,
            width=t_width,
            layers=t_layers,
            heads=t_heads,
            mlp_dim=4 * t_width,
            act="gelu",
            ln_eps=1e-5,
        ),
    )


def _siglip(image_size, patch_size, width, layers, heads, mlp_dim, context_length=64):
    # SigLIP's text tower has the same width/depth as its image tower in every released size.
    tower = dict(width=width, layers=layers, heads=heads, mlp_dim=mlp_dim, act="gelu_tanh", ln_eps=1e-6)
    return dict(
        family="siglip",
        embed_dim=width,
        vision=dict(image_size=image_size, patch_size=patch_size, **tower),
        text=dict(vocab_size=CLIP_VOCAB_SIZE, context_length=context_length, **tower),
    )


def _tiny(family):
    entry = _clip(64, 32, 8, 64, 2, 4, 256, 64, 2, 4)
    entry["text"]["context_length"] = 32
    if family == "siglip":
        entry["family"] = "siglip"
        for tower in ("vision", "text"):
            entry[tower].update(act="gelu_tanh", ln_eps=1e-6)
    return entry


SIZES = {
    # name: embed, image, patch, width, layers, heads, mlp | text width, layers, heads
    "tiny": _tiny("clip"),
    "ViT-B-32": _clip(512, 224, 32, 768, 12, 12, 3072, 512, 12, 8),
    "ViT-B-16": _clip(512, 224, 16, 768, 12, 12, 3072, 512, 12, 8),
    "ViT-L-14": _clip(768, 224, 14, 1024, 24, 16, 4096, 768, 12, 12),
    "ViT-H-14": _clip(1024, 224, 14, 1280, 32, 16, 5120, 1024, 24, 16),
    "ViT-g-14": _clip(1024, 224, 14, 1408, 40, 16, 6144, 1024, 24, 16),
    # name: image, patch, width, layers, heads, mlp
    "siglip-tiny": _tiny("siglip"),
    "siglip-B-16": _siglip(224, 16, 768, 12, 12, 3072),  # google/siglip-base-patch16-224
    "siglip-L-16": _siglip(256, 16, 1024, 24, 16, 4096),  # google/siglip-large-patch16-256
    # google/siglip-so400m-patch14-384 (open_clip's ViT-SO400M-14-SigLIP is the 224px, 16-token twin)
    "siglip-So400m-14": _siglip(384, 14, 1152, 27, 16, 4304),
}


def _bert(layers, width, heads):
    return dict(model_type="bert", num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                intermediate_size=4 * width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


HF_TEXT_SIZES = {
    # name: layers, width, heads (MLP 4 x width, GELU, post-LayerNorm, eps 1e-12: BertConfig's defaults)
    "bert-tiny": _bert(2, 128, 2),
    "bert-mini": _bert(4, 256, 4),
    "bert-small": _bert(4, 512, 8),
    "bert-medium": _bert(8, 512, 8),
    "bert-base": _bert(12, 768, 12),
    "bert-large": _bert(24, 1024, 16),
}
