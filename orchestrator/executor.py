"""The plain executor: run a plan's merge nodes one after another through the checkpoint store.

Nodes run in the plan's order (every node after its children), each through the same ``run_node`` a
Prefect task calls. A node already finished in the store is loaded, not recomputed, so a killed run
started again resumes where it stopped and gives the same bytes. Preparing the run and concluding it
(scoring, publishing) are supermerge.orchestrator.run's, shared with the Prefect flow.

Siblings are not run in parallel: one node at a time keeps each node's measured peak its own (the
memory planner's budget is per node).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from supermerge.orchestrator.errors import StoreError
from supermerge.orchestrator.node import NodeRecord, NodeTask, cached_record, run_node
from supermerge.orchestrator.plan import MergePlan
from supermerge.orchestrator.publish import ExecutionReport
from supermerge.orchestrator.run import Prepared, conclude, prepared_plan
from supermerge.orchestrator.store import Store
from supermerge.orchestrator.stores import config_store, open_store

log = logging.getLogger(__name__)

NodeRunner = Callable[[NodeTask, Store], NodeRecord]
"""What runs one node: ``run_node`` (the default), or a wrapper around it."""


def run_nodes(prepared: Prepared, *, runner: NodeRunner | None = None, progress: bool = False) -> list[NodeRecord]:
    """Every node of the prepared plan, bottom-up; the records in plan order. ``runner`` runs one node
    that is not finished in the store (default ``run_node``); finished nodes are never handed to it."""
    plan, store = prepared.plan, prepared.store
    run = runner if runner is not None else (lambda node, s: run_node(node, s, progress=progress, data=plan.data))
    records: list[NodeRecord] = []
    for node in tqdm(plan.nodes, desc="merge tree", disable=not progress, unit="node"):
        done = cached_record(node, store)
        if done is not None:
            log.info("%s: already in the store; loading it", node.id)
        records.append(done if done is not None else run(node, store))
    if store.record(plan.root.key) is None:
        raise StoreError(f"the root {plan.root.id} is not finished in {store.root} after running every node; "
                         "the node runner did not write it")
    return records


def execute_prepared(prepared: Prepared, *, runner: NodeRunner | None = None, progress: bool = False) -> ExecutionReport:
    """Run the prepared plan's nodes here and conclude the run (score the root, publish it)."""
    started = time.perf_counter()
    records = run_nodes(prepared, runner=runner, progress=progress)
    return conclude(prepared, records, time.perf_counter() - started)


def execute(
    plan: MergePlan,
    *,
    store_dir: str | Path | None = None,
    overwrite: bool = False,
    runner: NodeRunner | None = None,
    progress: bool = False,
) -> ExecutionReport:
    """Run a plan made elsewhere (a benchmark's, a test's) and publish its root at the config's output;
    ``store_dir``: the store to use instead of the config's."""
    store = open_store(store_dir) if store_dir is not None else config_store(plan.config)
    return execute_prepared(prepared_plan(plan, store, overwrite=overwrite), runner=runner, progress=progress)
