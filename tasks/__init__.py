"""The work: pure functions, and the thin Prefect task wrappers that call them."""
