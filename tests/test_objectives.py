"""Pretraining objectives beyond masked LM: each is a component of the training core."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_pretrain import CLS, MASK, SEP, SPECIALS, VOCAB, CrashAt, register_pretraining_data, train_once

def register_repeated_word_data(name: str = "repeated", instances: int = 200) -> dict:
    """Pretraining data whose every instance repeats one word: a replaced token is the odd one out,
    and the masked word is its neighbours' (a pattern a tiny model learns in a few dozen steps)."""
    import numpy as np

    from storage.artifacts import ArtifactStore
    from tests.test_pretrain import write_pretraining_data, write_tokenizer

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(instances):
        word, length = int(rng.integers(len(SPECIALS), len(VOCAB))), int(rng.integers(10, 30))
        ids = [CLS] + [word] * length + [SEP]
        positions = sorted(rng.choice(np.arange(1, length + 1), size=max(1, round(0.15 * len(ids))),
                                      replace=False).tolist())
        for p in positions:
            ids[p] = MASK
        rows.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "masked_positions": positions,
                     "masked_ids": [word] * len(positions), "label": -1})
    store = ArtifactStore()
    with store.create("tokenizer", f"{name}-tok") as writer:
        write_tokenizer(writer.dir)
        tok = writer.commit(manifest={"vocab_size": len(VOCAB), "lowercase": True})
    tokenizer = {"id": tok.id, "name": tok.name, "fingerprint": tok.fingerprint, "path": tok.path}
    with store.create("pretraining-data", name) as writer:
        manifest = write_pretraining_data(writer.dir, rows, tokenizer=tokenizer, objective="none")
        data = writer.commit(manifest=manifest)
    return {"id": data.id, "name": data.name, "fingerprint": data.fingerprint, "path": data.path,
            "manifest": data.manifest}


# --- ELECTRA: replaced-token detection ---------------------------------------------------------


def test_electra_configs_make_a_smaller_generator_and_refuse_a_larger_one():
    from bertflow.errors import BertflowError
    from tasks.bert_model import bert_config
    from tasks.electra_model import electra_configs

    discriminator, generator = electra_configs(bert_config("mini", vocab_size=100))
    assert (discriminator.hidden_size, generator.hidden_size) == (256, 64)
    assert (discriminator.num_attention_heads, generator.num_attention_heads) == (4, 1)
    assert generator.num_hidden_layers == discriminator.num_hidden_layers == 4
    assert generator.embedding_size == discriminator.hidden_size  # shared embeddings, projected down
    with pytest.raises(BertflowError, match="larger than the discriminator"):
        electra_configs(bert_config("mini", vocab_size=100), generator_size=1.5)


def test_electra_shares_embeddings_and_corrupts_only_masked_positions():
    from tasks.bert_model import bert_config
    from tasks.electra_model import ElectraPretrainingModel, electra_configs

    torch.manual_seed(0)
    model = ElectraPretrainingModel(*electra_configs(bert_config("tiny", vocab_size=40))).eval()
    assert model.generator.electra.embeddings is model.discriminator.electra.embeddings
    assert model.generator.generator_lm_head.weight is model.discriminator.electra.embeddings.word_embeddings.weight
    input_ids = torch.randint(5, 40, (3, 12))
    positions = torch.tensor([[1, 4, 0], [2, 3, 7], [5, 0, 0]])
    labels = torch.tensor([[9, 10, -100], [11, 12, 13], [14, -100, -100]])
    out = model(input_ids=input_ids, attention_mask=None, token_type_ids=torch.zeros_like(input_ids),
                mlm_positions=positions, mlm_labels=labels)
    assert int(out["mlm_count"]) == 6 and int(out["rtd_count"]) == 36
    assert 0 <= int(out["rtd_replaced"]) <= 6  # only a masked position can be replaced
    assert torch.isclose(out["loss"], out["mlm_loss"] + 50 * out["rtd_loss"])


def test_electra_learns_detection_the_generator_improves_and_the_export_loads(home: Path, tmp_path: Path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    data = register_repeated_word_data()
    result = train_once(data, name="electra", objective="electra", steps=300, batch_size=16, lr=2e-3, warmup=5, dropout=0.0,
                        eval_every=100, save_every=1000, eval_instances=20)
    first, last = result.evals[0], result.evals[-1]
    assert last["mlm_loss"] < first["mlm_loss"]  # the generator learns the masked LM
    # The discriminator beats calling every token original (what it predicts on the plateau).
    assert last["rtd_accuracy"] > last["rtd_baseline"] + 0.01, last
    assert type(result.model).__name__ == "ElectraForPreTraining"
    result.model.save_pretrained(tmp_path / "export")
    encoder = AutoModel.from_pretrained(tmp_path / "export")
    assert type(encoder).__name__ == "ElectraModel"
    head = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", num_labels=2)
    reloaded = dict(head.electra.named_parameters())
    for name, weight in result.model.electra.named_parameters():
        assert torch.equal(reloaded[name], weight), name


def test_electra_resumes_exactly_after_an_interruption(home: Path):
    data = register_pretraining_data(objective="sop")  # sentence labels are present, and not used
    reference = train_once(data, name="straight", objective="electra")
    with pytest.raises(KeyboardInterrupt):
        train_once(data, callbacks=[CrashAt(6)], name="crashy", objective="electra")
    resumed = train_once(data, name="crashy", objective="electra")
    assert resumed.resumed_from == 4
    assert [h["loss"] for h in resumed.history if h["kind"] == "train"] == \
        [h["loss"] for h in reference.history if h["kind"] == "train"]
    assert [e["rtd_accuracy"] for e in resumed.evals] == [e["rtd_accuracy"] for e in reference.evals]
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_fields_added_later_leave_earlier_cache_keys_alone():
    from tasks.pretrain_config import PretrainConfig

    plain = PretrainConfig(name="m").model_dump(mode="json")
    assert "objective" not in plain and "generator_size" not in plain
    assert PretrainConfig(name="m", objective="electra").model_dump(mode="json")["objective"] == "electra"


def _electra_export(root: Path) -> None:
    from transformers import BertConfig, ElectraForPreTraining

    from tasks.electra_model import electra_configs

    ElectraForPreTraining(electra_configs(BertConfig.from_pretrained(root))[0]).save_pretrained(root)


def _albert_export(root: Path) -> None:
    from transformers import BertConfig

    from tasks.albert_model import albert_config, new_albert_model

    config = albert_config(BertConfig.from_pretrained(root), embedding_size=16, share_layers="all")
    new_albert_model(config, nsp_head=True, share_layers="all").save_pretrained(root)


@pytest.mark.parametrize("family, write_export", [("electra", _electra_export), ("albert", _albert_export)])
def test_an_export_of_another_family_fine_tunes_with_our_stage(flow_home: Path, tmp_path: Path, family: str,
                                                               write_export):
    import json

    from storage.artifacts import ArtifactStore
    from tests.conftest import run_cli
    from tests.test_finetune import SENTIMENT, write_tiny_bert, write_tsv

    root = write_tiny_bert(tmp_path / family)
    (root / "model.safetensors").unlink()
    torch.manual_seed(0)
    write_export(root)
    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    assert run_cli("finetune", "--model", str(root), "--task-type", "classification", "--train", str(train),
                   "--dev", str(train), "--name", f"{family}-sent", "--epochs", "30", "--batch-size", "4",
                   "--lr", "1e-2", "--warmup-ratio", "0", "--eval-every", "20") == 0
    artifact = ArtifactStore().resolve(f"{family}-sent", kind="finetune")
    assert json.loads((Path(artifact.path) / "config.json").read_text())["model_type"] == family
    assert json.loads((Path(artifact.path) / "metrics.json").read_text())["dev"]["accuracy"] == 1.0


@pytest.mark.parametrize("family, write_export", [("electra", _electra_export), ("albert", _albert_export)])
def test_the_random_init_baseline_keeps_the_family_and_shape(tmp_path: Path, family: str, write_export):
    from transformers import AutoModel

    from tasks.baseline import initialise_like
    from tests.test_finetune import write_tiny_bert

    root = write_tiny_bert(tmp_path / family)
    (root / "model.safetensors").unlink()
    torch.manual_seed(0)
    write_export(root)
    pretrained = AutoModel.from_pretrained(root)
    fresh = initialise_like(str(root), seed=1)
    assert fresh.config.model_type == family and fresh.config.architectures == [type(fresh).__name__]
    assert sum(p.numel() for p in fresh.base_model.parameters()) == sum(p.numel() for p in pretrained.parameters())
    assert not torch.equal(fresh.base_model.embeddings.word_embeddings.weight,
                           pretrained.embeddings.word_embeddings.weight)
