"""The run summary's metrics table and HTML report: the trivial baseline beside each figure, and
the remarks (runs that learnt nothing, partial evaluations) under the table."""

from __future__ import annotations

from tasks.report import comparison_rows, format_table, render_report, run_remarks

WARNING = "the selected model does not beat the trivial baseline (always '1', ...): dev accuracy 0.5000 vs 0.5000"


def finetunes() -> list[dict]:
    baselines = {"dev": {"name": "majority", "label": "1", "accuracy": 0.5, "f1": 0.6667},
                 "test": {"name": "majority", "label": "1", "accuracy": 0.55, "f1": 0.7097}}
    pretrained = {"name": "t", "stats": {"dev": {"accuracy": 0.8, "f1": 0.81}, "test": {"accuracy": 0.75},
                                         "baselines": baselines, "warnings": [], "dev_max_examples": 100,
                                         "train_max_examples": 2000}}
    random_init = {"name": "t.random-init", "stats": {"dev": {"accuracy": 0.5, "f1": 0.6667},
                                                      "test": {"accuracy": 0.55}, "baselines": baselines,
                                                      "warnings": [WARNING], "dev_max_examples": 100}}
    return [{"task": "sentiment", "pretrained": pretrained, "random_init": random_init}]


def test_the_table_shows_the_trivial_baseline_beside_each_figure():
    rows = comparison_rows(finetunes())
    by_key = {(r["split"], r["metric"]): r for r in rows}
    assert by_key[("dev", "accuracy")]["baseline"] == 0.5 and by_key[("test", "accuracy")]["baseline"] == 0.55
    table = format_table(rows).splitlines()
    assert table[0].split() == ["task", "split", "metric", "baseline", "pretrained", "random", "init", "gain"]
    assert table[2].split() == ["sentiment", "dev", "accuracy", "0.5000", "0.8000", "0.5000", "+0.3000"]
    # a summary saved before baselines existed still prints
    old = [{k: v for k, v in r.items() if k != "baseline"} for r in rows]
    assert format_table(old).splitlines()[2].split()[3] == "-"


def test_remarks_name_the_runs_that_learnt_nothing_and_the_partial_evaluations():
    remarks = run_remarks(finetunes())
    assert remarks == [
        "note: run t: dev is only its first 100 examples (--max-dev-examples)",
        f"warning: run t.random-init: {WARNING}",
        "note: run t.random-init: dev is only its first 100 examples (--max-dev-examples)"]
    summary = {"metrics": comparison_rows(finetunes()), "remarks": remarks, "artifacts": []}
    page = render_report("r", summary, {}, [])
    assert "<th>trivial baseline</th>" in page and "<td>0.5000</td>" in page
    assert "does not beat the trivial baseline" in page


def test_report_cells_are_formatted_and_absent_statistics_left_out():
    from tasks.report import _kv_table

    table = _kv_table({"documents": 13493, "mb_per_second": 8.123456, "label_1_fraction": None,
                       "removed": {"too_short": {"documents": 379, "chars": 2101}}, "languages": ["en", "zh"]})
    assert "None" not in table and "{" not in table and "label 1 fraction" not in table
    assert "<td>13,493</td>" in table and "<td>8.123</td>" in table
    assert "<td>too_short documents 379, chars 2,101</td>" in table and "<td>en, zh</td>" in table


def test_fine_tuning_curves_pair_each_run_with_its_random_init_twin():
    from tasks.report import finetune_curves_figure

    def points(values):
        return [{"name": "f1", "split": "dev", "step": 10 * (i + 1), "value": v} for i, v in enumerate(values)]

    image = finetune_curves_figure({"demo-seg": points([0.5, 0.58]), "demo-seg-random-init": points([0.52, 0.55])})
    assert image is not None and image.startswith("data:image/png;base64,")
    assert finetune_curves_figure({"x": [{"name": "loss", "split": "train", "step": 1, "value": 1.0}]}) is None
