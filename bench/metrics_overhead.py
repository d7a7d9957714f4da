#!/usr/bin/env python3
"""What metrics cost the accept path: empath with the metrics endpoint on (and scraped
every second, as a Prometheus would) against empath with it off, in alternating runs.

Same load as bench/accept.py (smtp-source, new connection per message, durable
accept into a held queue). Prints the median and spread (min–max) of each side and
the ratio of medians; ``--json`` writes every round.

    python3 bench/metrics_overhead.py [--pairs 5] [--messages 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept import (  # bench scripts import their sibling
    DOMAIN,
    EmpathTarget,
    Params,
    log,
    scratch_dir,
    throughput_round,
)

METRICS_PORT = 10099


class MeteredEmpath(EmpathTarget):
    """empath with ``metrics.listen`` set, scraped every second while it runs."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.label = f"empath w={self.workers} metrics on"
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_config(self, run_dir: Path) -> Path:
        path = super()._write_config(run_dir)
        with path.open("a") as f:
            f.write(f'metrics: {{listen: "127.0.0.1:{METRICS_PORT}"}}\n')
        return path

    def begin(self) -> int:
        pid = super().begin()
        self._stop.clear()
        self._thread = threading.Thread(target=self._scrape_loop, daemon=True)
        self._thread.start()
        return pid

    def end(self, expected: int):  # type: ignore[no-untyped-def]
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return super().end(expected)

    def _scrape_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics",
                                            timeout=5) as resp:
                    body = resp.read()
                if b"empath_messages_received_total" in body:
                    self.scrapes += 1
            except OSError as exc:
                log(f"scrape failed: {exc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5, help="alternating on/off pairs")
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--empath-cmd", default=f"{sys.executable} -m empath")
    ap.add_argument("--json", default=None, help="write the rounds here")
    a = ap.parse_args()
    p = Params(messages=a.messages, sessions=a.sessions, size=a.size, workers=[a.workers],
               rounds=a.pairs, latency_messages=0, latency_connections=0,
               empath_cmd=a.empath_cmd, standin=False, skip_postfix=True, tmpdir=None,
               keep_tmp=False)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    # CPU of the daemon's whole process tree per message: less sensitive than msg/s to
    # what else the machine is doing
    cpu_ms: dict[str, list[float]] = {"off": [], "on": []}
    with scratch_dir(p, "empath-metrics-", postfix=False) as tmp:
        (tmp / "off").mkdir()
        (tmp / "on").mkdir()
        off = EmpathTarget(tmp / "off", a.empath_cmd, a.workers, standin=False)
        on = MeteredEmpath(tmp / "on", a.empath_cmd, a.workers, standin=False)
        for i in range(1, a.pairs + 1):
            # alternate which goes first, so a drift in the machine hits both alike
            order = [("off", off), ("on", on)] if i % 2 else [("on", on), ("off", off)]
            for key, target in order:
                r = throughput_round(target, p, i)
                if r.rate is None:
                    log(f"round {i} {key} failed: {r.error}")
                    return 1
                rates[key].append(r.rate)
                if r.cpu_seconds is not None:
                    cpu_ms[key].append(1000 * r.cpu_seconds / a.messages)
            time.sleep(1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmetrics overhead, {a.messages} msgs x {a.pairs} alternating pairs, "
          f"{a.workers} workers, domain {DOMAIN}")
    print(f"{'':14} {'median msg/s':>12}  {'spread (min-max)':>18}  {'CPU ms/msg':>10}  "
          f"{'spread':>11}")
    for key in ("off", "on"):
        cpu = cpu_ms[key] or [float("nan")]
        print(f"{'metrics ' + key:14} {med[key]:12.1f}  "
              f"{min(rates[key]):8.1f}-{max(rates[key]):<8.1f}  "
              f"{statistics.median(cpu):10.2f}  {min(cpu):5.2f}-{max(cpu):<5.2f}")
    ratios = [n / f for n, f in zip(rates["on"], rates["off"], strict=True)]
    print(f"ratio on/off of medians: {med['on'] / med['off']:.3f} "
          f"(per pair: {min(ratios):.3f}-{max(ratios):.3f}); scrapes while on: {on.scrapes}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rates": rates, "medians": med,
                                            "cpu_ms_per_msg": cpu_ms}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
