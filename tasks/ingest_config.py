"""What `bertflow ingest` is asked to do, and what it reports: the stage's config model, its
cache key and summaries. Free of Prefect, so that a cached re-run
is answered from the catalog without starting Prefect (`ingest_inputs` → `cached_result`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.cleaning import CleaningOptions
from tasks.text import UnicodeForm

STAGE = "ingest"
STAGE_VERSION = "3"  # bump when the output of the same inputs and parameters changes

REMOVAL_STEPS = ("empty", "too_short", "too_long", "low_letter_fraction", "too_few_sentences",
                 "exact_duplicate", "near_duplicate")


class SourceSpec(BaseModel):
    """One SOURCE with read options of its own (the config file form; the CLI sets them globally)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="file, directory or glob")
    format: Literal["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "datasets",
                    "wikiextractor", "wikitext"] | None = None
    txt_mode: Literal["file", "blank-line", "line"] | None = None
    text_field: str | None = None
    encoding: str | None = None
    encoding_errors: Literal["strict", "replace"] | None = None


class IngestConfig(BaseModel):
    """Parameters of `bertflow ingest` (and the `ingest:` section of a pipeline config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[str | SourceSpec] = Field(
        min_length=1, description="files, directories or globs; or {path, format, txt_mode, ...}")
    name: str = Field(description="artifact name of the corpus")
    format: Literal["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "datasets",
                    "wikiextractor", "wikitext"] = Field(
        "auto", description="auto: from each file's extension (and WikiExtractor or WikiText from the first lines)")
    txt_mode: Literal["file", "blank-line", "line"] = Field(
        "blank-line", description="txt: one document per file, per blank-line block, or per line")
    text_field: str = Field("text", description="jsonl/json key or csv/tsv/parquet/datasets column")
    encoding: str = Field("utf-8", description="text encoding of the files (a Python codec name)")
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="replace: undecodable bytes become U+FFFD instead of stopping with an error")
    unicode_form: UnicodeForm = Field("NFC", description="Unicode normalisation form (none: text kept as is)")
    language: Literal["auto", "en", "zh"] = Field("auto", description="auto: guessed per document")
    min_chars: int = Field(20, ge=0, description="drop shorter documents: characters, after normalisation")
    max_chars: int = Field(2_000_000, ge=1, description="drop longer documents: characters, after normalisation")
    min_letter_fraction: float = Field(0.5, ge=0.0, le=1.0,
                                       description="drop documents with a smaller share of letters among non-space characters")
    min_sentences: int = Field(1, ge=1, description="drop documents with fewer sentences")
    dedupe: bool = Field(True, description="drop exact duplicate documents")
    near_dedupe: float | None = Field(None, gt=0.0, le=1.0,
                                      description="MinHash Jaccard threshold, e.g. 0.8; off when unset")
    minhash_permutations: int = Field(64, ge=16, le=512, description="MinHash permutations per document (near-dedupe)")
    shingle_chars: int = Field(5, ge=1, le=32, description="character n-gram size for MinHash")
    shard_mb: float = Field(32.0, gt=0, description="MB of text per output shard")
    workers: int = Field(0, ge=0, description="worker threads; 0 = one per CPU core, plus one")
    seed: int = Field(0, description="seed of the MinHash permutations (near-dedupe)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        from storage.artifacts import check_name

        return check_name(value)

    @field_validator("max_chars")
    @classmethod
    def _max_above_min(cls, value: int, info: Any) -> int:
        if value < info.data.get("min_chars", 0):
            raise ValueError("max_chars must be >= min_chars")
        return value


    def cleaning_options(self) -> CleaningOptions:
        """The per-document settings, as a plain dataclass (cheap to hand to worker threads)."""
        return CleaningOptions(**{f: getattr(self, f) for f in CleaningOptions.__dataclass_fields__})

    def source_specs(self) -> list[SourceSpec]:
        """Every source with its read options resolved (its own, else the config's)."""
        specs = []
        for source in self.sources:
            spec = SourceSpec(path=source) if isinstance(source, str) else source
            specs.append(SourceSpec(**{
                name: getattr(spec, name) if getattr(spec, name) is not None else getattr(self, name)
                for name in SourceSpec.model_fields
            }))
        return specs


def resolve_source_specs(config: IngestConfig) -> list[Any]:
    """Expand every source spec to files, each with its read options; duplicates keep the first."""
    from storage.sources import ReadOptions, resolve_sources

    files: dict[str, Any] = {}
    for spec in config.source_specs():
        options = ReadOptions(format=spec.format, txt_mode=spec.txt_mode, text_field=spec.text_field,
                              encoding=spec.encoding, encoding_errors=spec.encoding_errors)
        for source in resolve_sources([spec.path], spec.format, options):
            files.setdefault(source.path, source)
    return list(files.values())


def ingest_inputs(config: IngestConfig, home: Any = None) -> dict[str, Any]:
    """The ingest task's inputs, hence its cache key: the config, and the path, size,
    modification time and read options of every source file (the stage's input fingerprint).
    `home` is unused: the signature is the other stages' input builders'."""
    from dataclasses import asdict

    return {"config": config, "sources": [asdict(source) for source in resolve_source_specs(config)]}


def summary_markdown(manifest: dict[str, Any]) -> str:
    """The ingest summary as a Markdown table (a Prefect artifact in the UI)."""
    s = manifest["stats"]
    rows = [("kept", s["documents"], s["sentences"], s["chars"]),
            ("input", s["input"]["documents"], "", s["input"]["chars"])]
    rows += [(f"removed: {step}", r["documents"], "", r["chars"]) for step, r in s["removed"].items() if r["documents"]]
    lines = [f"### corpus `{manifest['name']}` ({manifest['fingerprint']})", "",
             "| | documents | sentences | characters |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b:,} | {c if c == '' else format(c, ',')} | {d:,} |" for a, b, c, d in rows]
    lines += ["", "| source | documents | sentences | characters |", "|---|---:|---:|---:|"]
    lines += [f"| {src} | {c.get('documents', 0):,} | {c.get('sentences', 0):,} | {c.get('chars', 0):,} |"
              for src, c in s["per_source"].items()]
    return "\n".join(lines)


def format_summary(manifest: dict[str, Any]) -> str:
    """The human summary printed at the end of `bertflow ingest`."""
    s = manifest["stats"]
    lines = [
        f"corpus {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
        f"  kept     {s['documents']:>10,} documents {s['sentences']:>11,} sentences {s['chars']:>13,} chars",
        f"  input    {s['input']['documents']:>10,} documents {'':>21} {s['input']['chars']:>13,} chars"
        f"  ({s['input']['bytes'] / 1e6:,.1f} MB)",
    ]
    for step, removed in s["removed"].items():
        if removed["documents"]:
            lines.append(f"  removed  {removed['documents']:>10,} documents {'':>21} {removed['chars']:>13,} chars  {step}")
    lines.append("  languages: " + ", ".join(f"{k} {v:,}" for k, v in s["languages"].items()))
    lines.append("  per source:")
    for source, counts in s["per_source"].items():
        lines.append(f"    {counts.get('documents', 0):>9,} docs {counts.get('sentences', 0):>10,} sents"
                     f" {counts.get('chars', 0):>12,} chars  {source}")
    return "\n".join(lines)
