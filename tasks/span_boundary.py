"""SpanBERT's span-boundary objective (Joshi et al. 2020), an extra loss beside the masked LM.

Each masked token x_i of a masked span (x_s … x_e) is predicted a second time, from the
encoder's final states of the two tokens around the span, x_{s-1} and x_{e+1}, and a learned
embedding of its place in the span, p_{i-s+1}:

    h = LayerNorm(GeLU(W2 · LayerNorm(GeLU(W1 · [x_{s-1}; x_{e+1}; p_{i-s+1}]))))
    sbo logits = MLM decoder(h)          (weight tied to the token embeddings)
    loss = MLM + SBO (+ NSP/SOP)

The spans are read off the masks: the maximal runs of consecutive masked positions in each
sequence. Two spans the masking drew side by side are one run, so they merge into one span. The
boundary of a span that touches the sequence's edge is the edge token itself. The head is for
pretraining only: the export is the BERT (or ALBERT) without it.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_SPAN_POSITIONS = 32  # relative positions with their own embedding; later ones share the last


def span_boundaries(masked: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every position of each sequence: (left boundary, right boundary, place in its span).

    `masked` (batch, seq) marks the masked positions; `lengths` (batch,) the real tokens. A run of
    masked positions s … e has the left boundary s-1 and the right one e+1 (clamped to the first
    and the last real token), and position i is at place i - s of it. The values at unmasked
    positions are not used.
    """
    batch, seq = masked.shape
    index = torch.arange(seq, device=masked.device).expand(batch, seq)  # (batch, seq)
    # The last unmasked position at or before i, and the first at or after it.
    left = torch.where(masked, -1, index).cummax(dim=1).values
    right = torch.where(masked, seq, index).flip(1).cummin(dim=1).values.flip(1)
    place = index - (left + 1)
    last = (lengths.to(index.device) - 1).clamp(min=0).unsqueeze(1)  # (batch, 1)
    return left.clamp(min=0), torch.minimum(right, last), place


class SpanBoundaryHead(nn.Module):
    """[x_{s-1}; x_{e+1}; p_{i-s+1}] → a 2-layer feed-forward network with GeLU and LayerNorm →
    the input width of the MLM decoder (H for BERT, E for ALBERT)."""

    def __init__(self, hidden_size: int, output_size: int, *, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02):
        super().__init__()
        self.position_embeddings = nn.Embedding(MAX_SPAN_POSITIONS, hidden_size)
        self.dense1 = nn.Linear(3 * hidden_size, hidden_size)
        self.LayerNorm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dense2 = nn.Linear(hidden_size, output_size)
        self.LayerNorm2 = nn.LayerNorm(output_size, eps=layer_norm_eps)
        for module in (self.position_embeddings, self.dense1, self.dense2):  # BERT's initialisation
            nn.init.normal_(module.weight, std=initializer_range)
        nn.init.zeros_(self.dense1.bias)
        nn.init.zeros_(self.dense2.bias)

    def forward(self, left: torch.Tensor, right: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
        """left, right: (tokens, hidden) boundary states; place: (tokens,) 0 for a span's first token."""
        position = self.position_embeddings(place.clamp(0, MAX_SPAN_POSITIONS - 1))
        h = self.LayerNorm1(nn.functional.gelu(self.dense1(torch.cat([left, right, position], dim=-1))))
        return self.LayerNorm2(nn.functional.gelu(self.dense2(h)))  # (tokens, output)


def span_boundary_inputs(hidden: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The boundary states and places of the masked tokens at (rows, positions)."""
    batch, seq, _ = hidden.shape
    masked = torch.zeros(batch, seq, dtype=torch.bool, device=hidden.device)
    masked[rows, positions] = True
    lengths = (attention_mask.sum(1) if attention_mask is not None
               else torch.full((batch,), seq, device=hidden.device))
    left, right, place = span_boundaries(masked, lengths)
    return hidden[rows, left[rows, positions]], hidden[rows, right[rows, positions]], place[rows, positions]
