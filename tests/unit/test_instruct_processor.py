"""The LLaVA export carries a LlavaProcessor (issue 19): `AutoProcessor.from_pretrained(folder)` loads it, and its
chat template + image-token expansion + image processor give the ids and pixels our ConversationEncoder and eval
transform give (a system turn, two rounds, two images; and a generation prompt)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlamaConfig, LlavaProcessor

from mmpretrain.data.transforms import EvalTransform, normalize_images
from mmpretrain.instruct.export import export_llava
from mmpretrain.instruct.model import build_language_model, build_vlm
from mmpretrain.instruct.template import IMAGE_PLACEHOLDER, ChatTemplate, ConversationEncoder, HFTokenizer
from mmpretrain.instruct.vqa import twin_tokenizer
from mmpretrain.model import ModelConfig, build_model, resolve_model_config

TEMPLATES = {
    "twin": ChatTemplate(system=""),  # configs/instruct/tiny.yaml's: no system prompt
    # a default system prompt and a word in every piece (whitespace alone is invisible to the word-level tokenizer)
    "marked": ChatTemplate(
        system="describe the image .",
        system_prefix="name ",
        system_suffix=" .",
        user_prefix="USER: ",
        user_suffix=" ?",
        assistant_prefix="ASSISTANT:",
        answer_prefix=" ",
    ),
}


def export(tmp_path, template: ChatTemplate, select_strategy: str):
    tok = twin_tokenizer(template)
    cfg = resolve_model_config(ModelConfig(name="tiny"))
    lm = build_language_model(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=512))  # fmt: skip
    model = build_vlm(build_model(cfg), cfg, lm, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
                      select_strategy=select_strategy)  # fmt: skip
    folder = str(tmp_path / "llava")
    export_llava(model, folder, tokenizer=tok, template=template)
    encoder = ConversationEncoder(HFTokenizer(tok), model.image_token_id, model.num_image_tokens, template)
    return folder, encoder, cfg.vision.image_size


def images():
    """Two non-square noise images (resize and crop both matter). Sizes whose center crop starts at a whole offset
    or rounds down: where (resized side - S) / 2 ends in .5 and rounds up to even (e.g. 37 x 50 at S = 32), our
    transform crops 1 pixel lower than CLIPImageProcessor, which floors (docs/instruct.md)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((41, 64), (100, 48))]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("select_strategy", ["default", "full"])
def test_llava_processor_matches_our_encoder_and_transform(tmp_path, name, select_strategy):
    template = TEMPLATES[name]
    folder, encoder, size = export(tmp_path, template, select_strategy)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, LlavaProcessor)
    assert isinstance(LlavaProcessor.from_pretrained(folder), LlavaProcessor)
    pics = images()

    # a whole conversation: system turn, two rounds, two images (one given as an image item, one as text)
    record = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "what is the size of the shape ?"},
        {"from": "human", "value": "<image> what color is the shape ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and <image> where is the shape ?"}, {"from": "gpt", "value": "left"}]}  # fmt: skip
    messages = [
        {"role": "system", "content": "what is the size of the shape ?"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what color is the shape ?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and <image> where is the shape ?"},
        {"role": "assistant", "content": [{"type": "text", "text": "left"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    got = processor(text=text, images=pics, return_tensors="pt")
    assert got["input_ids"][0].tolist() == encoder.encode(record).input_ids

    # pixels: our eval transform (shorter side bicubic, center crop) + CLIP normalization
    ours = torch.stack([EvalTransform(size)(p.convert("RGB")) for p in pics])
    want = normalize_images(ours)
    assert got["pixel_values"].shape == want.shape
    assert (got["pixel_values"] - want).abs().max() <= 1e-6

    # a generation prompt without a system turn: the template's default system prompt, then the assistant prefix
    prompt = [{"role": "user", "content": "<image> what shape is it ?"}]
    text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    got = processor(text=text, images=pics[:1], return_tensors="pt")
    assert got["input_ids"][0].tolist() == encoder.encode_prompt([("user", "<image> what shape is it ?")])
