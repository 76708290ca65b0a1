"""The Prefect UI as a user sees it, in a real browser: runs a tiny pipeline in a fresh data home
(its background server records the runs), then takes headless-Chromium screenshots of the Runs
page and of each stage's summary and loss-curve artifacts.

    .venv/bin/python benchmarks/ui_check.py [--out ui-shots] [--chromium chromium]

Needs a Chromium (Debian: `apt-get install chromium`). It prints each page it captured with the
PNG's size; a page whose API calls fail ("Can't connect to Server API") or an image that does not
render shows in the screenshot, so look at them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bertflow(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "bertflow.cli", *argv], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"bertflow {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def api(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def screenshot(chromium: str, url: str, out: Path) -> int:
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                   capture_output=True, timeout=120)
    return out.stat().st_size if out.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ui-shots", help="folder for the screenshots (default ui-shots)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args()
    if not shutil.which(args.chromium):
        raise SystemExit(f"error: no Chromium at {args.chromium!r}; install it (apt-get install chromium) or pass --chromium")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    scratch = Path(tempfile.mkdtemp(prefix="ui-check-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(BERTFLOW_HOME=str(scratch / "home"), OMP_NUM_THREADS="1")
    try:
        corpus = scratch / "corpus.txt"
        corpus.write_text("".join(f"Document {i} opens with a sentence about topic {i % 13}. It goes on with a"
                                  f" second one, and a third that mentions {i % 7}.\n\n" for i in range(400)))
        bertflow(env, "ingest", str(corpus), "--name", "ui")
        bertflow(env, "tokenizer", "--corpus", "ui", "--name", "ui-tok", "--vocab-size", "300")
        bertflow(env, "pretraining-data", "--corpus", "ui", "--tokenizer", "ui-tok", "--name", "ui-data",
                 "--max-seq-len", "32")
        bertflow(env, "pretrain", "--data", "ui-data", "--name", "ui-bert", "--model", "tiny", "--steps", "40",
                 "--batch-size", "16", "--eval-every", "20", "--eval-instances", "32")
        status = bertflow(env, "server", "status")
        ui = next(line.split()[-1] for line in status.splitlines() if line.strip().startswith("UI:"))
        pages = {"runs": f"{ui}/runs"}
        for artifact in api(f"{ui}/api", "/artifacts/filter", {}):
            if artifact["type"] == "markdown":
                pages[artifact["key"]] = f"{ui}/artifacts/artifact/{artifact['id']}"
        for name, url in pages.items():
            size = screenshot(args.chromium, url, out / f"{name}.png")
            print(f"{name:<28} {size:>9,} bytes  {out / (name + '.png')}  ({url})")
        bertflow(env, "server", "stop")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
