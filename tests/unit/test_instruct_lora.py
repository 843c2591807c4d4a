"""LoRA through peft: only the adapters train, and the merged model (and its LLaVA export) gives the adapted
model's logits."""

import torch
from transformers import LlamaConfig, LlavaForConditionalGeneration

from mmpretrain.instruct.export import export_llava
from mmpretrain.instruct.lora import add_lora, has_lora, merge_lora
from mmpretrain.instruct.model import tiny_vlm
from mmpretrain.model import ModelConfig

IMG = 5


def test_lora_trains_adapters_and_merges_exactly(tmp_path):
    lm = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = tiny_vlm(ModelConfig(name="tiny"), lm, image_token_id=IMG).eval()
    P, S = model.num_image_tokens, model.vision_cfg.vision.image_size
    ids = torch.tensor([[1, 7] + [IMG] * P + [9, 10, 11]])
    images = torch.randn(1, 3, S, S)
    with torch.no_grad():
        before = model(ids, images).logits
    add_lora(model, rank=4, alpha=8)
    lm_trainable = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images).logits, before)  # B = 0 at init
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter
        adapted = model(ids, images).logits
    assert (adapted - before).abs().max() > 1e-3
    merge_lora(model)
    assert not has_lora(model)
    assert not any("lora" in k for k in model.state_dict())
    with torch.no_grad():
        merged = model(ids, images).logits
    assert (merged - adapted).abs().max() <= 1e-5
    export_llava(model, str(tmp_path / "llava"))
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava")).eval()
    with torch.no_grad():
        exported = hf(input_ids=ids, pixel_values=images).logits
    assert (exported - adapted).abs().max() <= 1e-4
