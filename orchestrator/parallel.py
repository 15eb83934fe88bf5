"""What running a plan's nodes side by side needs beyond the plain executor (no Prefect here).

The Prefect flow runs independent subtrees at once; this module decides how many nodes may run at
once on each device and the order to hand them out in. Once every node is done, the flow publishes the
root through ``run.conclude``, the step ``supermerge merge`` ends with (same ``merge_report.json``),
so either way of running gives the same output and the next run can reuse its tree
(supermerge.orchestrator.incremental).

Slots: one node at a time per GPU (two merges on one GPU would share the memory the planner gave to
each); on the CPU as many nodes as the host budget holds at the largest CPU node's predicted peak
(after the GPU nodes' host share), at most one per core, at least one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from supermerge.orchestrator.sizes import format_bytes
from supermerge.orchestrator.node import NodeRecord, NodeTask
from supermerge.orchestrator.plan import MergePlan


def device_slots(plan: MergePlan, *, cpu_count: int | None = None, max_parallel: int | None = None) -> dict[str, int]:
    """Nodes that may run at once per device the plan uses: {'cuda:0': 1, 'cpu': n, ...}.

    ``max_parallel`` caps the CPU's slots (e.g. 1 to measure one node at a time, or to leave a
    shared machine's cores to others)."""
    devices = sorted({n.device for n in plan.nodes})
    slots = {d: 1 for d in devices if d != "cpu"}
    if "cpu" in devices:
        gpu_host = sum(
            max(n.predicted.host_bytes if n.predicted else 0 for n in plan.nodes if n.device == d) for d in slots
        )
        largest = max(n.predicted.total if n.predicted else 0 for n in plan.nodes if n.device == "cpu")
        fit = (plan.budget.host - gpu_host) // max(largest, 1)
        cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        slots["cpu"] = max(1, min(int(fit), cores, max_parallel or cores))
    return slots


def submission_order(plan: MergePlan) -> list[NodeTask]:
    """The nodes by height (every node whose children are all models first, the root last), in plan
    order within a height. A pool worker taking a node whose children still run waits for them; with
    this order every node below a waiting one was handed out before it, so the pool never deadlocks,
    and nodes that can start now are handed out before those that cannot."""
    height: dict[str, int] = {}
    for n in plan.nodes:
        height[n.id] = 1 + max((height[c.name] for c in n.children if c.path is None), default=0)
    return sorted(plan.nodes, key=lambda n: height[n.id])


def run_summary(
    plan: MergePlan, records: Mapping[str, NodeRecord | None], states: Mapping[str, str]
) -> str:
    """Markdown: the tree, then per node its state, device, predicted vs measured peak memory and
    the measured seconds (the planner predicts memory, not time)."""
    lines = [
        f"## {plan.config.output.name}: {len(plan.nodes)} merge node(s), fan-in {plan.fan_in}, "
        f"depth {plan.tree.depth}, method {plan.config.method}",
        "",
        "```",
        plan.tree.render(lambda n: f"[{len(plan.node(n).tasks)} tasks] {states.get(n, 'not run')}"),
        "```",
        "",
        "| node | tasks | state | device | predicted peak | measured peak | measured / predicted | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in plan.nodes:
        r = records.get(n.id)
        measured = format_bytes(r.measured_peak_bytes) if r is not None else "-"
        ratio = (f"{r.measured_peak_bytes / n.predicted_peak_bytes:.2f}"
                 if r is not None and n.predicted_peak_bytes and r.measured_peak_bytes else "-")
        if r is not None and r.over_prediction:
            ratio += " (over the planner's margin)"
        seconds = f"{r.seconds:.2f}" + (" (earlier run)" if r.cached else "") if r is not None else "-"
        lines.append(f"| {n.id} | {len(n.tasks)} | {states.get(n.id, 'not run')} | {n.device} "
                     f"| {format_bytes(n.predicted_peak_bytes)} | {measured} | {ratio} | {seconds} |")
    return "\n".join(lines)
