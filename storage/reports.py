"""Where run summaries and HTML reports live: `<state dir>/runs/pipeline/<run>/`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bertflow.errors import BertflowError
from storage.home import DataHome

SUMMARY_FILE = "summary.json"


def run_dir(run: str, home: DataHome | None = None) -> Path:
    return (home or DataHome.from_env()).state_dir / "runs" / "pipeline" / run


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_run_summary(run: str, summary: dict[str, Any], home: DataHome | None = None) -> Path:
    path = run_dir(run, home) / SUMMARY_FILE
    _atomic_write(path, json.dumps(summary, indent=2, ensure_ascii=False))
    return path


def load_run_summary(run: str | None = None, home: DataHome | None = None) -> tuple[str, dict[str, Any]]:
    """The named run's summary, or the most recent run's."""
    root = (home or DataHome.from_env()).state_dir / "runs" / "pipeline"
    if run is None:
        summaries = sorted(root.glob(f"*/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime)
        if not summaries:
            raise BertflowError(f"no pipeline run in {root.parent.parent}; run `bertflow run --config ...` first")
        path = summaries[-1]
        run = path.parent.name
    else:
        path = root / run / SUMMARY_FILE
        if not path.exists():
            known = ", ".join(sorted(p.parent.name for p in root.glob(f"*/{SUMMARY_FILE}"))) or "none"
            raise BertflowError(f"no pipeline run named '{run}' (known: {known})")
    return run, json.loads(path.read_text(encoding="utf-8"))


def write_report(run: str, page: str, output: str | None = None, home: DataHome | None = None) -> Path:
    path = Path(output) if output else run_dir(run, home) / "report.html"
    _atomic_write(path, page)
    return path
