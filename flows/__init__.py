"""Prefect glue and the command line: the top of the import graph (flows -> orchestrator -> merge_core)."""
