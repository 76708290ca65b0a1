"""`bertflow pretrain`, `bertflow params`, `bertflow fill-mask`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bertflow.errors import BertflowError
from bertflow.options import ConfigOptions, add_command, add_stage_parser
from bertflow.runtime import run_as_ranks, run_flow, under_torchrun

PRESET_NAMES = "tiny, mini, small, medium, base, large"
OPTIONS = ConfigOptions("tasks.pretrain_config:PretrainConfig", exclusive=(("steps", "epochs"),))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_stage_parser(
        subparsers, "pretrain", OPTIONS, run, restart=True, refresh="retrain even if a finished run is cached",
        help="pretraining data → a BERT model artifact (MLM + NSP/SOP), resumable")
    p.add_argument("--data", required=True, help="pretraining-data artifact name")

    q = add_command(subparsers, "params", run_params, help="parameter count of a model or preset, broken down by part")
    q.add_argument("model", metavar="MODEL_OR_PRESET")
    q.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size for a preset (default 30522)")
    q.add_argument("--no-nsp", action="store_true", help="masked-LM head only (data built with --objective none)")
    q.add_argument("--embedding-size", type=int, default=None,
                   help="ALBERT: factorised embeddings of size E (default: a BERT, or the ALBERT directory's own)")
    q.add_argument("--share-layers", choices=["none", "attention", "ffn", "all"], default=None,
                   help="ALBERT: cross-layer sharing (default: a BERT, or the ALBERT directory's own)")
    q.add_argument("--json", action="store_true",
                   help="the breakdown as one JSON object (stable keys; docs/artifacts-and-catalog.md#json-output)")

    f = add_command(subparsers, "fill-mask", run_fill_mask, help="top-k predictions for [MASK] in a sentence")
    f.add_argument("model", metavar="MODEL", help="model artifact name or a Hugging Face model directory")
    f.add_argument("text", nargs="+", help="text(s) holding the tokenizer's mask token, e.g. \"paris is the [MASK] of france .\"")
    f.add_argument("--top-k", type=int, default=5)
    f.add_argument("--json", action="store_true",
                   help="one JSON object per text (stable keys; docs/artifacts-and-catalog.md#json-output)")


def run(args: argparse.Namespace) -> int:
    """Pretrain BERT on a pretraining-data artifact (CUDA when available, else CPU; DDP under
    torchrun). Checkpoints go to <home>/runs/pretrain/NAME; re-running the same command resumes.
    The result is a Hugging Face model directory with its tokenizer."""
    from tasks.pretrain import format_summary

    config = OPTIONS.config(args)
    if under_torchrun():
        from tasks.pretrain import follow_rank0, followers

        # Rank 0 runs the flow and sends what to train; the other ranks train it and print nothing.
        manifest = run_as_ranks(args.device, lambda: _run(config, args), follow_rank0, followers.release)
        if manifest is None:
            return 0
    else:
        manifest = _run(config, args)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def _run(config, args: argparse.Namespace) -> dict:
    from flows.pretrain import pretrain_flow

    return run_flow(pretrain_flow, config=config, data=args.data, refresh=args.refresh, restart=args.restart)


def _model_dir(model: str) -> Path:
    """A Hugging Face directory: given as a path, or a model artifact's."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BertflowError(f"{model}: no config.json in this directory; pass a model artifact or a Hugging Face model directory")
        from storage.finetune_store import check_bert_directory

        check_bert_directory(str(path))
        return path
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    if not store.catalog.find(model, "model"):
        raise BertflowError(f"'{model}' is not a model artifact (see `bertflow ls --kind model`), a Hugging Face"
                            f" model directory, a preset ({PRESET_NAMES}) or a BERT config.json")
    return Path(store.resolve(model, kind="model").path)


def run_params(args: argparse.Namespace) -> int:
    """Print the parameter count of a preset, a BERT config.json, a model artifact or a Hugging Face
    directory, part by part (embeddings, attention, feed-forward, LayerNorms, pooler, heads),
    and check the sum against the instantiated model. With --embedding-size or --share-layers
    (or an ALBERT directory), the count is an ALBERT's, with the saving against the BERT of the
    same shape."""
    from tasks.bert_model import PRESETS, bert_config, count_parameters, format_params, new_hf_model, params_breakdown

    model = args.model
    nsp_head = not args.no_nsp
    albert = None  # an ALBERT config read from a directory
    if model in PRESETS or model.lower().endswith(".json"):
        config = bert_config(model, vocab_size=args.vocab_size)
    else:
        from transformers import AutoConfig

        directory = _model_dir(model)
        config = AutoConfig.from_pretrained(directory)
        if config.model_type not in ("bert", "albert"):
            raise BertflowError(f"{directory}/config.json: model_type '{config.model_type}' is not BERT or ALBERT")
        nsp_head = any(name in (config.architectures or ["BertForPreTraining"])
                       for name in ("BertForPreTraining", "AlbertForPreTraining"))
        if config.model_type == "albert":
            albert, config = config, _bert_shape(config)
    if albert is None and args.embedding_size is None and args.share_layers is None:
        instantiated = count_parameters(new_hf_model(config, nsp_head=nsp_head))
        lines = params_breakdown(config, nsp_head=nsp_head)
        if args.json:
            print(json.dumps(_params_json(model, config, lines, instantiated, nsp_head), indent=2))
        else:
            print(format_params(model, config, lines, instantiated))
        return 0 if instantiated == sum(line.count for line in lines) else 1

    from tasks.albert_model import albert_config, albert_params_breakdown, new_albert_model, share_mode

    share = args.share_layers or (share_mode(albert) if albert is not None else "none")
    embedding_size = args.embedding_size or (albert.embedding_size if albert is not None else None)
    config = albert_config(config, embedding_size=embedding_size, share_layers=share)
    instantiated = count_parameters(new_albert_model(config, nsp_head=nsp_head, share_layers=share))
    lines = albert_params_breakdown(config, nsp_head=nsp_head, share_layers=share)
    bert_total = sum(line.count for line in params_breakdown(_bert_shape(config), nsp_head=nsp_head))
    if args.json:
        print(json.dumps(_params_json(model, config, lines, instantiated, nsp_head, bert_total=bert_total,
                                      albert={"embedding_size": config.embedding_size, "share_layers": share}),
                         indent=2))
    else:
        print(format_params(model, config, lines, instantiated, bert_total=bert_total,
                            header=f" E={config.embedding_size} sharing={share}"))
    return 0 if instantiated == sum(line.count for line in lines) else 1


def _params_json(model: str, config, lines: list, instantiated: int, nsp_head: bool, *,
                 bert_total: int | None = None, albert: dict | None = None) -> dict:
    total = sum(line.count for line in lines)
    shape = {key: getattr(config, key) for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                  "intermediate_size", "vocab_size", "max_position_embeddings")}
    return {"model": model, "architecture": "albert" if albert else "bert", "config": shape, "albert": albert,
            "nsp_head": nsp_head, "parts": [{"group": line.group, "part": line.part, "count": line.count}
                                            for line in lines],
            "total": total, "instantiated": instantiated, "matches": instantiated == total, "bert_total": bert_total}


def _bert_shape(albert_config):
    """The BERT of an ALBERT config's shape (E = H, no sharing)."""
    from transformers import BertConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "pad_token_id")
    return BertConfig(**{key: getattr(albert_config, key) for key in keys})


def run_fill_mask(args: argparse.Namespace) -> int:
    """Run a model artifact (or Hugging Face directory) on text with [MASK] and print the top-k
    fillers."""
    import transformers
    from transformers import pipeline

    directory = str(_model_dir(args.model))
    transformers.logging.set_verbosity_error()
    fill = pipeline("fill-mask", model=directory, tokenizer=directory, device="cpu")
    mask = fill.tokenizer.mask_token
    for text in args.text:
        if mask not in text:
            raise BertflowError(f"text '{text}' holds no {mask} token; put {mask} where a word should be predicted")
    for text in args.text:
        predictions = fill(text, top_k=args.top_k)
        per_mask = predictions if predictions and isinstance(predictions[0], list) else [predictions]
        if args.json:
            print(json.dumps({"text": text, "masks": [
                [{"score": round(float(p["score"]), 6), "token": int(p["token"]), "token_str": p["token_str"],
                  "sequence": p["sequence"]} for p in candidates] for candidates in per_mask]}, ensure_ascii=False))
            continue
        print(text)
        for p in per_mask[0]:  # several masks: the first one's (--json gives each)
            print(f"  {p['score']:.4f}  {p['token_str']:<16} {p['sequence']}")
    return 0
