"""Peak resident memory of one trial, measured while it runs in a long-lived process.

``ru_maxrss`` only ever grows over a process's life, so after the first trial of a sweep it
would report the largest trial so far, not this one. A background thread samples the current
RSS (``/proc/self/statm`` on Linux) every ``interval`` seconds instead; where /proc is absent
the process-wide ``ru_maxrss`` is the fallback (exact for a trial in a fresh worker process).
"""

from __future__ import annotations

import resource
import sys
import threading
from types import TracebackType

from peftlab.runtime.heap import resident_bytes


def current_rss_mb() -> float | None:
    """The current RSS in MiB, or None where /proc cannot tell it."""
    rss = resident_bytes()
    return rss / 2**20 if rss else None


def max_rss_mb() -> float:
    """The process's lifetime peak (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PeakRSS:
    """``with PeakRSS() as rss: ...``; then ``rss.peak_mb``."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb: float = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._sampled = current_rss_mb() is not None

    def _sample(self) -> None:
        while True:
            rss = current_rss_mb()
            if rss is not None:
                self.peak_mb = max(self.peak_mb, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSS:
        if self._sampled:
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._sampled:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, current_rss_mb() or 0.0)
        else:
            self.peak_mb = max_rss_mb()
