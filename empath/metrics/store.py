"""A process's own counts: plain dicts, cheap enough for the SMTP hot path.

prometheus-client's metric objects take a lock per increment and, in multi-process
mode, write an mmap'ed file; a worker accepting hundreds of messages a second only
needs ``dict[key] += 1``. A store is turned into a JSON-able snapshot for the trip
to the supervisor (empath/daemon/ipc.py ``metrics``), where snapshots are summed.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from empath.metrics.spec import METRICS

__all__ = ["Store"]

Key = tuple[str, tuple[str, ...]]


class Store:
    __slots__ = ("counters", "gauges", "hists")

    def __init__(self) -> None:
        self.counters: dict[Key, float] = {}
        self.gauges: dict[Key, float] = {}
        # per bucket (the last one is +Inf), not cumulative; then the sum
        self.hists: dict[Key, tuple[list[int], list[float]]] = {}

    def inc(self, name: str, labels: tuple[str, ...] = (), by: float = 1.0) -> None:
        key = (name, labels)
        counters = self.counters
        counters[key] = counters.get(key, 0.0) + by

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self.gauges[(name, labels)] = value

    def observe(self, name: str, value: float, labels: tuple[str, ...] = ()) -> None:
        key = (name, labels)
        h = self.hists.get(key)
        if h is None:
            h = self.hists[key] = ([0] * (len(METRICS[name].buckets) + 1), [0.0])
        h[0][bisect_left(METRICS[name].buckets, value)] += 1
        h[1][0] += value

    # ---- snapshots ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "c": [[n, list(lb), v] for (n, lb), v in self.counters.items()],
            "g": [[n, list(lb), v] for (n, lb), v in self.gauges.items()],
            "h": [[n, list(lb), list(b), s[0]] for (n, lb), (b, s) in self.hists.items()],
        }

    def add(self, other: Store | dict[str, Any], *, gauges: bool = True) -> None:
        """Sum ``other`` (a store or a snapshot) into this one."""
        snap = other.snapshot() if isinstance(other, Store) else other
        for name, labels, value in snap.get("c", ()):
            if name in METRICS:  # a worker of another version may know other names
                self.inc(name, tuple(labels), float(value))
        if gauges:
            for name, labels, value in snap.get("g", ()):
                if name in METRICS:
                    key = (name, tuple(labels))
                    self.gauges[key] = self.gauges.get(key, 0.0) + float(value)
        for name, labels, buckets, total in snap.get("h", ()):
            spec = METRICS.get(name)
            if spec is None or len(buckets) != len(spec.buckets) + 1:
                continue
            key = (name, tuple(labels))
            h = self.hists.get(key)
            if h is None:
                h = self.hists[key] = ([0] * len(buckets), [0.0])
            for i, n in enumerate(buckets):
                h[0][i] += int(n)
            h[1][0] += float(total)
