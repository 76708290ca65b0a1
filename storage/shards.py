"""Where the shard artifacts (corpus, pretraining data) keep their Parquet files.

Now: `<artifact>/data/shard-00000.parquet …`, with `manifest.json` and `_SUCCESS` beside
`data/`, not in it. pandas, `datasets` and DuckDB read a folder (or a glob) as one Parquet
dataset only when every file in it is Parquet, so `data/` holds nothing else.

Before: the shards at the top of the artifact directory, beside the manifest. Artifacts of
that layout still read everywhere in bertflow (`shard_files` falls back to it), and a stage
that writes the same bytes again replaces them with the new layout (`ArtifactStore`).
The fingerprint hashes a shard's path inside `data/`, so the same bytes keep the same
fingerprint in both layouts and nothing made from them is recomputed.
"""

from __future__ import annotations

from pathlib import Path

from storage.home import filesystem, is_url, store_errors

DATA_DIR = "data"
SHARD_GLOB = "shard-*.parquet"


def shard_path(index: int) -> str:
    """The path of the `index`-th shard, relative to the artifact directory."""
    return f"{DATA_DIR}/shard-{index:05d}.parquet"


def shard_files(artifact_dir: str | Path) -> list:
    """The shards of an artifact directory in order, in either layout: local paths, or URLs
    (str) for an artifact in an object store, which the readers stream (`storage.home.open_input`)."""
    if is_url(artifact_dir):
        url = str(artifact_dir).rstrip("/")
        fs, root = filesystem(url)
        with store_errors(url):
            for pattern in (f"{DATA_DIR}/{SHARD_GLOB}", SHARD_GLOB):
                found = sorted(fs.glob(f"{root}/{pattern}"))
                if found:
                    return [f"{url}/{path[len(root):].lstrip('/')}" for path in found]
        return []
    root = Path(artifact_dir)
    return sorted((root / DATA_DIR).glob(SHARD_GLOB)) or sorted(root.glob(SHARD_GLOB))


def join(directory: str | Path, relative: str) -> str | Path:
    """`directory/relative` for a local path (a Path) or a URL (a str)."""
    return f"{str(directory).rstrip('/')}/{relative}" if is_url(directory) else Path(directory) / relative


def fingerprint_path(relative: str) -> str:
    """The name a data file has in the fingerprint: its path inside `data/`, as the first layout
    had it at the top."""
    return relative.removeprefix(f"{DATA_DIR}/")
