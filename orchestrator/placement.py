"""Where each merge node runs: its engine's predicted peak against the budget, on a GPU or in RAM.

Each engine predicts its own peak (``supermerge.merge_core.peak.Workload``: a learned merge, a
per-tensor merge in memory, a streamed one); the budget comes from ``supermerge.orchestrator.budget``.
A node that fits nowhere is placed on no device, with the reason, and the planner tries a smaller
fan-in.
"""

from __future__ import annotations

from dataclasses import dataclass

from supermerge.merge_core.peak import ModelShape, PeakBytes, Workload
from supermerge.orchestrator.budget import Budget
from supermerge.orchestrator.sizes import format_bytes


@dataclass(frozen=True)
class Placement:
    """Where a node runs and its prediction there; ``device`` None when it fits nowhere."""

    device: str | None
    predicted: PeakBytes
    reason: str
    task_vector_device: str | None = None
    """'cpu' when the node runs on a GPU with its stacked task vectors in host memory."""


def place_node(
    shape: ModelShape, work: Workload, budget: Budget, requested: str
) -> Placement:
    """Put a node on ``requested`` ('cpu', 'cuda' = any GPU, 'cuda:N') if its prediction fits there.

    With 'cuda' (what ``device: auto`` resolves to on a GPU machine) the GPU with the most budget that
    fits is chosen, and a node no GPU can hold runs on the CPU when RAM can: the plan shows it. An
    explicit 'cuda:N' is held to that GPU.
    """
    cpu = work.peak(shape, "cpu")
    gpu = work.peak(shape, "cuda")
    offloaded = work.offloaded_peak(shape)
    if requested.startswith("cuda"):
        indices = sorted(budget.gpus, key=lambda i: -budget.gpus[i])
        if ":" in requested:
            indices = [int(requested.split(":", 1)[1])]
        for i in indices:
            if gpu.device_bytes <= budget.gpus.get(i, 0) and gpu.host_bytes <= budget.host:
                return Placement(f"cuda:{i}", gpu, "fits the GPU")
        for i in indices:
            if (offloaded is not None and offloaded.device_bytes <= budget.gpus.get(i, 0)
                    and offloaded.host_bytes <= budget.host):
                return Placement(f"cuda:{i}", offloaded, "fits the GPU with its task vectors in host memory", "cpu")
        if ":" in requested:
            return Placement(None, gpu, f"needs {format_bytes(gpu.device_bytes)} on {requested}, budget "
                                        f"{format_bytes(budget.gpus.get(indices[0], 0))}")
        if cpu.total <= budget.host:
            return Placement("cpu", cpu, "too big for every GPU; fits RAM")
        return Placement(None, cpu, f"needs {format_bytes(gpu.device_bytes)} on a GPU (largest budget "
                                    f"{format_bytes(max(budget.gpus.values(), default=0))}) or "
                                    f"{format_bytes(cpu.total)} RAM (budget {format_bytes(budget.host)})")
    if cpu.total <= budget.host:
        return Placement("cpu", cpu, "fits RAM")
    return Placement(None, cpu, f"needs {format_bytes(cpu.total)} RAM, budget {format_bytes(budget.host)}")


def describe(predicted: PeakBytes, top: int = 3) -> str:
    """The largest terms, for error messages and the plan."""
    terms = sorted(predicted.terms().items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {format_bytes(v)}" for name, v in terms)

