"""ALBERT's parameter reductions and SpanBERT's span-boundary objective, on the masked-LM objective."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.test_objectives import register_repeated_word_data
from tests.test_pretrain import VOCAB, CrashAt, register_pretraining_data, train_once

SHARE_MODES = ["none", "attention", "ffn", "all"]


def tiny_albert(share: str | None, embedding_size: int | None = 32, *, nsp_head: bool = True):
    from tasks.albert_model import albert_config, new_albert_model
    from tasks.bert_model import bert_config

    config = albert_config(bert_config("tiny", vocab_size=len(VOCAB)), embedding_size=embedding_size,
                           share_layers=share)
    return config, new_albert_model(config, nsp_head=nsp_head, share_layers=share)


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, len(VOCAB), (3, 12), generator=g)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[2, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids),
            "mlm_positions": torch.tensor([[1, 2, 0], [3, 4, 7], [5, 0, 0]]),
            "mlm_labels": torch.tensor([[6, 7, -100], [8, 9, 10], [11, -100, -100]]),
            "next_sentence_label": torch.tensor([0, 1, 0])}


# --- ALBERT: factorised embeddings, cross-layer sharing -----------------------------------------

@pytest.mark.parametrize("share", SHARE_MODES)
@pytest.mark.parametrize("embedding_size", [None, 32])
@pytest.mark.parametrize("nsp_head", [True, False])
def test_albert_breakdown_sums_to_the_instantiated_model(share: str, embedding_size: int | None, nsp_head: bool):
    from tasks.albert_model import albert_params_breakdown
    from tasks.bert_model import count_parameters

    config, model = tiny_albert(share, embedding_size, nsp_head=nsp_head)
    lines = albert_params_breakdown(config, nsp_head=nsp_head, share_layers=share)
    assert sum(line.count for line in lines) == count_parameters(model)
    assert type(model).__name__ == ("AlbertForPreTraining" if nsp_head else "AlbertForMaskedLM")
    assert config.num_hidden_groups == (1 if share == "all" else config.num_hidden_layers)


def test_partial_sharing_ties_the_blocks_of_every_layer_to_the_first():
    _, model = tiny_albert("attention")
    first, second = (group.albert_layers[0] for group in model.albert.encoder.albert_layer_groups)
    assert first.attention is second.attention and first.ffn is not second.ffn
    _, model = tiny_albert("ffn")
    first, second = (group.albert_layers[0] for group in model.albert.encoder.albert_layer_groups)
    assert first.ffn is second.ffn and first.ffn_output is second.ffn_output
    assert first.full_layer_layer_norm is second.full_layer_layer_norm and first.attention is not second.attention


def test_albert_base_has_the_published_12m_parameters():
    """ALBERT-base (E=128, all shared): Hugging Face's albert-base-v2 encoder holds 11,683,584."""
    from tasks.albert_model import albert_config, albert_params_breakdown
    from tasks.bert_model import bert_config

    config = albert_config(bert_config("base", vocab_size=30000), embedding_size=128, share_layers="all")
    lines = albert_params_breakdown(config, share_layers="all")
    assert sum(line.count for line in lines if line.group not in ("MLM head", "SOP/NSP head")) == 11_683_584


@pytest.mark.parametrize("share", ["attention", "ffn", "all"])
def test_albert_export_loads_with_transformers_and_computes_what_was_trained(share: str, tmp_path: Path):
    from transformers import AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

    from tasks.bert_model import MaskedGatherPretrainingModel

    torch.manual_seed(0)
    model = MaskedGatherPretrainingModel(tiny_albert(share)[1], share_layers=share)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for seed in range(2):  # the shared blocks move away from their initial values
        model(**random_batch(seed))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    exported = model.export()
    exported.save_pretrained(tmp_path / "export")
    if share != "all":  # the export owns a copy per layer; the training model stays tied
        from tasks.albert_model import SHARED_SUBMODULES

        block = SHARED_SUBMODULES[share][0]
        trained_layers = [g.albert_layers[0] for g in model.hf.albert.encoder.albert_layer_groups]
        exported_layers = [g.albert_layers[0] for g in exported.albert.encoder.albert_layer_groups]
        assert getattr(trained_layers[0], block) is getattr(trained_layers[1], block)
        assert getattr(exported_layers[0], block) is not getattr(exported_layers[1], block)

    batch = random_batch(5)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        trained = model.hf.albert(**inputs).last_hidden_state
        encoder = AutoModel.from_pretrained(tmp_path / "export").eval()
        assert type(encoder).__name__ == "AlbertModel"
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, trained)
        full = AutoModelForPreTraining.from_pretrained(tmp_path / "export").eval()
        torch.testing.assert_close(full(**inputs).prediction_logits, model.hf(**inputs).prediction_logits)
    head = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", num_labels=2)
    reloaded = dict(head.albert.named_parameters())
    for name, weight in exported.albert.named_parameters():
        assert torch.equal(reloaded[name], weight), name


def test_an_albert_run_exports_an_albert_with_its_architecture(home: Path):
    from transformers import AutoModel, AutoTokenizer

    from tasks.pretrain import run_pretrain
    from tasks.pretrain_config import PretrainConfig

    data = register_pretraining_data(objective="sop")
    config = PretrainConfig(name="albert", model="tiny", steps=2, batch_size=8, eval_instances=8, precision="fp32",
                            embedding_size=32, share_layers="all")
    manifest = run_pretrain(config, data)
    from storage.artifacts import ArtifactStore

    artifact = ArtifactStore().resolve("albert", kind="model")
    assert artifact.manifest["architecture"] == "AlbertForPreTraining"
    saved = json.loads((Path(manifest["path"]) / "config.json").read_text())
    assert saved["model_type"] == "albert" and saved["architectures"] == ["AlbertForPreTraining"]
    assert (saved["embedding_size"], saved["num_hidden_groups"]) == (32, 1)
    assert type(AutoModel.from_pretrained(manifest["path"])).__name__ == "AlbertModel"
    assert AutoTokenizer.from_pretrained(manifest["path"]).mask_token == "[MASK]"
    assert "nsp_loss" in manifest["stats"]["heldout"]  # the SOP head trains on the data's labels


def test_albert_all_resumes_exactly_after_an_interruption(home: Path):
    data = register_pretraining_data()
    options = dict(embedding_size=32, share_layers="all")
    reference = train_once(data, name="straight", **options)
    with pytest.raises(KeyboardInterrupt):
        train_once(data, callbacks=[CrashAt(6)], name="crashy", **options)
    resumed = train_once(data, name="crashy", **options)
    assert resumed.resumed_from == 4
    assert [h["loss"] for h in resumed.history if h["kind"] == "train"] == \
        [h["loss"] for h in reference.history if h["kind"] == "train"]
    assert [e["mlm_accuracy"] for e in resumed.evals] == [e["mlm_accuracy"] for e in reference.evals]
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_albert_settings_fail_before_training(home: Path):
    from bertflow.errors import BertflowError
    from tasks.pretrain import prepare_run
    from tasks.pretrain_config import PretrainConfig

    data = register_pretraining_data()
    with pytest.raises(BertflowError, match="--embedding-size 200 is larger than the hidden size 128"):
        prepare_run(PretrainConfig(name="m", model="tiny", embedding_size=200), data)
    with pytest.raises(BertflowError, match="--share-layers apply to --objective mlm, not electra"):
        prepare_run(PretrainConfig(name="m", model="tiny", objective="electra", share_layers="all"), data)
    with pytest.raises(BertflowError, match="--span-boundary apply to --objective mlm"):
        prepare_run(PretrainConfig(name="m", model="tiny", objective="electra", span_boundary=True), data)


def test_params_cli_shows_an_alberts_saving(home: Path, capsys):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run_cli("params", "mini", "--embedding-size", "128", "--share-layers", "all") == 0
    out = buffer.getvalue()
    assert "token (V·E)" in out and "3,906,816" in out and "× 1" in out and "matches" in out
    assert "BERT of the same shape" in out and "11,267,900" in out and "6,342,272" in out
    assert run_cli("params", "tiny", "--embedding-size", "300") == 1
    assert "--embedding-size 300 is larger than the hidden size 128" in capsys.readouterr().err


def test_later_fields_stay_out_of_the_dump_at_their_defaults():
    from tasks.pretrain_config import PretrainConfig

    plain = PretrainConfig(name="m").model_dump(mode="json")
    assert not {"embedding_size", "share_layers", "span_boundary"} & set(plain)
    assert not PretrainConfig(name="m").albert
    changed = PretrainConfig(name="m", share_layers="none", span_boundary=True).model_dump(mode="json")
    assert (changed["share_layers"], changed["span_boundary"]) == ("none", True)


# --- SpanBERT: the span-boundary objective ------------------------------------------------------

def test_spans_are_runs_of_masked_positions_with_their_boundaries():
    from tasks.span_boundary import span_boundaries

    # [CLS] a [M] [M] b [M] [M] [M] [SEP]: two spans; [CLS] [M] [M] [SEP] [PAD]: the span between
    # the special tokens; [M] a [M]: spans at both edges take the edge token as their boundary.
    masked = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 0],
                           [0, 1, 1, 0, 0, 0, 0, 0, 0],
                           [1, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    lengths = torch.tensor([9, 4, 3])
    left, right, place = span_boundaries(masked, lengths)
    at = masked
    assert left[0][at[0]].tolist() == [1, 1, 4, 4, 4] and right[0][at[0]].tolist() == [4, 4, 8, 8, 8]
    assert place[0][at[0]].tolist() == [0, 1, 0, 1, 2]
    assert left[1][at[1]].tolist() == [0, 0] and right[1][at[1]].tolist() == [3, 3]  # [CLS] and [SEP]
    assert left[2][at[2]].tolist() == [0, 1] and right[2][at[2]].tolist() == [1, 2]  # clamped to the edges
    assert place[2][at[2]].tolist() == [0, 0]
    # Adjacent spans are one run: positions 2-4 masked in one draw or two give one span.
    left, right, place = span_boundaries(torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool), torch.tensor([6]))
    assert (left[0, 2:5].tolist(), right[0, 2:5].tolist(), place[0, 2:5].tolist()) == ([1] * 3, [5] * 3, [0, 1, 2])


def test_span_boundary_adds_its_loss_and_is_not_exported():
    from tasks.bert_model import MaskedGatherPretrainingModel, bert_config, new_hf_model

    torch.manual_seed(0)
    model = MaskedGatherPretrainingModel(new_hf_model(bert_config("tiny", vocab_size=len(VOCAB)), nsp_head=True),
                                         span_boundary=True).eval()
    out = model(**random_batch())
    assert int(out["sbo_count"]) == int(out["mlm_count"]) == 6 and 0 <= int(out["sbo_correct"]) <= 6
    torch.testing.assert_close(out["loss"], out["mlm_loss"] + out["sbo_loss"] + out["nsp_loss"])
    assert model.loss_weights == {"mlm": 1.0, "nsp": 1.0, "sbo": 1.0}
    assert any(name.startswith("sbo.") for name in model.state_dict())
    exported = model.export()
    assert type(exported).__name__ == "BertForPreTraining"
    assert not any("sbo" in name for name in exported.state_dict())
    # With ALBERT, the head feeds the E-wide decoder.
    albert = MaskedGatherPretrainingModel(tiny_albert("all")[1], span_boundary=True, share_layers="all").eval()
    assert albert.sbo.dense2.out_features == 32 and torch.isfinite(albert(**random_batch())["sbo_loss"])


def test_span_boundary_learns_on_repeated_words(home: Path):
    """Every token of an instance is one word: the boundary tokens say which word was masked."""
    data = register_repeated_word_data()
    result = train_once(data, name="sbo", span_boundary=True, steps=20, batch_size=16, lr=2e-3, warmup=5,
                        dropout=0.0, eval_every=5, save_every=1000, eval_instances=20)
    first, last = result.evals[0], result.evals[-1]
    assert last["sbo_loss"] < first["sbo_loss"]
    assert last["sbo_accuracy"] > max(0.9, first["sbo_accuracy"] + 0.2), result.evals
    assert type(result.model).__name__ == "BertForMaskedLM"


def test_span_boundary_resumes_exactly_after_an_interruption(home: Path):
    data = register_pretraining_data()
    reference = train_once(data, name="straight", span_boundary=True)
    from storage.checkpoints import RunCheckpoints, pretrain_run_dir

    checkpoint = RunCheckpoints(pretrain_run_dir("straight")).load_latest(on_damaged=print)
    assert any(name.startswith("sbo.") for name in checkpoint["model"])  # the head resumes too
    with pytest.raises(KeyboardInterrupt):
        train_once(data, callbacks=[CrashAt(6)], name="crashy", span_boundary=True)
    resumed = train_once(data, name="crashy", span_boundary=True)
    assert resumed.resumed_from == 4
    assert [h["loss"] for h in resumed.history if h["kind"] == "train"] == \
        [h["loss"] for h in reference.history if h["kind"] == "train"]
    assert [e["sbo_accuracy"] for e in resumed.evals] == [e["sbo_accuracy"] for e in reference.evals]
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
