"""The run's tree in the Prefect UI while it runs: a markdown artifact and a progress bar, both posted
at every change of any node's state, from the flow run's first second to its end.

Prefect's run graph shows only task runs that have started, and cannot tell a node reused from the
store from one merged now; this artifact shows the whole tree and every node's state (pending,
running, merged, from store, failed, not run, crashed) with the report's columns (predicted vs
measured memory, seconds). Node threads and the flow's thread both change states, so posts are
serialised by a lock, each a new version of the same key, tied to the flow run explicitly (an
artifact posted from a task's thread would otherwise belong to that task run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

from supermerge.orchestrator.node import NodeRecord
from supermerge.orchestrator.parallel import run_summary
from supermerge.orchestrator.plan import MergePlan

PENDING, RUNNING, MERGED, FROM_STORE = "pending", "running", "merged", "from store"
NOT_RUN = "not run (an input failed)"
CRASHED = "crashed (the flow run stopped before the node finished)"
NOT_RUN_CRASH = "not run (the flow run crashed)"
UNFINISHED = (PENDING, RUNNING)
IN_FLIGHT = "_in flight"
"""How an artifact version posted while the run goes on begins (a last version begins otherwise)."""


class LiveTree:
    """The artifacts of one flow run (``flow_run_id``): ``report_key`` (markdown: the tree and the
    node table) and ``progress_key`` (finished nodes / all nodes). Use as a context manager."""

    def __init__(self, flow_run_id: UUID | None, report_key: str, progress_key: str) -> None:
        self.flow_run_id = flow_run_id
        self.report_key, self.progress_key = report_key, progress_key
        self.plan: MergePlan | None = None
        self.states: dict[str, str] = {}
        self.records: dict[str, NodeRecord | None] = {}
        self.extra = ""
        self._lock = threading.Lock()
        self._client: Any = None
        self._progress_id: UUID | None = None

    def __enter__(self) -> LiveTree:
        self._client = get_client(sync_client=True).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.__exit__(*exc)

    def planning(self, what: str) -> None:
        """Before the tree exists: say what the run is doing."""
        with self._lock:
            self._post(f"## planning\n\n{what}", "planning")

    def start(self, plan: MergePlan, states: Mapping[str, str]) -> None:
        """The whole tree, every node in its first state (pending or from store)."""
        with self._lock:
            self.plan = plan
            self.states = {n.id: states.get(n.id, PENDING) for n in plan.nodes}
            self._post_all()

    def set(self, node: str, state: str, record: NodeRecord | None = None) -> None:
        with self._lock:
            self.states[node] = state
            if record is not None:
                self.records[node] = record
            self._post_all()

    def crashed(self) -> None:
        """The flow run is going down with nodes unfinished: say so rather than leave them running."""
        with self._lock:
            if self.plan is None:
                return
            for n, s in self.states.items():
                if s.startswith(RUNNING):
                    self.states[n] = CRASHED
                elif s == PENDING:
                    self.states[n] = NOT_RUN_CRASH
            self._post_all()

    def finish(self, note: str, extra: str = "") -> None:
        """The last version: a line on the outcome, and ``extra`` markdown (e.g. the accuracy table)."""
        with self._lock:
            self.extra = extra
            self._post_all(note)

    def _counts(self) -> str:
        words = [MERGED, FROM_STORE, RUNNING, PENDING]
        counts = {w: sum(s.startswith(w) for s in self.states.values()) for w in words}
        other = len(self.states) - sum(counts.values())
        return ", ".join(f"{counts[w]} {w}" for w in words if counts[w]) + (f", {other} failed or not run" if other else "")

    def _post_all(self, note: str | None = None) -> None:
        assert self.plan is not None
        done = sum(s in (MERGED, FROM_STORE) for s in self.states.values())
        total = len(self.states)
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        head = f"**{note}**" if note else f"{IN_FLIGHT}; updated {stamp} UTC_"
        body = run_summary(self.plan, self.records, self.states)
        self._post(f"{head}\n\n{self._counts()}\n\n{body}{self.extra}",
                   f"{self.plan.config.output}: {done} of {total} merge nodes done")
        self._progress(100.0 * done / total, f"{done} of {total} merge nodes done ({self._counts()})")

    def _post(self, markdown: str, description: str) -> None:
        if self.flow_run_id is None:
            return
        self._client.create_artifact(ArtifactCreate(key=self.report_key, type="markdown", data=markdown,
                                                    description=description, flow_run_id=self.flow_run_id))

    def _progress(self, percent: float, description: str) -> None:
        if self.flow_run_id is None:
            return
        if self._progress_id is None:
            created = self._client.create_artifact(ArtifactCreate(
                key=self.progress_key, type="progress", data=percent, description=description,
                flow_run_id=self.flow_run_id))
            self._progress_id = created.id
        else:
            self._client.update_artifact(self._progress_id, ArtifactUpdate(data=percent, description=description))



def close_crashed_runs(deployment_id: UUID, report_key: str, progress_key: str) -> list[str]:
    """Make the record of this deployment's crashed runs true: a run killed with its host (SIGKILL)
    cannot say it stopped, and once the zombie-run automation (supermerge.flows.automations) has marked it
    Crashed its task runs still read Running and its tree artifact still reads "in flight". Marks
    those task runs Crashed and posts a last tree version with the unfinished nodes as crashed. Run
    at the start of each deployment run; the names of the runs closed."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType,
                                                TaskRunFilter, TaskRunFilterStateType, TaskRunFilterState)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
    from prefect.states import Crashed

    closed = []
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED]))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
        for run in crashed:
            response = client.request("POST", "/artifacts/filter", json={
                "artifacts": {"flow_run_id": {"any_": [str(run.id)]}, "key": {"any_": [report_key]}},
                "sort": "CREATED_DESC", "limit": 1})
            latest = response.json()
            if not latest or IN_FLIGHT not in (latest[0]["data"] or ""):
                continue
            why = (run.state.message if run.state else None) or "the flow run crashed"
            unfinished = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]))),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
            for task_run in unfinished:
                client.set_task_run_state(task_run.id, Crashed(message=f"its flow run crashed: {why}"), force=True)
            data = latest[0]["data"]
            head, rest = data.split("\n\n", 1)
            rest = rest.replace(f"| {RUNNING} |", f"| {CRASHED} |").replace(f"| {PENDING} |", f"| {NOT_RUN_CRASH} |")
            rest = rest.replace(f"] {RUNNING}\n", f"] {CRASHED}\n").replace(f"] {PENDING}\n", f"] {NOT_RUN_CRASH}\n")
            progress = client.request("POST", "/artifacts/filter", json={
                "artifacts": {"flow_run_id": {"any_": [str(run.id)]}, "key": {"any_": [progress_key]}},
                "sort": "CREATED_DESC", "limit": 1}).json()
            for bar in progress:
                client.update_artifact(bar["id"], ArtifactUpdate(
                    description=f"{bar['description'].split(' (')[0]}; then the flow run crashed"))
            client.create_artifact(ArtifactCreate(
                key=report_key, type="markdown", flow_run_id=run.id, description=f"{run.name}: crashed",
                data=f"**crashed: {why}; closed by a later run. Nodes merged before the crash are in the store "
                     f"and were reused by the next run.**\n\n{rest}"))
            closed.append(run.name)
    return closed
