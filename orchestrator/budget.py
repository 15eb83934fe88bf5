"""The per-node memory budget, and the check of a node's measured peak against its prediction.

The budget defaults to a safe fraction of what is free (``supermerge.orchestrator.hardware``); the
same fractions give the margin by which a measured peak may exceed its prediction before the run
flags it (the headroom the default budget leaves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from supermerge.orchestrator.errors import MemoryBudgetError
from supermerge.orchestrator.hardware import MemoryInventory
from supermerge.orchestrator.sizes import format_bytes, parse_bytes

log = logging.getLogger(__name__)

SAFE_RAM_FRACTION = 0.8
"""Default host budget: this share of the RAM psutil reports available, so the page cache, allocator
slack and the prediction's error (measured within -20 %..+10 %) still fit."""

SAFE_GPU_FRACTION = 0.9
"""Default GPU budget: this share of each GPU's free memory (the CUDA context and the caching
allocator's slack are outside ``max_memory_allocated``)."""


@dataclass(frozen=True)
class Budget:
    """Bytes one node may use: ``host`` RAM beyond what the process already holds, and per GPU
    (``gpus``: torch index -> bytes). ``source`` says where the numbers came from."""

    host: int
    gpus: dict[int, int] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "gpus": {str(k): v for k, v in self.gpus.items()}, "source": self.source}


def make_budget(memory_budget: str | None, inventory: MemoryInventory) -> Budget:
    """The per-node budget: ``memory_budget`` caps the process's RAM (and each GPU's use); without it,
    a safe fraction of what is free (SAFE_RAM_FRACTION of available RAM, SAFE_GPU_FRACTION per GPU)."""
    gpu_free = {g.index: int(SAFE_GPU_FRACTION * g.free_bytes) for g in inventory.gpus}
    if memory_budget is None:
        return Budget(
            host=int(SAFE_RAM_FRACTION * inventory.ram_available_bytes),
            gpus=gpu_free,
            source=(f"{SAFE_RAM_FRACTION:.0%} of the {format_bytes(inventory.ram_available_bytes)} RAM "
                    f"available" + (f", {SAFE_GPU_FRACTION:.0%} of each GPU's free memory" if gpu_free else "")),
        )
    cap = parse_bytes(memory_budget)
    host = cap - inventory.process_bytes
    if host <= 0:
        raise MemoryBudgetError(
            f"memory budget {memory_budget} is below the {format_bytes(inventory.process_bytes)} this "
            "process already uses; raise --memory-budget"
        )
    if host > inventory.ram_available_bytes:
        log.warning("memory budget %s exceeds the %s RAM available now; planning with the budget as given",
                    memory_budget, format_bytes(inventory.ram_available_bytes))
    return Budget(
        host=host,
        gpus={i: min(cap, free) for i, free in gpu_free.items()},
        source=(f"memory budget {memory_budget} minus the {format_bytes(inventory.process_bytes)} this "
                "process already uses"),
    )


# --- checking a prediction against what a node measured ------------------------------------------

OVER_PREDICTION_SLACK_BYTES = 16 * 2**20
"""Readings within this of the prediction are never flagged: a process's RSS also moves by a few MB
of allocator slack and lazily imported code, which matters only next to a tiny node's prediction."""


def prediction_margin(device: str) -> float:
    """How far (a fraction) a node's measured peak may exceed its prediction before it eats the
    headroom the default budget leaves: ``1 / SAFE_RAM_FRACTION - 1`` (25 %) in RAM,
    ``1 / SAFE_GPU_FRACTION - 1`` (11 %) on a GPU."""
    fraction = SAFE_GPU_FRACTION if device.startswith("cuda") else SAFE_RAM_FRACTION
    return 1 / fraction - 1


def exceeds_prediction(measured_bytes: int, predicted_bytes: int, device: str) -> bool:
    """The measured peak is above the prediction by more than the planner's margin (and the slack)."""
    allowed = max(prediction_margin(device) * predicted_bytes, OVER_PREDICTION_SLACK_BYTES)
    return measured_bytes > predicted_bytes + allowed
