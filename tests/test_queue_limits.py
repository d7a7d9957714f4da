"""Delivery limits as logic: the circuit breaker's states and the per-destination
concurrency and rate limiter (the end-to-end behaviour is in test_delivery.py)."""

from __future__ import annotations

import asyncio
import time

from empath.queue.limits import Breaker, Breakers, DestinationLimiter
from empath.queue.manager import retry_delay


def test_breaker_opens_after_threshold_then_probes_once_after_cooldown() -> None:
    b = Breaker(threshold=3, cooldown=60.0)
    for t in (0.0, 1.0):
        b.failure(t)
        assert b.allow(t) and b.state == "closed"
    b.failure(2.0)
    assert b.state == "open"
    assert not b.allow(30.0)  # cooling down: nobody tries
    assert b.allow(62.0)  # one probe after the cooldown ...
    assert b.state == "half-open"
    assert not b.allow(62.5)  # ... and only one
    b.failure(63.0)  # the probe failed: open again, a new cooldown from now
    assert b.state == "open" and not b.allow(100.0) and b.allow(123.0)
    b.success()
    assert b.state == "closed" and b.allow(123.5)


def test_breakers_snapshot_lists_only_unhealthy_hosts() -> None:
    bs = Breakers(threshold=1, cooldown=10.0)
    bs.get("192.0.2.1:25").failure(0.0)
    bs.get("192.0.2.2:25").success()
    assert bs.snapshot() == {"192.0.2.1:25": "open"}


def test_retry_schedule_last_interval_repeats() -> None:
    schedule = (60, 300, 900)
    assert [retry_delay(schedule, n) for n in (1, 2, 3, 4, 10)] == [60, 300, 900, 900, 900]


def test_limiter_bounds_concurrency() -> None:
    async def main() -> int:
        lim = DestinationLimiter(max_connections=2, rate=None)
        peak = 0

        async def one() -> None:
            nonlocal peak
            await lim.acquire()
            try:
                peak = max(peak, lim.active)
                await asyncio.sleep(0.01)
            finally:
                lim.release()

        await asyncio.gather(*(one() for _ in range(10)))
        assert lim.active == 0
        return peak

    assert asyncio.run(main()) == 2


def test_limiter_rate_spaces_messages() -> None:
    """At 20 messages/s, five messages cannot all start within 0.15 s: the bucket holds
    one token, then refills one per 50 ms. (A lower bound: it holds on any machine.)"""

    async def main() -> float:
        lim = DestinationLimiter(max_connections=None, rate=20.0)
        start = time.monotonic()
        for _ in range(5):
            await lim.acquire()
            lim.release()
        return time.monotonic() - start

    assert asyncio.run(main()) >= 0.15
