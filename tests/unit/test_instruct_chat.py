"""`python -m mmpretrain.instruct.chat` on an export: the same prompt ids and greedy answer as our model."""

import numpy as np
import torch

from mmpretrain.data.synthetic import make_shape_sample
from mmpretrain.data.transforms import normalize_images
from mmpretrain.instruct.chat import answer
from mmpretrain.instruct.config import InstructConfig
from mmpretrain.instruct.export import export_llava
from mmpretrain.instruct.template import ChatTemplate, ConversationEncoder, HFTokenizer
from mmpretrain.instruct.train import build
from mmpretrain.instruct.vqa import image_tensor, twin_tokenizer


def test_chat_answers_like_our_model(tmp_path):
    template = ChatTemplate(system="")
    tok = twin_tokenizer(template)
    model = build(InstructConfig(), tok).eval()
    export_llava(model, str(tmp_path / "llava"), tokenizer=tok, template=template)
    sample = make_shape_sample(np.random.default_rng(3), 32)
    sample.image.save(tmp_path / "shape.png")

    text, got = answer(str(tmp_path / "llava"), [str(tmp_path / "shape.png")], "what shape is it ?", max_new_tokens=6)

    enc = ConversationEncoder(HFTokenizer(tok), model.image_token_id, model.num_image_tokens, template)
    prompt = torch.tensor([enc.encode_prompt([("user", "<image> what shape is it ?")])])
    want = model.generate(prompt, normalize_images(image_tensor(sample.image)), max_new_tokens=6, eos_id=2)
    want = want[:-1] if want and want[-1] == 2 else want
    assert got == want and len(want) > 0
    assert text == tok.decode(want, skip_special_tokens=True)
