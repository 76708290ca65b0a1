"""ELECTRA's replaced-token detection (Clark et al. 2020) as a pretraining objective.

A small generator, a masked LM, fills the masked positions with tokens sampled from its own
predictions. The discriminator then reads the whole sequence and predicts, for every token,
whether it was replaced. Masked LM learns from the 15% of tokens that are masked; the
discriminator learns from all of them, which is why ELECTRA gets more out of little compute.

    loss = generator MLM cross-entropy + λ · discriminator binary cross-entropy   (λ = 50)

Generator and discriminator share their embeddings (token, position, segment), as in the paper.
The generator is the discriminator's depth with `generator_size` (1/4 by default) of its hidden
size, heads and feed-forward width. Both are Hugging Face ELECTRA modules, so the export — the
discriminator alone — is an `ElectraForPreTraining` checkpoint that `AutoModel` and
`AutoModelFor*` load. The sampling is not differentiated through (the paper's choice).

Works with any pretraining data: static or dynamic masks (the generator reads the masked
input as built), and any sentence objective (NSP/SOP labels are not used).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bertflow.errors import BertflowError

DISCRIMINATOR_WEIGHT = 50.0  # λ, the paper's value
GENERATOR_SIZE = 0.25  # generator hidden size / discriminator hidden size


def electra_configs(bert_config: Any, *, generator_size: float = GENERATOR_SIZE) -> tuple[Any, Any]:
    """(discriminator, generator) `ElectraConfig`s for the shape of a `BertConfig`."""
    from transformers import ElectraConfig

    if not 0 < generator_size <= 1:
        raise BertflowError(f"--generator-size {generator_size}: the generator must not be larger than the"
                            " discriminator; pass a fraction in (0, 1] (the paper: 1/4 to 1/2)")
    hidden, heads = bert_config.hidden_size, bert_config.num_attention_heads
    shared = dict(vocab_size=bert_config.vocab_size, embedding_size=hidden,
                  num_hidden_layers=bert_config.num_hidden_layers,
                  max_position_embeddings=bert_config.max_position_embeddings,
                  type_vocab_size=bert_config.type_vocab_size, pad_token_id=bert_config.pad_token_id,
                  hidden_dropout_prob=bert_config.hidden_dropout_prob,
                  attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
                  hidden_act=bert_config.hidden_act, layer_norm_eps=bert_config.layer_norm_eps,
                  initializer_range=bert_config.initializer_range)
    discriminator = ElectraConfig(hidden_size=hidden, num_attention_heads=heads,
                                  intermediate_size=bert_config.intermediate_size, **shared)
    gen_heads = max(1, round(heads * generator_size))
    gen_hidden = max(gen_heads, round(hidden * generator_size / gen_heads) * gen_heads)
    generator = ElectraConfig(hidden_size=gen_hidden, num_attention_heads=gen_heads,
                              intermediate_size=max(1, round(bert_config.intermediate_size * gen_hidden / hidden)),
                              **shared)
    return discriminator, generator


class ElectraPretrainingModel(nn.Module):
    """Generator + discriminator with shared embeddings; the forward pass returns the loss and
    the sums the held-out evaluation averages (`mlm_*` for the generator, `rtd_*` for the
    discriminator)."""

    def __init__(self, discriminator_config: Any, generator_config: Any, *,
                 discriminator_weight: float = DISCRIMINATOR_WEIGHT, attn_implementation: str = "sdpa"):
        super().__init__()
        self.loss_weights = {"mlm": 1.0, "rtd": discriminator_weight}
        from transformers import ElectraForMaskedLM, ElectraForPreTraining

        for config in (discriminator_config, generator_config):
            config._attn_implementation = attn_implementation
        self.discriminator = ElectraForPreTraining(discriminator_config)
        self.generator = ElectraForMaskedLM(generator_config)
        self.generator.electra.embeddings = self.discriminator.electra.embeddings
        self.generator.generator_lm_head.weight = self.discriminator.electra.embeddings.word_embeddings.weight
        self.sampling_generator: torch.Generator | None = None  # None: the global RNG (training)

    def export(self) -> nn.Module:
        return self.discriminator

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor,
                mlm_positions: torch.Tensor, mlm_labels: torch.Tensor,
                next_sentence_label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        valid = mlm_labels != -100  # (batch, max_predictions)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mlm_positions)
        rows, positions, labels = rows[valid], mlm_positions[valid], mlm_labels[valid]

        # The generator: a masked LM scored at the masked positions only.
        hidden = self.generator.electra(input_ids=input_ids, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids, return_dict=True).last_hidden_state
        logits = self.generator.generator_lm_head(self.generator.generator_predictions(hidden[rows, positions]))
        mlm_loss = nn.functional.cross_entropy(logits.float(), labels)

        # Fill the masked positions with samples; a sample equal to the original is not "replaced".
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=self.sampling_generator).squeeze(1)
            original = input_ids.clone()
            original[rows, positions] = labels
            corrupted = original.clone()
            corrupted[rows, positions] = sampled
            replaced = (corrupted != original).float()

        # The discriminator: every real (non-padding) token, original or replaced.
        scores = self.discriminator(input_ids=corrupted, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids, return_dict=True).logits.float()
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(replaced, dtype=torch.bool)
        rtd_loss = nn.functional.binary_cross_entropy_with_logits(scores[real], replaced[real])
        result = {"mlm_loss": mlm_loss, "mlm_count": labels.new_tensor(labels.numel()),
                  "rtd_loss": rtd_loss, "rtd_count": real.sum()}
        if not self.training:
            result["mlm_correct"] = (logits.argmax(-1) == labels).sum()
            result["rtd_correct"] = ((scores[real] > 0).float() == replaced[real]).sum()
            result["rtd_replaced"] = replaced[real].sum()
        result["loss"] = mlm_loss + self.loss_weights["rtd"] * rtd_loss
        return result
