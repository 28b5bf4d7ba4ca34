"""Progress for long transfers: a tqdm bar on a terminal, plain log lines otherwise.

Nightly runs log to files, where a redrawn bar is noise; there we log one line per
finished item and a byte count at most every ``interval`` seconds. Thread-safe.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

log = logging.getLogger("bmsync")


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 kB``, ``2.3 MB``, ``4.0 GB`` (decimal units; GB is the largest)."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


class Progress:
    """Counts bytes and items; draws a bar when ``stream`` is a terminal.

    ``enabled=False`` turns the bar and the periodic lines off (``--json`` runs, tests)
    while the counts still work.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float = 5.0,
    ) -> None:
        self.label = label
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.items = 0
        self._interval = interval
        self._last_log = time.monotonic()
        self._enabled = enabled
        self._bar: Any = None
        if enabled and getattr(self._stream, "isatty", lambda: False)():
            from tqdm import tqdm  # imported only for a terminal: keeps start-up lean

            self._bar = tqdm(
                total=0,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc=label,
                file=self._stream,
                leave=False,
                dynamic_ncols=True,
            )

    def add_total(self, n: int) -> None:
        with self._lock:
            self.total += n
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self._enabled and time.monotonic() - self._last_log >= self._interval:
                self._last_log = time.monotonic()
                log.info(
                    "%s: %s of %s", self.label, human_bytes(self.done), human_bytes(self.total)
                )

    def item_done(self, message: str) -> None:
        """One unit of work finished; shown above the bar or as a log line."""
        with self._lock:
            self.items += 1
            if not self._enabled:
                return
            if self._bar is not None:
                self._bar.write(message, file=self._stream)
            else:
                log.info("%s", message)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
