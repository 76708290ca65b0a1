"""The run summary's task: the artifacts and metrics table of a pipeline run, saved for
`bertflow report` and shown in the Prefect UI as a table and a markdown artifact."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks import report


@task(name="summarise-run", task_run_name="summarise-run[{run}]")
def publish_run_summary(run: str, stage_manifests: list[dict[str, Any]], finetunes: list[dict[str, Any]],
                        distilled: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary (saved for `bertflow report`), also as Prefect table + markdown artifacts."""
    summary = report.run_summary(run, stage_manifests, finetunes, distilled)
    key = "".join(ch if ch.isalnum() else "-" for ch in run.lower())
    if summary["metrics"]:
        create_table_artifact(key=f"{key}-metrics", table=summary["metrics"],
                              description=f"run {run}: fine-tuning metrics, pretrained vs random initialisation")
    create_markdown_artifact(key=f"{key}-artifacts", markdown=report.artifacts_markdown(summary),
                             description=f"run {run}: artifacts")
    return summary
