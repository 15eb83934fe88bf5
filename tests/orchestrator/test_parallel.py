"""How many nodes run at once per device, and the order they are handed out in."""

from __future__ import annotations

from types import SimpleNamespace

from supermerge.orchestrator.node import ChildRef
from supermerge.orchestrator.parallel import device_slots, submission_order

MB = 2**20


def _node(id: str, device: str = "cpu", total: int = 100 * MB, host: int = 0, children: tuple = ()) -> SimpleNamespace:
    return SimpleNamespace(id=id, device=device, children=children, predicted_peak_bytes=total,
                           predicted=SimpleNamespace(total=total, host_bytes=host, peak=total))


def _plan(nodes: list[SimpleNamespace], host_budget: int) -> SimpleNamespace:
    return SimpleNamespace(nodes=nodes, budget=SimpleNamespace(host=host_budget))


def test_cpu_slots_are_what_the_budget_holds_at_the_largest_node_capped_by_cores() -> None:
    plan = _plan([_node("merge-0", total=100 * MB), _node("merge-1", total=300 * MB)], host_budget=1000 * MB)
    assert device_slots(plan, cpu_count=8) == {"cpu": 3}
    assert device_slots(plan, cpu_count=2) == {"cpu": 2}
    assert device_slots(plan, cpu_count=8, max_parallel=1) == {"cpu": 1}
    assert device_slots(_plan(plan.nodes, host_budget=200 * MB), cpu_count=8) == {"cpu": 1}  # at least one


def test_one_node_per_gpu_and_the_gpu_nodes_host_share_leaves_the_cpu_less() -> None:
    nodes = [_node("merge-0", "cuda:0", host=300 * MB), _node("merge-1", "cuda:1", host=100 * MB),
             _node("merge-2", "cuda:0", host=200 * MB), _node("merge-3", "cpu", total=100 * MB)]
    assert device_slots(_plan(nodes, host_budget=1000 * MB), cpu_count=16) == {"cuda:0": 1, "cuda:1": 1, "cpu": 6}


def test_nodes_are_handed_out_lowest_first() -> None:
    m0 = _node("merge-0", children=(ChildRef("a", "k", "/models/a"), ChildRef("b", "k", "/models/b")))
    m1 = _node("merge-1", children=(ChildRef("merge-0", "k0"), ChildRef("c", "k", "/models/c")))
    m2 = _node("merge-2", children=(ChildRef("d", "k", "/models/d"), ChildRef("e", "k", "/models/e")))
    root = _node("merge-3", children=(ChildRef("merge-1", "k1"), ChildRef("merge-2", "k2")))
    order = [n.id for n in submission_order(_plan([m0, m1, m2, root], 0))]
    assert order == ["merge-0", "merge-2", "merge-1", "merge-3"]
