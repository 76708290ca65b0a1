"""The settings of `bertflow pretrain` (and the `pretrain:` section of a pipeline config).

Kept free of torch so that the CLI builds its options from it without loading the stage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

# Settings that do not change the trajectory: a run may be resumed with different values.
OPERATIONAL_FIELDS = frozenset({"save_every", "keep_checkpoints", "eval_every", "log_every", "workers",
                                "compile"})
# Fields added after the first release, left out of the dump while at their defaults: cache keys,
# artifact fingerprints and checkpoint identities of runs that do not use them stay as they were.
LATER_FIELDS = ("objective", "generator_size", "discriminator_weight", "embedding_size", "share_layers",
                "span_boundary")


class PretrainConfig(BaseModel):
    """Parameters of `bertflow pretrain` (and the `pretrain:` section of a pipeline config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="artifact name of the model")
    objective: Literal["mlm", "electra"] = Field(
        "mlm", description="mlm: masked LM (+ the data's NSP/SOP); electra: replaced-token detection by a"
        " discriminator, with a small generator filling the masks (the discriminator is exported)")
    generator_size: float = Field(
        0.25, gt=0, description="electra: generator hidden size as a fraction of the discriminator's (≤ 1)")
    discriminator_weight: float = Field(
        50.0, gt=0, description="electra: λ, the weight of the discriminator's loss against the generator's MLM")
    embedding_size: int | None = Field(
        None, ge=1, description="mlm: ALBERT's factorised embeddings, E (tokens are embedded in E dimensions and"
        " projected to the hidden size; default: no factorisation, a BERT)")
    share_layers: Literal["none", "attention", "ffn", "all"] | None = Field(
        None, description="mlm: ALBERT's cross-layer sharing: the attention block, the feed-forward block or the"
        " whole layer shared by every layer; none: an ALBERT without sharing (default: a BERT)")
    span_boundary: bool = Field(
        False, description="mlm: add SpanBERT's span-boundary objective, each masked token predicted from the two"
        " tokens around its masked span (a pretraining-only head, not exported)")
    model: str = Field("mini", description="preset (tiny, mini, small, medium, base, large) or a BERT config.json path")
    steps: int | None = Field(None, ge=1, description="optimizer steps (give steps or epochs, not both)")
    epochs: float | None = Field(None, gt=0, description="passes over the training instances (default 1 without --steps)")
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (per process)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup: float = Field(0.01, ge=0, description="warm-up: fraction of total steps when < 1, else steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled decay (not on biases, LayerNorms)")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="hidden and attention dropout probability (default: the model's own, 0.1 for"
        " presets); the CPU demo pretrains with 0")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW β1: decay of the running mean of gradients")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW β2: decay of the running mean of squared gradients")
    adam_eps: float = Field(1e-6, gt=0, description="AdamW ε: added to the denominator for numerical stability")
    max_grad_norm: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 = off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware supports it (GPUs, CPUs with AMX), else fp16 on"
        " CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    save_every: int = Field(1000, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run directory")
    eval_every: int = Field(500, ge=1, description="steps between held-out evaluations (and one at the end)")
    eval_instances: int = Field(1000, ge=0, description="held-out instances (at most 10% of the data)")
    log_every: int = Field(50, ge=1, description="steps between log lines and progress updates")
    bucket_batches: int = Field(50, ge=1, description="batches per length-sorted bucket; 1 = no bucketing")
    workers: int | None = Field(None, ge=0, description="data-loader processes; default 4 on CUDA, 0 on CPU")
    seed: int = Field(0, description="random seed: initial weights, data order, dynamic masks and dropout")

    @field_validator("generator_size")
    @classmethod
    def _generator_not_larger(cls, value: float) -> float:
        if value > 1:
            raise ValueError("the generator must not be larger than the discriminator; pass a fraction in"
                             " (0, 1] (the paper: 1/4 to 1/2)")
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "PretrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        return self

    @property
    def albert(self) -> bool:
        """The model is an ALBERT (factorised embeddings or cross-layer sharing asked for)."""
        return self.embedding_size is not None or self.share_layers is not None

    @model_serializer(mode="wrap")
    def _omit_later_fields_at_defaults(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in LATER_FIELDS:
            if key in data and getattr(self, key) == type(self).model_fields[key].default:
                del data[key]
        return data

    def trajectory_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
