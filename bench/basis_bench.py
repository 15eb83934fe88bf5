"""Issue 14 part 2 on real fine-tunes: SuperMerge over the raw task vectors vs over the TSV-M pieces,
each started at init 0.3 or at the training-free merge chosen on validation; TA and TSV-M beside.

    python -m bench.basis_bench --cache /work/bench-cache --tasks language sentiment quote_topic

Uses the cached full fine-tunes of the packaged MiniLM (``<cache>/<task>-full-*``) and their
32-example validation / held-out test splits (``<cache>/work/data``), the old benchmark's learned
budget (60 AdamW steps at lr 0.05, 8 examples per task per step) and one seed; prints a markdown
table of test accuracy per task, the average, the chosen start scale and the wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from supermerge.merge_core.workload import minilm_dir
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.data import load_task_data
from supermerge.merge_core.job import score_result
from supermerge.merge_core.merge import merge
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import load_task_vector

METHODS = ("task_arithmetic", "tsv", "supermerge", "supermerge_ta_init", "supermerge_tsv", "supermerge_tsv_init")
LEARNED = {"steps": 60, "lr": 0.05, "batch_size": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    data_dir = args.cache / "work" / "data"
    val = {t: load_task_data(data_dir / f"{t}.val.jsonl", tokenizer, args.max_length) for t in args.tasks}
    test = {t: load_task_data(data_dir / f"{t}.test.jsonl", tokenizer, args.max_length) for t in args.tasks}
    with open_checkpoint(minilm_dir()) as base:
        vectors = [load_task_vector(base, next(args.cache.glob(f"{t}-full-*")), name=t) for t in args.tasks]
    model = FunctionalModel(minilm_dir())
    print(f"tasks {args.tasks}; val {[len(v) for v in val.values()]}, test {[len(v) for v in test.values()]}; "
          f"learned: {LEARNED}, seed 0")
    print("| method | " + " | ".join(args.tasks) + " | avg | start / chosen | seconds |")
    print("|---|" + "---|" * len(args.tasks) + "---|---|---|")
    for method in args.methods:
        params = LEARNED if method.startswith("supermerge") else {}
        started = time.perf_counter()
        result = merge(minilm_dir(), vectors, method, params=params, val=val, seed=0, model=model)
        seconds = time.perf_counter() - started
        acc = score_result(model, result, test)
        chosen = (f"scale {max(result.search, key=lambda p: (p['val_accuracy'], -p['val_loss']))['scale']}"
                  if result.search and "scale" in result.search[0] else
                  ", ".join(f"{k}={v}" for k, v in result.params.items()) if not method.startswith("supermerge")
                  else "init 0.3")
        avg = 100 * sum(acc.values()) / len(acc)
        print(f"| {method} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in args.tasks)
              + f" | {avg:.1f} | {chosen} | {seconds:.0f} |", flush=True)
        del result


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
