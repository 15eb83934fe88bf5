"""WUDI's two solvers on real task vectors: the objective each reaches and its time per matrix.

    python -m bench.wudi_bench --models /work/bench-cache/language-full-6e72e77f04 \\
        /work/bench-cache/sentiment-full-7db38c2e69 /work/bench-cache/quote_topic-full-82a607299a

Loads the full fine-tunes' task vectors against the packaged MiniLM, and for a few of its matrices
(an FFN output (384, 1536), an FFN input (1536, 384), an attention (384, 384)) runs the official
procedure (Adam from sum_i tau_i, 300 steps at lr 1e-5) and the closed-form minimiser, printing the
objective L at the start, after Adam and at the closed form, and the seconds each took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from supermerge.merge_core.workload import minilm_dir
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.methods import wudi
from supermerge.merge_core.task_vectors import load_task_vector, stack_deltas

TENSORS = ("encoder.layer.3.output.dense.weight", "encoder.layer.3.intermediate.dense.weight",
           "encoder.layer.3.attention.self.query.weight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="full fine-tunes of MiniLM")
    args = parser.parse_args()
    with open_checkpoint(minilm_dir()) as base:
        vectors = [load_task_vector(base, p, name=p.name) for p in args.models]
        names = [n for n in base.keys() if any(n.endswith(t) for t in TENSORS)]
        print(f"k = {len(vectors)}, torch threads {torch.get_num_threads()}")
        print("| tensor | shape | L start | L Adam (official) | L closed form | Adam s | closed form s |")
        print("|---|---|---|---|---|---|---|")
        for n in names:
            d = stack_deltas(base.get(n), vectors, n)
            started = time.perf_counter()
            adam = wudi.adam(d)
            adam_s = time.perf_counter() - started
            started = time.perf_counter()
            closed = wudi.closed_form(d)
            closed_s = time.perf_counter() - started
            print(f"| {n} | {tuple(d.shape[1:])} | {float(wudi.objective(d.sum(0), d)):.4e} | "
                  f"{float(wudi.objective(adam, d)):.4e} | {float(wudi.objective(closed, d)):.4e} | "
                  f"{adam_s:.2f} | {closed_s:.2f} |")


if __name__ == "__main__":
    main()
