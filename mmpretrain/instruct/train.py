"""`python -m mmpretrain.instruct CONFIG [a.b=c ...]`: the stages of visual instruction tuning on the project's engine.

    python -m mmpretrain.instruct configs/instruct/tiny.yaml output_dir=runs/instruct-tiny
    torchrun --nproc_per_node=2 -m mmpretrain.instruct configs/instruct/tiny.yaml engine.zero_stage=3

Each stage is one `mmpretrain.engine.build_engine` (DeepSpeed ZeRO 0-3) over the parts it trains. Ranks: the global
batch of a step is a function of (seed, stage, step) alone (indices drawn once, each rank takes its slice), and the
loss is the token mean over the GLOBAL batch's assistant tokens (the label count all-reduced), so N ranks train as
one rank holding the whole batch. Checkpoints: mmpretrain.checkpoint's layout (checkpoints/step_N, latest,
meta.json with the stage and its step), every checkpoint.every_steps and at the end; the same command resumes,
mid-stage or across a stage boundary. Data: the tiny twin's synthetic sets (mmpretrain.instruct.vqa) or, per stage,
LLaVA's conversation JSON + an image folder (bad records skipped and counted).

Writes <output_dir>/config.yaml, metrics.jsonl (+ wandb, offline by default), checkpoints/, eval.json (exact-match
accuracy per question type of the twin's held-out images, skipped records by reason) and llava/ (the
LlavaForConditionalGeneration export, with the tokenizer). What is built and what is not: docs/instruct.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmpretrain import checkpoint
from mmpretrain.atomic import write_atomic
from mmpretrain.config import diff_configs
from mmpretrain.data.transforms import normalize_images
from mmpretrain.distributed import (
    all_reduce,
    all_reduce_number,
    barrier,
    destroy,
    gathered_params,
    init_distributed,
    print0,
    world_rank,
)
from mmpretrain.engine import CpuThreadTuner, build_engine, input_dtype, owns_clipping, release_engine
from mmpretrain.faults import EXIT_STOPPED, StopRequest, discard_gradients
from mmpretrain.instruct.config import InstructConfig
from mmpretrain.instruct.data import collate, read_conversation_shards, read_llava_json
from mmpretrain.instruct.export import export_llava, hf_parity
from mmpretrain.instruct.lora import add_lora, has_lora, merge_lora
from mmpretrain.instruct.model import VisionLanguageModel, build_language_model, token_loss_sum
from mmpretrain.instruct.template import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    BadConversation,
    ChatTemplate,
    ConversationEncoder,
    HFTokenizer,
)
from mmpretrain.instruct.vqa import make_captions, make_dialogues, make_vqa, twin_tokenizer
from mmpretrain.logging import MetricsLogger, new_run_id
from mmpretrain.model import ModelConfig, build_model, resolve_model_config

RESTART_MAY_CHANGE = ("logging.",)  # keys a restart may change: they touch neither weights nor data order


class InstructError(ValueError):
    """A user error found at start (a config that does not fit the launch or the output folder)."""


def load_instruct_config(path: str | None, overrides: list[str]) -> InstructConfig:
    merged = OmegaConf.structured(InstructConfig)
    if path is not None:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    cfg: InstructConfig = OmegaConf.to_object(merged)
    cfg.validate()
    return cfg


def config_dict(cfg: InstructConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "eval.json", "llava")  # what a run that trained leaves


def check_restart(cfg: InstructConfig) -> bool:
    """An output_dir holding a run started with other settings is refused (naming them and its config.yaml), never
    written over. Returns whether config.yaml must be (re)written: absent, or left by a start that failed before
    it trained (none of RUN_OUTPUTS: e.g. a wrong data path), whose settings may change."""
    path = os.path.join(cfg.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return True
    old = OmegaConf.to_container(OmegaConf.load(path))
    changed = [c for c in diff_configs(old, config_dict(cfg)) if not c.startswith(RESTART_MAY_CHANGE)]
    if changed and not any(os.path.exists(os.path.join(cfg.output_dir, name)) for name in RUN_OUTPUTS):
        print0(f"{path}: replaced (a start that trained nothing; changed: {'; '.join(changed)})")
        return True
    if changed:
        raise InstructError(
            f"output_dir {cfg.output_dir} holds a run started with other settings ({path}: {'; '.join(changed)}); "
            "it is kept. Restore those settings to resume, or choose a new output_dir"
        )
    return False


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
    embeddings grown to the tokenizer when `<image>` was added) or a fresh Llama-style LM of lm.*. Seeded: every
    rank, and every rebuild, makes the same weights."""
    from transformers import LlamaConfig

    torch.manual_seed(cfg.seed)
    if cfg.vision.path:
        two_tower, run_cfg = checkpoint.load_model(cfg.vision.path)
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
    if cfg.lm.gradient_checkpointing:  # long conversations at scale: activations of one layer at a time
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return VisionLanguageModel(vision_cfg, two_tower.vision_model, lm, image_token_id, cfg.vision.feature_layer,
                               cfg.vision.select_strategy)  # fmt: skip


# ----------------------------------------------------------------------------- data


def encode_all(encoder: ConversationEncoder, records: list[dict], skipped: Counter) -> list[tuple]:
    """The twin's records -> [(input_ids, labels, images uint8 (1, 3, S, S), qtype)]; bad ones counted by reason."""
    out = []
    for r in records:
        try:
            e = encoder.encode(r)
        except BadConversation as err:
            skipped[err.reason] += 1
            continue
        out.append((e.input_ids, e.labels, r["image_tensor"], r["qtype"]))
    return out


def stage_data(cfg: InstructConfig, encoder: ConversationEncoder, image_size: int, skipped: Counter) -> list[list]:
    """Each stage's training items (identical on every rank): the twin's caption or VQA set, a LLaVA JSON or
    conversation shards. A set two stages share is built once. Bad records are counted in `skipped` by reason."""
    d, built, out = cfg.data, {}, []
    for i, stage in enumerate(cfg.stages):
        key = (stage.data, stage.llava_json, stage.image_folder, stage.shards)
        if key not in built:
            if stage.data == "captions":
                built[key] = encode_all(encoder, make_captions(d.num_caption_images, image_size, d.seed), skipped)
            elif stage.data == "vqa":
                built[key] = encode_all(encoder, make_dialogues(d.num_train_images, image_size, d.seed), skipped)
            else:
                read = read_llava_json if stage.data == "llava" else read_conversation_shards
                where = (stage.llava_json, stage.image_folder) if stage.data == "llava" else (stage.shards,)
                try:
                    items, bad = read(*where, encoder, image_size)
                except ValueError as e:  # an unreadable JSON file (a missing shard is counted instead)
                    raise InstructError(f"stages.{i}.llava_json: {e}") from None
                skipped.update(bad)
                built[key] = items
        if not built[key]:
            raise InstructError(f"stages.{i}: no trainable record in its data ({stage.data}; skipped: {dict(skipped)})")
        out.append(built[key])
    return out


def global_batch_indices(seed: int, stage: int, step: int, num_items: int, batch_size: int) -> list[int]:
    """The global batch of (stage, step): item indices drawn with replacement from a generator seeded by
    (seed, stage, step) alone, so any world size and any resume point draws the same batch."""
    rng = np.random.default_rng([seed, stage, step])
    return rng.integers(num_items, size=batch_size).tolist()


# ----------------------------------------------------------------------------- model per stage


def set_trainable(model: VisionLanguageModel, parts: list[str]) -> None:
    """Train the named parts, freeze the rest; an LM with LoRA adapters trains the adapters only."""
    modules = {"projector": model.projector, "lm": model.language_model, "vision": model.vision_tower}
    for name, module in modules.items():
        for p in module.parameters():
            p.requires_grad_(name in parts)
    if has_lora(model):
        for name, p in model.language_model.named_parameters():
            p.requires_grad_("lm" in parts and "lora_" in name)


def enter_stage(model: VisionLanguageModel, cfg: InstructConfig, index: int) -> None:
    """Give the model stage `index`'s structure and trainable set: LoRA adapters added (freshly, from a generator
    seeded by (seed, stage)) or merged away, then the parts it trains."""
    stage = cfg.stages[index]
    if stage.lora_rank and not has_lora(model):
        torch.manual_seed(cfg.seed * 1000 + index)  # the adapters' A init: the same on every rank and every resume
        add_lora(model, stage.lora_rank, stage.lora_alpha)
    elif not stage.lora_rank:
        merge_lora(model)  # a stage after a LoRA stage trains the merged weights
    set_trainable(model, stage.train)


def model_at_stage(cfg: InstructConfig, tokenizer, index: int, weights: dict | None = None) -> VisionLanguageModel:
    """A plain model with stage `index`'s structure: built, the stages' structure changes replayed up to `index`
    (LoRA added / merged), and `weights` (a full state dict of the previous stage's model) loaded strictly before
    stage `index` is entered. Without weights the engine's checkpoint fills them in (a resume)."""
    model = build(cfg, tokenizer)
    for i in range(index):
        enter_stage(model, cfg, i)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    enter_stage(model, cfg, index)
    return model


def full_weights(engine) -> dict:
    """Every weight of the engine's model, whole, on every rank (a collective under ZeRO-3: each module's shards
    are gathered in turn). The next stage starts from them; the export and the evaluation read them."""
    module = engine.module
    if engine.zero_optimization_stage() < 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    out = {}
    for prefix, sub in module.named_modules():
        params = list(sub.parameters(recurse=False))
        with gathered_params(params):  # collective: whole on every rank
            for name, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                if t is not None and name not in sub._non_persistent_buffers_set:
                    out[f"{prefix}.{name}" if prefix else name] = t.detach().clone()
    return out


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass
class StepResult:
    loss: float  # token mean over the global batch's target tokens (the same on every rank)
    num_tokens: int  # target tokens of the global batch
    grad_norm: float | None  # before clipping; None for a skipped step
    skipped: bool  # non-finite loss or gradient on some rank: no update
    stop: bool  # some rank was asked to stop


def train_step(engine, batch: dict, cfg: InstructConfig, params: list, stop_requested: bool) -> StepResult:
    """One optimizer step on this rank's slice of the global batch.

    Loss: sum over the global batch's target tokens / their global count. This rank returns N x its tokens' sum /
    the global count (the count all-reduced, without gradient), so DeepSpeed's average over the N ranks gives the
    gradient of the global token mean: what one rank holding the whole batch computes.
    """
    world, _ = world_rank()
    images = batch["images"]
    images = None if images is None else images.to(input_dtype(cfg.engine))
    out = engine(input_ids=batch["input_ids"], images=images, attention_mask=batch["attention_mask"])
    local_sum, local_count = token_loss_sum(out.logits, batch["labels"])
    num_tokens = int(all_reduce_number(int(local_count)))  # collective: the global count of target tokens
    loss = local_sum * (world / max(num_tokens, 1))
    engine.backward(loss)
    norm = None
    if owns_clipping(cfg.engine):  # ZeRO 0, fp32 / amp_bf16: whole averaged gradients here; DeepSpeed clips elsewhere
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        elif grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    bad = ~torch.isfinite(loss.detach()) | (torch.tensor(False) if norm is None else ~torch.isfinite(norm))
    flags = torch.stack([bad.float(), torch.tensor(float(stop_requested)), loss.detach().float() / world])
    all_reduce(flags)  # collective: every rank decides alike; the loss summed = the global token mean
    skipped, stop, mean_loss = flags[0].item() > 0, flags[1].item() > 0, flags[2].item()
    if skipped:
        discard_gradients(engine)
        return StepResult(mean_loss, num_tokens, None, True, stop)
    engine.step()
    grad_norm = float(norm) if norm is not None else engine.get_global_grad_norm()
    return StepResult(mean_loss, num_tokens, None if grad_norm is None else float(grad_norm), False, stop)


# ----------------------------------------------------------------------------- evaluation


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


def finish(cfg: InstructConfig, tokenizer, template, encoder, weights: dict, skipped: Counter, train_s: float) -> dict:
    """Rank 0: the final model (adapters merged) evaluated on the twin's held-out images (data.num_eval_images > 0),
    eval.json, and the LLaVA export."""
    model = model_at_stage(cfg, tokenizer, len(cfg.stages) - 1)
    model.load_state_dict(weights, strict=True)  # the last stage's weights, adapters included
    merge_lora(model.eval())
    t0, d, size = time.time(), cfg.data, model.vision_cfg.vision.image_size
    result = {"train_s": round(train_s, 1), "skipped": dict(skipped)}
    eval_data = []
    if d.num_eval_images > 0:
        for phrasing in ("train", "held_out"):
            eval_data = encode_all(encoder, make_vqa("eval", d.num_eval_images, size, d.seed, phrasing), Counter())
            result[f"eval_{phrasing}_phrasings"] = evaluate(model, eval_data, tokenizer.eos_token_id,
                                                            cfg.eval_max_new_tokens)  # fmt: skip
    result["eval_s"] = round(time.time() - t0, 1)
    folder = os.path.join(cfg.output_dir, "llava")
    export_llava(model, folder, tokenizer=tokenizer, template=template, force=True)
    if eval_data:  # the export, loaded by transformers, against our model on the first 50 held-out questions
        result["hf_parity"] = hf_parity(model, folder, eval_data[:50], tokenizer.eos_token_id, cfg.eval_max_new_tokens)
    write_atomic(os.path.join(cfg.output_dir, "eval.json"), json.dumps(result, indent=1))  # the old one or this
    return result


# ----------------------------------------------------------------------------- the run


def stage_of(cfg: InstructConfig, step: int) -> tuple[int, int]:
    """(stage index, steps done in it) after `step` steps of the run (a stage's last step stays in that stage)."""
    for i, stage in enumerate(cfg.stages):
        if step <= stage.steps or i == len(cfg.stages) - 1:
            return i, step
        step -= stage.steps
    raise AssertionError("unreachable")


def save_checkpoint(engine, cfg: InstructConfig, step: int, stage: int, stage_step: int, rank: int, world: int,
                    run_meta: dict) -> None:  # fmt: skip
    """checkpoints/step_<step> through mmpretrain.checkpoint (a collective: every rank writes its part, then
    meta.json and `latest`, atomically). meta.json: the run's step, the stage and the steps done in it (the data
    position: the batches are a function of (seed, stage, step)), the world size, the wandb run id, the config."""
    meta = {"stage": stage, "stage_name": cfg.stages[stage].name, "stage_step": stage_step, "world_size": world,
            "samples_seen": step * cfg.batch_size, "wandb_run_id": run_meta["wandb_run_id"],
            "config": run_meta["config"], "cpu_threads": run_meta.get("cpu_threads", 0),
            "data": {"stage": stage, "stage_step": stage_step, "skipped": run_meta["skipped"]}}  # fmt: skip
    checkpoint.save(engine, cfg.output_dir, step, meta, rank, cfg.checkpoint.keep_last, world_size=world)


def cpu_threads(cfg: InstructConfig, world: int, meta: dict | None) -> CpuThreadTuner | None:
    """torch's intra-op threads on a CPU run (None on CUDA): engine.cpu_threads when set, else one thread or all
    the cores of a rank, whichever trains faster on the run's own steps (a tiny LM's small ops can run faster on
    one). A resumed run keeps the count its checkpoint recorded."""
    if torch.cuda.is_available():
        return None
    per_rank = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    choices = [cfg.engine.cpu_threads] if cfg.engine.cpu_threads else sorted({1, per_rank})
    return CpuThreadTuner(choices, chosen=(meta or {}).get("cpu_threads", 0))


def run(cfg: InstructConfig, stop_after_steps: int = 0) -> dict:
    """Train (or resume) every stage, then (rank 0) evaluate and export. Returns what eval.json holds (rank 0),
    plus `step` and `stopped`."""
    write_config = check_restart(cfg)
    dist_info = init_distributed(cfg.engine.dist_timeout_s)
    rank, world, is_main = dist_info.rank, dist_info.world_size, dist_info.is_main
    if cfg.batch_size % world:
        raise InstructError(f"batch_size must be divisible by the world size (got {cfg.batch_size} on {world} ranks)")
    per_rank = cfg.batch_size // world
    os.makedirs(cfg.output_dir, exist_ok=True)
    if is_main and write_config:
        write_atomic(os.path.join(cfg.output_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    barrier()

    # where the run is: the latest checkpoint's step, and so its stage and the steps done in it
    tag, universal = checkpoint.prepare_resume(cfg.output_dir, world_size=world, zero_stage=cfg.engine.zero_stage,
                                               rank=rank)  # fmt: skip
    meta = checkpoint.read_meta(os.path.join(checkpoint.checkpoint_root(cfg.output_dir), tag)) if tag else None
    step = meta["step"] if meta else 0
    first_stage, _ = stage_of(cfg, step)

    template = ChatTemplate(system=cfg.system)
    tokenizer = load_tokenizer(cfg, template)
    model = model_at_stage(cfg, tokenizer, first_stage)  # its weights: fresh, or the checkpoint's (below)
    encoder = ConversationEncoder(HFTokenizer(tokenizer), model.image_token_id, model.num_image_tokens, template,
                                  max_length=cfg.lm.max_positions)  # fmt: skip
    skipped: Counter = Counter()
    data = stage_data(cfg, encoder, model.vision_cfg.vision.image_size, skipped)
    total_steps = sum(s.steps for s in cfg.stages)
    run_id = meta["wandb_run_id"] if meta else new_run_id()
    cfg_dict = config_dict(cfg)
    log = MetricsLogger(cfg.logging, cfg.output_dir, is_main=is_main, run_id=run_id, config=cfg_dict,
                        start_step=step, total_steps=total_steps)  # fmt: skip
    if meta:
        log.write(f"resumed from {checkpoint.checkpoint_root(cfg.output_dir)}/{tag} (step {step}, stage "
                  f"{meta['stage']} {cfg.stages[meta['stage']].name!r} at its step {meta['stage_step']})")  # fmt: skip
    log.write(f"data: {sum(skipped.values())} records skipped ({dict(skipped)})")
    stop_file = os.environ.get("MMPRETRAIN_STOP_FILE") or os.path.join(cfg.output_dir, "STOP")
    stopper = StopRequest(stop_file if is_main else None).install()
    if stopper.clear_stale_file():
        log.write(f"removed a stale stop file {stop_file} (its run ended before acting on it)")

    run_meta = {"wandb_run_id": run_id, "config": cfg_dict, "skipped": dict(skipped)}
    threads = cpu_threads(cfg, world, meta)
    if threads is not None and threads.chosen:
        run_meta["cpu_threads"] = threads.chosen
    skipped_metrics = {"skipped_samples": sum(skipped.values()), **{f"data/skipped/{r}": n for r, n in skipped.items()}}
    offset = sum(s.steps for s in cfg.stages[:first_stage])
    weights, saved_at, stop, start_step, t0 = None, (step if meta else None), False, step, time.time()
    for index in range(first_stage, len(cfg.stages)):
        stage = cfg.stages[index]
        if index > first_stage:
            model = model_at_stage(cfg, tokenizer, index, weights)
        optim = dataclasses.replace(cfg.optim, lr=stage.lr, min_lr=min(cfg.optim.min_lr, stage.lr))
        engine = build_engine(model, optim, cfg.engine, micro_batch_size=per_rank, total_steps=stage.steps,
                              load_universal=universal and index == first_stage)  # fmt: skip
        if meta and index == first_stage:
            checkpoint.resume(engine, cfg.output_dir, rank, tag=tag)  # every weight, optimizer, LR schedule, RNG
        params = [p for p in engine.module.parameters() if p.requires_grad]

        engine.train()
        t_log, tokens, steps, losses = time.time(), 0, 0, []  # this log window's
        while step - offset < stage.steps and not stop:
            idx = global_batch_indices(cfg.seed, index, step - offset, len(data[index]), cfg.batch_size)
            mine = idx[rank * per_rank : (rank + 1) * per_rank]
            t_step = time.perf_counter()
            res = train_step(engine, collate([data[index][i] for i in mine], tokenizer.pad_token_id), cfg, params,
                             stopper.requested())  # fmt: skip
            if threads is not None and not threads.chosen and threads.step_done(time.perf_counter() - t_step):
                run_meta["cpu_threads"] = threads.chosen
                log.write(threads.line)
            step += 1
            tokens, steps = tokens + res.num_tokens, steps + 1
            losses += [] if res.skipped else [res.loss]
            log.advance()
            stop = res.stop or bool(stop_after_steps and step - start_step >= stop_after_steps)
            if step % cfg.logging.log_every == 0 or step - offset == stage.steps or stop:
                elapsed = time.time() - t_log
                loss = sum(losses) / len(losses) if losses else float("nan")  # the window's mean over good steps
                log.log(step, {"stage": stage.name, "stage_step": step - offset, "loss": loss,
                               "lr": engine.get_lr()[0], "grad_norm": res.grad_norm,
                               "skipped_steps": steps - len(losses),
                               "samples_per_s": steps * cfg.batch_size / max(elapsed, 1e-9),
                               "tokens_per_s": tokens / max(elapsed, 1e-9), **skipped_metrics})  # fmt: skip
                t_log, tokens, steps, losses = time.time(), 0, 0, []
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                save_checkpoint(engine, cfg, step, index, step - offset, rank, world, run_meta)
                saved_at = step
        if stop or index == len(cfg.stages) - 1:
            break
        weights = full_weights(engine)  # collective under ZeRO-3: the next stage starts from every weight
        offset += stage.steps
        release_engine(engine)

    if saved_at != step and step > start_step:
        save_checkpoint(engine, cfg, step, index, step - offset, rank, world, run_meta)
        saved_at = step
    train_s = time.time() - t0
    stopper.uninstall()
    result = {"step": step, "stopped": step < total_steps}
    if stop and step < total_steps:
        log.write(f"stopped after step {step} ({stopper.reason() if stopper.requested() else 'as asked'}); "
                  f"checkpoint step_{saved_at} saved; rerun the same command to resume")  # fmt: skip
        stopper.acknowledge()
        result["stopped_on_request"] = not (stop_after_steps and step - start_step >= stop_after_steps)
    else:
        weights = full_weights(engine)  # collective under ZeRO-3
        if is_main:
            result.update(finish(cfg, tokenizer, template, encoder, weights, skipped, train_s))
            print0(json.dumps(result))
    release_engine(engine)  # before the process groups go (mmpretrain.distributed.destroy)
    log.close()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.instruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("args", nargs="*", help="a YAML config (optional, first), then key=value overrides")
    p.add_argument("--stop-after-steps", type=int, default=0, metavar="N",
                   help="save a checkpoint and exit 0 after N steps of this invocation (0 = run on)")  # fmt: skip
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    args = ns.args
    path = args[0] if args and "=" not in args[0] else None
    code = 0
    try:
        try:
            cfg = load_instruct_config(path, args[1:] if path else args)
        except (ValueError, OSError, OmegaConfBaseException) as e:  # a bad key or value, an unreadable YAML
            raise InstructError(str(e).strip().splitlines()[0]) from None
        result = run(cfg, stop_after_steps=ns.stop_after_steps)
        code = EXIT_STOPPED if result.get("stopped_on_request") else 0
    except InstructError as e:
        print0(f"python -m mmpretrain.instruct: error: {e}", file=sys.stderr)
        code = 2
    finally:
        destroy()
    if code:
        sys.exit(code)
