"""Measure a block's real peak memory: host RSS above where it started, and CUDA's peak allocation.

Host: on Linux the kernel keeps the process's RSS high-water mark (``VmHWM`` in /proc/self/status),
and writing ``5`` to /proc/self/clear_refs resets it to the current RSS. So the block's exact peak is
``VmHWM`` after it minus RSS before it: nothing is sampled, no spike is missed. Where that reset is not
allowed (other kernels, some sandboxes), a thread samples RSS with psutil every millisecond instead,
and the reading says so (``method``). Before the start is read, freed heap is handed back to the OS
(glibc ``malloc_trim``) so memory a previous node freed but the allocator kept does not hide this
node's growth. GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors
only; the CUDA context and the caching allocator's slack are not included).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil
import torch

log = logging.getLogger(__name__)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
SAMPLE_SECONDS = 0.001


@dataclass(frozen=True)
class PeakReading:
    """``host_bytes``: peak RSS above the RSS at the start; ``device_bytes``: peak CUDA allocation above
    the start (None on CPU); ``method``: how the host peak was read (``vmhwm`` or ``sampled``)."""

    host_bytes: int
    device_bytes: int | None
    method: str


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold (malloc.h)."""

MMAP_THRESHOLD_BYTES = 128 << 10
"""Blocks of this size and more are mmapped, so freeing one returns it to the OS at once: glibc's own
starting threshold, kept from rising."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


def _release_freed_heap() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


STREAM_MMAP_THRESHOLD_BYTES = 32 << 20
"""The threshold for streamed merges: TIES works in (k, 65,536) chunks of 1-8 MiB whose temporaries,
mapped and unmapped one by one at 128 KiB, made a 1.1B-parameter k = 4 merge take 263 s instead of
153 s; at 32 MiB they come from the heap and are reused, while whole tensors still go back at once."""


def return_large_blocks_promptly(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc serve every block of ``threshold_bytes`` or more by mmap (process-wide).

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB); after
    the first training step a merge's big per-step tensors (merged parameters, activations) then come
    from the heap, and what one step frees stays in the process, in pieces the next step cannot
    always reuse. A 2-input MiniLM node's peak crept from 1,080 MiB after 1 step to 1,165 MiB after
    8-10 that way, by an amount set by the order of allocations, which no planner can predict; with
    the threshold fixed at 1 MiB it was 965 and 1,010 MiB. At 1 MiB, activations of short sequences
    (16 x 32 tokens x 384 values: 768 KiB a tensor) still came from the heap, and nodes late in a long
    run measured up to 12 % more than early ones; at 128 KiB the same nodes measured 6 % less than at
    1 MiB and the same early and late, with no time lost we could measure. Returns False where the C
    library is not glibc (nothing is changed there)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _high_water_mark() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{_STATUS} has no VmHWM line")


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


class PeakMeter:
    """Context manager; ``reading`` holds the result after the block (also when the block raised)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.reading: PeakReading | None = None
        self._sampler: _Sampler | None = None
        self._start = 0
        self._device_start = 0

    def __enter__(self) -> PeakMeter:
        _release_freed_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._device_start = torch.cuda.memory_allocated(self.device)
        self._start = psutil.Process().memory_info().rss
        if not _reset_high_water_mark():
            log.info("cannot reset the RSS high-water mark here; sampling RSS every %.0f ms", SAMPLE_SECONDS * 1e3)
            self._sampler = _Sampler()
            self._sampler.start()
        return self

    def current(self) -> PeakReading:
        """The peak so far, inside the block (the block's writer records it before the block ends)."""
        if self._sampler is not None:
            peak, method = max(self._sampler.peak, psutil.Process().memory_info().rss), "sampled"
        else:
            peak, method = _high_water_mark(), "vmhwm"
        return self._reading(peak, method)

    def _reading(self, peak: int, method: str) -> PeakReading:
        device_bytes = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            device_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._device_start)
        return PeakReading(max(0, peak - self._start), device_bytes, method)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sampler is not None:
            peak, method = self._sampler.stop(), "sampled"
        else:
            peak, method = _high_water_mark(), "vmhwm"
        self.reading = self._reading(peak, method)
