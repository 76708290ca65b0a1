"""The BERT we pretrain: size presets, the parameter-count breakdown, and the pretraining model.

The model is a standard `transformers` `BertForPreTraining` (MLM + NSP/SOP heads) or
`BertForMaskedLM` (objective none) — same modules, same weight names — so the export is a
checkpoint the whole ecosystem loads. Only the forward pass used for training differs: the MLM
head (transform + vocabulary decoder) runs on the hidden states gathered at the masked
positions, not on every position. With 15% of tokens masked, the dense head spends most of its
vocabulary-sized matmuls on positions whose logits are thrown away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertflow.errors import BertflowError

# Google's released sizes (layers, hidden, heads); feed-forward width is 4 × hidden.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}
BERT_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def bert_config(model: str, *, vocab_size: int, pad_token_id: int = 0, max_position_embeddings: int = 512,
                type_vocab_size: int = 2) -> "BertConfig":  # noqa: F821
    """A `BertConfig` for a preset name or a CONFIG.json path (Google or Hugging Face style).

    A preset takes its vocabulary size from the tokenizer; a CONFIG.json keeps its own and the
    caller checks it against the tokenizer.
    """
    from transformers import BertConfig

    if model in PRESETS:
        layers, hidden, heads = PRESETS[model]
        return BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * hidden,
            max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
            pad_token_id=pad_token_id,
        )
    path = Path(model)
    if path.suffix.lower() != ".json":
        raise BertflowError(f"--model '{model}' is not a preset ({', '.join(PRESETS)}) or a CONFIG.json file")
    if not path.is_file():
        raise BertflowError(f"--model {model}: file not found; pass a preset ({', '.join(PRESETS)}) or a BERT config.json")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BertflowError(f"{model}: not valid JSON ({exc}); pass a BERT config.json") from None
    if not isinstance(values, dict):
        raise BertflowError(f"{model}: expected a JSON object (a BERT config)")
    model_type = values.get("model_type", "bert")
    missing = [k for k in BERT_CONFIG_KEYS if k not in values]
    if model_type != "bert" or missing:
        why = f"model_type is '{model_type}'" if model_type != "bert" else f"missing {', '.join(missing)}"
        raise BertflowError(f"{model}: not a BERT config ({why}); pass a BERT config.json or a preset"
                            f" ({', '.join(PRESETS)})")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise BertflowError(f"{model}: hidden_size {values['hidden_size']} is not a multiple of"
                            f" num_attention_heads {values['num_attention_heads']}")
    values.setdefault("vocab_size", vocab_size)
    values.setdefault("pad_token_id", pad_token_id)
    # Hugging Face bookkeeping keys are not BertConfig arguments.
    for key in ("architectures", "transformers_version", "model_type", "directionality"):
        values.pop(key, None)
    return BertConfig(**values)


# --- parameter count -----------------------------------------------------------------------

@dataclass(frozen=True)
class ParamLine:
    group: str
    part: str
    count: int


def params_breakdown(config: Any, *, nsp_head: bool = True) -> list[ParamLine]:
    """Parameter count by part, from the config alone (formula per part)."""
    V, H, P, T = config.vocab_size, config.hidden_size, config.max_position_embeddings, config.type_vocab_size
    I, L = config.intermediate_size, config.num_hidden_layers
    lines = [
        ParamLine("embeddings", "token (V·H)", V * H),
        ParamLine("embeddings", "position (P·H)", P * H),
        ParamLine("embeddings", "segment (T·H)", T * H),
        ParamLine("embeddings", "LayerNorm (2H)", 2 * H),
        # Q, K, V and output projections: four H×H matrices and four biases.
        ParamLine(f"encoder × {L}", "attention (4H²+4H)", L * (4 * H * H + 4 * H)),
        ParamLine(f"encoder × {L}", "attention LayerNorm (2H)", L * 2 * H),
        # H→I→H with biases: 2·H·I + I + H (= 8H²+5H when I = 4H).
        ParamLine(f"encoder × {L}", "feed-forward (2HI+I+H)", L * (2 * H * I + I + H)),
        ParamLine(f"encoder × {L}", "feed-forward LayerNorm (2H)", L * 2 * H),
    ]
    if nsp_head:
        lines.append(ParamLine("pooler", "dense (H²+H)", H * H + H))
    lines += [
        ParamLine("MLM head", "transform (H²+H)", H * H + H),
        ParamLine("MLM head", "transform LayerNorm (2H)", 2 * H),
        # The decoder's weight is the token embedding matrix (tied); only its bias is new.
        ParamLine("MLM head", "decoder bias (V; weight tied)", V),
    ]
    if nsp_head:
        lines.append(ParamLine("NSP/SOP head", "classifier (2H+2)", 2 * H + 2))
    return lines


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def format_params(name: str, config: Any, lines: list[ParamLine], instantiated: int, *,
                  bert_total: int | None = None, header: str = "") -> str:
    """The breakdown as printed by `bertflow params`; `bert_total`: the count of the BERT of the same
    shape, to show an ALBERT's saving against."""
    total = sum(line.count for line in lines)
    out = [f"{name}: L={config.num_hidden_layers} H={config.hidden_size} heads={config.num_attention_heads}"
           f" I={config.intermediate_size} V={config.vocab_size} P={config.max_position_embeddings}{header}"]
    group = None
    for line in lines:
        if line.group != group:
            group = line.group
            subtotal = sum(x.count for x in lines if x.group == group)
            out.append(f"  {group:<36}{subtotal:>14,}")
        out.append(f"    {line.part:<34}{line.count:>14,}")
    out.append(f"  {'total (formula)':<36}{total:>14,}  ({total / 1e6:.2f} M)")
    verdict = "matches" if instantiated == total else "DOES NOT MATCH"
    out.append(f"  {'instantiated model':<36}{instantiated:>14,}  {verdict}")
    if bert_total is not None:
        saving = bert_total - total
        out.append(f"  {'BERT of the same shape':<36}{bert_total:>14,}  ({bert_total / 1e6:.2f} M)")
        out.append(f"  {'saving':<36}{saving:>14,}  ({saving / bert_total:.1%} of BERT)")
    return "\n".join(out)


# --- the pretraining model -----------------------------------------------------------------

def new_hf_model(config: Any, *, nsp_head: bool, attn_implementation: str = "sdpa") -> nn.Module:
    """A freshly initialised `BertForPreTraining` (or `BertForMaskedLM` without a sentence task)."""
    from transformers import BertForMaskedLM, BertForPreTraining

    config._attn_implementation = attn_implementation
    cls = BertForPreTraining if nsp_head else BertForMaskedLM
    model = cls(config)
    model.config._attn_implementation = attn_implementation
    return model


class MaskedGatherPretrainingModel(nn.Module):
    """Wraps a Hugging Face BERT or ALBERT pretraining model; the forward pass scores masked
    positions only.

    `self.hf` holds every weight the export keeps, under Hugging Face's names; `export` returns it
    to be saved (for ALBERT's partial sharing, a copy with the shared blocks untied). With
    `span_boundary`, `self.sbo` is SpanBERT's span-boundary head, a pretraining-only part.
    """

    def __init__(self, hf_model: nn.Module, *, span_boundary: bool = False, share_layers: str | None = None):
        super().__init__()
        self.hf = hf_model
        self.share_layers = share_layers
        self.loss_weights = {"mlm": 1.0, "nsp": 1.0}  # NSP or SOP: the sentence head's loss
        self.has_sentence_head = self._sentence_head() is not None
        if span_boundary:
            from tasks.span_boundary import SpanBoundaryHead

            config = hf_model.config
            self.sbo = SpanBoundaryHead(config.hidden_size, self._mlm_head().decoder.in_features,
                                        layer_norm_eps=config.layer_norm_eps,
                                        initializer_range=config.initializer_range)
            self.loss_weights["sbo"] = 1.0
        else:
            self.sbo = None

    # BERT keeps its heads under `cls`, ALBERT at the top; methods, not attributes, so that the
    # state dict names each weight once.
    def _encoder(self) -> nn.Module:
        return getattr(self.hf, self.hf.base_model_prefix)

    def _mlm_head(self) -> nn.Module:
        return self.hf.cls.predictions if hasattr(self.hf, "cls") else self.hf.predictions

    def _sentence_head(self) -> nn.Module | None:
        if hasattr(self.hf, "cls"):
            return getattr(self.hf.cls, "seq_relationship", None)
        return getattr(self.hf, "sop_classifier", None)

    def export(self) -> nn.Module:
        if self.share_layers is None:
            return self.hf
        from tasks.albert_model import untied_copy

        return untied_copy(self.hf, self.share_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                mlm_positions: torch.Tensor, mlm_labels: torch.Tensor,
                next_sentence_label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        outputs = self._encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids, return_dict=True)
        hidden = outputs.last_hidden_state  # (batch, seq, hidden)
        # Padded prediction slots (label -100) are dropped before the head, not after.
        valid = mlm_labels != -100  # (batch, max_predictions)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mlm_positions)
        rows, positions, labels = rows[valid], mlm_positions[valid], mlm_labels[valid]
        mlm_head = self._mlm_head()
        logits = mlm_head(hidden[rows, positions])  # (masked tokens, vocab)
        mlm_loss = nn.functional.cross_entropy(logits.float(), labels)
        result = {"mlm_loss": mlm_loss, "mlm_count": labels.new_tensor(labels.numel())}
        if not self.training:  # accuracy is for evaluation; an argmax over the vocabulary is not free
            result["mlm_correct"] = (logits.argmax(-1) == labels).sum()
        loss = mlm_loss
        if self.sbo is not None:
            from tasks.span_boundary import span_boundary_inputs

            left, right, place = span_boundary_inputs(hidden, attention_mask, rows, positions)
            sbo_logits = mlm_head.decoder(self.sbo(left, right, place))  # (masked tokens, vocab)
            sbo_loss = nn.functional.cross_entropy(sbo_logits.float(), labels)
            loss = loss + sbo_loss
            result.update(sbo_loss=sbo_loss, sbo_count=labels.new_tensor(labels.numel()))
            if not self.training:
                result["sbo_correct"] = (sbo_logits.argmax(-1) == labels).sum()
        if self.has_sentence_head and next_sentence_label is not None:
            sentence_logits = self._sentence_head()(outputs.pooler_output)  # (batch, 2)
            nsp_loss = nn.functional.cross_entropy(sentence_logits.float(), next_sentence_label)
            loss = loss + nsp_loss
            result.update(nsp_loss=nsp_loss, nsp_correct=(sentence_logits.argmax(-1) == next_sentence_label).sum(),
                          nsp_count=next_sentence_label.new_tensor(next_sentence_label.numel()))
        result["loss"] = loss
        return result
