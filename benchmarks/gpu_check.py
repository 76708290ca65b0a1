"""GPU check (issue 22): one prepared script that verifies pretraining on a CUDA device and measures it.

Two parts. `prepare` runs HERE, on CPU, and writes the git-ignored folder `gpu-data/` that the
device call carries (the device machine reaches no network and has no ../shared):

    .venv/bin/python benchmarks/gpu_check.py prepare      # gpu-data/: home/ (catalog + pretraining
                                                          # data of an enwiki slice, Google's vocab),
                                                          # sst2/ (a slice), site.tar.xz (wheels)

`check` (the default) runs ON the device machine, from the repository root, in about 8 minutes:

  1. install: `make install` where PyPI answers; else (the lent machines: no network) the image's
     python3 and CUDA torch, plus the carried wheels of what bertflow needs beyond the image
     (gpu-data/site.tar.xz, unpacked to a --target folder). Then `pytest -m gpu`.
  2. benchmarks/pretrain_throughput.py for base and mini, seq 128, bf16: ours next to the plain
     `transformers` step, with MFU against the GPU's dense bf16 peak.
  3. a short `mini` pretraining on the carried data: killed with SIGKILL after its middle
     checkpoint, resumed by the same command, then an uninterrupted run of the same length under
     another name; final losses compared. SST-2 fine-tuned from the resumed model; fill-mask.
  4. everything printed goes to $OUT/gpu_check.log, the figures to $OUT/gpu_check.json.

`--dry-run` does the same on CPU at tiny sizes (a synthetic corpus and task built on the fly, a
tiny model, a few steps, fp32, no install, no GPU tests) in about a minute: tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CARRIED = ROOT / "gpu-data"
# The catalog records absolute paths, so the data home is built at, and restored to, this path.
HOME_AT = Path("/tmp/bertflow-gpu-check/home")
SITE_AT = Path("/tmp/bertflow-gpu-check/site")

# What bertflow imports beyond the device image (/work/.library/device/KINDS.md lists the image's
# packages): Prefect 3.8.8's tree, duckdb and pydantic, at the versions of this project's venv.
# Lazily imported extras (datasets, datasketch, jieba, zstandard, shtab) are left out.
WHEELS = """aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 annotated-types==0.8.0 apprise==1.13.1
asgi-lifespan==2.1.0 asyncpg==0.32.0 beartype==0.23.1 burner-redis==0.1.7 cachetools==7.3.3 cffi==2.1.1
coolname==5.0.0 cronsim==2.9 cryptography==51.0.1 cyclopts==5.5.2 dateparser==1.5.0 docker==7.2.0
docstring_parser==0.18.0 duckdb==2.0.1 exceptiongroup==1.3.2 fastapi==0.150.0 graphviz==0.21 greenlet==3.5.6
griffe==2.4.1 griffecli==2.4.1 griffelib==2.4.1 h2==4.4.1 hpack==4.2.0 httpcore2==2.17.0 httpx2==2.17.0
hyperframe==6.1.0 importlib_metadata==10.2.0 jinja2-humanize-extension==0.4.0 jsonpatch==1.48 jsonpointer==3.12
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 lazy-importer==0.1.0 Mako==1.4.3 oauthlib==4.0.1
opentelemetry-api==1.45.3 orjson==3.13.0 pendulum==3.3.0 prefect==3.8.8 py-key-value-aio==0.5.0 pycparser==3.12
pydantic==2.14.4 pydantic_core==2.50.5 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3 pydocket==0.27.2
python-dotenv==1.2.4 python-json-logger==4.2.0 python-slugify==9.0.0 pytz==2026.6 readchar==4.2.2 redis==8.2.0
referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4 rich-rst==2.2.0 rpds-py==2026.9.1
ruamel.yaml==0.19.1 ruamel.yaml.clib==0.2.15 semver==3.2.0 sniffio==1.3.1 SQLAlchemy==2.0.59 starlette==1.10.0
text-unidecode==1.3 toml==0.10.2 tomlkit==0.15.3 truststore==0.10.5 typing-inspection==0.4.5 tzdata==2026.6
tzlocal==5.4.5 uncalled-for==0.6.2 uvicorn==0.55.0 websockets==16.1.1""".split()
DEVICE_PYTHON = "3.12"  # the image's python3 (KINDS.md)

FILL_MASK = ["the capital of france is [MASK] .", "he played the [MASK] in a rock band .",
             "the river flows into the [MASK] .", "she was born in [MASK] , england ."]


# Sizes: the real check (enwiki-mini's recipe, shortened) and the dry run.
REAL = {"articles": 700, "max_seq_len": 128, "dupe_factor": 1, "sst2_train": 20000,
        "pretrain": ["--model", "mini", "--steps", "1200", "--batch-size", "128", "--lr", "0.0005",
                     "--warmup", "0.02", "--precision", "auto", "--save-every", "300", "--eval-every", "600",
                     "--eval-instances", "1000", "--seed", "0"],
        "finetune": ["--epochs", "1", "--lr", "0.0001", "--batch-size", "32", "--max-seq-len", "128"],
        "throughput": [("base", ["--batch-size", "128", "--rounds", "5", "--steps-per-round", "5"]),
                       ("mini", ["--batch-size", "128", "--rounds", "5", "--steps-per-round", "10"])],
        "tolerance": 0.01}  # bf16 noise: relative difference of the final losses
DRY = {"documents": 120, "max_seq_len": 32, "dupe_factor": 2, "vocab_size": 300,
       "pretrain": ["--model", "tiny", "--steps", "40", "--batch-size", "8", "--lr", "0.001", "--warmup", "2",
                    "--precision", "fp32", "--device", "cpu", "--save-every", "10", "--eval-every", "20",
                    "--eval-instances", "32", "--log-every", "10", "--seed", "0"],
       "finetune": ["--epochs", "1", "--lr", "0.001", "--batch-size", "16", "--max-seq-len", "32",
                    "--device", "cpu", "--precision", "fp32"],
       "throughput": [("tiny", ["--vocab-size", "1000", "--seq-len", "32", "--batch-size", "8", "--rounds", "1",
                                "--steps-per-round", "1", "--device", "cpu", "--precision", "fp32"])],
       "tolerance": 0.0}  # CPU fp32: the resumed run is the uninterrupted one, exactly


class Report:
    """Prints, and keeps everything printed in OUT/gpu_check.log; figures go to OUT/gpu_check.json."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "gpu_check.log").open("a", encoding="utf-8")
        self.figures: dict[str, Any] = {"checks": {}}

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.figures["checks"][name] = {"ok": bool(ok), "detail": detail}
        self.say(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.figures, indent=2, default=str))


class Runner:
    """Runs the bertflow CLI (and other commands) with one environment, logging each."""

    def __init__(self, report: Report, python: str, env: dict[str, str]):
        self.report, self.python, self.env = report, python, env

    def run(self, argv: list[str], *, timeout: float = 600, check: bool = True, show: int = 40
            ) -> subprocess.CompletedProcess:
        self.report.say(f"$ {' '.join(argv)}")
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        lines = (done.stdout + done.stderr).rstrip().splitlines()
        for line in (lines if len(lines) <= show else ["…", *lines[-show:]]):
            self.report.say(f"  {line}")
        self.report.say(f"  (exit {done.returncode}, {time.perf_counter() - start:.1f} s)")
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed with exit {done.returncode}")
        return done

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run([self.python, "-m", "bertflow.cli", *args], **kwargs)

    def cli_json(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        done = self.cli(*args, "--json", "-q", show=0, **kwargs)
        return json.loads(done.stdout[done.stdout.index("{"):])


def base_env(home: Path, extra_path: list[Path] = ()) -> dict[str, str]:
    env = dict(os.environ, BERTFLOW_HOME=str(home), PYTHONUNBUFFERED="1", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# --- prepare: the carried data, built on CPU ------------------------------------------------------

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el", "is", "ob", "ur"]


def synthetic_corpus(path: Path, documents: int, seed: int = 0) -> None:
    """Pseudo-English documents over a small invented vocabulary, one JSON line each."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    with path.open("w") as handle:
        for _ in range(documents):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
                         for _ in range(rng.randint(4, 10))]
            handle.write(json.dumps({"text": "\n".join(sentences)}) + "\n")


def synthetic_sentiment(directory: Path, train: int, dev: int, seed: int = 0) -> None:
    """A two-label task a tiny model learns in one epoch: the label is which word list a sentence uses."""
    import random

    rng = random.Random(seed)
    good, bad = ["kalo", "mine", "rusa"], ["tovi", "depo", "anel"]
    filler = ["ka", "lo", "mi", "ne", "sa", "to"]
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = [rng.choice(filler) for _ in range(rng.randint(3, 8))] + [rng.choice(good if label else bad)]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)} \t{label}")
        (directory / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def build_site_archive(dest: Path, report: Report) -> None:
    """The wheels bertflow needs beyond the device image, for its python, unpacked into one folder
    and packed as tar.xz (a third smaller than the wheels themselves)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                   "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", p)]
        Runner(report, sys.executable, dict(os.environ)).run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms,
             "-d", str(wheels), *WHEELS], show=5)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        with tarfile.open(dest, "w:xz", preset=6) as archive:
            archive.add(site, arcname=".")
    report.say(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB, {len(WHEELS)} packages)")


def prepare(dest: Path, report: Report, *, dry: bool, home_at: Path, wheels: bool = True) -> None:
    """Build the data the check reads: a data home holding the pretraining data, and an SST-2 slice."""
    sizes = DRY if dry else REAL
    if home_at.exists():
        shutil.rmtree(home_at)
    home_at.mkdir(parents=True)
    runner = Runner(report, sys.executable, base_env(home_at))
    scratch = home_at.parent / "sources"
    scratch.mkdir(parents=True, exist_ok=True)
    sst2 = dest / "sst2"
    try:
        if dry:
            synthetic_corpus(scratch / "corpus.jsonl", sizes["documents"])
            synthetic_sentiment(sst2, train=320, dev=80)
        else:
            enwiki = SHARED / "corpora/enwiki_sample/enwiki_20190720_sample.jsonl"
            vocab = SHARED / "vocab/uncased_L-12_H-768_A-12/vocab.txt"
            for needed in (enwiki, vocab, SHARED / "tasks/sst2/train.tsv"):
                if not needed.exists():
                    raise SystemExit(f"{needed} is not present: `prepare` needs ../shared/data")
            with enwiki.open() as source, (scratch / "corpus.jsonl").open("w") as slice_:
                for _, line in zip(range(sizes["articles"]), source):
                    slice_.write(line)
            sst2.mkdir(parents=True, exist_ok=True)
            with (SHARED / "tasks/sst2/train.tsv").open() as source:
                lines = [line for _, line in zip(range(sizes["sst2_train"] + 1), source)]
            (sst2 / "train.tsv").write_text("".join(lines))
            shutil.copy(SHARED / "tasks/sst2/dev.tsv", sst2 / "dev.tsv")
        runner.cli("ingest", str(scratch / "corpus.jsonl"), "--name", "gpucheck-corpus", "--format", "jsonl",
                   "--text-field", "text", "-q")
        tokenizer = (["--vocab-size", str(sizes["vocab_size"])] if dry else ["--vocab", str(vocab)])
        runner.cli("tokenizer", "--corpus", "gpucheck-corpus", "--name", "gpucheck-tok", *tokenizer, "-q")
        data = runner.cli_json("pretraining-data", "--corpus", "gpucheck-corpus", "--tokenizer", "gpucheck-tok",
                               "--name", "gpucheck-data", "--max-seq-len", str(sizes["max_seq_len"]),
                               "--dupe-factor", str(sizes["dupe_factor"]), "--masking", "whole-word")
        report.say(f"pretraining data: {data['stats'].get('instances', data['stats'])} instances")
    finally:
        if not dry:  # the dry run goes on in this home, and its check stops the server
            runner.cli("server", "stop", check=False, show=3)
        shutil.rmtree(scratch, ignore_errors=True)
    if dry:
        return  # the dry run's check goes on in home_at itself
    # The catalog, artifacts and cache records travel; the Prefect server's database, lock and logs
    # do not (the device's first command starts a server of its own).
    if (dest / "home").exists():
        shutil.rmtree(dest / "home")
    shutil.copytree(home_at, dest / "home", symlinks=True,
                    ignore=lambda folder, names: [n for n in names if n in ("logs", "prefect-server")]
                    if Path(folder) == home_at else [])
    if wheels:
        build_site_archive(dest / "site.tar.xz", report)
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    report.say(f"prepared {dest}: {total / 2**20:.1f} MiB")


# --- check: on the device (or, --dry-run, here) ---------------------------------------------------

def pypi_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def install(report: Report, data: Path) -> tuple[str, list[Path]]:
    """The python to run bertflow with, and the folders to put on its path."""
    if pypi_reachable():
        report.say("install: PyPI answers: `make install` (the CUDA build of the pinned torch)")
        Runner(report, sys.executable, dict(os.environ)).run(["make", "install"], timeout=900, show=10)
        return str(ROOT / ".venv/bin/python"), []
    archive = data / "site.tar.xz"
    report.say("install: no network (the lent machines reach none): the image's python and CUDA torch,"
               f" plus {archive.name} unpacked to {SITE_AT}")
    if not archive.exists():
        raise SystemExit(f"{archive} is missing: run `benchmarks/gpu_check.py prepare` here first")
    start = time.perf_counter()
    shutil.rmtree(SITE_AT, ignore_errors=True)
    SITE_AT.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(SITE_AT, filter="data")
    report.say(f"  unpacked in {time.perf_counter() - start:.1f} s")
    return sys.executable, [SITE_AT]


def environment(report: Report, runner: Runner) -> None:
    code = ("import sys, torch, transformers, prefect; print('python', sys.version.split()[0], '| torch',"
            " torch.__version__, '| cuda', torch.version.cuda, '| transformers', transformers.__version__,"
            " '| prefect', prefect.__version__); print('device:', torch.cuda.get_device_name()"
            " if torch.cuda.is_available() else 'no CUDA device');"
            " print('bf16:', torch.cuda.is_available() and torch.cuda.is_bf16_supported())")
    done = runner.run([runner.python, "-c", code], check=False)
    report.figures["environment"] = done.stdout.strip()
    if shutil.which("nvidia-smi"):
        runner.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                    "--format=csv"], check=False)


def throughput(report: Report, runner: Runner, sizes: dict[str, Any], dry: bool) -> None:
    rows = report.figures.setdefault("throughput", {})
    for preset, extra in sizes["throughput"]:
        path = report.out / f"throughput-{preset}.json"
        argv = [runner.python, "benchmarks/pretrain_throughput.py", "--preset", preset, "--seq-len", "128",
                "--mfu-preset", "none", "--json", str(path),
                *([] if dry else ["--device", "cuda", "--precision", "bf16"]), *extra]
        done = runner.run(argv, check=False, timeout=300)
        if done.returncode == 0 and path.exists():
            rows[preset] = json.loads(path.read_text())
            path.unlink()  # in gpu_check.json already; $OUT brings back 8 files at most
        else:
            rows[preset] = {"error": f"exit {done.returncode}"}
    base = rows.get("base", {}).get("rows")
    if base:
        ours = next((r for r in base if r["step"].startswith("ours (")), None)
        mfu = ours and ours["mfu"]
        report.check("base bf16 MFU >= 50%", bool(mfu and mfu >= 0.5),
                     f"{mfu:.1%}" if mfu is not None else "no MFU (unknown peak)")


def checkpoint_steps(home: Path, name: str) -> list[int]:
    """Steps of the checkpoints whose success marker is written (storage/checkpoints.py's layout)."""
    directory = home / "runs" / "pretrain" / name
    return sorted(int(p.name[len("step-"):-len(".pt.json")]) for p in directory.glob("step-*.pt.json"))


def pretrain_killed_and_resumed(report: Report, runner: Runner, home: Path, sizes: dict[str, Any]
                                ) -> tuple[dict, dict]:
    steps = int(sizes["pretrain"][sizes["pretrain"].index("--steps") + 1])
    every = int(sizes["pretrain"][sizes["pretrain"].index("--save-every") + 1])
    kill_after = max(every, (steps // 2) // every * every)
    argv = [runner.python, "-m", "bertflow.cli", "pretrain", "--data", "gpucheck-data", "--name", "gpucheck-mini",
            *sizes["pretrain"], "--json", "-q"]
    report.say(f"$ {' '.join(argv)}   # SIGKILL once checkpoint {kill_after} of {steps} is written")
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=ROOT, env=runner.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = None
    while process.poll() is None and time.perf_counter() - start < 600:
        if any(s >= kill_after for s in checkpoint_steps(home, "gpucheck-mini")):
            os.killpg(process.pid, signal.SIGKILL)  # the command and its loader workers
            killed_at = checkpoint_steps(home, "gpucheck-mini")
            break
        time.sleep(0.02)
    process.wait()
    report.say(f"  killed {time.perf_counter() - start:.1f} s in, checkpoints left: {killed_at}"
               if killed_at else f"  NOT killed: the run ended first (exit {process.returncode})")
    report.figures["killed_with_checkpoints"] = killed_at
    resumed = runner.cli_json("pretrain", "--data", "gpucheck-data", "--name", "gpucheck-mini", *sizes["pretrain"])
    straight = runner.cli_json("pretrain", "--data", "gpucheck-data", "--name", "gpucheck-straight",
                               *sizes["pretrain"])
    for label, manifest in (("resumed", resumed), ("uninterrupted", straight)):
        s = manifest["stats"]
        report.say(f"  {label}: {s['steps']} steps (resumed from {s['resumed_from_step']}), {s['device']}"
                   f" {s['precision']}, {s['tokens_per_s']:,} tokens/s this session, final train loss"
                   f" {s['final_train_loss']:.4f}, held-out " + ", ".join(f"{k} {v:.4f}" for k, v in s["heldout"].items()))
    report.figures["pretrain"] = {"resumed": resumed["stats"], "uninterrupted": straight["stats"]}
    a, b = resumed["stats"]["heldout"]["loss"], straight["stats"]["heldout"]["loss"]
    relative = abs(a - b) / abs(b)
    report.check("killed run resumed", bool(killed_at) and resumed["stats"]["resumed_from_step"] >= kill_after,
                 f"resumed from step {resumed['stats']['resumed_from_step']}")
    report.check("resumed loss = uninterrupted loss", relative <= sizes["tolerance"],
                 f"held-out loss {a:.6f} vs {b:.6f} (relative difference {relative:.2e},"
                 f" tolerance {sizes['tolerance']:g})")
    return resumed, straight


def finetune_and_fill_mask(report: Report, runner: Runner, data: Path, sizes: dict[str, Any]) -> None:
    run = runner.cli_json("finetune", "--model", "gpucheck-mini", "--task-type", "classification",
                          "--train", str(data / "sst2/train.tsv"), "--dev", str(data / "sst2/dev.tsv"),
                          "--name", "gpucheck-sst2", *sizes["finetune"])
    stats = run.get("stats", {})
    report.figures["sst2"] = stats
    dev = stats.get("dev") or stats.get("metrics", {}).get("dev") or stats
    accuracy = dev.get("accuracy") if isinstance(dev, dict) else None
    report.say(f"  SST-2 dev accuracy: {accuracy:.4f}" if accuracy is not None else f"  SST-2 stats: {stats}")
    report.figures["sst2_dev_accuracy"] = accuracy
    done = runner.cli("fill-mask", "gpucheck-mini", *FILL_MASK, "--top-k", "3", show=60)
    report.figures["fill_mask"] = done.stdout


def check(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "gpu-check-out")
    report = Report(out)
    dry = args.dry_run
    sizes = DRY if dry else REAL
    started = time.perf_counter()
    report.say(f"gpu_check {'--dry-run ' if dry else ''}started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    data = Path(args.data) if args.data else CARRIED
    home = Path(args.home) if args.home else HOME_AT
    report.figures.update(dry_run=dry, data=str(data), home=str(home))
    runner = None
    try:
        if dry:
            report.say("dry run: CPU, tiny sizes, data built on the fly; no install, no GPU tests")
            prepare(data, report, dry=True, home_at=home)
            python, path = sys.executable, []
        else:
            python, path = install(report, data)
            if home.exists():
                shutil.rmtree(home)
            shutil.copytree(data / "home", home, symlinks=True)
        runner = Runner(report, python, base_env(home, path))
        environment(report, runner)
        if not dry:
            tests = runner.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                "tests/test_gpu.py"], check=False, timeout=300, show=30)
            report.check("pytest -m gpu", tests.returncode == 0, f"exit {tests.returncode}")
        throughput(report, runner, sizes, dry)
        pretrain_killed_and_resumed(report, runner, home, sizes)
        finetune_and_fill_mask(report, runner, data, sizes)
    except Exception as exc:  # report what broke, keep what was measured
        report.check("gpu_check ran to the end", False, f"{type(exc).__name__}: {exc}")
    finally:
        if runner is not None:
            runner.cli("server", "stop", check=False, show=3)
        report.figures["seconds"] = round(time.perf_counter() - started, 1)
        report.say()
        report.say("summary:")
        pretrain = report.figures.get("pretrain", {}).get("resumed", {})
        for preset, figures in report.figures.get("throughput", {}).items():
            for row in figures.get("rows", []):
                mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
                report.say(f"  {preset:<5} {row['step'][:50]:<50} {row['tokens_per_s']:>12,.0f} tokens/s{mfu}")
        if pretrain:
            report.say(f"  pretraining: {pretrain['tokens_per_s']:,} tokens/s (resumed session),"
                       f" held-out MLM accuracy {pretrain['heldout'].get('mlm_accuracy', float('nan')):.4f}")
        if report.figures.get("sst2_dev_accuracy") is not None:
            report.say(f"  SST-2 dev accuracy {report.figures['sst2_dev_accuracy']:.4f}")
        for name, result in report.figures["checks"].items():
            report.say(f"  [{'PASS' if result['ok'] else 'FAIL'}] {name}: {result['detail']}")
        report.say(f"gpu_check finished in {report.figures['seconds']:.0f} s; log and figures in {out}")
        report.save()
    return 0 if all(c["ok"] for c in report.figures["checks"].values()) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="check", choices=["check", "prepare"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, data built on the fly")
    parser.add_argument("--data", default=None, help="the carried folder (default gpu-data/; dry run: scratch)")
    parser.add_argument("--home", default=None, help=f"where the data home is restored (default {HOME_AT})")
    parser.add_argument("--out", default=None, help="report folder (default $OUT, else gpu-check-out/)")
    parser.add_argument("--no-wheels", action="store_true", help="prepare: skip site.tar.xz")
    args = parser.parse_args()
    if args.action == "prepare":
        report = Report(Path(args.out or tempfile.mkdtemp(prefix="gpu-check-prepare-")))
        prepare(Path(args.data) if args.data else CARRIED, report, dry=args.dry_run,
                home_at=Path(args.home) if args.home else HOME_AT, wheels=not args.no_wheels)
        return
    sys.exit(check(args))


if __name__ == "__main__":
    main()
