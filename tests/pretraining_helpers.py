"""Small corpora and tokenizers written straight into a test data home (no Prefect, no ingest)."""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.artifacts import ArtifactStore
from storage.corpus import CorpusShardWriter

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el", "is", "ob", "ur"]


def synthetic_documents(n_docs: int, seed: int = 0, min_sentences: int = 2, max_sentences: int = 12
                        ) -> list[list[str]]:
    """Documents of pseudo-English sentences over a small invented vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(400)]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.integers(min_sentences, max_sentences + 1)):
            sentence = " ".join(rng.choice(words, size=rng.integers(4, 20)))
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        docs.append(sentences)
    return docs


def write_corpus(name: str, documents: list[list[str]], language: str = "en", shard_bytes: int = 1 << 30
                 ) -> dict[str, Any]:
    """A corpus artifact holding exactly these documents; returns the reference stages take."""
    store = ArtifactStore()
    with store.create("corpus", name) as writer:
        shards = CorpusShardWriter(writer.dir, shard_bytes=shard_bytes)
        for doc_id, sentences in enumerate(documents):
            shards.add(doc_id, "test", language, sentences, sum(len(s) for s in sentences))
        shards.flush()
        stats = {"documents": len(documents), "sentences": sum(len(d) for d in documents)}
        artifact = writer.commit(manifest={"shards": shards.shards}, stats=stats)
    return {"id": artifact.id, "name": artifact.name, "fingerprint": artifact.fingerprint,
            "path": artifact.path, "stats": stats}


def tokenizer_ref(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the pretraining-data flow passes for a tokenizer artifact."""
    store = ArtifactStore()
    artifact = store.resolve(manifest["name"], kind="tokenizer")
    return {"id": artifact.id, "name": artifact.name, "fingerprint": artifact.fingerprint,
            "path": artifact.path, "vocab_size": artifact.manifest["vocab_size"],
            "special_ids": artifact.manifest["special_ids"]}
