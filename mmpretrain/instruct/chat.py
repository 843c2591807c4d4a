"""`python -m mmpretrain.instruct.chat FOLDER --image x.png --prompt "..."`: answer from a run or its export.

    python -m mmpretrain.instruct.chat outputs/instruct-tiny --image shape.png --prompt "what shape is it ?"
    python -m mmpretrain.instruct.chat outputs/instruct-tiny/llava --image shape.png --prompt "what shape is it ?"

FOLDER is either
- a run folder of `python -m mmpretrain.instruct` (config.yaml + checkpoints/latest, any ZeRO stage): our model is
  rebuilt with the structure of the checkpoint's stage, its weights read weights-only (mmpretrain.convert.ours:
  a folder someone handed you cannot run code here), LoRA adapters merged, and our `generate` answers; images go
  through the eval transform (shorter side to the tower's size, bicubic, center crop);
- or its export (mmpretrain.instruct.export): transformers' LlavaForConditionalGeneration, its tokenizer, the
  CLIPImageProcessor and our chat template (instruct_template.json; LLaVA-1.5's wording when absent), answered
  with transformers' generate.

The prompt goes through the same ConversationEncoder as training; images without an `<image>` in the prompt are
placed before it. Greedy decoding; prints the answer. Not yet: several turns.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from PIL import Image

from mmpretrain.convert.ours import step_weights
from mmpretrain.data.transforms import EvalTransform, normalize_images
from mmpretrain.instruct.export import TEMPLATE_FILE
from mmpretrain.instruct.lora import merge_lora
from mmpretrain.instruct.template import IMAGE_PLACEHOLDER, ChatTemplate, ConversationEncoder, HFTokenizer
from mmpretrain.instruct.train import load_instruct_config, load_tokenizer, model_at_stage
from mmpretrain.run_folder import find_step_dir, read_meta


def is_run_folder(folder: str) -> bool:
    """A `python -m mmpretrain.instruct` output_dir with a checkpoint (not an export folder)."""
    return os.path.isfile(os.path.join(folder, "config.yaml")) and os.path.isdir(os.path.join(folder, "checkpoints"))


def with_images(prompt: str, images: list[str]) -> str:
    """The prompt with one `<image>` per image (placed first when it has none); ValueError when they disagree."""
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER} " * len(images) + prompt
    if prompt.count(IMAGE_PLACEHOLDER) != len(images):
        raise ValueError(
            f"the prompt has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} but {len(images)} images"
        )
    return prompt


def load_run(folder: str):
    """(our model in eval mode, its tokenizer, its ChatTemplate) from a run folder's latest checkpoint: the structure
    of the checkpoint's stage, its weights read weights-only, LoRA adapters merged."""
    cfg = load_instruct_config(os.path.join(folder, "config.yaml"), [])
    template = ChatTemplate(system=cfg.system)
    tok = load_tokenizer(cfg, template)
    step_dir = find_step_dir(folder)
    model = model_at_stage(cfg, tok, int(read_meta(step_dir)["stage"]))
    model.load_state_dict(step_weights(step_dir, cfg.engine.zero_stage), strict=True)
    return merge_lora(model.eval()), tok, template


def answer_from_run(folder: str, images: list[str], prompt: str, max_new_tokens: int = 32) -> tuple[str, list[int]]:
    """answer() for a run folder: our model from its latest checkpoint (see the module docstring)."""
    model, tok, template = load_run(folder)
    encoder = ConversationEncoder(HFTokenizer(tok), model.image_token_id, model.num_image_tokens, template)
    ids = torch.tensor([encoder.encode_prompt([("user", with_images(prompt, images))])])
    pixels = None
    if images:
        transform = EvalTransform(model.vision_cfg.vision.image_size)
        pixels = normalize_images(torch.stack([transform(Image.open(p).convert("RGB")) for p in images]))
    with torch.no_grad():
        new = model.generate(ids, pixels, max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id)
    if new and new[-1] == tok.eos_token_id:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=True), new


def answer(folder: str, images: list[str], prompt: str, max_new_tokens: int = 32) -> tuple[str, list[int]]:
    """(answer text, answer ids without the eos) for one user turn, from a run folder or an export folder."""
    if is_run_folder(folder):
        return answer_from_run(folder, images, prompt, max_new_tokens)
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    path = os.path.join(folder, TEMPLATE_FILE)
    template = ChatTemplate(**json.load(open(path))) if os.path.isfile(path) else ChatTemplate()
    cfg = model.config
    encoder = ConversationEncoder(HFTokenizer(tok), cfg.image_token_id, cfg.image_seq_length, template)
    ids = torch.tensor([encoder.encode_prompt([("user", with_images(prompt, images))])])
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
    p.add_argument("folder", help="a run folder of python -m mmpretrain.instruct, or its export (<output_dir>/llava)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    print(answer(args.folder, args.image, args.prompt, args.max_new_tokens)[0])


if __name__ == "__main__":
    main()
