"""`python -m mmpretrain.instruct.chat FOLDER --image x.png --prompt "..."`: answer from a LLaVA export folder.

    python -m mmpretrain.instruct.chat outputs/instruct-tiny/llava --image shape.png --prompt "what shape is it ?"

FOLDER is what `python -m mmpretrain.instruct` exports (mmpretrain.instruct.export): transformers'
LlavaForConditionalGeneration, its tokenizer, the CLIPImageProcessor and our chat template (instruct_template.json;
LLaVA-1.5's wording when absent). The prompt goes through the same ConversationEncoder as training; images without
an `<image>` in the prompt are placed before it. Greedy decoding with transformers' generate; prints the answer.
Not yet: our own (un-exported) folders, several turns.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from PIL import Image

from mmpretrain.instruct.export import TEMPLATE_FILE
from mmpretrain.instruct.template import IMAGE_PLACEHOLDER, ChatTemplate, ConversationEncoder, HFTokenizer


def answer(folder: str, images: list[str], prompt: str, max_new_tokens: int = 32) -> tuple[str, list[int]]:
    """(answer text, answer ids without the eos) for one user turn."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    path = os.path.join(folder, TEMPLATE_FILE)
    template = ChatTemplate(**json.load(open(path))) if os.path.isfile(path) else ChatTemplate()
    cfg = model.config
    encoder = ConversationEncoder(HFTokenizer(tok), cfg.image_token_id, cfg.image_seq_length, template)
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER} " * len(images) + prompt
    if prompt.count(IMAGE_PLACEHOLDER) != len(images):
        raise ValueError(
            f"the prompt has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} but {len(images)} images"
        )
    ids = torch.tensor([encoder.encode_prompt([("user", prompt)])])
    pixels = None
    if images:
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] == tok.eos_token_id:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True), new


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.instruct.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("folder", help="a LLaVA export folder (python -m mmpretrain.instruct writes <output_dir>/llava)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    print(answer(args.folder, args.image, args.prompt, args.max_new_tokens)[0])


if __name__ == "__main__":
    main()
