"""Prefect layer: tasks wrap one library call each, flows compose them. Nothing else lives here."""
