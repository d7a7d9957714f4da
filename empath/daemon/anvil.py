"""Per-client connection accounting, in the supervisor only (as Postfix's anvil).

Workers ask before greeting a client; the answer is None (admit) or a 421 reply.
Clients in ``relay_networks`` are exempt from the per-client limits (as Postfix
exempts $mynetworks by default) but not from ``max_connections``.

It also counts failed SMTP AUTH per address (empath/smtp/auth.py), so that the limit
holds across workers: an address with ``limits.auth_failures`` failures within
``limits.auth_failure_window`` is refused at connect until they age out (addresses in
``relay_networks`` are counted, so their sessions are still dropped, but not refused:
a webmail on localhost must not lock out everyone behind it).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

from empath.config.model import Config
from empath.smtp.policy import in_networks

__all__ = ["Anvil"]

WINDOW = 60.0


class Anvil:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.total = 0
        self.per_ip: dict[str, int] = defaultdict(int)
        self.recent: dict[str, deque[float]] = {}
        self.auth_failures: dict[str, deque[float]] = {}

    def admit(self, ip: str, now: float | None = None) -> str | None:
        cfg = self.config
        host = cfg.hostname
        limits = cfg.limits
        if self.total >= limits.max_connections:
            return f"421 4.7.0 {host} Error: too many connections, try again later"
        if not in_networks(ip, cfg.relay_networks):
            now = time.monotonic() if now is None else now
            if self._auth_failures(ip, now) >= limits.auth_failures:
                return (f"421 4.7.0 {host} Error: too many authentication failures from "
                        f"{ip}, try again later")
            if self.per_ip.get(ip, 0) >= limits.per_client_connections:
                return f"421 4.7.0 {host} Error: too many connections from {ip}"
            times = self.recent.setdefault(ip, deque())
            while times and times[0] <= now - WINDOW:
                times.popleft()
            if len(times) >= limits.per_client_rate:
                return f"421 4.7.0 {host} Error: too many connections from {ip}, slow down"
            times.append(now)
            if len(self.recent) > 100_000:
                self._prune(now)
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def auth_failed(self, ip: str, now: float | None = None) -> int:
        """Count a failed AUTH from ``ip``; its failures within the window, this one too."""
        now = time.monotonic() if now is None else now
        self._auth_failures(ip, now)
        self.auth_failures.setdefault(ip, deque()).append(now)
        if len(self.auth_failures) > 100_000:
            for old in [a for a, t in self.auth_failures.items()
                        if not t or t[-1] <= now - self.config.limits.auth_failure_window]:
                del self.auth_failures[old]
        return len(self.auth_failures[ip])

    def _auth_failures(self, ip: str, now: float) -> int:
        times = self.auth_failures.get(ip)
        if times is None:
            return 0
        window = self.config.limits.auth_failure_window
        while times and times[0] <= now - window:
            times.popleft()
        if not times:
            del self.auth_failures[ip]
            return 0
        return len(times)

    def release(self, ip: str) -> None:
        count = self.per_ip.get(ip, 0)
        if count <= 1:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = count - 1
        if count > 0:
            self.total -= 1

    def _prune(self, now: float) -> None:
        for ip in [ip for ip, t in self.recent.items() if not t or t[-1] <= now - WINDOW]:
            del self.recent[ip]

    @property
    def connections(self) -> int:
        return self.total
