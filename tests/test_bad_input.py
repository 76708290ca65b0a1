"""Bad input: one stderr line naming the file or field and the fix, exit 1, nothing registered and
nothing left in the data home's scratch or artifact folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from storage.artifacts import ArtifactStore
from tests.conftest import run_cli

TEXT = "A first sentence of the document. And a second one, so that it passes the filters.\n"


def _model_dir(root: Path) -> Path:
    from tests.test_finetune import write_tiny_bert

    return write_tiny_bert(root / "model")


def dangling_symlink(root: Path) -> tuple[list[str], str]:
    src = root / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT)
    (src / "gone.txt").symlink_to(root / "nowhere.txt")
    return ["ingest", str(src), "--name", "c"], f"{src / 'gone.txt'}: a broken symbolic link"


def unreadable_file(root: Path) -> tuple[list[str], str]:
    path = root / "secret.txt"
    path.write_text(TEXT)
    path.chmod(0)
    return ["ingest", str(path), "--name", "c"], f"{path}: permission denied"


def not_really_zstd(root: Path) -> tuple[list[str], str]:
    path = root / "text.txt.zst"
    path.write_text(TEXT)
    return ["ingest", str(path), "--name", "c"], f"{path}: cannot decompress"


def unterminated_csv_quote(root: Path) -> tuple[list[str], str]:
    path = root / "docs.csv"
    path.write_text('text,label\n"a first row whose quote never closes,1\na second row,0\na third row,1\n')
    return ["ingest", str(path), "--name", "c"], f"{path}:2: a quoted field opened in this row is never closed"


def one_huge_line(root: Path) -> tuple[list[str], str]:
    path = root / "one-line.txt"
    path.write_text("word " * 500_000)
    return (["ingest", str(path), "--name", "c", "--max-chars", "100000"],
            "most removed by 'too_long'); raise --max-chars")


def config_not_json(root: Path) -> tuple[list[str], str]:
    model = _model_dir(root)
    (model / "config.json").write_text("{not json")
    return (["finetune", "--model", str(model), "--task-type", "classification", "--train", str(_tsv(root)),
             "--dev", str(_tsv(root)), "--name", "f"], f"{model / 'config.json'}: not valid JSON")


def weights_truncated(root: Path) -> tuple[list[str], str]:
    model = _model_dir(root)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])
    return (["finetune", "--model", str(model), "--task-type", "classification", "--train", str(_tsv(root)),
             "--dev", str(_tsv(root)), "--name", "f"], f"{weights}: the weights do not load")


def weights_garbage_for_fill_mask(root: Path) -> tuple[list[str], str]:
    model = _model_dir(root)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    return ["fill-mask", str(model), "a [MASK] b"], f"{model / 'model.safetensors'}: the weights do not load"


def electra_generator_too_large(root: Path) -> tuple[list[str], str]:
    return (["pretrain", "--data", "d", "--name", "m", "--objective", "electra", "--generator-size", "2"],
            "invalid value for 'generator_size': Value error, the generator must not be larger than the discriminator")


def _tsv(root: Path) -> Path:
    path = root / "task.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    return path


CASES: dict[str, Callable[[Path], tuple[list[str], str]]] = {
    f.__name__: f for f in (dangling_symlink, unreadable_file, not_really_zstd, unterminated_csv_quote, one_huge_line,
                            config_not_json, weights_truncated, weights_garbage_for_fill_mask,
                            electra_generator_too_large)
}


# Bad input that root never meets (it reads every file): as root, these run in a child without
# that power (_run_unprivileged).
UNPRIVILEGED = {"unreadable_file"}

# Run in a fresh interpreter (no threads yet), then exec'd as the CLI: drop CAP_DAC_OVERRIDE (1)
# and CAP_DAC_READ_SEARCH (2) from the capability bounding set with prctl(PR_CAPBSET_DROP = 24).
# Root's exec then grants neither, and the kernel checks file modes for it as for any user.
_DROP_FILE_POWERS_THEN_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):
    if libc.prctl(24, capability, 0, 0, 0) != 0:
        sys.exit(f"cannot drop capability {capability}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, "-m", "bertflow.cli", *sys.argv[1:]])
"""


def _run_unprivileged(argv: list[str]) -> tuple[int, str]:
    from prefect.settings import PREFECT_API_URL

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _DROP_FILE_POWERS_THEN_EXEC, *argv], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    if done.stderr.startswith("cannot drop capability"):
        pytest.skip(f"root reads every file, and here {done.stderr.strip()}")
    return done.returncode, done.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(flow_home: Path, tmp_path: Path, capsys, case: str):
    argv, expected = CASES[case](tmp_path)
    capsys.readouterr()
    if case in UNPRIVILEGED and os.geteuid() == 0:
        code, err = _run_unprivileged(argv)
    else:
        code, err = run_cli(*argv), capsys.readouterr().err
    assert code == 1, err[-3000:]
    # Prefect's INFO lines about the flow run itself are not errors (they go with -q, issue 20).
    err = [line for line in err.strip().splitlines() if " | INFO    | " not in line]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    store = ArtifactStore()
    assert store.catalog.list(all_versions=True) == []
    assert not list(store.home.scratch_dir.iterdir())
    artifacts = flow_home / "artifacts"
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
    shutil.rmtree(tmp_path / "src", ignore_errors=True)
