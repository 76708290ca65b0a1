"""`bertflow finetune`, `bertflow predict RUN`, `bertflow embed MODEL`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bertflow.errors import BertflowError
from bertflow.options import ConfigOptions, add_command, add_stage_parser
from bertflow.runtime import run_as_ranks, run_flow, under_torchrun

OPTIONS = ConfigOptions("tasks.finetune_config:FinetuneConfig", required=("task_type", "train", "dev"),
                        sections=(("format", "file format"), ("mode", "training")))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_stage_parser(
        subparsers, "finetune", OPTIONS, run_finetune, restart=True,
        help="fine-tune and evaluate a BERT on a classification, pair, token or QA task")

    q = add_command(subparsers, "predict", run_predict, help="predictions of a fine-tuned run for text or a file")
    q.add_argument("run_name", metavar="RUN", help="finetune artifact name")
    q.add_argument("--text", action="append", default=None,
                   help="input text (repeatable); qa: the question")
    q.add_argument("--text-b", default=None, help="pair: the second text")
    q.add_argument("--context", default=None, help="qa: the passage to answer from")
    q.add_argument("--file", default=None, help="a file in the run's training format (labels optional)")
    q.add_argument("--json", action="store_true", help="one JSON object per prediction")

    e = add_command(subparsers, "embed", run_embed, help="contextual vectors of texts from a BERT")
    e.add_argument("model", metavar="MODEL", help="model or finetune artifact name, or a BERT directory")
    e.add_argument("--text", action="append", required=True, help="input text (repeatable)")
    e.add_argument("--pooling", default="mean", choices=["cls", "mean", "tokens"])
    e.add_argument("--word", default=None, help="compare this word's vectors across the texts")
    e.add_argument("--dims", type=int, default=8, help="vector components shown (0: all)")
    e.add_argument("--json", action="store_true", help="full vectors as JSON")


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a BERT (a model artifact or any Hugging Face BERT directory) on labelled files, select
    the best checkpoint on dev, evaluate once on test, and write a finetune artifact (Hugging
    Face model directory, predictions, metrics.json)."""
    from tasks.finetune import format_summary

    config = OPTIONS.config(args)
    from storage.artifacts import check_name

    check_name(args.name)
    from flows.finetune import finetune_flow

    if under_torchrun():
        from tasks.finetune import follow_rank0, followers

        # Rank 0 runs the flow and sends each training job; the other ranks train them and print nothing.
        manifest = run_as_ranks(config.device, lambda: run_flow(finetune_flow, config=config, refresh=args.refresh,
                                                                restart=args.restart),
                                follow_rank0, followers.release)
        if manifest is None:
            return 0
    else:
        manifest = run_flow(finetune_flow, config=config, refresh=args.refresh, restart=args.restart)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def _predict_inputs(args: argparse.Namespace, manifest: dict[str, Any]) -> list:
    from tasks.finetune_inference import text_to_tokens
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
    """Print labels (classification, pair), entities (token) or answers (qa) of a finetune run."""
    from storage.artifacts import ArtifactStore
    from tasks.finetune_inference import load_finetuned, predict_examples

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
    """Print contextual vectors ([CLS], mean-pooled, or per token) from a model artifact, a finetune
    run or a Hugging Face BERT directory; with --word, the same word's vectors in the different
    texts and their cosine similarities."""
    from transformers import AutoModel

    from tasks.finetune_inference import cosine, embed_texts, load_tokenizer, word_vector

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
        pairs = [(found[a], found[b]) for a in range(len(found)) for b in range(a + 1, len(found))]
        if args.json:  # one more line after the texts' objects: the word's vectors and their cosines
            print(json.dumps({"word": args.word, "vectors": {str(i): v.round(6).tolist() for i, v in found},
                              "cosines": [{"texts": [x[0], y[0]], "cosine": round(float(cosine(x[1], y[1])), 6)}
                                          for x, y in pairs]}, ensure_ascii=False))
        else:
            for x, y in pairs:
                print(f"cosine('{args.word}' in text {x[0]}, text {y[0]}) = {cosine(x[1], y[1]):.4f}")
    return 0
