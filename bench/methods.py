"""The methods the benchmark compares and how each is run: read by the run (bench/benchmark.py) and by
the report rendered from its results (bench/report.py)."""

from __future__ import annotations

ALL_METHODS = (
    "average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "tsv", "iso_c", "iso_cts", "wudi",
    "adamerging", "supermerge", "supermerge_no_tanh", "supermerge_ta_init", "supermerge_tsv", "supermerge_tsv_init",
    "supermerge_iso_cts_init", "supermerge_compressed",
)
"""Every method the benchmark compares, in report order; those the registry lacks are skipped."""
LEARNED = ("adamerging", "supermerge", "supermerge_no_tanh", "supermerge_ta_init", "supermerge_tsv",
           "supermerge_tsv_init", "supermerge_iso_cts_init", "supermerge_compressed")
"""Trained merges: the same early-stopping rule and step budget for each. The SuperMerge variants are
issue 14 part 2's questions (W started at Task Arithmetic's choice; over the TSV-M pieces; there,
started at TSV-M's choice; over the Iso-CTS pieces, started at Iso-CTS) and issue 15's (over task
vectors compressed to TSV-M's rank)."""
LORA_METHODS = ("average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi", "supermerge",
                "supermerge_tsv_init", "supermerge_iso_cts_init")
"""Methods run on the LoRA adapters: the training-free ones that take no random masks, SuperMerge, and
its two variants started at a training-free merge."""
SEEDED = frozenset({"dare_ta", "dare_ties", *LEARNED})
"""Methods whose result depends on the seed (DARE's masks, the learned merges' batches): run once per
seed; every other method runs once, reported with no spread."""
