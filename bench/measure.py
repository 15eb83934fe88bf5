"""Wall time and peak resident memory of a block of code, measured while it runs."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    """Highest RSS sampled during the block (the whole process)."""
    start_rss_bytes: int = 0

    @property
    def peak_increase_bytes(self) -> int:
        """Peak RSS above what the process held when the block started: what the block itself added."""
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)


class measure:  # noqa: N801 - used as a context manager, reads like a function
    """``with measure() as m: ...`` samples the process RSS every ``interval`` seconds in a thread.

    Sampling can miss a spike shorter than the interval; 10 ms is far below the duration of any tensor
    allocation that matters here (a merge step takes ~1 s).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> Measurement:
        self.result.start_rss_bytes = self.result.peak_rss_bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._started = time.perf_counter()
        self._thread.start()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self.result.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, self._proc.memory_info().rss)
