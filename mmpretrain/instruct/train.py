"""`python -m mmpretrain.instruct CONFIG [a.b=c ...]`: the tiny twin's two stages on the project's engine.

    python -m mmpretrain.instruct configs/instruct/tiny.yaml output_dir=runs/instruct-tiny

First version (docs/instruct.md says what is missing): one process, the synthetic shapes VQA set built in memory
(mmpretrain.instruct.vqa), a fresh Llama-style LM with the set's word-level tokenizer, each stage one
`mmpretrain.engine.build_engine` over the parts it trains. Writes <output_dir>/metrics.jsonl (one line per logged
step, stage named), eval.json (exact-match accuracy per question type on held-out images, with the training
phrasings and with held-out phrasings, next to each type's chance) and llava/ (the LlavaForConditionalGeneration
export, with the tokenizer). No checkpoints or resume yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter

import torch
from omegaconf import OmegaConf

from mmpretrain.atomic import write_atomic
from mmpretrain.checkpoint import load_model
from mmpretrain.data.transforms import normalize_images
from mmpretrain.distributed import env_rank_world, init_distributed, print0
from mmpretrain.engine import build_engine, owns_clipping
from mmpretrain.instruct.config import InstructConfig
from mmpretrain.instruct.data import collate
from mmpretrain.instruct.export import export_llava
from mmpretrain.instruct.lora import add_lora, has_lora, merge_lora
from mmpretrain.instruct.model import VisionLanguageModel, build_language_model
from mmpretrain.instruct.template import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    BadConversation,
    ChatTemplate,
    ConversationEncoder,
    HFTokenizer,
)
from mmpretrain.instruct.vqa import make_captions, make_vqa, twin_tokenizer
from mmpretrain.model import ModelConfig, build_model, resolve_model_config

LOG_EVERY = 10


def load_instruct_config(path: str | None, overrides: list[str]) -> InstructConfig:
    merged = OmegaConf.structured(InstructConfig)
    if path is not None:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    cfg: InstructConfig = OmegaConf.to_object(merged)
    cfg.validate()
    return cfg


def load_tokenizer(cfg: InstructConfig, template: ChatTemplate):
    """lm.path's tokenizer (an `<image>` token added when it has none; pad = eos when it has no pad), else the
    shapes set's word-level twin tokenizer."""
    if not cfg.lm.path:
        return twin_tokenizer(template)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.lm.path, local_files_only=True, trust_remote_code=False)
    if IMAGE_PLACEHOLDER not in tok.get_vocab():
        tok.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build(cfg: InstructConfig, tokenizer) -> VisionLanguageModel:
    """The VLM: our tower (from vision.path, or fresh vision.name) + projector + the LM of lm.path (its
    embeddings grown to the tokenizer when `<image>` was added) or a fresh Llama-style LM of lm.*."""
    from transformers import LlamaConfig

    torch.manual_seed(cfg.seed)
    if cfg.vision.path:
        two_tower, run_cfg = load_model(cfg.vision.path)
        vision_cfg = run_cfg.model
    else:
        fresh = ModelConfig(name=cfg.vision.name)
        if cfg.vision.image_size:
            fresh.vision.image_size = cfg.vision.image_size
        vision_cfg = resolve_model_config(fresh)
        two_tower = build_model(vision_cfg)
    if cfg.lm.path:
        lm = build_language_model(cfg.lm.path)
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer))
    else:
        lm = build_language_model(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.lm.hidden_size, intermediate_size=cfg.lm.intermediate_size,
            num_hidden_layers=cfg.lm.layers, num_attention_heads=cfg.lm.heads, num_key_value_heads=cfg.lm.kv_heads,
            max_position_embeddings=cfg.lm.max_positions, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return VisionLanguageModel(vision_cfg, two_tower.vision_model, lm, image_token_id, cfg.vision.feature_layer,
                               cfg.vision.select_strategy)  # fmt: skip


def encode_all(encoder: ConversationEncoder, records: list[dict], skipped: Counter) -> list[tuple]:
    """[(input_ids, labels, images uint8 (1, 3, S, S), qtype)]; bad records counted in `skipped` by reason."""
    out = []
    for r in records:
        try:
            e = encoder.encode(r)
        except BadConversation as err:
            skipped[err.reason] += 1
            continue
        out.append((e.input_ids, e.labels, r["image_tensor"], r["qtype"]))
    return out


def set_trainable(model: VisionLanguageModel, parts: list[str]) -> None:
    """Train the named parts, freeze the rest; an LM with LoRA adapters trains the adapters only."""
    modules = {"projector": model.projector, "lm": model.language_model, "vision": model.vision_tower}
    for name, module in modules.items():
        for p in module.parameters():
            p.requires_grad_(name in parts)
    if has_lora(model):
        for name, p in model.language_model.named_parameters():
            p.requires_grad_("lm" in parts and "lora_" in name)


def train_stage(model, stage, data: list[tuple], cfg: InstructConfig, pad_id: int, log, offset: int) -> None:
    if stage.lora_rank and not has_lora(model):
        add_lora(model, stage.lora_rank, stage.lora_alpha)
    elif not stage.lora_rank:
        merge_lora(model)  # a stage after a LoRA stage trains the merged weights
    set_trainable(model, stage.train)
    optim = dataclasses.replace(cfg.optim, lr=stage.lr, min_lr=min(cfg.optim.min_lr, stage.lr))
    engine = build_engine(model, optim, cfg.engine, micro_batch_size=cfg.batch_size, total_steps=stage.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed + offset)
    model.train()
    t0 = time.time()
    for step in range(stage.steps):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen).tolist()
        out = engine(**collate([data[i] for i in idx], pad_id))
        engine.backward(out.loss)
        if owns_clipping(cfg.engine) and cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        engine.step()
        if step % LOG_EVERY == 0 or step == stage.steps - 1:
            row = dict(stage=stage.name, step=offset + step + 1, loss=round(float(out.loss.detach()), 5),
                       lr=engine.get_lr()[0], elapsed_s=round(time.time() - t0, 1))  # fmt: skip
            log.write(json.dumps(row) + "\n")
            log.flush()
            print0(json.dumps(row))
    model.eval()


@torch.no_grad()
def evaluate(model: VisionLanguageModel, data: list[tuple], eos_id: int, max_new_tokens: int) -> dict:
    """Exact match per question type: greedy answer ids up to eos == the reference answer's ids + eos."""
    hits, totals, answers = Counter(), Counter(), {}
    for ids, labels, images, qtype in data:
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        prompt = torch.tensor([ids[:start]])
        got = model.generate(prompt, normalize_images(images), max_new_tokens=max_new_tokens, eos_id=eos_id)
        totals[qtype] += 1
        hits[qtype] += got == ids[start:]
        answers.setdefault(qtype, Counter())[tuple(ids[start:])] += 1
    acc = {q: hits[q] / totals[q] for q in totals}
    chance = {q: max(answers[q].values()) / totals[q] for q in totals}  # always the most frequent answer
    return {"accuracy": acc, "chance": chance, "count": dict(totals)}


def run(cfg: InstructConfig) -> dict:
    _, world, _ = env_rank_world()
    if world != 1:
        raise ValueError(f"python -m mmpretrain.instruct runs on one process for now (got a world of {world})")
    init_distributed(cfg.engine.dist_timeout_s)
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.output_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    template = ChatTemplate(system=cfg.system)
    tokenizer = load_tokenizer(cfg, template)
    model = build(cfg, tokenizer)
    size = model.vision_cfg.vision.image_size
    encoder = ConversationEncoder(HFTokenizer(tokenizer), model.image_token_id, model.num_image_tokens, template,
                                  max_length=cfg.lm.max_positions)  # fmt: skip
    skipped = Counter()
    d = cfg.data
    data = {"captions": encode_all(encoder, make_captions(d.num_caption_images, size, d.seed), skipped),
            "vqa": encode_all(encoder, make_vqa("train", d.num_train_images, size, d.seed), skipped)}  # fmt: skip
    evals = {p: encode_all(encoder, make_vqa("eval", d.num_eval_images, size, d.seed, p), skipped)
             for p in ("train", "held_out")}  # fmt: skip
    t0, offset = time.time(), 0
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as log:
        for stage in cfg.stages:
            train_stage(model, stage, data[stage.data], cfg, tokenizer.pad_token_id, log, offset)
            offset += stage.steps
    train_s = time.time() - t0
    result = {"train_s": round(train_s, 1), "skipped": dict(skipped)}
    for phrasing, eval_data in evals.items():
        result[f"eval_{phrasing}_phrasings"] = evaluate(model, eval_data, tokenizer.eos_token_id,
                                                        cfg.eval_max_new_tokens)  # fmt: skip
    result["total_s"] = round(time.time() - t0, 1)
    write_atomic(os.path.join(cfg.output_dir, "eval.json"), json.dumps(result, indent=1))  # the old one or this
    export_llava(
        merge_lora(model), os.path.join(cfg.output_dir, "llava"), tokenizer=tokenizer, template=template, force=True
    )
    print0(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.instruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("args", nargs="*", help="a YAML config (optional, first), then key=value overrides")
    args = p.parse_args(sys.argv[1:] if argv is None else argv).args
    path = args[0] if args and "=" not in args[0] else None
    run(load_instruct_config(path, args[1:] if path else args))
