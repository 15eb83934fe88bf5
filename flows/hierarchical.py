"""The ``hierarchical-merge`` Prefect flow: a merge tree with one Prefect task per merge node.

The flow plans (orchestrator.plan, or the previous run's tree grown by newly registered models,
orchestrator.incremental), then submits one task per merge node with its merged children's futures
as arguments, so the UI draws the tree's edges and independent subtrees run at once, and publishes
the root as ``supermerge merge`` does. Each task runs ``orchestrator.node.run_node`` and returns its
small ``NodeRecord`` dict: models move through the checkpoint store on disk, never through Prefect
(a tensor result or parameter would be pickled into Prefect's result storage). The store is also
the cache: a node finished there, by this flow or by ``supermerge merge``, is not merged again, so a
re-run after a crash resumes, and Prefect's own caching is off.

Concurrency: one thread pool per device the plan uses, sized by ``orchestrator.parallel.device_slots``
(one node per GPU; on the CPU as many nodes as the memory budget holds at once, at most one per core),
each node submitted to its own device's pool. Pools in the flow's process need no concurrency limits
on the server (which poll, about a second per hand-off).

Retries come from the config's ``retry:`` section. Artifacts: a progress bar updated as nodes finish,
a markdown report (the tree, each node's state, predicted vs measured memory, seconds) and, with
``evaluate``, the per-task test accuracy and rank table.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.cli import _load_merge_config
from merge_core.config import MergeConfig
from merge_core.errors import CheckpointError
from merge_core.evaluate import results_table
from merge_core.job import score_models
from orchestrator.executor import default_store_dir
from orchestrator.incremental import plan_with_previous
from orchestrator.node import NodeRecord, NodeTask, run_node
from orchestrator.parallel import device_slots, finish, run_summary, submission_order
from orchestrator.plan import MergePlan
from orchestrator.store import CheckpointStore

FLOW_NAME = "hierarchical-merge"
PROGRESS_KEY = "hierarchical-merge-progress"
REPORT_KEY = "hierarchical-merge-report"
SHOWN_TASKS = 4
"""Task names spelled out in a task run's name; a bigger subtree says how many more."""


def node_label(node: dict[str, Any]) -> str:
    """``merge[merge-3: sentiment+verb_sense]``: a node's id and the tasks of its subtree."""
    tasks = list(node["tasks"])
    shown = "+".join(tasks[:SHOWN_TASKS])
    more = f"+{len(tasks) - SHOWN_TASKS} more" if len(tasks) > SHOWN_TASKS else ""
    return f"merge[{node['id']}: {shown}{more}]"


def node_run_name() -> str:
    """The running merge task's name (see ``node_label``)."""
    return node_label(task_run.parameters["node"])


@task(name="merge-node", task_run_name=node_run_name, cache_policy=NO_CACHE, persist_result=False)
def merge_node(node: dict[str, Any], store_dir: str, children: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge one node into the store (returned from the store when finished there already).

    ``children``: the merged children's records; the argument only orders the node after them and
    draws the edges, the inputs themselves are read from the store."""
    record = run_node(NodeTask.from_dict(node), CheckpointStore(Path(store_dir)))
    what = "finished in the store, not merged again; it had merged" if record.cached else "merged"
    get_run_logger().info("%s: %s in %.2f s, peak %.1f MB (predicted %.1f MB)", record.id, what, record.seconds,
                          record.measured_peak_bytes / 2**20, record.predicted_peak_bytes / 2**20)
    return record.to_dict()


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_merge(config: MergeConfig, model_dir: str) -> tuple[dict[str, float], str]:
    """Test accuracy of the merged model per task, and the paper's table with the pretrained model and
    the individual fine-tunes as references."""
    row = config.output.name
    scores = score_models(config, {"pretrained": None, "individual": None, row: model_dir})
    table = results_table({row: scores[row]}, references={k: scores[k] for k in ("pretrained", "individual")},
                          individual=scores["individual"])
    return scores[row], table


def _state_name(future: PrefectFuture[Any], record: dict[str, Any] | None) -> str:
    state = future.state
    if state.is_completed() and record is not None:
        return "from store" if record["cached"] else "merged"
    if state.is_failed() or state.is_crashed():
        return f"{state.name.lower()}: {state.message or ''}".strip()
    return "not run (an input failed)"


def run_tree(plan: MergePlan, store: CheckpointStore, slots: dict[str, int],
             config: MergeConfig) -> dict[str, PrefectFuture[Any]]:
    """Submit one merge task per node, lowest first, to its device's pool (``slots`` threads), each
    with its merged children's futures as arguments; return once all are done, the progress artifact
    updated as each finishes. Retries are the config's."""
    progress = create_progress_artifact(0.0, key=PROGRESS_KEY, description=f"0 of {len(plan.nodes)} merge nodes")
    node_task = merge_node.with_options(retries=config.retry.retries,
                                        retry_delay_seconds=config.retry.retry_delay_seconds)
    futures: dict[str, PrefectFuture[Any]] = {}
    with ExitStack() as stack:
        pools = {d: stack.enter_context(ThreadPoolTaskRunner(max_workers=n)) for d, n in slots.items()}
        for node in submission_order(plan):
            children = [futures[c.name] for c in node.children if c.path is None]
            futures[node.id] = pools[node.device].submit(
                node_task, {"node": node.to_dict(), "store_dir": str(store.root), "children": children}
            )
        node_of = {id(f): n for n, f in futures.items()}
        for done, future in enumerate(as_completed(list(futures.values())), start=1):
            update_progress_artifact(progress, 100.0 * done / len(futures),
                                     description=f"{done} of {len(futures)} merge nodes; last {node_of[id(future)]}")
    for future in futures.values():
        future.wait()  # keeps the final state on the future (the API's copy may lag behind)
    return futures


def outcomes(futures: dict[str, PrefectFuture[Any]]) -> tuple[dict[str, NodeRecord | None], dict[str, str]]:
    """Each node's record (None when it did not complete) and state in words."""
    raw = {n: f.result(raise_on_failure=False) if f.state.is_completed() else None for n, f in futures.items()}
    return ({n: NodeRecord(**r) if r is not None else None for n, r in raw.items()},
            {n: _state_name(futures[n], raw[n]) for n in futures})


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
) -> dict[str, Any]:
    """Merge the models a YAML config names as a tree of merges; publish the root to its output.

    ``output``, ``method``, ``max_fan_in``, ``memory_budget``, ``flat``, ``device`` override the config as
    the ``supermerge merge`` options do. ``replan``: cluster from scratch instead of growing the tree
    published at the output; ``max_parallel``: at most this many CPU nodes at once.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    merge_config = _load_merge_config(Path(config), output=Path(output) if output else None, method=method,
                                      device=device, memory_budget=memory_budget, max_fan_in=max_fan_in, flat=flat)
    if merge_config.output.exists() and not overwrite:
        raise CheckpointError(f"{merge_config.output} already exists; choose another output or pass overwrite=True")
    plan = plan_with_previous(merge_config, replan=replan)
    store = CheckpointStore(default_store_dir(merge_config.output))
    slots = device_slots(plan, max_parallel=max_parallel)
    logger.info("%s\nslots per device: %s", plan.render(), slots)
    planned = time.perf_counter()

    futures = run_tree(plan, store, slots, merge_config)
    ran = time.perf_counter()
    records, states = outcomes(futures)
    summary = run_summary(plan, records, states)
    failed = [n for n, f in futures.items() if f.state.is_failed() or f.state.is_crashed()]
    if failed:
        create_markdown_artifact(summary, key=REPORT_KEY, description=f"{plan.config.output}: failed")
        futures[failed[0]].result()  # raises that node's own error

    test_accuracy: dict[str, float] = {}
    table = ""
    if evaluate and any(m.test is not None for m in merge_config.models):
        test_accuracy, table = evaluate_merge(merge_config, str(store.path(plan.root.key)))
    elif evaluate:
        logger.warning("evaluate: no model in %s has test data; nothing to score", config)
    ordered = [r for r in records.values() if r is not None]
    report = finish(plan, store, ordered, time.perf_counter() - started, overwrite=overwrite,
                    test_accuracy=test_accuracy)
    create_markdown_artifact(summary + (f"\n\n## Test accuracy (rank)\n\n{table}" if table else ""),
                             key=REPORT_KEY, description=f"{plan.config.output}")
    finished = time.perf_counter()
    logger.info("published %s: %d node(s) merged, %d from the store, in %.1f s", report.output,
                sum(not r.cached for r in ordered), sum(r.cached for r in ordered), finished - started)
    return {
        "output": str(report.output),
        "store": str(store.root),
        "seconds": round(finished - started, 3),
        "plan_seconds": round(planned - started, 3),
        "nodes_seconds": round(ran - planned, 3),
        "finish_seconds": round(finished - ran, 3),
        "slots": slots,
        "merged": sum(not r.cached for r in ordered),
        "from_store": sum(r.cached for r in ordered),
        "nodes": [r.to_dict() for r in ordered],
        "test_accuracy": test_accuracy,
    }
