# SPDX-License-Identifier: Apache-2.0
"""A dependency-free progress bar for the CLI (stderr; redraws in place on a terminal, prints
a line every few seconds otherwise)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``p = Progress("hashing", total_bytes); p(done_bytes, total_bytes); p.close()``."""

    def __init__(self, label: str, total: int = 0, stream=None, interval: float = 2.0):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.1 if self.tty else interval
        self.t0 = self.last = time.monotonic()
        self.done = 0
        self._final = False

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total if total is not None else self.total
        now = time.monotonic()
        if now - self.last >= self.interval or done >= self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        if self._final:
            return
        self._final = self.total > 0 and self.done >= self.total
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self.t0, 1e-9) / 2**20
        bar = "#" * int(frac * 30)
        text = (f"{self.label} [{bar:<30}] {frac:6.1%} {self.done / 2**20:,.1f}/"
                f"{self.total / 2**20:,.1f} MiB {rate:,.0f} MiB/s")
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
