"""`bertflow params`: the per-part formula equals the instantiated model, for every size."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("preset", ["tiny", "mini"])
@pytest.mark.parametrize("nsp_head", [True, False])
def test_breakdown_sums_to_the_instantiated_model(preset: str, nsp_head: bool):
    from tasks.bert_model import bert_config, count_parameters, new_hf_model, params_breakdown

    config = bert_config(preset, vocab_size=30522 if preset == "mini" else 21128)
    lines = params_breakdown(config, nsp_head=nsp_head)
    assert sum(line.count for line in lines) == count_parameters(new_hf_model(config, nsp_head=nsp_head))


def test_bert_base_has_the_published_110m_parameters():
    from tasks.bert_model import bert_config, params_breakdown

    lines = params_breakdown(bert_config("base", vocab_size=30522))
    by_part = {line.part: line.count for line in lines}
    assert by_part["attention (4H²+4H)"] == 12 * (4 * 768 ** 2 + 4 * 768)
    assert by_part["feed-forward (2HI+I+H)"] == 12 * (8 * 768 ** 2 + 5 * 768)
    assert sum(by_part.values()) == 110_106_428


def test_params_cli_prints_the_breakdown_for_a_preset_and_a_config_file(home: Path, tmp_path: Path):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run_cli("params", "mini") == 0
    out = buffer.getvalue()
    assert "token (V·H)" in out and "7,813,632" in out and "11,267,900" in out and "matches" in out

    config = tmp_path / "bert_config.json"  # Google's style: no model_type, FFN not 4H
    config.write_text(json.dumps({"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3,
                                  "intermediate_size": 200, "vocab_size": 1000, "type_vocab_size": 2,
                                  "max_position_embeddings": 64}))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run_cli("params", str(config), "--no-nsp") == 0
    assert "matches" in buffer.getvalue()


def test_params_rejects_unknown_models_and_non_bert_configs(home: Path, tmp_path: Path, capsys):
    assert run_cli("params", "humongous") == 1
    assert "is not a model artifact" in capsys.readouterr().err
    gpt = tmp_path / "config.json"
    gpt.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    assert run_cli("params", str(gpt)) == 1
    assert "not a BERT config" in capsys.readouterr().err
