"""`bertflow ls`, `bertflow show`, `bertflow verify` and `bertflow catalog sync`: what is in the
catalog, whether it is still as written, and the catalog rebuilt from the artifacts' manifests."""

from __future__ import annotations

import argparse
import json
import sys

from storage.artifacts import KINDS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    ls = subparsers.add_parser("ls", help="list artifacts in the catalog")
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--all", action="store_true", help="every version, not only the newest per name")
    ls.add_argument("--json", action="store_true", help="a JSON list (stable; see docs/artifacts-and-catalog.md)")
    ls.set_defaults(run=run_ls)
    show = subparsers.add_parser("show", help="one artifact: stats, parents, path")
    show.add_argument("name", help="artifact name (newest version) or full id kind/name/fingerprint")
    show.add_argument("--kind", choices=KINDS)
    show.add_argument("--json", action="store_true", help="a JSON object (stable; see docs/artifacts-and-catalog.md)")
    show.set_defaults(run=run_show)
    verify = subparsers.add_parser("verify", help="check artifacts against what was written (every file's size and"
                                   " digest); exit 1 if any is damaged")
    verify.add_argument("name", nargs="?", help="artifact name or id (default: every version of every artifact)")
    verify.add_argument("--kind", choices=KINDS)
    verify.add_argument("--json", action="store_true", help="a JSON list of {id, path, status, problem} (stable; see"
                        " docs/artifacts-and-catalog.md)")
    verify.set_defaults(run=run_verify)
    catalog = subparsers.add_parser("catalog", help="the catalog itself (an index of the data home's artifacts)")
    actions = catalog.add_subparsers(dest="action", metavar="ACTION", required=True)
    sync = actions.add_parser("sync", help="rebuild the catalog from the committed artifacts' manifests: add what"
                              " another machine (or a lost catalog) is missing, drop rows whose artifact is gone")
    sync.add_argument("--json", action="store_true", help="a JSON object {artifacts, added, removed, swept}")
    sync.set_defaults(run=run_sync)


def run_ls(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    entries = store.entries(kind=args.kind, all_versions=args.all)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no artifacts in {store.home.url}")
        return 0
    rows = [("KIND", "NAME", "FINGERPRINT", "CREATED", "STATUS")]
    for e in entries:
        rows.append((e.kind, e.name, e.fingerprint, e.created_at[:19],
                     ("ok" if store.damage(e.path) is None else "damaged") if store.exists(e.path) else "missing"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def run_show(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    entry = store.find_one(args.name, args.kind)
    data = entry.to_json()
    data["status"] = "ok" if store.exists(entry.path) else "missing"
    data["metrics"] = store.catalog.metrics(f"{entry.kind}/{entry.name}")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{entry.kind} {entry.name}")
    for key in ("id", "fingerprint", "path", "created_at", "status"):
        print(f"  {key:<12} {data[key]}")
    print(f"  {'parents':<12} {', '.join(entry.parents) or '-'}")
    print("  params:")
    for key, value in entry.params.items():
        print(f"    {key}: {json.dumps(value, ensure_ascii=False)}")
    print("  stats:")
    for line in json.dumps(entry.stats, indent=2, ensure_ascii=False).splitlines()[1:-1]:
        print("  " + line)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Re-read every file of the artifacts (or of NAME) and compare its size and digest with the
    ones recorded when the artifact was committed. The cheap size check runs on every use;
    this is the full one."""
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    entries = [store.find_one(args.name, args.kind)] if args.name else store.entries(kind=args.kind,
                                                                                     all_versions=True)
    damaged = 0
    results = []
    for entry in entries:
        present = store.exists(entry.path)
        problem = store.damage(entry.path, full=True) if present else "missing or incomplete"
        damaged += problem is not None
        results.append({"id": entry.id, "path": entry.path,
                        "status": "ok" if problem is None else "damaged" if present else "missing",
                        "problem": problem})
        if not args.json:
            print(f"{'ok' if problem is None else 'DAMAGED':<8} {entry.id}" + (f": {problem}" if problem else ""))
    if args.json:
        print(json.dumps(results, indent=2))
    if damaged:
        print(f"error: {damaged} of {len(entries)} artifact(s) damaged; re-run the stages that produced them"
              " (the same commands recompute them)", file=sys.stderr)
        return 1
    if not args.json:
        print(f"{len(entries)} artifact(s) intact")
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    swept = [] if store.home.is_local else store.sweep_uncommitted()
    result = {**store.sync_catalog(), "swept": len(swept)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{store.home.url}: {result['artifacts']} committed artifact(s); catalog {store.home.catalog_path}:"
          f" {result['added']} added, {result['removed']} removed"
          + (f"; {len(swept)} abandoned upload(s) removed" if swept else ""))
    return 0
