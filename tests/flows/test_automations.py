"""The zombie-run automation (flows/automations.py): Prefect's documented trigger, installed once."""

from __future__ import annotations

from datetime import timedelta

import pytest

from supermerge.flows.automations import NAME, install, zombie_automation


def test_the_automation_crashes_a_run_whose_heartbeats_stop_for_within_seconds() -> None:
    automation = zombie_automation(40)
    trigger = automation.trigger
    assert trigger.after == {"prefect.flow-run.heartbeat"} and trigger.expect == {"prefect.flow-run.*"}
    assert trigger.posture == "Proactive" and trigger.within == timedelta(seconds=40) and trigger.threshold == 1
    assert trigger.for_each == {"prefect.resource.id"}  # one bucket per flow run
    [action] = automation.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED"


@pytest.mark.usefixtures("prefect_api")
def test_installing_twice_leaves_one_automation() -> None:
    from prefect import get_client

    install(90)
    install(45)
    with get_client(sync_client=True) as client:
        [found] = client.read_automations_by_name(name=NAME)
    assert found.trigger.within == timedelta(seconds=45) and found.enabled
