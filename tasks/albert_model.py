"""ALBERT's parameter reductions (Lan et al. 2020) for the masked-LM objective.

- **Factorised embeddings**: tokens (and positions, segments) are embedded in E dimensions and
  projected to the hidden size H: V·E + E·H parameters instead of V·H.
- **Cross-layer sharing**: every layer uses the same attention block (`attention`), the same
  feed-forward block (`ffn`) or the same whole layer (`all`, ALBERT's default).

The model is a Hugging Face `AlbertForPreTraining` (MLM + SOP/NSP head) or `AlbertForMaskedLM`.
`all` is ALBERT's own `num_hidden_groups=1`; `none` gives every layer its own group. The partial
modes keep one group per layer and make the shared blocks of every group the same module objects
as group 0's while training; the export deep-copies them back into each group, a checkpoint of
plain `num_hidden_groups = L` that computes the same outputs (and holds L copies of the block).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from bertflow.errors import BertflowError
from tasks.bert_model import ParamLine

SHARE_MODES = ("none", "attention", "ffn", "all")
# The AlbertLayer submodules each partial mode shares. An AlbertAttention holds its LayerNorm; the
# feed-forward block is the two projections and the LayerNorm after them.
SHARED_SUBMODULES: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "ffn": ("ffn", "ffn_output", "full_layer_layer_norm"),
}


def albert_config(bert_config: Any, *, embedding_size: int | None, share_layers: str | None) -> Any:
    """An `AlbertConfig` of the shape of a `BertConfig`, with embedding size E (None: E = H) and
    the sharing mode (None: `none`)."""
    from transformers import AlbertConfig

    hidden = bert_config.hidden_size
    if embedding_size is not None and embedding_size > hidden:
        raise BertflowError(f"--embedding-size {embedding_size} is larger than the hidden size {hidden};"
                            f" pass --embedding-size {hidden} or less (ALBERT's own models use 128)")
    share = share_layers or "none"
    if share not in SHARE_MODES:
        raise BertflowError(f"--share-layers {share}: pass one of {', '.join(SHARE_MODES)}")
    layers = bert_config.num_hidden_layers
    return AlbertConfig(
        vocab_size=bert_config.vocab_size, embedding_size=embedding_size or hidden, hidden_size=hidden,
        num_hidden_layers=layers, num_hidden_groups=1 if share == "all" else layers, inner_group_num=1,
        num_attention_heads=bert_config.num_attention_heads, intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act, hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        # BERT's sentence head has no dropout of its own; the SOP head and fine-tuning heads use this.
        classifier_dropout_prob=bert_config.hidden_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings, type_vocab_size=bert_config.type_vocab_size,
        initializer_range=bert_config.initializer_range, layer_norm_eps=bert_config.layer_norm_eps,
        pad_token_id=bert_config.pad_token_id)


def share_mode(config: Any) -> str:
    """The sharing of a saved ALBERT config: `all` (one group) or `none` (a group per layer);
    a partially shared model is saved untied, as `none`."""
    if config.num_hidden_groups == 1 and config.num_hidden_layers > 1:
        return "all"
    if config.num_hidden_groups == config.num_hidden_layers and config.inner_group_num == 1:
        return "none"
    raise BertflowError(f"ALBERT config with {config.num_hidden_groups} groups of {config.inner_group_num} layer(s)"
                        f" for {config.num_hidden_layers} layers: only one group, or one per layer, is supported")


def tie_layers(model: nn.Module, share_layers: str | None) -> nn.Module:
    """Make the shared blocks of every layer group the same modules as group 0's (partial sharing)."""
    groups = model.albert.encoder.albert_layer_groups
    for name in SHARED_SUBMODULES.get(share_layers or "none", ()):
        for group in groups[1:]:
            setattr(group.albert_layers[0], name, getattr(groups[0].albert_layers[0], name))
    return model


def untied_copy(model: nn.Module, share_layers: str | None) -> nn.Module:
    """A copy whose layer groups own their blocks (for partial sharing; the model itself otherwise)."""
    if share_layers not in SHARED_SUBMODULES:
        return model
    model = copy.deepcopy(model)  # the copy keeps the embedding ↔ decoder tie
    groups = model.albert.encoder.albert_layer_groups
    for name in SHARED_SUBMODULES[share_layers]:
        for group in groups[1:]:
            setattr(group.albert_layers[0], name, copy.deepcopy(getattr(group.albert_layers[0], name)))
    return model


def new_albert_model(config: Any, *, nsp_head: bool, share_layers: str | None,
                     attn_implementation: str = "sdpa") -> nn.Module:
    """A freshly initialised `AlbertForPreTraining` (or `AlbertForMaskedLM`), tied for partial sharing."""
    from transformers import AlbertForMaskedLM, AlbertForPreTraining

    config._attn_implementation = attn_implementation
    model = (AlbertForPreTraining if nsp_head else AlbertForMaskedLM)(config)
    model.config._attn_implementation = attn_implementation
    return tie_layers(model, share_layers)


def albert_params_breakdown(config: Any, *, nsp_head: bool = True, share_layers: str | None = None) -> list[ParamLine]:
    """Parameter count by part of an ALBERT trained with this sharing, from the config alone."""
    V, E, H = config.vocab_size, config.embedding_size, config.hidden_size
    P, T, I, L = config.max_position_embeddings, config.type_vocab_size, config.intermediate_size, config.num_hidden_layers
    share = share_layers or "none"
    attention_copies = 1 if share in ("attention", "all") else L
    ffn_copies = 1 if share in ("ffn", "all") else L
    group = f"encoder × {L}" + ("" if share == "none" else f", {share} shared")
    lines = [
        ParamLine("embeddings", "token (V·E)", V * E),
        ParamLine("embeddings", "position (P·E)", P * E),
        ParamLine("embeddings", "segment (T·E)", T * E),
        ParamLine("embeddings", "LayerNorm (2E)", 2 * E),
        ParamLine("projection E→H", "dense (E·H+H)", E * H + H),
        ParamLine(group, f"attention (4H²+4H) × {attention_copies}", attention_copies * (4 * H * H + 4 * H)),
        ParamLine(group, f"attention LayerNorm (2H) × {attention_copies}", attention_copies * 2 * H),
        ParamLine(group, f"feed-forward (2HI+I+H) × {ffn_copies}", ffn_copies * (2 * H * I + I + H)),
        ParamLine(group, f"feed-forward LayerNorm (2H) × {ffn_copies}", ffn_copies * 2 * H),
    ]
    if nsp_head:
        lines.append(ParamLine("pooler", "dense (H²+H)", H * H + H))
    lines += [
        ParamLine("MLM head", "transform (H·E+E)", H * E + E),
        ParamLine("MLM head", "transform LayerNorm (2E)", 2 * E),
        ParamLine("MLM head", "decoder bias (V; weight tied)", V),
    ]
    if nsp_head:
        lines.append(ParamLine("SOP/NSP head", "classifier (2H+2)", 2 * H + 2))
    return lines
