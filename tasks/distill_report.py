"""The distillation report as a table: teacher, student (and the random-init student) side by
side. Free of torch, so the pipeline's summary prints it without loading the stage."""

from __future__ import annotations

from typing import Any


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The side-by-side rows of a distillation report (both modes)."""
    if report["mode"] == "task":
        return report["rows"]
    return [{"model": role, "name": report[role]["name"], report["metric"]: report[role]["mlm_accuracy"],
             "parameters": report[role]["parameters"], "examples_per_s": report[role]["speed"]["examples_per_s"]}
            for role in ("teacher", "student")]


def format_report(report: dict[str, Any]) -> str:
    metric = report["metric"]
    rows = report_rows(report)
    teacher = rows[0]
    header = f"{'model':<12} {metric:>13} {'% of teacher':>12} {'parameters':>13} {'examples/s':>11} {'speed-up':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        value, base = row.get(metric), teacher.get(metric)
        kept = f"{100 * value / base:.1f}%" if value is not None and base else "-"
        speedup = f"{row['examples_per_s'] / teacher['examples_per_s']:.2f}x" if teacher["examples_per_s"] else "-"
        shown = "-" if value is None else f"{value:.4f}"
        lines.append(f"{row['model']:<12} {shown:>13} {kept:>12} {row['parameters']:>13,} {row['examples_per_s']:>11,.1f}"
                     f" {speedup:>9}")
    speed = report["speed"]["student"] if report["mode"] == "task" else report["student"]["speed"]
    lines.append(f"inference: {speed['examples']} examples of {speed['seq_len']} tokens, batch {speed['batch_size']},"
                 f" {speed['threads']} thread(s) on {speed['device']}, median of {len(speed['seconds'])} passes"
                 + ("" if report["mode"] == "task" else "; encoders without heads"))
    if report["mode"] == "general" and not report["kl_term"]:
        lines.append("note: the teacher has no masked-LM head, so the KL term was off (loss = MLM + cosine)")
    return "\n".join(lines)
