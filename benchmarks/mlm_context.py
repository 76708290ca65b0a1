"""Does a pretrained model use context? Masked-token accuracy against count baselines.

Masks 15% of the tokens of held-out text (always `[MASK]`, never a random or kept token, so
copying the input earns nothing) and prints the model's top-1 accuracy on them:
  - with the text around each mask (what masked-LM pretraining should teach),
  - with every other token masked too (no context: the model can only guess frequencies),
and, for scale, two count baselines from the training text: the most frequent token
(unigram) and the most frequent successor of the token before the mask (bigram, which sees the
unmasked previous token). A model stuck at "unigram" has learned token frequencies only
(the masked-LM plateau); one near or above "bigram" uses its context.

Usage:
    python benchmarks/mlm_context.py MODEL --train TRAIN.tsv --eval DEV.tsv [--column text]
MODEL is a model artifact name (in $BERTFLOW_HOME) or a Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_texts(path: str, column: str, limit: int | None = None) -> list[str]:
    """The texts of a TSV/CSV/JSONL file, read as fine-tuning reads it."""
    from storage.finetune_store import ReadOptions, read_sentence_examples

    examples = read_sentence_examples(path, ReadOptions(text_column=column), pair=False, require_labels=False)
    return [ex.text_a for ex in examples if ex.text_a][:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--train", required=True, help="text the count baselines are counted on (TSV/CSV)")
    parser.add_argument("--eval", required=True, help="held-out text to mask (TSV/CSV)")
    parser.add_argument("--column", default="text")
    parser.add_argument("--documents", type=int, default=400, help="held-out documents to score")
    parser.add_argument("--max-seq-len", type=int, default=128, help="tokens per document (the model's trained length)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import BertForMaskedLM, BertTokenizerFast

    from storage.finetune_store import resolve_model

    path = resolve_model(args.model)["path"]
    tokenizer = BertTokenizerFast.from_pretrained(path)
    model = BertForMaskedLM.from_pretrained(path).eval()
    encode = lambda text: tokenizer(text, truncation=True, max_length=args.max_seq_len)["input_ids"]  # noqa: E731

    successors: dict[int, Counter] = defaultdict(Counter)
    unigram: Counter = Counter()
    for text in read_texts(args.train, args.column):
        ids = encode(text)
        for previous, current in zip(ids, ids[1:]):
            successors[previous][current] += 1
        unigram.update(ids[1:-1])
    most_frequent = unigram.most_common(1)[0][0]

    rng = np.random.default_rng(args.seed)
    mask = tokenizer.mask_token_id
    total = with_context = without_context = bigram = frequent = 0
    with torch.no_grad():
        for text in read_texts(args.eval, args.column, args.documents):
            ids = torch.tensor(encode(text))
            n = len(ids)
            if n < 5:
                continue
            positions = rng.choice(np.arange(1, n - 1), size=max(1, round(0.15 * (n - 2))), replace=False)
            targets = ids[positions]
            masked = ids.clone()
            masked[positions] = mask
            with_context += (model(input_ids=masked[None]).logits[0, positions].argmax(-1) == targets).sum().item()
            alone = torch.full_like(ids, mask)
            alone[0], alone[-1] = ids[0], ids[-1]  # [CLS] and [SEP] stay
            without_context += (model(input_ids=alone[None]).logits[0, positions].argmax(-1) == targets).sum().item()
            for p in positions:
                after = successors.get(int(ids[p - 1]))
                bigram += (after.most_common(1)[0][0] if after else most_frequent) == int(ids[p])
                frequent += most_frequent == int(ids[p])
            total += len(positions)
    print(f"{args.model}: {total:,} masked tokens in {args.documents} documents of {args.eval}")
    print(f"  model, with context     {with_context / total:.3f}")
    print(f"  model, no context       {without_context / total:.3f}")
    print(f"  count bigram (previous) {bigram / total:.3f}")
    print(f"  count unigram           {frequent / total:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
