"""Which work pool each merge node is sent to, when nodes run on other machines (no Prefect here).

A pool is a device class with a memory size: ``supermerge-cpu`` (CPU hosts with 16 GB of RAM),
``supermerge-gpu-24gb`` (one 24 GB GPU per worker, 64 GB of RAM), ... Every worker of a pool must
have at least that much, so the pool's numbers are a promise about its smallest machine. The
planner's per-node ``device`` gives the class (``cpu``, or a GPU for any ``cuda`` device) and its
``predicted`` peak the memory: the node goes to the smallest pool of its class that holds the
prediction (the big machines stay free for the nodes only they can hold). A plan with a node that
fits no pool is refused before anything runs, naming every such node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from supermerge.merge_core.errors import ConfigError
from supermerge.orchestrator.errors import PlacementError
from supermerge.orchestrator.node import NodeTask
from supermerge.orchestrator.sizes import format_bytes, parse_bytes

DeviceClass = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class WorkPool:
    """A work pool nodes can be sent to. ``memory_bytes``: RAM of a ``cpu`` pool's smallest worker,
    or the GPU memory of a ``cuda`` pool's; ``host_memory_bytes``: a ``cuda`` pool's RAM (None: not
    checked)."""

    name: str
    device: DeviceClass
    memory_bytes: int
    host_memory_bytes: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WorkPool:
        """``{"name": "supermerge-gpu-24gb", "device": "cuda", "memory": "24GB", "host_memory": "64GB"}``."""
        unknown = sorted(set(raw) - {"name", "device", "memory", "host_memory"})
        name = raw.get("name")
        if unknown or not isinstance(name, str) or not name or raw.get("device") not in ("cpu", "cuda") \
                or "memory" not in raw:
            raise ConfigError(f"work pool {dict(raw)!r}: give name, device ('cpu' or 'cuda'), memory (e.g. '24GB') "
                              f"and, for a GPU pool, optionally host_memory{f'; unknown keys {unknown}' if unknown else ''}")
        host = raw.get("host_memory")
        return cls(name, raw["device"], parse_bytes(str(raw["memory"])),
                   parse_bytes(str(host)) if host is not None else None)

    def holds(self, node: NodeTask) -> bool:
        """The node's class is this pool's and its predicted peak fits the pool's memory."""
        if device_class(node.device) != self.device:
            return False
        predicted = node.predicted
        if predicted is None:
            return True
        if self.device == "cpu":
            return predicted.total <= self.memory_bytes
        return predicted.device_bytes <= self.memory_bytes and (
            self.host_memory_bytes is None or predicted.host_bytes <= self.host_memory_bytes)

    def describe(self) -> str:
        host = f", {format_bytes(self.host_memory_bytes)} RAM" if self.host_memory_bytes is not None else ""
        return f"{self.name} ({self.device}, {format_bytes(self.memory_bytes)}{host})"


def device_class(device: str) -> DeviceClass:
    """'cpu' -> 'cpu'; 'cuda', 'cuda:N' -> 'cuda'."""
    return "cuda" if device.startswith("cuda") else "cpu"


def parse_pools(raw: Sequence[Mapping[str, Any]]) -> list[WorkPool]:
    """The configured pools, each checked; at least one, names unique."""
    pools = [WorkPool.from_dict(p) for p in raw]
    if not pools:
        raise ConfigError("pools: name at least one work pool to send merge nodes to")
    names = [p.name for p in pools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"pools: each work pool once; {twice} appear more than once")
    return pools


def place_on_pools(nodes: Sequence[NodeTask], pools: Sequence[WorkPool]) -> dict[str, WorkPool]:
    """node id -> the smallest pool of its device class that holds its predicted peak.

    Raises PlacementError listing every node that fits no pool, before any node runs."""
    placed: dict[str, WorkPool] = {}
    homeless: list[str] = []
    for node in nodes:
        fits = sorted((p for p in pools if p.holds(node)), key=lambda p: (p.memory_bytes, p.host_memory_bytes or 0, p.name))
        if fits:
            placed[node.id] = fits[0]
            continue
        predicted = node.predicted
        need = (format_bytes(predicted.total if device_class(node.device) == "cpu" else predicted.device_bytes)
                if predicted is not None else "?")
        homeless.append(f"{node.id} ({node.device}, predicted {need})")
    if homeless:
        raise PlacementError(
            f"{len(homeless)} merge node(s) fit no work pool: {'; '.join(homeless)}. The pools: "
            f"{'; '.join(p.describe() for p in pools)}. Add a pool of that device class with enough memory, "
            "or plan smaller nodes (--max-fan-in, --memory-budget)"
        )
    return placed


def dispatched_node(node: NodeTask) -> dict[str, Any]:
    """The node as sent to a worker: a GPU node on its worker's GPU ('cuda', whichever index the
    planner's machine gave it), everything else as planned (the key is the planner's)."""
    raw = node.to_dict()
    if device_class(node.device) == "cuda":
        raw["device"] = "cuda"
    return raw
