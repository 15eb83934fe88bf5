"""One merge node as Prefect sees it: the ``merge-node`` flow a worker runs, and the names of a node's
states, shared by the in-process task (supermerge.flows.hierarchical) and the pool path
(supermerge.flows.pools).

The ``merge-node`` flow is ten lines around ``supermerge.orchestrator.node.run_node``, like the task:
the node as plain data and the store's location in, the node's small record out, the model through
the store (which every worker must reach: ``s3://...`` or a shared mount at the same path). A worker
runs each flow run in a process of its own (a process pool: a subprocess; Docker or Kubernetes: a
container), so the node's measured peak, its RSS high-water mark and the malloc threshold are its
own, whatever runs beside it; the model code a learned node runs is imported before its meter starts
(``merge_core.model.load_model_code``: some 160 MB for a BERT, which the in-process path loads while
planning), so a node measures the same on either path. The flow logs its process id, its parent's (the worker's, on a
process pool) and its host, which is how a run's placement can be read back from the API.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, ParamSpec, TypeVar

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State, TaskRun
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS
from prefect.states import Completed
from prefect.tasks import Task

from supermerge.flows.live import FROM_STORE, MERGED, NOT_RUN, RUNNING, LiveTree
from supermerge.merge_core.config import MergeConfig
from supermerge.merge_core.model import load_model_code
from supermerge.orchestrator.node import NodeRecord, NodeTask, run_node
from supermerge.orchestrator.sizes import format_bytes
from supermerge.orchestrator.stores import open_store

NODE_FLOW_NAME = "merge-node"
FROM_STORE_STATE = "From store"
"""The name of a Completed state whose node was finished in the store already (not merged again)."""
FROM_STORE_TAG = "from-store"
"""The tag of a node's task run when the store held the node before the run started."""
PLACED_LOG = "merge-node {node}: pid {pid}, parent pid {ppid}, host {host}"
"""The first line a ``merge-node`` run logs: where it runs (read back by deploy/e2e_distributed_check.py)."""


P = ParamSpec("P")
R = TypeVar("R")


def show_library_logs() -> None:
    """Give the loggers named in PREFECT_LOGGING_EXTRA_LOGGERS (supermerge: every module of the product) Prefect's own
    level for them (``prefect.extra``'s, INFO by default) unless they have one: Prefect attaches its
    API handler to them but leaves their level at the root's WARNING, which drops INFO lines."""
    level = logging.getLogger("prefect.extra").getEffectiveLevel()
    for name in PREFECT_LOGGING_EXTRA_LOGGERS.value():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def node_state_name(future: PrefectFuture[Any], record: dict[str, Any] | None) -> str:
    """A node's state in the live tree's words, from its task's future and record."""
    state = future.state
    if state.is_completed() and record is not None:
        return FROM_STORE if record["cached"] else MERGED
    if state.is_failed() or state.is_crashed():
        return f"{state.name.lower()}: {state.message or ''}".strip()
    return NOT_RUN


@flow(name=NODE_FLOW_NAME, persist_result=False)
def merge_node_flow(node: dict[str, Any], store: str) -> Any:
    """Merge one node (``NodeTask.to_dict``) into the store at ``store`` (a URL or a shared folder);
    its ``NodeRecord`` dict, in the state ``From store`` when the store held it already."""
    show_library_logs()
    logger = get_run_logger()
    task = NodeTask.from_dict(node)
    logger.info(PLACED_LOG.format(node=task.id, pid=os.getpid(), ppid=os.getppid(), host=socket.gethostname()))
    if task.validation:  # the node runs its model: its code is loaded before the node's meter starts
        load_model_code(task.base, task.kind)  # type: ignore[arg-type]
    record = run_node(task, open_store(store))
    what = "finished in the store, not merged again; it had merged" if record.cached else "merged"
    logger.info("%s: %s in %.2f s, peak %s (predicted %s)", record.id, what, record.seconds,
                format_bytes(record.measured_peak_bytes), format_bytes(record.predicted_peak_bytes))
    if record.cached:
        return Completed(data=record.to_dict(), name=FROM_STORE_STATE, message="finished in the store earlier")
    return record.to_dict()


def node_task_options(base: Task[P, R], node: NodeTask, stored: bool, config: MergeConfig, live: LiveTree,
                      name: str | None = None) -> Task[P, R]:
    """``base`` (the in-process merge task, or the task that sends a node to a pool) for one node:
    named after the node (or ``name``) from its creation, the config's retries, tagged when the store
    holds it already, and marked running in the live tree when it starts (with the attempt after a
    retry)."""

    def running(_task: Task[..., Any], task_run: TaskRun, _state: State) -> None:
        live.set(node.id, RUNNING if task_run.run_count <= 1 else f"{RUNNING} (attempt {task_run.run_count})")

    return base.with_options(task_run_name=name or node.id, retries=config.retry.retries,
                             retry_delay_seconds=config.retry.retry_delay_seconds,
                             tags=[FROM_STORE_TAG] if stored else None, on_running=[running])


def follow_nodes(futures: dict[str, PrefectFuture[Any]], live: LiveTree) -> None:
    """Wait for every node's task, in the order they end, and set each node's final state and record
    in the live tree (the in-process path and the pool path submit differently, but end alike)."""
    node_of = {id(f): n for n, f in futures.items()}
    for future in as_completed(list(futures.values())):
        future.wait()  # keeps the final state on the future (the API's copy may lag behind)
        record = future.result(raise_on_failure=False) if future.state.is_completed() else None
        live.set(node_of[id(future)], node_state_name(future, record), NodeRecord(**record) if record else None)
