"""The ``hierarchical-merge`` Prefect flow: a merge tree with one Prefect task per merge node.

The flow takes the one run path (supermerge.orchestrator.run, the same as ``supermerge merge``): it
prepares (the output checked once, the previous run's tree grown by newly registered models, or a new
plan), then submits one task per merge node, named after the node (``merge-pa+pb``), with its merged
children's futures as arguments, so the UI draws the tree's edges and independent subtrees run at
once, then concludes in the task ``conclude`` (scores the root, publishes it). Each task
runs ``supermerge.orchestrator.node.run_node`` and returns its small ``NodeRecord`` dict: models move through the
checkpoint store on disk, never through Prefect (a tensor result or parameter would be pickled into
Prefect's result storage). The store is also the cache: a node finished there, by this flow or by
``supermerge merge``, is not merged again (its task run ends in the state ``From store``, tagged
``from-store``), so a re-run after a crash resumes, and Prefect's own caching is off. The node dict
and the store path are passed ``quote``d: Prefect links a task's inputs to earlier results by object
identity, and a string shared with an earlier node's record would draw a false edge.

Versions (``versions=N``, what the deployment passes): each run publishes ``<output>/v<N>`` and
switches ``<output>/current`` to it, keeping the newest N (supermerge.orchestrator.versions), so a schedule or a
trigger never collides with an earlier output; a run whose tree's root is the one ``current``
already holds publishes nothing and ends at once, "up to date". ``versions=0`` (the CLI) publishes
at ``output`` itself and refuses an existing one without ``overwrite``.

Concurrency: one thread pool per device the plan uses, sized by ``supermerge.orchestrator.parallel.device_slots``
(one node per GPU; on the CPU as many nodes as the memory budget holds at once, at most one per core),
each node submitted to its own device's pool. Pools in the flow's process need no concurrency limits
on the server (which poll, about a second per hand-off). With ``pools``, each node instead runs as a
flow run of the ``merge-node`` deployment on a work pool, in a process of its own on whichever worker
takes it (supermerge.flows.pools); everything else here is the same.

Retries come from the config's ``retry:`` section. Artifacts (supermerge.flows.live): the report (the tree,
each node's state, predicted vs measured memory, seconds and, with ``evaluate``, the test accuracy
and rank table) and a progress bar, both posted from the run's first second and at every change.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from supermerge.flows.live import FROM_STORE, LiveTree, close_crashed_runs
from supermerge.flows.node_flow import (FROM_STORE_STATE, follow_nodes, node_task_options,
                                         show_library_logs)
from supermerge.flows.pools import run_tree_on_pools
from supermerge.merge_core.config import MergeConfig
from supermerge.merge_core.evaluate import results_table
from supermerge.merge_core.job import DataCache, score_models
from supermerge.orchestrator.sizes import format_bytes
from supermerge.orchestrator.options import MergeOptions, load_merge_config
from supermerge.orchestrator.node import NodeRecord, NodeTask, cached_record, run_node
from supermerge.orchestrator.parallel import device_slots, submission_order
from supermerge.orchestrator.plan import MergePlan
from supermerge.orchestrator.pools import parse_pools
from supermerge.orchestrator.publish import ExecutionReport
from supermerge.orchestrator.run import Prepared, conclude, prepare
from supermerge.orchestrator.store import Store
from supermerge.orchestrator.stores import open_store

FLOW_NAME = "hierarchical-merge"
PROGRESS_KEY = "hierarchical-merge-progress"
REPORT_KEY = "hierarchical-merge-report"


@task(name="merge-node", cache_policy=NO_CACHE, persist_result=False)
def merge_node(node: dict[str, Any], store_dir: str, children: list[dict[str, Any]],
               data: DataCache | None = None) -> Any:
    """Merge one node into the store (returned from the store when finished there already, in the
    state ``From store``).

    ``children``: the merged children's records; the argument only orders the node after them and
    draws the edges, the inputs themselves are read from the store. ``data``: the plan's data files,
    read and tokenised once per run (the tasks run in this process)."""
    record = run_node(NodeTask.from_dict(node), open_store(store_dir), data=data)
    what = "finished in the store, not merged again; it had merged" if record.cached else "merged"
    get_run_logger().info("%s: %s in %.2f s, peak %s (predicted %s)", record.id, what, record.seconds,
                          format_bytes(record.measured_peak_bytes), format_bytes(record.predicted_peak_bytes))
    if record.cached:
        return Completed(data=record.to_dict(), name=FROM_STORE_STATE, message="finished in the store earlier")
    return record.to_dict()


@task(name="conclude", cache_policy=NO_CACHE, persist_result=False)
def conclude_run(prepared: Prepared, records: list[NodeRecord], seconds: float, evaluate: bool) -> ExecutionReport:
    """Score the root on the test data (``evaluate``) and publish it (supermerge.orchestrator.run.conclude,
    the step ``supermerge merge`` ends with too)."""
    return conclude(prepared, records, seconds, evaluate_test=evaluate)


@task(name="references", cache_policy=NO_CACHE, persist_result=False)
def reference_scores(config: MergeConfig, data: DataCache) -> dict[str, dict[str, float]]:
    """Test accuracy of the pretrained model and of each task's own fine-tune: the rows the merged
    model is ranked against in the report (``data``: the run's, which read the test data already)."""
    return score_models(config, {"pretrained": None, "individual": None}, data=data)


def run_tree(plan: MergePlan, store: Store, slots: dict[str, int], live: LiveTree) -> dict[str, PrefectFuture[Any]]:
    """Submit one merge task per node, lowest first, to its device's pool (``slots`` threads), each
    with its merged children's futures as arguments; return once all are done, the live tree
    updated as each starts and ends."""
    futures: dict[str, PrefectFuture[Any]] = {}
    with ExitStack() as stack:
        pools = {d: stack.enter_context(ThreadPoolTaskRunner(max_workers=n)) for d, n in slots.items()}
        for node in submission_order(plan):
            children = [futures[c.name] for c in node.children if c.path is None]
            node_task = node_task_options(merge_node, node, cached_record(node, store) is not None, plan.config, live)
            futures[node.id] = pools[node.device].submit(
                node_task, {"node": quote(node.to_dict()), "store_dir": quote(store.location), "children": children,
                            "data": quote(plan.data)}
            )
        follow_nodes(futures, live)
    return futures


def finished_records(futures: dict[str, PrefectFuture[Any]]) -> list[NodeRecord]:
    """The records of the nodes that completed, in submission order."""
    return [NodeRecord(**f.result()) for f in futures.values() if f.state.is_completed()]


def _flow_run() -> Any:
    context = FlowRunContext.get()
    return context.flow_run if context is not None else None


def close_crashed(deployment_id: Any) -> None:
    """Mark the unfinished task runs and tree of this deployment's crashed runs as crashed
    (supermerge.flows.live.close_crashed_runs); a failure to do so is logged, and this run goes on."""
    logger = get_run_logger()
    try:
        closed = close_crashed_runs(deployment_id, REPORT_KEY, PROGRESS_KEY)
    except Exception as e:  # the record of an earlier run must not stop this merge
        logger.warning("could not mark the task runs of earlier crashed runs as crashed: %s", e)
        return
    if closed:
        logger.info("earlier run(s) %s had crashed: their unfinished task runs and tree now say so", closed)


@flow(name=FLOW_NAME)
def hierarchical_merge(
    config: str,
    output: str | None = None,
    method: str | None = None,
    max_fan_in: int | None = None,
    memory_budget: str | None = None,
    flat: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    evaluate: bool = False,
    replan: bool = False,
    max_parallel: int | None = None,
    versions: int = 0,
    store: str | None = None,
    pools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Merge the models a YAML config names as a tree of merges; publish the root to its output.

    ``output``, ``method``, ``max_fan_in``, ``memory_budget``, ``flat``, ``device`` override the config as
    the ``supermerge merge`` options do. ``replan``: cluster from scratch instead of growing the tree
    published at the output; ``max_parallel``: at most this many CPU nodes at once. ``versions``: publish
    each run as ``<output>/v<N>`` with ``<output>/current`` pointing at it, keeping this many (0: publish
    at ``output`` itself, refusing an existing one unless ``overwrite``). ``store``: the checkpoint
    store (a folder or ``s3://bucket/prefix``), overriding the config's. ``pools``: run each node as a
    run of the ``merge-node`` deployment on one of these work pools (``{"name", "device", "memory"}``
    each; supermerge.flows.pools) instead of in this process; the store must be one every worker reaches.
    """
    show_library_logs()
    logger = get_run_logger()
    started = time.perf_counter()
    run = _flow_run()
    if run is not None and run.deployment_id is not None:
        close_crashed(run.deployment_id)
    options = MergeOptions.from_flow_parameters(output=output, method=method, device=device, memory_budget=memory_budget,
                                                max_fan_in=max_fan_in, flat=flat, store=store, overwrite=overwrite,
                                                replan=replan)
    with LiveTree(run.id if run is not None else None, REPORT_KEY, PROGRESS_KEY) as live:
        live.planning(f"reading {config} and planning the merge tree")
        merge_config = load_merge_config(Path(config), options)
        work_pools = parse_pools(pools) if pools is not None else None
        prepared = prepare(merge_config, options, versions=versions)
        plan, checkpoints = prepared.plan, prepared.store
        planned = time.perf_counter()
        if prepared.up_to_date:
            live.start(plan, {n.id: FROM_STORE for n in plan.nodes})
            note = f"up to date: {prepared.published} already holds this merge tree's root; nothing merged or published"
            live.finish(note)
            logger.info("%s (%.1f s)", note, time.perf_counter() - started)
            return {"output": str(prepared.published), "version": prepared.published.name, "up_to_date": True,
                    "store": checkpoints.location, "seconds": round(time.perf_counter() - started, 3),
                    "merged": 0, "from_store": 0, "nodes": [], "test_accuracy": {}}
        slots = device_slots(plan, max_parallel=max_parallel)
        logger.info("%s\nslots per device: %s", plan.render(), slots)
        live.start(plan, {})
        try:
            futures = (run_tree_on_pools(plan, checkpoints, work_pools, live) if work_pools is not None
                       else run_tree(plan, checkpoints, slots, live))
        except BaseException:
            live.crashed()
            raise
        ran = time.perf_counter()
        failed = [n for n, f in futures.items() if f.state.is_failed() or f.state.is_crashed()]
        if failed:
            live.finish(f"failed: node {failed[0]} failed; nothing published (finished nodes stay in the store)")
            futures[failed[0]].result()  # raises that node's own error

        ordered = finished_records(futures)
        scored = evaluate and any(m.test is not None for m in merge_config.models)
        if evaluate and not scored:
            logger.warning("evaluate: no model in %s has test data; nothing to score", config)
        report = conclude_run(quote(prepared), quote(ordered), ran - planned, scored)
        table = ""
        if scored:
            references = reference_scores(quote(merge_config), quote(plan.data))
            table = results_table({merge_config.output.name: report.test_accuracy}, references=references,
                                  individual=references["individual"])
        finished = time.perf_counter()
        merged, reused = sum(not r.cached for r in ordered), sum(r.cached for r in ordered)
        note = f"published {report.output}: {merged} node(s) merged, {reused} from the store, in {finished - started:.1f} s"
        live.finish(note, f"\n\n## Test accuracy (rank)\n\n{table}" if table else "")
        logger.info(note)
    return {
        "output": str(report.output),
        "version": prepared.target.name if versions else None,
        "up_to_date": False,
        "store": checkpoints.location,
        "seconds": round(finished - started, 3),
        "plan_seconds": round(planned - started, 3),
        "nodes_seconds": round(ran - planned, 3),
        "finish_seconds": round(finished - ran, 3),
        "slots": slots,
        "merged": merged,
        "from_store": reused,
        "nodes": [r.to_dict() for r in ordered],
        "test_accuracy": report.test_accuracy,
    }
