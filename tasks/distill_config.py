"""The settings of `bertflow distill` (and the `distill:` section of a pipeline config).

Kept free of torch so that the CLI builds its options from it without loading the stage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Settings that do not change the trajectory: a run may be resumed with different values.
OPERATIONAL_FIELDS = frozenset({"save_every", "keep_checkpoints", "eval_every", "log_every", "eval_batch_size",
                                "speed_examples", "speed_batch_size", "speed_seq_len", "speed_repeats",
                                "speed_threads", "compare_random_init"})
# The weights each mode's loss is made of.
MODE_WEIGHTS = {"general": ("kl_weight", "mlm_weight", "cos_weight"), "task": ("soft_weight", "hard_weight")}


class DistillConfig(BaseModel):
    """Parameters of `bertflow distill`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="artifact name of the student")
    mode: Literal["general", "task"] = Field(
        "general", description="general: masked-LM distillation over pretraining data (exports a model);"
        " task: soft labels of a fine-tuned teacher (exports a finetune run)")
    teacher: str = Field(description="general: a model artifact or a Hugging Face BERT/ELECTRA/ALBERT directory;"
                         " task: a finetune run")
    student: str = Field("mini", description="a preset (tiny, mini, small, medium, base, large) or a BERT"
                         " config.json (random init); task mode also: a model artifact or Hugging Face directory")
    init_from_teacher: bool = Field(
        False, description="initialise a preset/config student from the teacher's embeddings and every other"
        " layer (DistilBERT; needs the teacher's hidden size)")
    tokenizer: str | None = Field(
        None, description="a tokenizer artifact or directory; the student always uses the teacher's, so this"
        " only checks that they are the same")
    # -- data
    data: str | None = Field(None, description="general: pretraining-data artifact (built with the teacher's"
                             " vocabulary)")
    train: str | None = Field(None, description="task: labelled training file (default: the teacher run's)")
    dev: str | None = Field(None, description="task: dev file (default: the teacher run's)")
    unlabelled: str | None = Field(
        None, description="task: extra text the teacher labels: a corpus artifact, a .txt file (one text per"
        " line) or a file in the task's format (its labels are ignored)")
    max_train_examples: int | None = Field(None, ge=1, description="task: use only the first N labelled examples")
    max_unlabelled: int | None = Field(None, ge=1, description="task: use only the first N unlabelled texts")
    max_seq_len: int | None = Field(None, ge=8, description="task: tokens per sequence (default: the teacher run's)")
    # -- the loss
    temperature: float = Field(2.0, description="T: both distributions are softened by T, the KL scaled by T²")
    kl_weight: float = Field(5.0, ge=0, description="general: α, T²·KL(teacher ‖ student) on the masked"
                             " positions (needs a teacher with an MLM head)")
    mlm_weight: float = Field(2.0, ge=0, description="general: β, masked-LM cross-entropy on the labels")
    cos_weight: float = Field(1.0, ge=0, description="general: γ, cosine loss between the last hidden states"
                              " (non-pad tokens)")
    soft_weight: float = Field(1.0, ge=0, description="task: T²·KL to the teacher's soft labels")
    hard_weight: float = Field(1.0, ge=0, description="task: cross-entropy on gold labels, where there are any")
    # -- optimisation
    steps: int | None = Field(None, ge=1, description="optimizer steps (give steps or epochs, not both)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (default: general 1,"
                                 " task 3)")
    batch_size: int = Field(32, ge=1, description="sequences per step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup: float = Field(0.05, ge=0, description="warm-up: fraction of total steps when < 1, else steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled decay (not on biases, LayerNorms)")
    max_grad_norm: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 = off")
    dropout: float | None = Field(None, ge=0, lt=1, description="student hidden and attention dropout (default:"
                                  " the model's own)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware supports it, else fp16 on CUDA, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    save_every: int = Field(0, ge=0, description="steps between checkpoints (0: at every evaluation); a re-run"
                            " resumes from the newest")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept while the run trains")
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: general five times in the"
                            " run, task every epoch)")
    eval_instances: int = Field(1000, ge=0, description="general: held-out instances (at most 10% of the data)")
    eval_batch_size: int = Field(64, ge=1, description="task: sequences per evaluation batch")
    log_every: int = Field(50, ge=1, description="steps between log lines")
    bucket_batches: int = Field(50, ge=1, description="general: batches per length-sorted bucket")
    seed: int = Field(0, description="random seed: student initialisation, data order, dropout")
    # -- the report
    compare_random_init: bool = Field(
        False, description="task: also train the student's architecture from random weights on the gold labels"
        " alone, side by side")
    speed_examples: int = Field(256, ge=1, description="examples per timed inference pass")
    speed_batch_size: int = Field(32, ge=1, description="sequences per batch when timing inference")
    speed_seq_len: int = Field(128, ge=8, description="tokens per sequence when timing inference")
    speed_repeats: int = Field(5, ge=1, description="timed passes (the median is reported), after one warm-up")
    speed_threads: int | None = Field(None, ge=1, description="torch threads when timing (default: torch's)")

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"--temperature {value}: must be > 0 (DistilBERT uses 2)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        weights = MODE_WEIGHTS[self.mode]
        if not any(getattr(self, w) > 0 for w in weights):
            flags = ", ".join("--" + w.replace("_", "-") for w in weights)
            raise ValueError(f"every loss weight of --mode {self.mode} is 0 ({flags}); give at least one a"
                             " positive weight")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.mode == "general" and not self.data:
            raise ValueError("--mode general needs --data PRETRAINING_DATA (built with the teacher's vocabulary)")
        return self

    @property
    def epochs_or_default(self) -> float:
        return self.epochs or (1.0 if self.mode == "general" else 3.0)

    def trajectory_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
