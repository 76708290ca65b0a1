"""Run summaries: the metrics table printed after `bertflow run`, the artifact list shown in the
Prefect UI, and the self-contained HTML report of `bertflow report` (plots embedded as PNG data
URIs)."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from tasks.finetune_baselines import warning_line

# Metrics shown first in the comparison table, per task type (whichever the run reported).
HEADLINE = ("accuracy", "f1", "macro_f1", "micro_f1", "exact_match", "precision", "recall")


def _number(values: dict[str, Any], key: str) -> float | None:
    return float(values[key]) if isinstance(values.get(key), (int, float)) else None


def comparison_rows(finetunes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, split, metric): the trivial baseline (a predictor that reads no text),
    pretrained vs random initialisation, and the gain."""
    rows = []
    for entry in finetunes:
        pretrained = entry["pretrained"]["stats"]
        random_init = entry["random_init"]["stats"] if entry.get("random_init") else None
        for split in ("dev", "test"):
            ours = pretrained.get(split) or {}
            theirs = (random_init or {}).get(split) or {}
            trivial = (pretrained.get("baselines") or {}).get(split) or {}
            for metric in [m for m in HEADLINE if isinstance(ours.get(m), (int, float))]:
                value, base, floor = _number(ours, metric), _number(theirs, metric), _number(trivial, metric)
                rows.append({"task": entry["task"], "split": split, "metric": metric,
                             "baseline": None if floor is None else round(floor, 4),
                             "pretrained": round(value, 4),
                             "random_init": None if base is None else round(base, 4),
                             "gain": None if base is None else round(value - base, 4)})
    return rows


def _cell(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no fine-tuning tasks)"
    header = (f"{'task':<16} {'split':<5} {'metric':<12} {'baseline':>8} {'pretrained':>10} {'random init':>11}"
              f" {'gain':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['task']:<16} {r['split']:<5} {r['metric']:<12} {_cell(r.get('baseline')):>8}"
                     f" {r['pretrained']:>10.4f} {_cell(r['random_init']):>11} {_cell(r['gain'], '+.4f'):>8}")
    return "\n".join(lines)


def run_remarks(finetunes: list[dict[str, Any]]) -> list[str]:
    """What the metrics table cannot show: runs that do not beat their trivial baseline or cannot
    read their text, dev or test splits evaluated only in part. One line each."""
    remarks = []
    for entry in finetunes:
        for side in ("pretrained", "random_init"):
            if not entry.get(side):
                continue
            stats = entry[side]["stats"]
            remarks += [warning_line(entry[side]["name"], warning) for warning in stats.get("warnings", [])]
            remarks += [f"note: run {entry[side]['name']}: {split} is only its first {stats[f'{split}_max_examples']:,}"
                        f" examples (--max-{split}-examples)" for split in ("dev", "test")
                        if stats.get(f"{split}_max_examples")]
    return remarks


def run_summary(run: str, stage_manifests: list[dict[str, Any]], finetunes: list[dict[str, Any]],
                distilled: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's artifacts and metrics table (saved for `bertflow report`); returned. A distilled
    student adds its artifact and its report (`distill`: teacher and student side by side)."""
    from storage.reports import save_run_summary

    rows = comparison_rows(finetunes)
    produced = [*stage_manifests, *[f[k] for f in finetunes for k in ("pretrained", "random_init") if f.get(k)]]
    artifacts = [{"kind": m["kind"], "name": m["name"], "fingerprint": m["fingerprint"], "path": m["path"]}
                 for m in [*produced, *([distilled] if distilled else [])]]
    summary = {"run": run, "artifacts": artifacts, "metrics": rows, "remarks": run_remarks(finetunes),
               "stages": {m["kind"]: m.get("stats", {}) for m in stage_manifests}}
    if distilled:
        summary["distill"] = distilled["stats"]["distillation"]
    save_run_summary(run, summary)
    return summary


def artifacts_markdown(summary: dict[str, Any]) -> str:
    """The run's artifacts as a Markdown table (a Prefect artifact in the UI)."""
    lines = [f"### run `{summary['run']}`", "", "| kind | name | fingerprint |", "|---|---|---|"]
    lines += [f"| {a['kind']} | {a['name']} | {a['fingerprint']} |" for a in summary["artifacts"]]
    return "\n".join(lines)


# --- the HTML report ---------------------------------------------------------------------------

def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_figure(points: list[dict[str, Any]]) -> str | None:
    """Pretraining curves: training loss, held-out loss, MLM and NSP accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name: str, split: str) -> tuple[list, list]:
        xs = [p["step"] for p in points if p["name"] == name and p["split"] == split and p["step"] is not None]
        ys = [p["value"] for p in points if p["name"] == name and p["split"] == split and p["step"] is not None]
        return xs, ys

    train = series("loss", "train")
    heldout = series("loss", "heldout")
    mlm = series("mlm_accuracy", "heldout")
    nsp = series("nsp_accuracy", "heldout")
    if not (train[0] or heldout[0]):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    if train[0]:
        left.plot(*train, label="training loss", alpha=0.8)
    if heldout[0]:
        left.plot(*heldout, "o-", label="held-out loss")
    left.set_xlabel("step")
    left.set_ylabel("loss (MLM + NSP)")
    left.legend()
    left.grid(alpha=0.3)
    if mlm[0]:
        right.plot(*mlm, "o-", label="MLM accuracy")
    if nsp[0]:
        right.plot(*nsp, "s-", label="NSP accuracy")
    right.set_xlabel("step")
    right.set_ylabel("held-out accuracy")
    right.set_ylim(0, 1)
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle("Pretraining")
    return _png(fig)


def comparison_figure(rows: list[dict[str, Any]]) -> str | None:
    """Bars: each task's test (else dev) headline metric, pretrained vs random initialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def preference(row: dict) -> tuple[bool, int]:  # test over dev, then the earlier headline metric
        return row["split"] == "test", -HEADLINE.index(row["metric"])

    chosen: dict[str, dict] = {}
    for r in rows:
        if r["random_init"] is not None and (r["task"] not in chosen or preference(r) > preference(chosen[r["task"]])):
            chosen[r["task"]] = r
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(chosen), 3.8))
    names = list(chosen)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [chosen[n]["pretrained"] for n in names], width=0.4, label="pretrained")
    ax.bar([x + 0.2 for x in xs], [chosen[n]["random_init"] for n in names], width=0.4, label="random init")
    for x, n in zip(xs, names):
        ax.text(x - 0.2, chosen[n]["pretrained"] + 0.01, f"{chosen[n]['pretrained']:.3f}", ha="center", fontsize=8)
        ax.text(x + 0.2, chosen[n]["random_init"] + 0.01, f"{chosen[n]['random_init']:.3f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [f"{n}\n{chosen[n]['split']} {chosen[n]['metric']}" for n in names])
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Fine-tuning: pretrained vs random initialisation")
    return _png(fig)


def _value_text(value: Any) -> str | None:
    """A statistic as a reader wants it: numbers with separators and 4 significant digits, nested
    values as `key value` pairs, nothing for an absent one."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        parts = [(k, _value_text(v)) for k, v in value.items()]
        return ", ".join(f"{k} {v}" for k, v in parts if v is not None) or None
    if isinstance(value, (list, tuple)):
        parts = [_value_text(v) for v in value]
        return ", ".join(p for p in parts if p is not None) or None
    return str(value)


def _kv_table(data: dict[str, Any]) -> str:
    rows = []
    for key, value in data.items():
        text = _value_text(value)
        if text is None:
            continue  # an absent statistic (e.g. NSP figures of MLM-only data) is left out, not shown as None
        if len(text) > 400:
            text = text[:400] + " …"
        rows.append(f"<tr><th>{html.escape(str(key).replace('_', ' '))}</th><td>{html.escape(text)}</td></tr>")
    return "<table class='kv'>" + "".join(rows) + "</table>"


def finetune_curves_figure(runs: dict[str, list[dict[str, Any]]]) -> str | None:
    """Per task, the dev metric at each evaluation: the pretrained run next to its random-init twin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: dict[str, dict[str, tuple[str, list, list]]] = {}
    for name, points in runs.items():
        dev = [p for p in points if p["split"] == "dev" and p["step"] is not None]
        metric = next((m for m in HEADLINE if any(p["name"] == m for p in dev)), None)
        if metric is None:
            continue
        by_step = {p["step"]: p["value"] for p in dev if p["name"] == metric}  # the best, logged twice, once
        steps = sorted(by_step)
        base = name.removesuffix("-random-init")
        role = "random init" if name != base else "pretrained"
        tasks.setdefault(base, {})[role] = (metric, steps, [by_step[s] for s in steps])
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1, 3.4), squeeze=False)
    for ax, (base, roles) in zip(axes[0], tasks.items()):
        for role, (metric, steps, values) in sorted(roles.items()):
            ax.plot(steps, values, "o-", label=role)
            ax.set_ylabel(f"dev {metric}")
        ax.set_title(base)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Fine-tuning: dev metric per evaluation")
    fig.tight_layout()
    return _png(fig)


def render_report(run: str, summary: dict[str, Any], stages: dict[str, dict[str, Any]],
                  pretrain_points: list[dict[str, Any]],
                  finetune_points: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """A self-contained HTML page: per-stage statistics, pretraining and fine-tuning curves,
    metrics, comparison."""
    rows = summary.get("metrics", [])
    curves = curves_figure(pretrain_points)
    finetune_curves = finetune_curves_figure(finetune_points or {})
    bars = comparison_figure(rows)
    parts = [f"<h1>bertflow run <code>{html.escape(run)}</code></h1>"]
    if bars:
        parts.append(f"<img src='{bars}' alt='pretrained vs random initialisation'>")
    if rows:
        head = "".join(f"<th>{h}</th>" for h in ("task", "split", "metric", "trivial baseline", "pretrained",
                                                  "random init", "gain"))
        body = "".join(
            f"<tr><td>{html.escape(r['task'])}</td><td>{r['split']}</td><td>{r['metric']}</td>"
            f"<td>{_cell(r.get('baseline'))}</td><td>{r['pretrained']:.4f}</td><td>{_cell(r['random_init'])}</td>"
            f"<td>{_cell(r['gain'], '+.4f')}</td></tr>" for r in rows)
        remarks = "".join(f"<p class='remark'>{html.escape(line)}</p>" for line in summary.get("remarks", []))
        parts.append(f"<h2>Fine-tuning metrics</h2><table><tr>{head}</tr>{body}</table>"
                     "<p>Trivial baseline: what a predictor that reads no text scores (the majority training"
                     " label; every tag O; the first words of the context).</p>" + remarks)
    if finetune_curves:
        parts.append(f"<h2>Fine-tuning curves</h2><img src='{finetune_curves}' alt='fine-tuning curves'>")
    if curves:
        parts.append(f"<h2>Pretraining</h2><img src='{curves}' alt='pretraining curves'>")
    titles = {"corpus": "Corpus", "tokenizer": "Vocabulary", "pretraining-data": "Pretraining data",
              "model": "Model"}
    for kind, title in titles.items():
        stats = stages.get(kind)
        if stats:
            flat = {k: v for k, v in stats.items() if k not in ("per_source",)}
            parts.append(f"<h2>{title}</h2>{_kv_table(flat)}")
    artifacts = "".join(f"<tr><td>{a['kind']}</td><td>{html.escape(a['name'])}</td><td><code>{a['fingerprint']}</code>"
                        f"</td><td><code>{html.escape(a['path'])}</code></td></tr>" for a in summary.get("artifacts", []))
    parts.append(f"<h2>Artifacts</h2><table><tr><th>kind</th><th>name</th><th>fingerprint</th><th>path</th></tr>"
                 f"{artifacts}</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;font-size:14px}table.kv th{background:#f4f4f4}img{max-width:100%}"
             "p.remark{color:#8a4b00}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>bertflow {html.escape(run)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
