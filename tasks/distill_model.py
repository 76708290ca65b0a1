"""Knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019) as training modules
of the one training loop: a student, a frozen teacher and the distillation loss.

Both modules follow the pretraining models' contract (`tasks/bert_model.py`): `forward(**batch)`
returns `loss` and, per part, `<part>_loss` and `<part>_count` (and, in eval mode,
`<part>_correct`); `loss_weights` weighs the parts; `export()` returns the student alone, as a
Hugging Face model.

- General distillation (masked LM):
      loss = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))   at the masked positions (teacher with an MLM head)
           + β·cross-entropy(z_s, masked labels)
           + γ·(1 − cos(h_s W, h_t))                      over the non-pad tokens' last hidden states
  W is a learned linear projection when the hidden sizes differ (identity otherwise); it is not
  exported. DistilBERT's values: α 5, β 2, γ 1, T 2.
- Task distillation (classification, pairs, tags): the teacher's logits are computed once, before
  training, and travel with the batch (`teacher_logits`):
      loss = w_soft·T²·KL(teacher ‖ student) + w_hard·cross-entropy on the gold labels (where given)

The teacher is held outside the module's parameters and state dict: it is never trained, never
in a checkpoint, always in eval mode (no dropout), and moves with the module between devices.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from tasks.training.batch import IGNORE_INDEX


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, averaged over rows.
    The T² keeps the gradients' scale independent of T (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                    log_target=True, reduction="batchmean") * (t * t)


def mlm_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states → vocabulary logits, of a BERT, ALBERT or ELECTRA masked-LM model."""
    if hasattr(model, "cls"):  # BertForMaskedLM / BertForPreTraining
        return lambda hidden: model.cls.predictions(hidden)
    if hasattr(model, "generator_lm_head"):  # ElectraForMaskedLM
        return lambda hidden: model.generator_lm_head(model.generator_predictions(hidden))
    return model.predictions  # AlbertForMaskedLM


class _WithFrozenTeacher(nn.Module):
    """A module that carries a teacher which is not one of its parameters."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)  # a tuple: not registered as a submodule

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(device), .float(), ...: the teacher follows
        self.teacher._apply(fn)
        return super()._apply(fn, recurse)


class GeneralDistillationModel(_WithFrozenTeacher):
    """A BertForMaskedLM student learning from a teacher over masked-LM pretraining data.

    `teacher` is the teacher's masked-LM model when it has an MLM head (`teacher_has_head`), else
    its bare encoder; the KL part is then off.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, teacher_has_head: bool, temperature: float,
                 kl_weight: float, mlm_weight: float, cos_weight: float):
        super().__init__(teacher)
        self.hf = student
        self.temperature = temperature
        self.teacher_has_head = teacher_has_head
        self._teacher_head = (mlm_head(teacher) if teacher_has_head else None,)  # a tuple: ALBERT's is a module
        student_hidden = student.config.hidden_size
        teacher_hidden = teacher.config.hidden_size
        self.projection = nn.Linear(student_hidden, teacher_hidden) if student_hidden != teacher_hidden else None
        self.loss_weights = {"mlm": mlm_weight, "cos": cos_weight}
        if teacher_has_head:
            self.loss_weights["kl"] = kl_weight
            self.loss_weights["teacher_mlm"] = 0.0  # reported at evaluation, never trained

    def export(self) -> nn.Module:
        return self.hf

    def _teacher_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         token_type_ids: torch.Tensor) -> torch.Tensor:
        encoder = self.teacher.base_model
        with torch.no_grad():
            return encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           return_dict=True).last_hidden_state  # (batch, seq, teacher hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor,
                mlm_positions: torch.Tensor, mlm_labels: torch.Tensor,
                next_sentence_label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.hf.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              return_dict=True).last_hidden_state  # (batch, seq, hidden)
        teacher_hidden = self._teacher_outputs(input_ids, attention_mask, token_type_ids)

        # The masked positions (padded prediction slots dropped before the heads).
        valid = mlm_labels != IGNORE_INDEX  # (batch, max_predictions)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mlm_positions)
        rows, positions, labels = rows[valid], mlm_positions[valid], mlm_labels[valid]
        logits = self.hf.cls.predictions(hidden[rows, positions])  # (masked, vocab)
        mlm_loss = F.cross_entropy(logits.float(), labels)
        count = labels.new_tensor(labels.numel())
        result = {"mlm_loss": mlm_loss, "mlm_count": count}
        loss = self.loss_weights["mlm"] * mlm_loss

        if self.teacher_has_head:
            with torch.no_grad():
                teacher_logits = self._teacher_head[0](teacher_hidden[rows, positions])  # (masked, vocab)
            kl_loss = soft_kl(logits, teacher_logits, self.temperature)
            loss = loss + self.loss_weights["kl"] * kl_loss
            result.update(kl_loss=kl_loss, kl_count=count)
            if not self.training:
                result["kl_correct"] = (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()  # top-1 agreement
                result.update(teacher_mlm_loss=F.cross_entropy(teacher_logits.float(), labels), teacher_mlm_count=count,
                              teacher_mlm_correct=(teacher_logits.argmax(-1) == labels).sum())

        # Cosine between the last hidden states, over the real tokens.
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        student_states = hidden[real]  # (tokens, hidden)
        if self.projection is not None:
            student_states = self.projection(student_states)  # (tokens, teacher hidden)
        cos_loss = (1 - F.cosine_similarity(student_states.float(), teacher_hidden[real].float(), dim=-1)).mean()
        loss = loss + self.loss_weights["cos"] * cos_loss
        result.update(cos_loss=cos_loss, cos_count=real.sum())

        if not self.training:
            result["mlm_correct"] = (logits.argmax(-1) == labels).sum()
        result["loss"] = loss
        return result


class TaskDistillationModel(nn.Module):
    """A task head student (`…ForSequenceClassification` or `…ForTokenClassification`) learning
    the teacher's soft labels (`teacher_logits` in the batch, computed once before training, so no
    teacher rides along) and the gold labels where given (`labels`, IGNORE_INDEX where there is
    none)."""

    def __init__(self, student: nn.Module, *, temperature: float, soft_weight: float, hard_weight: float):
        super().__init__()
        self.hf = student
        self.temperature = temperature
        self.loss_weights = {"soft": soft_weight, "hard": hard_weight}

    def export(self) -> nn.Module:
        return self.hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                labels: torch.Tensor, teacher_logits: torch.Tensor, distill_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         return_dict=True).logits  # (batch, classes) or (batch, seq, classes)
        if distill_mask is not None:  # tags: the first piece of every word
            logits, teacher_logits, labels = logits[distill_mask], teacher_logits[distill_mask], labels[distill_mask]
        soft_loss = soft_kl(logits, teacher_logits, self.temperature)
        gold = labels != IGNORE_INDEX
        hard_count = gold.sum()
        # A batch of unlabelled examples only has no cross-entropy (and no NaN from an empty mean).
        hard_loss = F.cross_entropy(logits[gold].float(), labels[gold]) if bool(hard_count) else logits.sum() * 0
        result = {"soft_loss": soft_loss, "soft_count": labels.new_tensor(labels.numel()),
                  "hard_loss": hard_loss, "hard_count": hard_count,
                  "loss": self.loss_weights["soft"] * soft_loss + self.loss_weights["hard"] * hard_loss}
        if not self.training:
            predicted = logits.argmax(-1)
            result["soft_correct"] = (predicted == teacher_logits.argmax(-1)).sum()
            result["hard_correct"] = (predicted[gold] == labels[gold]).sum()
        return result
