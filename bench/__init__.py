"""Benchmark and demo helpers: real labelled text tasks that install offline (see bench/corpora.py)."""
