"""Scoring merged models per task, and the paper's results table (accuracy, rank, averages)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from supermerge.merge_core.data import TaskData
from supermerge.merge_core.model import FunctionalModel, correct, task_loss


@torch.no_grad()
@torch.inference_mode()
def task_scores(
    model: FunctionalModel,
    params: Mapping[str, Tensor],
    head: Mapping[str, Tensor],
    data: TaskData,
    batch_size: int = 64,
) -> tuple[float, float]:
    """(accuracy, mean loss) of the model with ``params`` and ``head`` on ``data``."""
    hits = total = 0
    loss_sum = 0.0
    for batch in data.batches(batch_size, by_length=True):
        batch = batch.to(model.device)
        logits = model.logits(params, head, batch.inputs)
        right, counted = correct(model.kind, logits, batch.labels)
        hits, total = hits + right, total + counted
        loss_sum += float(task_loss(model.kind, logits, batch.labels)) * len(batch)
    return hits / max(total, 1), loss_sum / max(len(data), 1)


def evaluate(
    model: FunctionalModel,
    params: Mapping[str, Tensor],
    heads: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, TaskData],
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy per task (each task scored with its own head)."""
    return {t: task_scores(model, params, heads[t], d, batch_size)[0] for t, d in data.items()}


def ranks(results: Mapping[str, Mapping[str, float]], task: str) -> dict[str, float]:
    """Rank of each method on one task: 1 is best; tied methods share the best rank of the tie."""
    scores = {m: r[task] for m, r in results.items() if task in r}
    return {m: 1 + sum(other > s for other in scores.values()) for m, s in scores.items()}


def results_table(
    results: Mapping[str, Mapping[str, float]],
    *,
    tasks: Sequence[str] | None = None,
    individual: Mapping[str, float] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
    digits: int = 1,
) -> str:
    """Markdown table in the paper's layout: per-task accuracy (%) with its rank among the methods,
    average accuracy, average rank, and (given individual models' accuracies) normalised accuracy.

    ``references`` (e.g. the pretrained model and the individual fine-tunes) are shown first, unranked:
    the paper ranks merging methods only.
    """
    references = references or {}
    every = [*results.values(), *references.values()]
    tasks = list(tasks or sorted({t for r in every for t in r}))
    rank_of = {t: ranks(results, t) for t in tasks}
    header = ["method", *tasks, "avg acc", "avg rank"] + (["normalised"] if individual else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(m, a, False) for m, a in references.items()] + [(m, a, True) for m, a in results.items()]
    for method, accs, ranked in rows:
        cells = [method if ranked else f"*{method}*"]
        for t in tasks:
            if t not in accs:
                cells.append("-")
            else:
                rank = f" ({rank_of[t][method]})" if ranked else ""
                cells.append(f"{100 * accs[t]:.{digits}f}{rank}")
        scored = [t for t in tasks if t in accs]
        avg = sum(accs[t] for t in scored) / len(scored) if scored else float("nan")
        cells.append(f"{100 * avg:.{digits}f}")
        cells.append(f"{sum(rank_of[t][method] for t in tasks) / len(tasks):.2f}" if ranked else "-")
        if individual:
            norm = [accs[t] / individual[t] for t in scored if individual.get(t)]
            cells.append(f"{100 * sum(norm) / len(norm):.{digits}f}" if norm else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
