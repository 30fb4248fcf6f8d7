"""Progress of a run on stderr: shards done, neurons/s, ETA. Short lines a person reads."""
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
    """Counts finished shards; prints at most every `interval` seconds (every update on a terminal)."""

    def __init__(self, *, shards: int, neurons: int, stream: TextIO | None = None, interval: float = 5.0):
        self.total_shards, self.total_neurons = shards, neurons
        self.done_shards = self.done_neurons = 0
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

    def update(self, neurons: int) -> None:
        self.done_shards += 1
        self.done_neurons += neurons
        now = time.perf_counter()
        if now - self.last_print >= self.interval or self.done_shards == self.total_shards:
            self.last_print = now
            elapsed = now - self.started
            rate = self.done_neurons / elapsed if elapsed > 0 else 0.0
            eta = (self.total_neurons - self.done_neurons) / rate if rate > 0 else float("inf")
            line = (f"[{self.done_shards}/{self.total_shards} shards] {self.done_neurons:,}/{self.total_neurons:,} "
                    f"neuron scores  {rate:,.0f}/s  ETA {format_seconds(eta) if rate else '?'}")
            if self.tty:
                print("\r" + line, end="", file=self.stream, flush=True)
            else:
                print(line, file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self.tty and self.done_shards:
            print(file=self.stream)

    def close(self) -> None:
        self._end_line()
