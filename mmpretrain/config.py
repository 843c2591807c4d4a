"""The run configuration: each component owns its dataclass; this module composes them.

Merge order (lingua style): dataclass defaults, then the YAML file, then ``a.b=c`` overrides::

    python -m mmpretrain.train configs/demo.yaml train.steps=200 model.name=tiny

Unknown keys, wrong types, missing required values and invalid combinations raise
:class:`ConfigError` before any work starts, with the key in its dotted CLI spelling.
The resolved config (every default filled in, model sizes expanded from the size table)
is what a run writes to ``<output_dir>/config.yaml`` and what a restart compares against.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmpretrain.checkpoint_config import CheckpointConfig
from mmpretrain.data.config import DataConfig
from mmpretrain.engine_config import EngineConfig, OptimConfig
from mmpretrain.eval.config import EvalConfig
from mmpretrain.logging_config import LoggingConfig
from mmpretrain.model.config import ModelConfig, resolve_model_config
from mmpretrain.objectives.config import TERM_CONFIGS, LossConfig, check_run


class ConfigError(ValueError):
    """A user error in the configuration; the message starts with the dotted key."""


# Secrets stay in the environment. A value that a `${oc.env:VAR}` of the user's config resolved to is used by the run
# but never written down: every dump (config.yaml, meta.json, the wandb config, a consolidated config.yaml, the
# restart check's message) goes through `to_dict` / `to_yaml`, which write it back as `${oc.env:VAR}`. Recorded by
# `load_config` for string values only (an int from the environment, e.g. a worker count, is no secret).
ENV_RE = re.compile(r"\$\{oc\.env:([^,}\s]+)")
_env_values: dict[str, str] = {}  # resolved value -> "${oc.env:VAR}"


def _record_env_values(raw: Any, resolved: Any) -> None:
    """Walk the unresolved and the resolved config side by side; remember what each `${oc.env:VAR}` gave."""
    if isinstance(raw, dict) and isinstance(resolved, dict):
        for k in raw:
            if k in resolved:
                _record_env_values(raw[k], resolved[k])
    elif isinstance(raw, list) and isinstance(resolved, list):
        for a, b in zip(raw, resolved):
            _record_env_values(a, b)
    elif isinstance(raw, str) and isinstance(resolved, str):
        for var in ENV_RE.findall(raw):
            if os.environ.get(var):
                _env_values[os.environ[var]] = f"${{oc.env:{var}}}"


def redact(obj: Any) -> Any:
    """``obj`` (a dict / list / str tree) with every value an `${oc.env:VAR}` resolved to written as `${oc.env:VAR}`
    (longest first, so a value inside another is not split)."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        for value in sorted(_env_values, key=len, reverse=True):
            obj = obj.replace(value, _env_values[value])
    return obj


def _literal(obj: Any) -> Any:
    """A written config's strings as literals: `${...}` escaped, so reading a folder never resolves anything (an
    `${oc.env:VAR}` that a dump left in place stays that text, whatever the reader's environment holds)."""
    if isinstance(obj, dict):
        return {k: _literal(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_literal(v) for v in obj]
    if isinstance(obj, str):
        return obj.replace("${", "\\${")
    return obj


@dataclass
class TrainLoopConfig:
    batch_size: int = 256
    """Global batch size in samples, summed over all ranks (per rank = batch_size / world size)."""
    steps: int = 1000
    """Total optimizer steps of the run (the LR schedule spans them)."""
    accum_steps: int = 1
    """GradCache micro-batches per step; every negative of the global batch is kept. 1 = off."""
    seed: int = 0
    """Seeds model init, data order and every RNG of the run."""
    max_skips_in_a_row: int = 8
    """A step whose loss or gradient is non-finite on any rank is skipped (no update, counted); this many in a
    row stop the run with an error, without saving over the last good checkpoint."""


@dataclass
class Config:
    output_dir: str = "outputs/run"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, wandb/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, prefix: str = "", world_size: int = 1) -> None:
        t = self.train
        for key in ("batch_size", "steps", "accum_steps", "max_skips_in_a_row"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1 (got {getattr(t, key)})")
        if t.batch_size % world_size:
            raise ConfigError(
                f"train.batch_size must be divisible by the world size (got {t.batch_size} on {world_size} ranks)"
            )
        if (t.batch_size // world_size) % t.accum_steps:
            raise ConfigError(
                f"train.accum_steps must divide the per-rank batch (got {t.accum_steps} for "
                f"{t.batch_size // world_size} samples per rank)"
            )
        if t.accum_steps > 1 and self.engine.zero_stage == 2 and not torch.cuda.is_available():
            # Seen in 3 of 9 two-rank runs here: 'terminate called without an active exception' in
            # DeepSpeed's stage-2 gradient reduction when the accumulation boundary is toggled on CPU.
            raise ConfigError(
                "train.accum_steps > 1 with engine.zero_stage=2 aborts intermittently inside DeepSpeed on CPU; "
                "use engine.zero_stage=1 or 3 (same result: every negative is kept either way)"
            )
        if self.data.naflex.enabled:
            self._check_naflex()
        try:
            check_run(self)  # each objective term's checks across sections (family, GradCache, ...)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")

    def _check_naflex(self) -> None:
        """data.naflex across sections: what packed NaFlex batches are built and tested for."""
        model = resolve_model_config(self.model)
        if model.family != "siglip":
            raise ConfigError(f"data.naflex.enabled needs a SigLIP model (model.family is {model.family})")
        if self.train.accum_steps > 1:
            raise ConfigError("data.naflex.enabled: train.accum_steps must be 1 (GradCache splits image tensors)")
        if model.vision.patch_dropout > 0:
            raise ConfigError("data.naflex.enabled: model.vision.patch_dropout must be 0 (not built for packed rows)")
        other = [name for name in self.loss.active() if name != "siglip"]
        if other:
            key = f"loss.terms.{other[0]}" if self.loss.terms is not None else "loss.name"
            raise ConfigError(f"{key}: data.naflex.enabled trains the sigmoid loss alone (loss.terms.siglip)")


def _validate_tree(node: Any, prefix: str) -> None:
    """Call ``validate(prefix)`` on every nested component dataclass, children first."""
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child, f"{prefix}.{f.name}" if prefix else f.name)
    if prefix and hasattr(node, "validate"):
        try:
            node.validate(prefix)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error: 'key: what is wrong'."""
    key = getattr(e, "full_key", None) or ""
    msg = str(e).split("\n")[0].strip()
    msg = re.sub(r"\s*full_key:.*$", "", msg)
    if "not in" in msg and "Key '" in msg:
        msg = "unknown key"
    elif msg.startswith("Missing mandatory value"):
        msg = "missing required value"
    return f"{key}: {msg}" if key else msg


def load_yaml(path: str):
    """OmegaConf.load, with a malformed file as one line naming it: ``FILE:LINE:COL: what is wrong``."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).split("\n")[0]
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
            problem += f" ({context} at line {context_mark.line + 1})"
        lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
        if mark is not None and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]:
            problem += " (a tab: YAML indents with spaces)"
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config is a mapping of sections (model:, data:, train: ...), not a list")
    return node


def world_size_from_env() -> int:
    """World size as the launcher announces it (torchrun, SLURM), before any process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def bundled_configs_dir() -> str:
    """The folder of the YAML configs shipped with the code: configs/ beside the package in a checkout,
    mmpretrain/configs/ inside an installed wheel (setup.py copies configs/ there)."""
    package = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(package, "configs")
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(package), "configs")


def bundled_config_names() -> list[str]:
    """Names of the bundled configs (``demo``, ``recipes/clip-tiny`` ...), sorted."""
    root = bundled_configs_dir()
    names = []
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        names += [os.path.normpath(os.path.join(rel, f))[: -len(".yaml")] for f in files if f.endswith(".yaml")]
    return sorted(names)


def find_config(path: str) -> str:
    """``path`` when it is a file; otherwise the bundled config of that name (``demo`` or ``demo.yaml``,
    ``recipes/clip-tiny``), so that an installed package runs its demo without a checkout. ConfigError
    when neither exists."""
    if os.path.isfile(path):
        return path
    bundled = os.path.join(bundled_configs_dir(), path if path.endswith(".yaml") else path + ".yaml")
    if not os.path.isabs(path) and os.path.isfile(bundled):
        return bundled
    raise ConfigError(
        f"config file not found: {path} (nor a bundled config of that name: {', '.join(bundled_config_names())})"
    )


def merge_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML <- ``a.b=c`` overrides, resolved, not validated: for a command that uses a section or two
    of the user's config and validates those (evaluation: data.eval and eval). Raises ConfigError."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            merged = OmegaConf.merge(merged, load_yaml(find_config(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)
        _record_env_values(OmegaConf.to_container(merged, resolve=False), OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    return cfg


def load_config(path: str | None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Defaults <- YAML <- ``a.b=c`` overrides, resolved and validated; raises ConfigError. ``path`` is a YAML
    file or the name of a bundled config (:func:`find_config`)."""
    world_size = world_size_from_env() if world_size is None else world_size
    cfg = merge_config(path, overrides)
    try:
        cfg.model = resolve_model_config(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_tree(cfg, "")
    cfg.validate(world_size=world_size)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The config as written to a file: `${oc.env:VAR}` values redacted (:func:`redact`)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def to_dict(cfg: Config) -> dict:
    """The config as a plain dict for writing or logging: `${oc.env:VAR}` values redacted (:func:`redact`)."""
    return redact(OmegaConf.to_container(OmegaConf.structured(cfg)))


def as_loaded(cfg: Config) -> Config:
    """A loaded folder's config as a reader may use it: our default `data:` section (data paths, and any `pipe:`
    command in them, come only from the user's own YAML or command line) and no trust granted (its
    `trust_pickles` keys are off: a folder cannot declare itself, or a teacher it names, trusted)."""
    cfg = copy.deepcopy(cfg)
    cfg.data = DataConfig()
    cfg.model.trust_pickles = False
    for name in TERM_CONFIGS:
        term = getattr(cfg.loss.terms, name, None) if cfg.loss.terms is not None else None
        if term is not None and hasattr(term, "trust_pickles"):
            term.trust_pickles = False
    return cfg


def from_dict(raw: dict, source: str) -> Config:
    """A full Config from a (possibly partial) dict, e.g. what a checkpoint's meta.json recorded; an unknown or
    badly typed key raises ConfigError naming ``source``. Nothing is resolved (a `${...}` stays text), nothing
    validated (the run did both)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), _literal(raw)))
    except Exception as e:
        raise ConfigError(f"{source}: invalid config ({str(e).splitlines()[0]})") from None


def from_yaml_file(path: str) -> Config:
    """Load a resolved config.yaml written by a run (no world-size checks; nothing resolved: a `${...}` stays text)."""
    try:
        raw = _literal(OmegaConf.to_container(load_yaml(path), resolve=False))
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_omegaconf_message(e)}") from None


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        dotted = f"{prefix}.{k}" if prefix else str(k)
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, dotted)
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out
