"""`bertflow ls` and `bertflow show`: what is in the catalog."""

from __future__ import annotations

import argparse
import json

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


def run_ls(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    entries = store.catalog.list(kind=args.kind, all_versions=args.all)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no artifacts in {store.home.url}")
        return 0
    rows = [("KIND", "NAME", "FINGERPRINT", "CREATED", "STATUS")]
    for e in entries:
        rows.append((e.kind, e.name, e.fingerprint, e.created_at[:19],
                     "ok" if store.exists(e.path) else "missing"))
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
