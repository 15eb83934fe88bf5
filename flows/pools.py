"""Merge nodes on other machines: each node a run of the ``merge-node`` deployment on a work pool.

``hierarchical-merge`` with ``pools`` (docs/distributed.md says why this and not prefect-dask): the
plan is made as always; each node is placed on the smallest configured pool of its device class that
holds its predicted peak (supermerge.orchestrator.pools; a node that fits no pool is refused before
anything runs, and so is a pool with no ``merge-node`` deployment or no online worker). Then one task
per node, submitted lowest first with its children's futures as arguments like the in-process path,
starts the node's run of ``merge-node/<pool>`` with ``run_deployment`` (a subflow of the merge, so
the UI nests it under the node) and waits for it. Siblings' runs are started at once, and any
worker of the pool takes each. The node's record is read back from the store, which every worker and
this flow reach; Prefect's results are not used (they live on the worker's disk).

Faults: a run that ends Failed or Crashed (its worker was killed: Prefect's heartbeats and
supermerge.flows.automations' zombie automation mark it Crashed) fails the node's task, which the
config's ``retry:`` policy retries: a new run of the deployment, which another worker of the pool
takes. The store's lock on the node's key (an S3 lease, taken over after its expiry) and its content
keys make the rerun safe and the result the same bytes.

    python -m supermerge.flows.pools deploy --pool supermerge-cpu [--root DIR]

deploys ``merge-node/<pool>`` on the pool (one per pool, from the source folder ``--root``, which
every worker of a process pool must have at the same path, or the image's for Docker/Kubernetes).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import WorkerStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from supermerge.flows.live import LiveTree
from supermerge.flows.node_flow import FROM_STORE_STATE, NODE_FLOW_NAME, follow_nodes, node_task_options
from supermerge.orchestrator.errors import PlacementError, RemoteNodeError, StoreError
from supermerge.orchestrator.node import NodeTask, cached_record
from supermerge.orchestrator.parallel import submission_order
from supermerge.orchestrator.plan import MergePlan
from supermerge.orchestrator.pools import WorkPool, dispatched_node, place_on_pools
from supermerge.orchestrator.stores import open_store
from supermerge.orchestrator.store import Store

POLL_SECONDS = 2.0
"""How often a node's task asks the server whether its run has ended (run_deployment's default: 5 s)."""

HEARTBEAT_SECONDS = 30
"""The ``merge-node`` runs' heartbeat (the least Prefect allows), for the zombie automation."""


def deployment_name(pool: str) -> str:
    """The ``merge-node`` deployment of a pool is named after the pool."""
    return f"{NODE_FLOW_NAME}/{pool}"


@task(name="merge-node-run", cache_policy=NO_CACHE, persist_result=False)
def run_on_pool(node: dict[str, Any], deployment: str, store: str, children: list[dict[str, Any]]) -> Any:
    """Run one node as a flow run of ``deployment`` and wait for it; its record, read from the store.

    ``children``: the merged children's records; it only orders the node after them and draws the
    edges. Raises RemoteNodeError when the run did not complete (the task's retries start another)."""
    planned = NodeTask.from_dict(node)
    run = run_deployment(deployment, parameters={"node": node, "store": store}, flow_run_name=planned.id,
                         timeout=None, poll_interval=POLL_SECONDS, as_subflow=True)
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state is not None else "without a state"
        message = (state.message or "").strip() if state is not None else ""
        raise RemoteNodeError(f"node {planned.id}: its run {run.name} ({run.id}) of {deployment} ended {name}"
                              f"{f': {message}' if message else ''}; its log is on the server (prefect flow-run logs {run.id})")
    record = cached_record(planned, open_store(store))
    if record is None:
        raise StoreError(f"node {planned.id}: its run {run.id} of {deployment} completed, but the store {store} holds "
                         "no finished node at its key here: the workers and this flow must reach the same store "
                         "(an s3:// URL, or a folder shared at the same path)")
    if state.name == FROM_STORE_STATE:
        return Completed(data=record.to_dict(), name=FROM_STORE_STATE, message="finished in the store earlier")
    return dataclasses.replace(record, cached=False).to_dict()


def check_pools_ready(pools: Sequence[str]) -> None:
    """Refuse, before any node runs, pools with no ``merge-node`` deployment or no online worker (their
    nodes would wait for ever), naming each with what to do."""
    problems = []
    with get_client(sync_client=True) as client:
        for pool in sorted(set(pools)):
            try:
                client.read_deployment_by_name(deployment_name(pool))
            except ObjectNotFound:
                problems.append(f"{pool}: no deployment {deployment_name(pool)} "
                                f"(python -m supermerge.flows.pools deploy --pool {pool})")
                continue
            workers = client.read_workers_for_work_pool(pool)
            if not any(w.status == WorkerStatus.ONLINE for w in workers):
                problems.append(f"{pool}: no online worker (prefect worker start --pool {pool} --limit 1 on "
                                "each machine of the pool)")
    if problems:
        raise PlacementError("the merge's nodes need work pools that cannot take them: " + "; ".join(problems))


def run_tree_on_pools(plan: MergePlan, store: Store, pools: Sequence[WorkPool],
                      live: LiveTree) -> dict[str, PrefectFuture[Any]]:
    """Send every node to its pool, lowest first, each after its merged children; return once all
    are done, the live tree updated as each starts and ends. The futures' results are the nodes'
    record dicts, as ``hierarchical.run_tree``'s are."""
    placed = place_on_pools(plan.nodes, pools)
    check_pools_ready([p.name for p in placed.values()])
    futures: dict[str, PrefectFuture[Any]] = {}
    # each thread only waits on the server: one per node, so every node whose inputs are ready runs
    with ThreadPoolTaskRunner(max_workers=len(plan.nodes)) as runner:
        for node in submission_order(plan):
            pool = placed[node.id].name
            children = [futures[c.name] for c in node.children if c.path is None]
            node_task = node_task_options(run_on_pool, node, cached_record(node, store) is not None, plan.config,
                                          live, name=f"{node.id} @ {pool}")
            futures[node.id] = runner.submit(node_task, {
                "node": quote(dispatched_node(node)), "deployment": quote(deployment_name(pool)),
                "store": quote(store.location), "children": children})
        follow_nodes(futures, live)
    return futures


def deploy(pool: str, root: Path) -> str:
    """Deploy ``merge-node/<pool>`` from the source folder ``root`` on the work pool ``pool``; its id.

    The runs send heartbeats every HEARTBEAT_SECONDS (so the zombie automation can mark a run whose
    worker died) and supermerge's own logs to the server."""
    from supermerge.flows.node_flow import merge_node_flow

    source = merge_node_flow.from_source(source=str(root.resolve()), entrypoint="flows/node_flow.py:merge_node_flow")
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS), "PREFECT_LOGGING_EXTRA_LOGGERS": "supermerge",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return str(source.deploy(name=pool, work_pool_name=pool, job_variables={"env": env}, tags=["supermerge"],
                             description=f"One supermerge merge node on the work pool {pool}", print_next_steps=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supermerge.flows.pools", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    deploying = commands.add_parser("deploy", help="deploy merge-node/<pool> on a work pool")
    deploying.add_argument("--pool", required=True, help="the work pool (created first: prefect work-pool create)")
    deploying.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                           help="the source folder the workers run from (default: this checkout)")
    args = parser.parse_args(argv)
    print(f"deployment {deploy(args.pool, args.root)}: {deployment_name(args.pool)} on the pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
