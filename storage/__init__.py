"""All reading and writing of artifacts, raw sources and the catalog lives here."""
