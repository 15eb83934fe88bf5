"""One task's forward and backward through a causal LM, as a later task of a SuperMerge step sees it
(the merged tensors' gradients already held): the RSS high-water mark above the state before it,
against the planner's ``activations + backward_temporaries`` (merge_core/methods/learned_peak.py).

    python -m bench.causal_backward /tmp/moonshot/base 2x32 2x32     # Qwen2-0.5B's shape, ~8 GB of RAM

The base is a Hugging Face causal-LM dir (bench/moonshot.py makes one); each ``BxS`` is a batch of B
sequences of S tokens. Prints measured and predicted MiB, their ratio, and the seconds it took.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from supermerge.merge_core.methods.learned_peak import backward_temporary_bytes
from supermerge.merge_core.model import FunctionalModel, task_loss
from supermerge.merge_core.peak import activation_bytes
from supermerge.orchestrator import measure
from supermerge.orchestrator.model_inventory import ModelInventory

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("batches", nargs="+", help="BxS: B sequences of S tokens")
    args = parser.parse_args(argv)
    measure.return_large_blocks_promptly()
    model = FunctionalModel(args.base, "causal_lm")
    shape = ModelInventory(args.base, "causal_lm").shape()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.module.named_parameters()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    print(f"vocab {shape.vocab}, hidden {shape.hidden}, tied {shape.tied_embeddings}")

    def step(b: int, s: int) -> None:
        ids = torch.randint(0, shape.vocab, (b, s))
        logits = model.logits(params, {}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        task_loss("causal_lm", logits, ids).backward()

    step(1, 4)  # the first backward's one-time allocations
    for text in args.batches:
        b, s = (int(x) for x in text.split("x"))
        gc.collect()
        measure._release_freed_heap()
        start = measure.psutil.Process().memory_info().rss
        if not measure._reset_high_water_mark():
            raise SystemExit("this kernel does not let the RSS high-water mark be reset (/proc/self/clear_refs)")
        started = time.perf_counter()
        step(b, s)
        measured = measure._high_water_mark() - start
        act = activation_bytes(shape, b, s)
        predicted = act + backward_temporary_bytes(shape, act)
        print(f"{b}x{s}: measured {measured / MIB:,.1f} MiB, predicted {predicted / MIB:,.1f} MiB "
              f"(activations {act / MIB:,.1f}), ratio {measured / predicted:.3f}, {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
