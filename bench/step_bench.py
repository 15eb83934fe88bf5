"""SuperMerge's training step against a plain forward + backward step of the same model, same batch.

One SuperMerge step builds the merged tensors from the k task vectors (``combine``), runs each task's
batch through the merged model with that task's head, and backpropagates to the merge weights W (then
one AdamW step on W). The plain step is what fine-tuning the base costs: the same k batches through the
same model (``supermerge.merge_core.model.FunctionalModel``, the same heads), gradients for every parameter. Their
ratio is the price of merging: the goal is at most 1.5 at k = 8.

    python -m bench.step_bench --k 2 4 8 16 --steps 5 [--profile 8] [--storage-dtype bfloat16]

Task vectors are random (the cost does not depend on their values), inputs random token ids of
``--seq-len`` tokens, ``--batch-size`` examples per task (SuperMerge's default, 16). Each timing is the
median of ``--steps`` steps after one warm-up step, the two kinds of step alternating so that a noisy
machine slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from supermerge.merge_core.workload import minilm_dir
from supermerge.merge_core.checkpoint import open_checkpoint
from supermerge.merge_core.data import TaskData
from supermerge.merge_core.methods.learned import (
    LearnedMergeConfig,
    _objective_loss,
    backward_step,
    initial_weights,
    stack_task_vectors,
    weight_groups,
)
from supermerge.merge_core.model import FunctionalModel
from supermerge.merge_core.task_vectors import TaskVector, mergeable_names

TASK_VECTOR_STD = 1e-3


def _setup(model: FunctionalModel, folder: Path, k: int, batch_size: int, seq_len: int, storage_dtype: str):
    with open_checkpoint(folder / "model.safetensors") as ck:
        names = mergeable_names(ck)
    base = model.base_params(names)
    g = torch.Generator().manual_seed(0)
    vectors = [TaskVector(f"t{i}", folder, {n: TASK_VECTOR_STD * torch.randn(b.shape, generator=g)
                                             for n, b in base.items()}) for i in range(k)]
    stacked = stack_task_vectors(base, vectors, storage_dtype)  # type: ignore[arg-type]
    del vectors
    hidden = model.module.config.hidden_size
    heads = {f"t{i}": {"classifier.weight": 0.02 * torch.randn(2, hidden, generator=g),
                       "classifier.bias": torch.zeros(2)} for i in range(k)}
    vocab = model.module.config.vocab_size
    batches = {}
    for t in heads:
        ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
        batches[t] = TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              torch.randint(0, 2, (batch_size,), generator=g))
    return names, base, stacked, heads, batches


def _steps(model, names, base, stacked, heads, batches, config) -> tuple[Callable[[], None], Callable[[], None]]:
    groups, group_of = weight_groups(names, config.granularity)
    weights = initial_weights(len(heads), len(groups), config).requires_grad_(True)
    optimizer = torch.optim.AdamW([weights], lr=config.lr)
    trainable = {n: b.detach().requires_grad_(True) for n, b in base.items()}

    def supermerge_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_step(weights, model, base, stacked, group_of, heads, batches, config)
        optimizer.step()

    def plain_step() -> None:
        for p in trainable.values():
            p.grad = None
        _objective_loss(model, trainable, heads, batches, "supervised").backward()

    return supermerge_step, plain_step


def _median_seconds(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _profile(step: Callable[[], None], rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--profile", type=int, default=None, metavar="K", help="print a profile of the step at this k")
    parser.add_argument("--markdown", type=Path, help="also write the table (and the command) here")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    folder = minilm_dir()
    model = FunctionalModel(folder)
    config = LearnedMergeConfig(storage_dtype=args.storage_dtype)
    say(f"MiniLM ({sum(p.numel() for p in model.module.parameters()) / 1e6:.1f}M parameters), "
        f"{args.batch_size} x {args.seq_len} tokens per task, storage {args.storage_dtype}, "
        f"backward {config.backward}, torch threads {torch.get_num_threads()}, median of {args.steps} steps")
    say("")
    say("| k | plain step (s) | SuperMerge step (s) | ratio |")
    say("|---|---|---|---|")
    for k in args.k:
        names, base, stacked, heads, batches = _setup(model, folder, k, args.batch_size, args.seq_len,
                                                      args.storage_dtype)
        supermerge_step, plain_step = _steps(model, names, base, stacked, heads, batches, config)
        t = _median_seconds({"plain": plain_step, "supermerge": supermerge_step}, args.steps)
        say(f"| {k} | {t['plain']:.3f} | {t['supermerge']:.3f} | {t['supermerge'] / t['plain']:.2f} |")
        if args.profile == k:
            print(f"SuperMerge step at k = {k}:\n{_profile(supermerge_step)}")
            print(f"plain step at k = {k}:\n{_profile(plain_step)}")
        del stacked
    if args.markdown:
        command = "python -m bench.step_bench " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
