"""The pipeline config (`bertflow run --config CONFIG.yaml`), validated by the stage models.

A pipeline config names the run and holds one section per stage. Each section takes the
same keys as the stage's command (the stage's own pydantic model validates it); the keys that
link stages — artifact names, the corpus a tokenizer reads, the data a model trains on — are
filled in by the pipeline, so they may not be set in the sections:

    name: demo                       # prefix of every artifact name of the run
    ingest: {sources: [...], ...}            → corpus          <name>-corpus
    tokenizer: {vocab_size: 8000, ...}       → tokenizer       <name>-tokenizer
    pretraining_data: {max_seq_len: 128}     → pretraining-data <name>-data
    pretrain: {model: tiny, steps: 2000}     → model           <name>-bert
    finetune:                                → finetune        <name>-<task name>
      - {name: sentiment, task_type: classification, train: ..., dev: ..., test: ...,
         compare_random_init: true}  # also fine-tune the same architecture from random weights
    distill: {student: tiny, steps: 500}     → model           <name>-distilled   (optional)
      # general mode (default): teacher <name>-bert, data <name>-data unless given;
      # mode: task: teacher is a finetune task of this config (default the first), e.g. {mode: task, teacher: sentiment}

Every error names the key (`finetune.0.lr`) before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bertflow.errors import BertflowError
from tasks.parallel import ParallelConfig

STAGES = ("ingest", "tokenizer", "pretraining_data", "pretrain", "finetune", "distill")
# The keys of each stage model that the pipeline sets itself.
LINK_KEYS = {
    "ingest": ("name",),
    "tokenizer": ("corpus", "name"),
    "pretraining_data": ("corpus", "tokenizer", "name"),
    "pretrain": ("name",),
    "finetune": ("model",),
    "distill": ("name",),
}


class FinetuneTask(BaseModel):
    """One fine-tuning task of the pipeline: the `bertflow finetune` options plus a comparison."""

    model_config = ConfigDict(extra="allow", frozen=True)  # the rest is validated by FinetuneConfig

    name: str = Field(description="task name; the artifact is <run name>-<task name>")
    compare_random_init: bool = Field(
        True, description="also fine-tune the same architecture from random weights, side by side")


class PipelineConfig(BaseModel):
    """A whole run: raw text to evaluated models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="run name, the prefix of every artifact name")
    ingest: dict[str, Any]
    tokenizer: dict[str, Any] = Field(default_factory=dict)
    pretraining_data: dict[str, Any] = Field(default_factory=dict)
    pretrain: dict[str, Any] = Field(default_factory=dict)
    finetune: list[FinetuneTask] = Field(default_factory=list)
    distill: dict[str, Any] | None = Field(None, description="optional: distil the run's BERT (general) or a"
                                           " fine-tuned task (task) into a smaller student")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig,
                                     description="where shard-level work runs (not part of any cache key)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        from storage.artifacts import check_name

        return check_name(value, "name")

    # -- artifact names of the run ----------------------------------------------------------

    @property
    def corpus_name(self) -> str:
        return f"{self.name}-corpus"

    @property
    def tokenizer_name(self) -> str:
        return f"{self.name}-tokenizer"

    @property
    def data_name(self) -> str:
        return f"{self.name}-data"

    @property
    def model_name(self) -> str:
        return f"{self.name}-bert"

    @property
    def random_model_name(self) -> str:
        return f"{self.name}-bert-random-init"

    def finetune_name(self, task: FinetuneTask, random_init: bool = False) -> str:
        return f"{self.name}-{task.name}" + ("-random-init" if random_init else "")

    @property
    def distill_name(self) -> str:
        return f"{self.name}-distilled"

    # -- the stage configs, built and validated by the stage models -------------------------

    def stage_configs(self) -> "StageConfigs":
        from tasks.distill_config import DistillConfig
        from tasks.finetune_config import FinetuneConfig
        from tasks.ingest import IngestConfig
        from tasks.pretrain_config import PretrainConfig
        from tasks.pretraining_data import PretrainingDataConfig
        from tasks.tokenizer import TokenizerConfig

        ingest = _build(IngestConfig, "ingest", self.ingest, name=self.corpus_name)
        tokenizer = _build(TokenizerConfig, "tokenizer", self.tokenizer, corpus=self.corpus_name,
                           name=self.tokenizer_name)
        data = _build(PretrainingDataConfig, "pretraining_data", self.pretraining_data,
                      corpus=self.corpus_name, tokenizer=self.tokenizer_name, name=self.data_name)
        pretrain = _build(PretrainConfig, "pretrain", self.pretrain, name=self.model_name)
        finetunes = []
        for index, task in enumerate(self.finetune):
            options = dict(task.model_extra or {})
            where = f"finetune.{index}"
            finetunes.append((task, _build(FinetuneConfig, where, options, model=self.model_name,
                                           name=self.finetune_name(task))))
        names = [t.name for t in self.finetune]
        if len(set(names)) != len(names):
            raise BertflowError(f"finetune: task names must differ (got {names})")
        return StageConfigs(ingest, tokenizer, data, pretrain, finetunes,
                            self._distill_config(DistillConfig) if self.distill is not None else None)

    def _distill_config(self, model: type[BaseModel]) -> Any:
        """The distill section with its links: general mode reads the run's BERT and data unless
        told otherwise; task mode's teacher names one of the run's fine-tuning tasks."""
        section = dict(self.distill or {})
        tasks = {task.name: task for task in self.finetune}
        if section.get("mode", "general") == "general":
            section.setdefault("teacher", self.model_name)
            section.setdefault("data", self.data_name)
        else:
            if "teacher" not in section and not tasks:
                raise BertflowError("distill.teacher: task distillation needs a fine-tuning task of this config"
                                    " (or a finetune run); add one under finetune or set distill.teacher")
            teacher = section.get("teacher", next(iter(tasks), None))
            if teacher in tasks:
                section["teacher"] = self.finetune_name(tasks[teacher])
        return _build(model, "distill", section, name=self.distill_name)


class StageConfigs:
    """The validated stage models of a pipeline config."""

    def __init__(self, ingest, tokenizer, pretraining_data, pretrain, finetune, distill=None):
        self.ingest = ingest
        self.tokenizer = tokenizer
        self.pretraining_data = pretraining_data
        self.pretrain = pretrain
        self.finetune = finetune  # list of (FinetuneTask, FinetuneConfig)
        self.distill = distill  # DistillConfig or None


def _build(stage_model: type[BaseModel], where: str, section: dict[str, Any], **links: Any) -> Any:
    stage = where.split(".")[0]
    for key in LINK_KEYS[stage]:
        if key in section:
            raise BertflowError(f"{where}.{key}: set by the pipeline (it links the stages); remove it")
    from tasks.validation import validated

    return validated(stage_model, {**section, **links}, where=where)


# -- loading ----------------------------------------------------------------------------------

def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set pretrain.steps=200 --set finetune.0.lr=5e-5`: dotted keys, YAML values."""
    for override in overrides:
        if "=" not in override:
            raise BertflowError(f"--set {override}: expected key=value, e.g. --set pretrain.steps=200")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise BertflowError(f"--set {dotted}: '{key}' is not an index of {'.'.join(keys[:i])}"
                                        f" (it has {len(node)} entries)")
                if last:
                    node[int(key)] = _parse_scalar(raw)
                else:
                    node = node[int(key)]
            else:
                if not isinstance(node, dict):
                    raise BertflowError(f"--set {dotted}: '{'.'.join(keys[:i])}' is not a section")
                if last:
                    node[key] = _parse_scalar(raw)
                else:
                    node = node.setdefault(key, {})
    return data


def load_yaml_mapping(path: Path, expected: str) -> dict[str, Any]:
    """A YAML (or JSON) file that must hold a mapping; one-line errors naming the file."""
    if not path.exists():
        raise BertflowError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise BertflowError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise BertflowError(f"{path}: expected {expected}")
    return data


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline config; every stage model is checked too."""
    path = Path(path)
    data = load_yaml_mapping(path, "a mapping of sections (name, ingest, tokenizer, ...)")
    data = apply_overrides(data, overrides or [])
    _resolve_relative_paths(data, path.parent)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        hint = " (unknown key)" if first["type"] == "extra_forbidden" else ""
        raise BertflowError(f"{path}: '{key}': {first['msg']}{hint}") from None
    try:
        config.stage_configs()
    except BertflowError as exc:
        raise BertflowError(f"{path}: {exc}") from None
    return config


def _home_dir() -> Path:
    from storage.home import DataHome

    return DataHome.from_env().state_dir


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    """Source and task-data paths in a config are relative to the project root (the current
    directory) when they exist there, else to the config file's directory; `{home}` stands for
    the data home (where `bertflow demo` exports the bundled corpus)."""

    def fix(value: str) -> str:
        value = value.replace("{home}", str(_home_dir()))
        if not value or Path(value).is_absolute() or "://" in value:
            return value
        if Path(value).exists() or any(ch in value for ch in "*?["):
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() else value

    ingest = data.get("ingest")
    if isinstance(ingest, dict) and isinstance(ingest.get("sources"), list):
        ingest["sources"] = [fix(s) if isinstance(s, str) else
                             ({**s, "path": fix(s["path"])} if isinstance(s, dict) and "path" in s else s)
                             for s in ingest["sources"]]
    for task in [*(data.get("finetune") or []), data.get("distill")]:
        if isinstance(task, dict):
            for key in ("train", "dev", "test", "unlabelled"):
                if isinstance(task.get(key), str):
                    task[key] = fix(task[key])
