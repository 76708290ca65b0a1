"""The DuckDB catalog: what register returns, and tables created once per process per file."""

from __future__ import annotations

from storage.catalog import Catalog, CatalogEntry


def entry(name: str = "c") -> CatalogEntry:
    return CatalogEntry(id=f"corpus/{name}/abc", kind="corpus", name=name, fingerprint="abc",
                        path=f"/data/{name}", parents=["x/y/z"], params={"min_chars": 3, "langs": ["en"]},
                        stats={"documents": 2, "mb": 0.5}, cache_key="k", stage_version="1")


def test_register_returns_what_the_catalog_then_reads(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    registered = catalog.register(entry())
    assert registered.created_at  # the registration time, in the format reads give
    assert registered == catalog.get_by_id(registered.id)
    assert catalog.find("c", "corpus") == [registered]


def test_a_catalog_file_removed_meanwhile_is_created_again(tmp_path):
    path = tmp_path / "home" / "catalog.duckdb"
    Catalog(path).register(entry("first"))
    assert [e.name for e in Catalog(path).list()] == ["first"]  # a second store: same tables
    path.unlink()
    catalog = Catalog(path)  # the tables were made before in this process, but the file is new
    assert catalog.list() == []
    catalog.register(entry("second"))
    assert [e.name for e in catalog.list()] == ["second"]
