"""The random-initialisation baseline: the pretrained model's architecture and tokenizer with
fresh weights, so fine-tuning it shows what pretraining bought."""

from __future__ import annotations

from typing import Any

STAGE = "random-init"
STAGE_VERSION = "1"


def initialise_like(model_dir: str, seed: int) -> Any:
    """The pretraining model of `model_dir`'s family and config (BertForPreTraining,
    AlbertForPreTraining with its factorised embeddings and sharing, ElectraForPreTraining),
    weights drawn fresh under `seed`."""
    import torch
    from transformers import AutoConfig, AutoModelForPreTraining

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForPreTraining.from_config(config)
    model.config.architectures = [type(model).__name__]
    return model


def run_random_init(name: str, model: dict[str, Any], seed: int, *, cache_key: str | None = None
                    ) -> dict[str, Any]:
    """A model artifact `name`: the same architecture and tokenizer as `model`, random weights."""
    from transformers import AutoTokenizer

    from storage.artifacts import ArtifactStore
    from storage.tokenizer_store import export_tokenizer

    store = ArtifactStore()
    with store.create("model", name) as writer:
        net = initialise_like(model["path"], seed)
        net.save_pretrained(writer.dir, safe_serialization=True)
        export_tokenizer(AutoTokenizer.from_pretrained(model["path"]), writer.dir, source=model["path"])
        parameters = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
        artifact = writer.commit(
            manifest={"architecture": type(net).__name__, "initialised_like": model, "seed": seed},
            parents=[model["id"]], params={"seed": seed, "like": model["id"]},
            stats={"parameters": parameters, "pretraining_steps": 0},
            cache_key=cache_key, stage_version=STAGE_VERSION)
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name,
            "fingerprint": artifact.fingerprint, "path": artifact.path, "stats": artifact.manifest["stats"]}
