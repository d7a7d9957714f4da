"""The service's numbers: the supervisor's own counts plus every worker's, summed.

Workers answer a ``metrics`` request with a snapshot of their store when the
supervisor is scraped, and send a last one when they stop. A worker that exits
keeps counting: its last counters and histograms move into ``retired``, so a
restarted worker never makes a counter go backwards (its gauges go with it).

Gauges that describe the service as a whole (queue, listeners, breakers, reloads)
are not counted anywhere: the supervisor computes them at scrape time and hands
them in as ``live``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import accumulate, product
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from empath.metrics.spec import METRICS
from empath.metrics.store import Store

__all__ = ["ServiceMetrics", "top_n"]

LiveGauge = tuple[str, tuple[str, ...], float]


def top_n(values: dict[str, float], n: int, other: str = "other") -> dict[str, float]:
    """The ``n`` largest entries, and the rest summed under ``other`` — a label set
    that stays bounded however many destinations the queue has."""
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    out = dict(ranked[:n])
    rest = ranked[n:]
    if rest:
        out[other] = out.get(other, 0.0) + sum(v for _, v in rest)
    return out


class ServiceMetrics(Collector):
    def __init__(self, local: Store) -> None:
        self.local = local  # the supervisor's own store
        self.workers: dict[int, dict[str, Any]] = {}  # pid → last snapshot
        self.retired = Store()
        self.live: list[LiveGauge] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def worker_snapshot(self, pid: int, snapshot: dict[str, Any]) -> None:
        self.workers[pid] = snapshot

    def worker_exited(self, pid: int) -> None:
        snap = self.workers.pop(pid, None)
        if snap is not None:
            self.retired.add(snap, gauges=False)

    def set_live(self, gauges: Iterable[LiveGauge]) -> None:
        self.live = list(gauges)

    def total(self) -> Store:
        out = Store()
        out.add(self.retired, gauges=False)
        out.add(self.local)
        for snap in self.workers.values():
            out.add(snap)
        for name, labels, value in self.live:
            out.gauges[(name, labels)] = value
        for name, spec in METRICS.items():
            for combo in product(*spec.values) if spec.values else ():
                if spec.kind == "counter":
                    out.counters.setdefault((name, combo), 0.0)
                elif spec.kind == "histogram":
                    out.hists.setdefault((name, combo), ([0] * (len(spec.buckets) + 1), [0.0]))
        return out

    # ---- prometheus_client Collector ------------------------------------------

    def collect(self) -> Iterator[Metric]:
        total = self.total()
        families: dict[str, Metric] = {}
        for name, spec in METRICS.items():
            if spec.kind == "counter":
                # prometheus_client adds _total itself
                families[name] = CounterMetricFamily(name.removesuffix("_total"), spec.help,
                                                     labels=spec.labels)
            elif spec.kind == "gauge":
                families[name] = GaugeMetricFamily(name, spec.help, labels=spec.labels)
            else:
                families[name] = HistogramMetricFamily(name, spec.help, labels=spec.labels)
        for (name, labels), value in sorted(total.counters.items()):
            fam = families[name]
            assert isinstance(fam, CounterMetricFamily)
            fam.add_metric(list(labels), value)
        for (name, labels), value in sorted(total.gauges.items()):
            fam = families[name]
            assert isinstance(fam, GaugeMetricFamily)
            fam.add_metric(list(labels), value)
        for (name, labels), (buckets, s) in sorted(total.hists.items()):
            fam = families[name]
            assert isinstance(fam, HistogramMetricFamily)
            bounds = [str(float(b)) for b in METRICS[name].buckets] + ["+Inf"]
            cumulative = list(accumulate(buckets))
            fam.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), s[0])
        # Families with no samples yet are exported too (with TYPE and HELP), so a
        # dashboard sees every name from the first scrape on.
        yield from families.values()
