"""What the machine has free now: RAM from psutil, each NVIDIA GPU's memory from pynvml.

No GPU, or no pynvml, is fine: the inventory says why none is listed (``gpu_note``), and the plan
prints it. Read once per plan, before the budget is set (``supermerge.orchestrator.budget``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuMemory:
    """One CUDA device as torch numbers it (``cuda:<index>``), from NVML."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class MemoryInventory:
    """What the machine has now. ``process_bytes``: RSS this process already uses (imports, data);
    ``gpu_note``: why no GPU is listed ('' when NVML answered)."""

    ram_available_bytes: int
    ram_total_bytes: int
    process_bytes: int
    gpus: tuple[GpuMemory, ...] = ()
    gpu_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _visible_nvml_indices(count: int, uuids: Sequence[str]) -> list[int] | str:
    """NVML indices of the GPUs torch sees, in torch's order, honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    out = []
    for item in (v.strip() for v in visible.split(",") if v.strip()):
        if item.isdigit() and int(item) < count:
            out.append(int(item))
        elif item.startswith("GPU-") and any(u.startswith(item) for u in uuids):
            out.append(next(i for i, u in enumerate(uuids) if u.startswith(item)))
        elif item.isdigit() or item.startswith("-"):
            break  # CUDA stops at the first invalid entry
        else:
            return f"CUDA_VISIBLE_DEVICES={visible!r} names devices NVML cannot match (MIG?)"
    return out


def _gpu_inventory() -> tuple[tuple[GpuMemory, ...], str]:
    try:
        import pynvml
    except ImportError as e:
        return (), f"pynvml is not installed ({e}); install nvidia-ml-py to plan for GPUs"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return (), f"NVML did not start ({e}): no NVIDIA driver here"
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        order = _visible_nvml_indices(count, uuids)
        if isinstance(order, str):
            return (), order
        gpus = []
        for torch_index, nvml_index in enumerate(order):
            info = pynvml.nvmlDeviceGetMemoryInfo(handles[nvml_index])
            gpus.append(GpuMemory(torch_index, _text(pynvml.nvmlDeviceGetName(handles[nvml_index])),
                                  int(info.free), int(info.total)))
        return tuple(gpus), "" if gpus else "NVML lists no GPU"
    except pynvml.NVMLError as e:
        return (), f"NVML failed while listing GPUs ({e})"
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_inventory() -> MemoryInventory:
    """Free RAM (psutil) and free memory of each GPU (pynvml), now."""
    vm = psutil.virtual_memory()
    gpus, note = _gpu_inventory()
    if note:
        log.info("no GPU planned for: %s", note)
    return MemoryInventory(int(vm.available), int(vm.total), int(psutil.Process().memory_info().rss), gpus, note)
