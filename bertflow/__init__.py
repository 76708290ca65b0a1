"""bertflow: raw text corpus to evaluated BERT models, as Prefect flows."""

__version__ = "0.1.0"
