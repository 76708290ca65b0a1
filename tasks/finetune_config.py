"""The settings of `bertflow finetune` (and of each `finetune:` task of a pipeline config), and
the trials of a sweep.

Kept free of torch so that the CLI builds its options from it without loading the stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator,
                      model_serializer, model_validator)

from tasks.finetune_data import parse_label_names, parse_sweep

TaskType = Literal["classification", "pair", "token", "qa"]
PRIMARY_METRIC = {"classification": "accuracy", "pair": "accuracy", "token": "f1", "qa": "f1"}
DEFAULT_MAX_SEQ_LEN = {"classification": 128, "pair": 128, "token": 128, "qa": 384}
# Settings that do not change the trajectory: a run may be resumed with different values.
OPERATIONAL_FIELDS = frozenset({"save_every", "keep_checkpoints", "test", "max_test_examples", "sweep",
                                "eval_batch_size"})


class FinetuneConfig(BaseModel):
    """Parameters of `bertflow finetune`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="artifact name of the fine-tuned run")
    model: str = Field(description="model artifact name, or a Hugging Face BERT directory")
    task_type: TaskType = Field("classification", description="classification | pair | token | qa")
    train: str = Field("", description="training file")
    dev: str = Field("", description="development file: evaluation during training and model selection")
    test: str | None = Field(None, description="test file, evaluated once with the selected model")
    # -- reading the files
    format: Literal["auto", "tsv", "csv", "jsonl", "conll", "char-tags", "jsonl-spans", "jsonl-tags",
                    "nested-spans", "squad"] = Field(
        "auto", description="auto: from the task type, the file extension and the file's layout (docs/finetune.md)")
    text_column: str | None = Field(None, description="column/key of the text (auto: sentence, text, text_a, ...)")
    text_b_column: str | None = Field(None, description="pair: column/key of the second text")
    label_column: str | None = Field(None, description="column/key of the label (auto: label, Quality, ...);"
                                     " jsonl-tags, nested-spans: key of the tags (auto: label, labels, tags, ...)")
    label_names: str | None = Field(None, description="classification, pair: a name for each label of the data,"
                                    " e.g. '0=negative,1=positive' (the exported config's id2label)")
    has_header: bool = Field(True, description="tsv/csv: first row names the columns (else columns are 0, 1, ...;"
                             " auto-detected when no name is known and the last column holds labels)",
                             json_schema_extra={"cli": "--no-header"})
    token_column: int = Field(0, description="conll: 0-based column of the token")
    tag_column: int = Field(-1, description="conll: 0-based column of the tag (-1: last)")
    token_level: Literal["word", "char"] = Field(
        "word", description="entity-span JSONL and raw predict text: tokens are words or characters")
    entities_key: str = Field("entities", description="entity-span JSONL: key of the entity list")
    position_digits: Literal["auto", "strip", "keep"] = Field(
        "auto", description="conll, jsonl-tags: tokens such as 字0 字1 (a character and its position in its word):"
        " strip the digit; auto: when most tokens are one CJK character and a digit")
    language: Literal["auto", "en", "zh"] = Field("auto", description="qa metric: SQuAD (en) or CMRC (zh)")
    # -- the model and sequence lengths
    mode: Literal["finetune", "feature"] = Field("finetune", description="feature: encoder frozen, head trains")
    max_seq_len: int | None = Field(None, ge=8, description="tokens per sequence (default 128; qa 384)")
    doc_stride: int = Field(128, ge=1, description="qa: tokens of overlap between context windows")
    max_query_len: int = Field(64, ge=1, description="qa: question tokens kept")
    max_answer_len: int = Field(30, ge=1, description="qa: longest answer span, in tokens")
    n_best: int = Field(20, ge=1, description="qa: start/end candidates considered per window")
    # -- optimisation
    epochs: int = Field(3, ge=1, description="passes over the training data")
    lr: float = Field(3e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(32, ge=1, description="training examples (qa: windows) per step")
    eval_batch_size: int = Field(64, ge=1, description="sequences per evaluation batch")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not on bias/LayerNorm)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    eval_every: int = Field(0, ge=0, description="evaluate on dev every N steps (0: at the end of each epoch)")
    early_stopping: int = Field(0, ge=0, description="stop after N evaluations without improvement (0: off)")
    selection_metric: str | None = Field(None, description="dev metric to select on (default: accuracy; token/qa: f1)")
    positive_label: str | None = Field(
        None, description="binary classification/pair: the label whose precision/recall/F1 are reported (default:"
        " 1, yes, true, pos, positive, entailment... when one label is such, else the last in sorted order)")
    max_train_examples: int | None = Field(None, ge=1, description="use only the first N training examples")
    max_dev_examples: int | None = Field(None, ge=1, description="evaluate on the first N dev examples only"
                                         " (qa: questions); selection then sees only those")
    max_test_examples: int | None = Field(None, ge=1, description="evaluate on the first N test examples only"
                                          " (qa: questions)")
    sweep: str | None = Field(None, description="grid, e.g. 'lr=2e-5,3e-5;batch-size=16,32'")
    seed: int = Field(42, description="seeds head initialisation, dropout and data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware supports it (GPUs, CPUs with AMX), else fp16 on"
        " CUDA, fp32 on CPU")
    grad_accum: int = Field(1, ge=1, description="micro-batches of --batch-size per optimizer step")
    save_every: int = Field(0, ge=0, description="steps between checkpoints (0: at every evaluation); a re-run"
                            " resumes from the newest")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept while the run trains (removed when it ends)")

    @field_validator("sweep")
    @classmethod
    def _sweep_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_sweep(value)  # raises ValueError with the problem
        return value

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_names_as_text(cls, value: object) -> object:
        if isinstance(value, dict):  # a YAML mapping {0: negative, 1: positive}
            return ",".join(f"{label}={name}" for label, name in value.items())
        return value

    @field_validator("label_names")
    @classmethod
    def _label_names_parse(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_label_names(value)  # raises ValueError with the problem
            if info.data.get("task_type") not in ("classification", "pair"):
                raise ValueError(f"--label-names names the classes of classification and pair tasks, not of"
                                 f" {info.data.get('task_type')} tasks (their tags are names already); leave it out")
        return value

    @model_serializer(mode="wrap")
    def _without_unset_label_names(self, handler: SerializerFunctionWrapHandler) -> dict:
        # The dump is what cache keys and checkpoint identities hash: runs made before
        # --label-names existed keep theirs (no recomputation, resumable checkpoints).
        data = handler(self)
        if data.get("label_names") is None:
            data.pop("label_names", None)
        return data

    @property
    def label_name_map(self) -> dict[str, str] | None:
        """Label in the data → its name, from --label-names."""
        return parse_label_names(self.label_names) if self.label_names else None

    @model_validator(mode="after")
    def _lengths_fit(self) -> "FinetuneConfig":
        if self.positive_label is not None and self.task_type not in ("classification", "pair"):
            raise ValueError(f"--positive-label applies to classification and pair tasks, not {self.task_type}")
        if self.task_type == "qa" and self.max_query_len + 3 >= self.seq_len:
            raise ValueError(f"max_query_len {self.max_query_len} leaves no room for context in"
                             f" max_seq_len {self.seq_len}")
        if self.task_type == "qa" and self.doc_stride >= self.seq_len - self.max_query_len - 3:
            raise ValueError(f"doc_stride {self.doc_stride} must be smaller than the context part of a window"
                             f" ({self.seq_len - self.max_query_len - 3} tokens); lower --doc-stride")
        return self

    @property
    def seq_len(self) -> int:
        return self.max_seq_len or DEFAULT_MAX_SEQ_LEN[self.task_type]

    @property
    def metric_name(self) -> str:
        return self.selection_metric or PRIMARY_METRIC[self.task_type]


def trial_inputs(config: FinetuneConfig, data: dict[str, dict | None]) -> list[tuple[FinetuneConfig, dict]]:
    """(config, data files) per trial: sweep trials never see the test file, so changing it
    does not invalidate their cache and the test set is read once, by `select_and_test`."""
    configs = trial_configs(config)
    if len(configs) == 1:
        return [(config, data)]
    return [(c, {**data, "test": None}) for c in configs]


def trial_configs(config: FinetuneConfig) -> list[FinetuneConfig]:
    """One config per sweep setting (named NAME.trial-I, no test file); the config itself when
    there is no sweep."""
    if config.sweep is None:
        return [config]
    return [config.model_copy(update={**setting, "name": f"{config.name}.trial-{i}", "sweep": None, "test": None,
                                      "max_test_examples": None})
            for i, setting in enumerate(parse_sweep(config.sweep))]
