"""Our VisionLanguageModel -> a transformers `LlavaForConditionalGeneration` folder (local disk).

Key map (the layout of the installed transformers' LlavaForConditionalGeneration state dict, checked against a
meta-device instance; transformers 5 dropped CLIPVisionModel's `vision_model.` level and renames older files):

    ours                                   HF LlavaForConditionalGeneration
    vision_tower.<k>                       model.vision_tower.<k>   (a CLIPVisionModel; our fused qkv_proj
                                           split into q/k/v_proj as mmpretrain.convert.hf does; our tower's
                                           `projection` is dropped: LLaVA never reads the pooled embedding)
    projector.linear_1 / linear_2          model.multi_modal_projector.linear_1 / linear_2
    language_model.model.<k>               model.language_model.<k>
    language_model.lm_head.weight          lm_head.weight   (left out when the LM ties it to the embeddings)

Config: LlavaConfig(vision_config = our tower's CLIPVisionConfig, text_config = the LM's config,
image_token_index, image_seq_length = tokens per image, vision_feature_layer, vision_feature_select_strategy,
projector_hidden_act "gelu", multimodal_projector_bias true). The LM's tokenizer is saved beside it when given.
With a template, our ChatTemplate's fields go to instruct_template.json.

LlavaProcessor (tokenizer and template given): processor_config.json + chat_template.jinja beside the tokenizer and
the CLIPImageProcessor, so `AutoProcessor.from_pretrained(folder)` / `LlavaProcessor.from_pretrained(folder)` load.
Its `patch_size`, `num_additional_image_tokens` (1: our CLIP tower's class token) and
`vision_feature_select_strategy` make it expand each `<image>` to image_seq_length image tokens, as our encoder
does. The Jinja chat template renders our ChatTemplate as one string (`chat_template_jinja`); its tokens equal our
encoder's piece-by-piece ids when the tokenizer splits at the pieces' edges (the word-level twin tokenizer does;
a BPE tokenizer may merge across an edge: the template text is the same, the ids can differ there).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from mmpretrain.convert.common import atomic_folder, cast, check_state_dict, save_safetensors
from mmpretrain.convert.hf import hf_config, to_hf_state_dict, write_preprocessor
from mmpretrain.data.transforms import normalize_images
from mmpretrain.instruct.model import VisionLanguageModel
from mmpretrain.instruct.template import IGNORE_INDEX, IMAGE_PLACEHOLDER, ChatTemplate

TEMPLATE_FILE = "instruct_template.json"  # our ChatTemplate's fields (no LlavaProcessor chat template yet)
VISION_DROPPED = ("vision_tower.projection.weight",)  # the pooled-embedding projection: not part of LLaVA


def llava_config(model: VisionLanguageModel, dtype: torch.dtype = torch.float32):
    """The transformers LlavaConfig for our model."""
    from transformers import LlavaConfig

    vision_config = hf_config(model.vision_cfg, dtype).vision_config
    text_config = model.language_model.config
    cfg = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act=model.projector.act_name,
        vision_feature_layer=model.feature_layer,
        vision_feature_select_strategy=model.select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = dtype
    return cfg


def to_llava_state_dict(sd: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our VisionLanguageModel state dict -> LlavaForConditionalGeneration names; unknown keys raise."""
    vision, out, unknown = {}, {}, []
    for key, value in sd.items():
        if key in VISION_DROPPED:
            continue
        if key.startswith("vision_tower."):
            vision[key.removeprefix("vision_tower.")] = value
        elif key.startswith("projector."):
            out["model.multi_modal_projector." + key.removeprefix("projector.")] = value
        elif key.startswith("language_model.model."):
            out["model.language_model." + key.removeprefix("language_model.model.")] = value
        elif key == "language_model.lm_head.weight":
            if not tied:
                out["lm_head.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"LLaVA export: keys with no place in LlavaForConditionalGeneration: {sorted(unknown)[:5]}")
    out.update({"model.vision_tower." + k: v for k, v in to_hf_state_dict(vision, "clip").items()})
    return out


def llava_expected_shapes(cfg) -> dict[str, torch.Size]:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied: saved once, as the embedding
    return shapes


def jinja_literal(text: str) -> str:
    """A Jinja string literal of `text` (JSON's double-quoted escapes are Jinja's: backslash, quote, newline)."""
    return json.dumps(text)


def chat_template_jinja(template: ChatTemplate, bos: bool) -> str:
    """Our ChatTemplate as a transformers chat template (Jinja): one string, the pieces of ConversationEncoder in
    order. Messages: [{"role": "system" | "user" | "assistant", "content": str or [{"type": "image"} |
    {"type": "text", "text": str}]}]; an image item is `<image>` at its place. `bos`: the encoder starts with the
    tokenizer's bos token. add_generation_prompt ends with the assistant prefix (what generation continues)."""
    t = {k: jinja_literal(v) for k, v in dataclasses.asdict(template).items()}
    image = jinja_literal(IMAGE_PLACEHOLDER)
    content = (
        "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for c in m['content'] -%}"
        f"{{%- if c['type'] == 'image' -%}}{{{{ {image} }}}}{{%- elif c['type'] == 'text' -%}}{{{{ c['text'] }}}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
    )
    return "".join([
        "{{- bos_token -}}" if bos else "",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set m = messages[0] -%}",
        "{%- set system -%}" + content + "{%- endset -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}{%- set system = " + t["system"] + " -%}{%- set turns = messages -%}{%- endif -%}",
        "{%- if system -%}{{ " + t["system_prefix"] + " + system + " + t["system_suffix"] + " }}{%- endif -%}",
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{{ " + t["user_prefix"] + " }}" + content,
        "{{ " + t["user_suffix"] + " }}{%- else -%}{{ " + t["assistant_prefix"] + " + " + t["answer_prefix"] + " }}",
        content + "{{ eos_token }}{%- endif -%}{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{ " + t["assistant_prefix"] + " }}{%- endif -%}",
    ])  # fmt: skip


def write_processor(out_dir: str, model: VisionLanguageModel, tokenizer, template: ChatTemplate) -> None:
    """A LlavaProcessor (our CLIPImageProcessor, the tokenizer, the chat template, the image-token expansion) into
    out_dir: processor_config.json, chat_template.jinja, the tokenizer's and the image processor's files."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    if len(tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)) != 1:
        raise ValueError(f"LLaVA export: the tokenizer does not hold {IMAGE_PLACEHOLDER} as one token")
    write_preprocessor(out_dir, model.vision_cfg.vision.image_size)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(out_dir),
        tokenizer=tokenizer,
        patch_size=model.vision_cfg.vision.patch_size,
        vision_feature_select_strategy=model.select_strategy,
        chat_template=chat_template_jinja(template, bos=tokenizer.bos_token_id is not None),
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,  # our CLIP tower's class token ("default" drops it again)
    )
    processor.save_pretrained(out_dir)


def export_llava(
    model: VisionLanguageModel,
    out_dir: str,
    tokenizer=None,
    template: ChatTemplate | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> str:
    """Write config.json, model.safetensors, preprocessor_config.json (CLIPImageProcessor of our eval transform)
    and, when given, the LM's tokenizer (a transformers tokenizer) and our chat template (TEMPLATE_FILE, what
    `python -m mmpretrain.instruct.chat` builds prompts with) to out_dir; with both, a LlavaProcessor
    (write_processor). Strict keys and shapes."""
    cfg = llava_config(model, dtype)
    hf_sd = cast(to_llava_state_dict(model.state_dict(), cfg.tie_word_embeddings), dtype)
    check_state_dict(hf_sd, llava_expected_shapes(cfg), "LLaVA export")
    with atomic_folder(out_dir, force) as tmp:
        save_safetensors(hf_sd, os.path.join(tmp, "model.safetensors"))
        cfg.to_json_file(os.path.join(tmp, "config.json"))
        write_preprocessor(tmp, model.vision_cfg.vision.image_size)
        if tokenizer is not None and template is not None:
            write_processor(tmp, model, tokenizer, template)  # the tokenizer too
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if template is not None:
            with open(os.path.join(tmp, TEMPLATE_FILE), "w") as f:
                json.dump(dataclasses.asdict(template), f, indent=1)
    return out_dir


@torch.no_grad()
def hf_parity(model: VisionLanguageModel, folder: str, items: list[tuple], eos_id: int, max_new_tokens: int) -> dict:
    """Our model against its export in `folder`, loaded by transformers' `LlavaForConditionalGeneration`, on
    `items` [(input_ids, labels, images uint8 (N, 3, S, S), ...)]: the largest |logit difference| over every
    position of every item (fp32), and how many greedy answers (our `generate`; transformers' `generate`, KV cache
    and all) are the same tokens. {"items", "max_abs_logit_diff", "same_answers"}."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    worst, same = 0.0, 0
    for ids, labels, images, *_ in items:
        pixels = normalize_images(images)
        full = torch.tensor([ids])
        ours = model(full, pixels).logits
        theirs = hf(input_ids=full, pixel_values=pixels).logits
        worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)  # the first answer's first token
        prompt = full[:, :start]
        mine = model.generate(prompt, pixels, max_new_tokens=max_new_tokens, eos_id=eos_id)
        out = hf.generate(input_ids=prompt, pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos_id, pad_token_id=eos_id)  # fmt: skip
        same += mine == out[0, start:].tolist()
    return {"items": len(items), "max_abs_logit_diff": worst, "same_answers": same}
