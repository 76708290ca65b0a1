"""`bertflow finetune`, `bertflow predict RUN`, `bertflow embed MODEL`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bertflow.errors import BertflowError
from bertflow.runtime import run_flow
from tasks.validation import validated


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune and evaluate a BERT on a classification, pair, token or QA task",
        description="Fine-tune a BERT (a model artifact or any Hugging Face BERT directory) on labelled"
        " files, select the best checkpoint on dev, evaluate once on test, and write a finetune artifact"
        " (Hugging Face model directory, predictions, metrics.json).")
    p.add_argument("--model", required=True, help="model artifact name or Hugging Face BERT directory")
    p.add_argument("--task-type", required=True, choices=["classification", "pair", "token", "qa"])
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--dev", required=True, help="development file (selection)")
    p.add_argument("--test", default=None, help="test file (evaluated once, with the selected model)")
    p.add_argument("--name", required=True, help="artifact name of the run")
    g = p.add_argument_group("file format")
    g.add_argument("--format", default="auto",
                   choices=["auto", "tsv", "csv", "jsonl", "conll", "jsonl-spans", "squad"])
    g.add_argument("--text-column", default=None, help="text column/key (auto: sentence, text, text_a, #1 String…)")
    g.add_argument("--text-b-column", default=None, help="pair: second text column (auto: #2 String, text_b…)")
    g.add_argument("--label-column", default=None, help="label column (auto: label, Quality…)")
    g.add_argument("--no-header", action="store_true", help="tsv/csv without a header row: columns are 0, 1, …")
    g.add_argument("--token-column", type=int, default=0, help="conll: 0-based token column")
    g.add_argument("--tag-column", type=int, default=-1, help="conll: 0-based tag column (-1: last)")
    g.add_argument("--token-level", default="word", choices=["word", "char"],
                   help="entity-span JSONL and predict text: word (whitespace) or character tokens")
    g.add_argument("--entities-key", default="entities", help="entity-span JSONL: key of the entity list")
    g.add_argument("--language", default="auto", choices=["auto", "en", "zh"],
                   help="qa metrics: SQuAD (en) or CMRC character-level (zh)")
    t = p.add_argument_group("training")
    t.add_argument("--mode", default="finetune", choices=["finetune", "feature"],
                   help="feature: freeze the encoder, train only the head")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--eval-batch-size", type=int, default=64)
    t.add_argument("--max-seq-len", type=int, default=None, help="tokens (default 128; qa 384)")
    t.add_argument("--doc-stride", type=int, default=128, help="qa: overlap of context windows, tokens")
    t.add_argument("--max-query-len", type=int, default=64, help="qa: question tokens kept")
    t.add_argument("--max-answer-len", type=int, default=30, help="qa: longest answer, tokens")
    t.add_argument("--n-best", type=int, default=20, help="qa: start/end candidates per window")
    t.add_argument("--warmup-ratio", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: every epoch)")
    t.add_argument("--early-stopping", type=int, default=0, help="stop after N evaluations without gain")
    t.add_argument("--selection-metric", default=None, help="dev metric for selection (default accuracy / f1)")
    t.add_argument("--max-train-examples", type=int, default=None, help="use the first N training examples")
    t.add_argument("--sweep", default=None, help="grid, e.g. \"lr=2e-5,3e-5;batch-size=16,32\"")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=run_finetune)

    q = subparsers.add_parser(
        "predict", help="predictions of a fine-tuned run for text or a file",
        description="Print labels (classification, pair), entities (token) or answers (qa) of a finetune run.")
    q.add_argument("run_name", metavar="RUN", help="finetune artifact name")
    q.add_argument("--text", action="append", default=None,
                   help="input text (repeatable); qa: the question")
    q.add_argument("--text-b", default=None, help="pair: the second text")
    q.add_argument("--context", default=None, help="qa: the passage to answer from")
    q.add_argument("--file", default=None, help="a file in the run's training format (labels optional)")
    q.add_argument("--json", action="store_true", help="one JSON object per prediction")
    q.set_defaults(run=run_predict)

    e = subparsers.add_parser(
        "embed", help="contextual vectors of texts from a BERT",
        description="Print contextual vectors ([CLS], mean-pooled, or per token) from a model artifact,"
        " a finetune run or a Hugging Face BERT directory; with --word, the same word's vectors in the"
        " different texts and their cosine similarities.")
    e.add_argument("model", metavar="MODEL", help="model or finetune artifact name, or a BERT directory")
    e.add_argument("--text", action="append", required=True, help="input text (repeatable)")
    e.add_argument("--pooling", default="mean", choices=["cls", "mean", "tokens"])
    e.add_argument("--word", default=None, help="compare this word's vectors across the texts")
    e.add_argument("--dims", type=int, default=8, help="vector components shown (0: all)")
    e.add_argument("--json", action="store_true", help="full vectors as JSON")
    e.set_defaults(run=run_embed)


def run_finetune(args: argparse.Namespace) -> int:
    from tasks.finetune import FinetuneConfig, format_summary

    config = validated(FinetuneConfig, dict(
        name=args.name, model=args.model, task_type=args.task_type, train=args.train, dev=args.dev,
        test=args.test, format=args.format, text_column=args.text_column, text_b_column=args.text_b_column,
        label_column=args.label_column, has_header=not args.no_header, token_column=args.token_column,
        tag_column=args.tag_column, token_level=args.token_level, entities_key=args.entities_key,
        language=args.language, mode=args.mode, max_seq_len=args.max_seq_len, doc_stride=args.doc_stride,
        max_query_len=args.max_query_len, max_answer_len=args.max_answer_len, n_best=args.n_best,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every, early_stopping=args.early_stopping, selection_metric=args.selection_metric,
        max_train_examples=args.max_train_examples, sweep=args.sweep, seed=args.seed, device=args.device,
    ))
    from storage.artifacts import check_name

    check_name(args.name)
    from flows.finetune import finetune_flow

    manifest = run_flow(finetune_flow, config=config, refresh=args.refresh)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def _predict_inputs(args: argparse.Namespace, manifest: dict[str, Any]) -> list:
    from tasks.finetune import text_to_tokens
    from tasks.finetune_data import QAExample, TextExample, TokenExample

    task_type = manifest["task_type"]
    if args.file:
        from storage.finetune_store import ReadOptions, read_sentence_examples, read_squad, read_token_examples

        options = ReadOptions(**manifest["read_options"])
        if task_type in ("classification", "pair"):
            return read_sentence_examples(args.file, options, pair=task_type == "pair", require_labels=False)
        if task_type == "token":
            return read_token_examples(args.file, options, require_labels=False)
        return read_squad(args.file)
    if not args.text:
        raise BertflowError("predict: give --text (repeatable) or --file")
    if task_type == "pair":
        if args.text_b is None:
            raise BertflowError("predict: this run classifies pairs; give --text A --text-b B")
        return [TextExample(text, args.text_b) for text in args.text]
    if task_type == "classification":
        return [TextExample(text) for text in args.text]
    if task_type == "token":
        level = manifest["read_options"].get("token_level", "word")
        return [TokenExample(text_to_tokens(text, level)) for text in args.text if text.strip()]
    if not args.context:
        raise BertflowError("predict: this run answers questions; give --text QUESTION --context PASSAGE")
    return [QAExample(str(i), text, args.context) for i, text in enumerate(args.text)]


def run_predict(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore
    from tasks.finetune import load_finetuned, predict_examples

    artifact = ArtifactStore().resolve(args.run_name, kind="finetune")
    model, tokenizer, manifest = load_finetuned(artifact.path)
    rows = predict_examples(model, tokenizer, manifest, _predict_inputs(args, manifest))
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        elif manifest["task_type"] in ("classification", "pair"):
            shown = row["text"] + (f"  |||  {row['text_b']}" if "text_b" in row else "")
            print(f"{row['prediction']}\t{row['probability']:.3f}\t{shown}")
        elif manifest["task_type"] == "token":
            entities = ", ".join(f"{e['text']} ({e['type']})" for e in row["entities"]) or "(no entities)"
            print(f"{' '.join(row['tokens'])}\n  -> {entities}")
        else:
            print(f"{row['question']}\n  -> {row['prediction'] or '(no answer found)'}")
    return 0


def _resolve_encoder(reference: str) -> str:
    from pathlib import Path

    from storage.artifacts import ArtifactStore
    from storage.finetune_store import check_bert_directory

    if Path(reference).expanduser().is_dir():
        path = str(Path(reference).expanduser().resolve())
    else:
        store = ArtifactStore()
        entries = [e for e in store.catalog.find(reference) if e.kind in ("model", "finetune")]
        if not entries:
            raise BertflowError(f"'{reference}' is neither a directory nor a model/finetune artifact;"
                                " run `bertflow ls` to see what exists")
        path = store.load(entries[0]).path
    check_bert_directory(path)
    return path


def run_embed(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    from tasks.finetune import cosine, embed_texts, load_tokenizer, word_vector

    path = _resolve_encoder(args.model)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    tokenizer = load_tokenizer(path)
    embedded = embed_texts(model, tokenizer, args.text,
                           max_seq_len=getattr(model.config, "max_position_embeddings", 512))
    dims = args.dims or None

    def show(vector: Any) -> str:
        return "[" + ", ".join(f"{x:+.4f}" for x in vector[:dims]) + (", …]" if dims and len(vector) > dims else "]")

    if args.json:
        for item in embedded:
            out: dict[str, Any] = {"text": item["text"], "pooling": args.pooling}
            if args.pooling == "tokens":
                out["tokens"] = item["tokens"]
                out["vectors"] = item["vectors"].round(6).tolist()
            else:
                out["vector"] = item[args.pooling].round(6).tolist()
            print(json.dumps(out, ensure_ascii=False))
    else:
        hidden = embedded[0]["vectors"].shape[1]
        print(f"{args.pooling} vectors, {hidden} dimensions (first {dims or hidden} shown)")
        for item in embedded:
            print(f"- {item['text']}")
            if args.pooling == "tokens":
                for token, vector in zip(item["tokens"], item["vectors"]):
                    print(f"    {token:<14} {show(vector)}")
            else:
                print(f"    {show(item[args.pooling])}")
        if len(embedded) > 1 and args.pooling != "tokens":
            for i in range(len(embedded)):
                for j in range(i + 1, len(embedded)):
                    print(f"cosine({args.pooling} {i + 1}, {args.pooling} {j + 1}) ="
                          f" {cosine(embedded[i][args.pooling], embedded[j][args.pooling]):.4f}")
    if args.word:
        vectors = [word_vector(item, args.word) for item in embedded]
        for i, (item, vector) in enumerate(zip(embedded, vectors), 1):
            if vector is None:
                print(f"'{args.word}' does not occur in text {i}", file=sys.stderr)
            elif not args.json:
                print(f"'{args.word}' in text {i}: {show(vector)}")
        found = [(i, v) for i, v in enumerate(vectors, 1) if v is not None]
        if len(found) < 2:
            raise BertflowError(f"--word '{args.word}' must occur in at least two of the texts")
        for a in range(len(found)):
            for b in range(a + 1, len(found)):
                print(f"cosine('{args.word}' in text {found[a][0]}, text {found[b][0]}) ="
                      f" {cosine(found[a][1], found[b][1]):.4f}")
    return 0
