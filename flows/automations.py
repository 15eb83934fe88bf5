"""The server-side automation that marks a vanished flow run Crashed (Prefect's documented
"zombie flow run" automation, https://docs.prefect.io/v3/advanced/detect-zombie-flows).

A flow run whose host dies (SIGKILL, power, eviction) cannot report its end: it stays Running, with
its task runs, and keeps its deployment's ``concurrency_limit`` slot until the lease Prefect's engine
renews lapses (300 s). Flow runs started by a worker emit ``prefect.flow-run.heartbeat`` every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180, at least 30; the deployment sets 30).
This automation expects another event of that flow run within ``within`` seconds of each heartbeat;
when none comes it moves the run to Crashed, which frees the slot, so the next run starts and
resumes from the checkpoint store. Prefect's docs advise ``within`` = 3 heartbeats (90 s at 30 s):
a run is then marked at most 90 s after its last heartbeat, and a heartbeat late by up to 60 s
(a loaded host) is not taken for a crash.

    python -m supermerge.flows.automations [--within SECONDS]     # once per server; replaces an older copy
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "supermerge: crash flow runs whose heartbeats stopped"
WITHIN_SECONDS = 90


def zombie_automation(within: float = WITHIN_SECONDS) -> Automation:
    """The automation as Prefect's docs give it: after each heartbeat of a flow run, expect any event
    of that run (a heartbeat or a state change) within ``within`` seconds, else mark it Crashed."""
    return Automation(
        name=NAME,
        description="Marks a flow run Crashed when its heartbeats stop (its process or host died), which "
                    "frees its deployment's concurrency slot for the next run.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within:g} s: the flow run's process or host died")],
    )


def install(within: float = WITHIN_SECONDS) -> Automation:
    """Create the automation on the server at PREFECT_API_URL, replacing any of the same name."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name=NAME):
            client.delete_automation(old.id)
    return zombie_automation(within).create()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supermerge.flows.automations", description=__doc__.splitlines()[0])
    parser.add_argument("--within", type=float, default=WITHIN_SECONDS,
                        help=f"seconds without a heartbeat before a run is marked Crashed (default {WITHIN_SECONDS})")
    args = parser.parse_args(argv)
    created = install(args.within)
    print(f"automation {created.id}: {NAME} (within {args.within:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
