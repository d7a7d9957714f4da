"""Delivery limits: per-destination concurrency and rate, and a circuit breaker per host.

All state lives in the supervisor's event loop; nothing here blocks or sleeps except
``acquire``, which waits for a slot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["Breaker", "Breakers", "DestinationLimiter"]


class DestinationLimiter:
    """Concurrency (a semaphore) and rate (a token bucket, messages/s) for one domain."""

    def __init__(self, max_connections: int | None, rate: float | None) -> None:
        self.max_connections = max_connections
        self.rate = rate
        self._sem = asyncio.Semaphore(max_connections) if max_connections else None
        self._tokens = 1.0
        self._last = time.monotonic()
        self.active = 0

    async def acquire(self) -> None:
        if self._sem is not None:
            await self._sem.acquire()
        self.active += 1
        if self.rate:
            while True:
                now = time.monotonic()
                self._tokens = min(1.0, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    break
                await asyncio.sleep((1.0 - self._tokens) / self.rate)

    def release(self) -> None:
        self.active -= 1
        if self._sem is not None:
            self._sem.release()


@dataclass
class Breaker:
    """Opens after ``threshold`` consecutive connection failures; after ``cooldown``
    seconds one delivery may probe (half-open); success closes it again."""

    threshold: int
    cooldown: float
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    def allow(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if now - self.opened_at >= self.cooldown and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self, now: float) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            self.opened_at = now

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing else "open"


class Breakers:
    def __init__(self, threshold: int = 5, cooldown: float = 300.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.by_key: dict[str, Breaker] = {}

    def get(self, key: str) -> Breaker:
        b = self.by_key.get(key)
        if b is None:
            b = self.by_key[key] = Breaker(self.threshold, self.cooldown)
        return b

    def snapshot(self) -> dict[str, str]:
        return {k: b.state for k, b in self.by_key.items() if b.state != "closed"}
