"""The tree-experiments table for docs/benchmarks.md, from ``bench/tree_experiments.py``'s JSON."""

from __future__ import annotations

from typing import Any

TREES_FILE = "benchmark_trees.json"
"""``bench/tree_experiments.py``'s results, rendered into the doc when they lie beside the benchmark's."""


def _avg(acc: dict[str, float]) -> float:
    return sum(acc.values()) / len(acc)


def trees_section(trees: dict[str, Any] | None, res: dict[str, Any] | None = None) -> list[str]:
    """One row per experiment: what it changes, the tree it ran, accuracy against the control and the
    flat merge, and its wall time. Without a ``flat`` experiment the flat reference is the benchmark's
    own flat SuperMerge run of the same seed in ``res`` (same fine-tunes and settings), and the table
    says so."""
    if not trees or not trees["runs"]:
        return []
    individual = trees["individual"]
    by = {r["experiment"]: r for r in trees["runs"]}
    control = by.get("control")
    flat = by.get("flat")
    seed = trees["runs"][0]["run"]["seed"]
    flat_note = ""
    if flat is None and res is not None:
        bench_flat = [r for r in res["runs"] if r["variant"] == "full" and r["method"] == "supermerge" and r["seed"] == seed]
        if bench_flat:
            flat = {"run": bench_flat[0]}
            flat_note = (f"\"vs flat\" compares with the benchmark's flat SuperMerge of seed {seed} "
                         f"({100 * _avg(bench_flat[0]['test_accuracy']):.1f}; the flat experiment was not run).")
    lines = ["## Why the tree loses: controlled experiments", "", "```bash", trees["command"], "```", "",
             "Hierarchical SuperMerge on the 8 full fine-tunes through the orchestrator (plan, plain executor, a "
             "fresh store each), the benchmark's SuperMerge settings at every node (early stopping on the held-out "
             "validation examples, as the flat merge), one factor changed per row against the control; seed "
             f"{trees['runs'][0]['run']['seed']}, one seed ({trees['seconds'] / 60:.1f} min in all). Normalised = "
             "merged / individual, averaged over tasks.", "",
             "| experiment | question | depth | nodes | avg test acc | normalised | vs control | vs flat | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in by.items():
        run = r["run"]
        acc = _avg(run["test_accuracy"])
        norm = sum(run["test_accuracy"][t] / individual[t] for t in run["test_accuracy"]) / len(run["test_accuracy"])
        vs_control = f"{100 * (acc - _avg(control['run']['test_accuracy'])):+.1f}" if control and name != "control" else "-"
        vs_flat = f"{100 * (acc - _avg(flat['run']['test_accuracy'])):+.1f}" if flat and name != "flat" else "-"
        p = run["params"]
        lines.append(f"| {name} | {r['question']} | {p.get('depth', '-')} | {p.get('merge_nodes', '-')} | "
                     f"{100 * acc:.1f} | {100 * norm:.1f} % | {vs_control} | {vs_flat} | {run['seconds']:.0f} |")
    if flat_note:
        lines += ["", flat_note]
    if control is None or flat is None:
        lines += ["", "Not measured: " + ", ".join(n for n, r in (("control", control), ("flat", flat)) if r is None)
                  + " (the columns against them say -)."]
    return lines + [""]
