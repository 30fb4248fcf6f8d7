"""Progress of a run on stderr: shards done, neuron scores/s, ETA. Short lines a person reads."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts finished shards; prints at most every `interval` seconds (every update on a terminal).

    The ETA divides the cost still to do by the cost done per second: early layers cost more per
    neuron than late ones, so a rate in neurons would mislead.
    """

    def __init__(self, *, shards: int, rows: int, cost: float, stream: TextIO | None = None,
                 interval: float = 5.0):
        self.total_shards, self.total_rows, self.total_cost = shards, rows, cost
        self.done_shards = self.done_rows = 0
        self.done_cost = 0.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.0 if self.tty else interval
        self.started = time.perf_counter()
        self.last_print = 0.0

    def restart(self) -> None:
        self.started = time.perf_counter()

    def message(self, text: str) -> None:
        self._end_line()
        print(text, file=self.stream, flush=True)

    def update(self, rows: int, cost: float) -> None:
        self.done_shards += 1
        self.done_rows += rows
        self.done_cost += cost
        now = time.perf_counter()
        if now - self.last_print < self.interval and self.done_shards < self.total_shards:
            return
        self.last_print = now
        elapsed = max(now - self.started, 1e-9)
        eta = (self.total_cost - self.done_cost) * elapsed / self.done_cost if self.done_cost else float("nan")
        line = (f"[{self.done_shards}/{self.total_shards} shards] {self.done_rows:,}/{self.total_rows:,} "
                f"neuron scores  {self.done_rows / elapsed:,.0f}/s  ETA {format_seconds(eta)}")
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self.tty and self.done_shards:
            print(file=self.stream)

    def close(self) -> None:
        self._end_line()
