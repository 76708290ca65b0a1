"""Prefect flows: one per file, each reads like a table of contents."""
