"""The benchmarks (a development tool, not part of the installed product): `python -m bench.benchmark`.

They use the product (merge_core, orchestrator, flows), never the reverse; the offline corpora and
fine-tuned workloads they share with `supermerge demo` live in merge_core (corpora.py, workload.py).
"""
