"""Config of `python -m mmpretrain.instruct CONFIG [a.b=c ...]` (defaults <- YAML <- overrides, OmegaConf).

Each field says what it means; `validate()` raises ValueError naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmpretrain.checkpoint_config import CheckpointConfig
from mmpretrain.engine_config import EngineConfig, OptimConfig
from mmpretrain.logging_config import LoggingConfig

PARTS = ("projector", "lm", "vision")  # what a stage can train
STAGE_DATA = ("captions", "vqa", "llava", "shards")  # the twin's sets; a LLaVA JSON + images; conversation shards


@dataclass
class VisionArgs:
    path: str = ""  # a folder `python -m mmpretrain.eval` loads (run, consolidated, HF, OpenCLIP); "" = fresh `name`
    name: str = "tiny"  # a size of mmpretrain.model.SIZES, freshly initialized (path empty; tests, the twin)
    image_size: int = 0  # a fresh tower's input size in pixels (0: the size's own); the images are made at it
    feature_layer: int = -2  # hidden state the projector reads (transformers' vision_feature_layer)
    select_strategy: str = "default"  # "default": drop the class token; "full": keep it


@dataclass
class LMArgs:
    """The causal LM: a local transformers folder (its weights and tokenizer), or a fresh Llama-style LM of the sizes
    below with the shapes set's word-level tokenizer."""

    path: str = ""  # a local folder AutoModelForCausalLM / AutoTokenizer load (no remote code); "" = fresh
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 128  # fresh LM's positions; also the longest conversation kept (longer: skipped, counted)
    gradient_checkpointing: bool = False  # recompute the LM's layer activations in backward (transformers' own)


@dataclass
class StageConfig:
    name: str = "instruct"
    data: str = "vqa"  # "captions" / "vqa": the twin's synthetic sets; "llava": llava_json + image_folder; "shards"
    llava_json: str = ""  # data=llava: LLaVA's conversation JSON (a list of records); bad records skipped, counted
    image_folder: str = ""  # data=llava: the folder the records' "image" names are relative to
    shards: str = ""  # data=shards: tars of .json conversations + images (brace spec; mmpretrain-make-shards llava)
    steps: int = 100  # optimizer steps
    lr: float = 1e-3  # peak LR of this stage (warmup then cosine, optim.*)
    train: list[str] = field(default_factory=lambda: ["projector", "lm"])  # parts it trains; the rest frozen
    lora_rank: int = 0  # > 0: the LM trains LoRA adapters of this rank (peft) instead of its weights ("lm" in train)
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (lora_alpha / lora_rank) B A


@dataclass
class VQAArgs:
    num_caption_images: int = 2000  # stage "captions"
    num_train_images: int = 4000  # stage "vqa": one conversation per image asking all five types (random order)
    num_eval_images: int = 500  # held-out images, asked with training phrasings and with held-out phrasings
    seed: int = 0


@dataclass
class InstructConfig:
    output_dir: str = "runs/instruct"
    seed: int = 0
    batch_size: int = 32  # conversations per optimizer step over all ranks (the global batch; divisible by the world)
    system: str = ""  # system prompt of the chat template ("" for none: the twin's conversations are short)
    eval_max_new_tokens: int = 4
    vision: VisionArgs = field(default_factory=VisionArgs)
    lm: LMArgs = field(default_factory=LMArgs)
    data: VQAArgs = field(default_factory=VQAArgs)
    stages: list[StageConfig] = field(
        default_factory=lambda: [
            StageConfig(name="projector", data="captions", steps=100, lr=1e-3, train=["projector"]),
            StageConfig(name="instruct", data="vqa", steps=300, lr=1e-3, train=["projector", "lm", "vision"]),
        ]
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=20, weight_decay=0.0))
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # every_steps, keep_last (async_save unused)
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # metrics.jsonl, wandb (offline), progress bar

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.vision.image_size < 0 or (self.vision.image_size and self.vision.path):
            raise ValueError("vision.image_size must be >= 0, and set only for a fresh tower (vision.path empty)")
        if self.vision.select_strategy not in ("default", "full"):
            raise ValueError(f"vision.select_strategy must be default or full (got {self.vision.select_strategy!r})")
        if not self.stages:
            raise ValueError("stages must name at least one stage")
        for i, s in enumerate(self.stages):
            if s.data not in STAGE_DATA:
                raise ValueError(f"stages.{i}.data must be one of {STAGE_DATA} (got {s.data!r})")
            if s.data == "llava" and not (s.llava_json and s.image_folder):
                raise ValueError(f"stages.{i}.llava_json and stages.{i}.image_folder must be set when "
                                 f"stages.{i}.data is llava")  # fmt: skip
            if s.data != "llava" and (s.llava_json or s.image_folder):
                raise ValueError(f"stages.{i}.llava_json / image_folder are read only with stages.{i}.data=llava")
            if (s.data == "shards") != bool(s.shards):
                raise ValueError(f"stages.{i}.shards must be set exactly when stages.{i}.data is shards")
            if s.steps < 1 or s.lr <= 0:
                raise ValueError(f"stages.{i}.steps must be >= 1 and stages.{i}.lr > 0")
            bad = sorted(set(s.train) - set(PARTS))
            if bad or not s.train:
                raise ValueError(f"stages.{i}.train must be a non-empty subset of {PARTS} (got {list(s.train)})")
            if s.lora_rank < 0 or (s.lora_rank > 0 and "lm" not in s.train):
                raise ValueError(f"stages.{i}.lora_rank must be >= 0, and > 0 only when stages.{i}.train has lm")
        self.optim.validate("optim")
        self.engine.validate("engine")
        self.checkpoint.validate("checkpoint")
        self.logging.validate("logging")
