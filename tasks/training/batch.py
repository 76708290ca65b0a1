"""What every stage's batches share: tensors by name, and the label value the losses skip."""

from __future__ import annotations

from typing import Any

Batch = dict[str, Any]  # tensor name → (batch, …) tensor, or None (e.g. a dropped attention mask)

# Label of positions a loss skips (padding, non-first word pieces, unmasked tokens): torch's
# cross-entropy ignores -100 by default.
IGNORE_INDEX = -100
