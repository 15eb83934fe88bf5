"""Work-pool placement: each node to the smallest pool of its device class that holds its prediction;
a plan with a node no pool holds is refused naming every such node."""

from __future__ import annotations

import pytest

from supermerge.merge_core.errors import ConfigError
from supermerge.merge_core.peak import PeakBytes
from supermerge.orchestrator.errors import PlacementError
from supermerge.orchestrator.node import NodeTask
from supermerge.orchestrator.pools import WorkPool, dispatched_node, parse_pools, place_on_pools

GB = 10**9


def _peak(host: int, device: int = 0) -> PeakBytes:
    zero = dict.fromkeys(["model_weights", "merge_weight_grads", "optimizer_state", "merge_weights",
                          "stacked_task_vectors", "merged_params", "merged_param_grads", "activations", "runtime"], 0)
    if device:
        return PeakBytes(**zero, task_vectors=device, op_temporaries=host, device_terms=frozenset({"task_vectors"}))
    return PeakBytes(**zero, task_vectors=host)


def _node(name: str, device: str, predicted: PeakBytes | None) -> NodeTask:
    return NodeTask(id=name, key="0" * 64, children=(), tasks=("a",), validation={}, base="/base", method="ta",
                    parameters={}, kind="encoder", seed=0, max_length=8, head_prefixes=(), data_digest="",
                    device=device, predicted=predicted)


POOLS = parse_pools([
    {"name": "cpu-small", "device": "cpu", "memory": "8GB"},
    {"name": "cpu-big", "device": "cpu", "memory": "64GB"},
    {"name": "gpu-24gb", "device": "cuda", "memory": "24GB", "host_memory": "32GB"},
    {"name": "gpu-80gb", "device": "cuda", "memory": "80GB"},
])


def test_each_node_goes_to_the_smallest_pool_of_its_class_that_holds_it() -> None:
    nodes = [_node("small", "cpu", _peak(5 * GB)), _node("large", "cpu", _peak(20 * GB)),
             _node("gpu", "cuda:1", _peak(4 * GB, 20 * GB)), _node("huge-gpu", "cuda:0", _peak(4 * GB, 30 * GB)),
             _node("gpu-host-heavy", "cuda:0", _peak(40 * GB, 10 * GB))]
    placed = {n: p.name for n, p in place_on_pools(nodes, POOLS).items()}
    assert placed == {"small": "cpu-small", "large": "cpu-big", "gpu": "gpu-24gb", "huge-gpu": "gpu-80gb",
                      "gpu-host-heavy": "gpu-80gb"}


def test_a_node_no_pool_holds_is_refused_naming_every_such_node() -> None:
    nodes = [_node("fits", "cpu", _peak(GB)), _node("too-big", "cpu", _peak(100 * GB)),
             _node("gpu-too-big", "cuda:0", _peak(GB, 90 * GB))]
    with pytest.raises(PlacementError, match="2 merge node") as caught:
        place_on_pools(nodes, POOLS)
    assert "too-big (cpu, predicted 100.00 GB)" in str(caught.value)
    assert "gpu-too-big (cuda:0, predicted 90.00 GB)" in str(caught.value)
    assert "fits" not in str(caught.value).split("fit no")[0]


def test_a_gpu_node_finds_no_cpu_pool() -> None:
    with pytest.raises(PlacementError, match="gpu"):
        place_on_pools([_node("gpu", "cuda", _peak(GB, GB))], POOLS[:2])


def test_pool_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="device"):
        parse_pools([{"name": "x", "device": "tpu", "memory": "1GB"}])
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_pools([{"name": "x", "device": "cpu", "memory": "1GB", "gpus": 2}])
    with pytest.raises(ConfigError, match="more than once"):
        parse_pools([{"name": "x", "device": "cpu", "memory": "1GB"}] * 2)
    with pytest.raises(ConfigError, match="at least one"):
        parse_pools([])
    assert parse_pools([{"name": "x", "device": "cpu", "memory": "512MiB"}]) == [WorkPool("x", "cpu", 2**29)]


def test_a_gpu_node_is_sent_to_its_workers_gpu_whatever_index_it_was_planned_on() -> None:
    assert dispatched_node(_node("g", "cuda:3", _peak(GB, GB)))["device"] == "cuda"
    cpu = _node("c", "cpu", _peak(GB))
    assert dispatched_node(cpu) == cpu.to_dict()
    assert NodeTask.from_dict(dispatched_node(cpu)) == cpu
