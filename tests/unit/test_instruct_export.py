"""Export to transformers' LlavaForConditionalGeneration: the folder loads with from_pretrained (no missing or
unexpected keys) and gives our model's logits (max abs diff <= 1e-4, fp32) and greedy tokens (issue 19)."""

import pytest
import torch
from transformers import LlamaConfig, LlavaForConditionalGeneration

from mmpretrain.instruct.export import export_llava
from mmpretrain.instruct.model import build_language_model, build_vlm
from mmpretrain.model import ModelConfig, build_model, resolve_model_config

IMG, EOS = 5, 2


def tiny_lm(**kw):
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=1,
                       pad_token_id=0, **kw)  # fmt: skip


def inputs(P, S, seed):
    """A batch of 2 (right-padded): row 0 two images, row 1 one image; 3 images in placeholder order."""
    g = torch.Generator().manual_seed(seed)
    row0 = [1, 7] + [IMG] * P + [9, 10] + [IMG] * P + [11, 12]
    row1 = [1] + [IMG] * P + [13, 14, 15]
    L = len(row0)
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for i, row in enumerate((row0, row1)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, torch.randn(3, 3, S, S, generator=g)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(feature_layer=-1, select_strategy="full"), dict(tie=True)],
    ids=["default-layer-2", "full-last-layer", "tied-embeddings"],
)
def test_llava_export_parity(tmp_path, kw):
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(name="tiny"))
    lm = build_language_model(tiny_lm(tie_word_embeddings=kw.pop("tie", False)))
    ours = build_vlm(build_model(cfg), cfg, lm, IMG, **kw).eval()
    with torch.no_grad():  # random projector biases, so a wrong bias mapping cannot hide behind zeros
        ours.projector.linear_1.bias.normal_()
        ours.projector.linear_2.bias.normal_()
    export_llava(ours, str(tmp_path / "llava"))
    hf, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava"), output_loading_info=True)
    hf.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.image_token_id == IMG and hf.config.image_seq_length == ours.num_image_tokens

    P, S = ours.num_image_tokens, cfg.vision.image_size
    for seed in range(2):
        ids, mask, images = inputs(P, S, seed)
        with torch.no_grad():
            a = ours(ids, images, attention_mask=mask).logits
            b = hf(input_ids=ids, pixel_values=images, attention_mask=mask).logits
            other = ours(ids, torch.randn_like(images), attention_mask=mask).logits
        real = mask.bool()
        assert (a - b)[real].abs().max() <= 1e-4
        assert (a - other)[real].abs().max() > 1e-3  # the images matter: parity is not vacuous

    # greedy answers, token for token, against transformers' own generate (KV cache and all)
    for seed in range(3):
        ids, _, images = inputs(P, S, seed)
        prompt = ids[1:, : 1 + P + 3]
        img = images[2:]
        mine = ours.generate(prompt, img, max_new_tokens=8, eos_id=EOS)
        with torch.no_grad():
            out = hf.generate(input_ids=prompt, pixel_values=img, max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=0)  # fmt: skip
        assert mine == out[0, prompt.shape[1] :].tolist()
