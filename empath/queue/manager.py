"""The queue manager: decides when each queued message is tried, and records results.

The spool is the queue: each recipient's state (pending, deferred with its next
attempt and last error, delivered, bounced) lives in the message's envelope record
and is written back — fsync'ed — after every transaction, before anything else
happens. A recipient recorded as delivered is never tried again; a crash between a
remote ``250`` and that write is the one window in which a copy can be repeated,
and it is as short as one fsync.

In memory there is only a heap of (due time, id): the scheduler never rescans the
disk to decide what to do next.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from empath.config.model import Config
from empath.delivery.client import ClientSettings, ConnectionPool, deliver
from empath.delivery.dns import DNS
from empath.delivery.dsn import build_dsn, should_notify
from empath.delivery.maildir import deliver_maildir
from empath.delivery.route import OwnIdentity, Route, own_identity, resolve_route
from empath.delivery.types import RcptResult, Target
from empath.queue.limits import Breakers, DestinationLimiter
from empath.spool import Envelope, Recipient, Spool

__all__ = ["QueueManager", "QueueStats"]

log = logging.getLogger("empath.queue")

FINAL = ("delivered", "bounced")
REMOVE_RETRY = 60.0


@dataclass
class QueueStats:
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _retry_delay(schedule: tuple[int, ...], attempts: int) -> int:
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


class QueueManager:
    def __init__(
        self, config: Config, spool: Spool, *, listening: list[tuple[str, int]] | None = None
    ) -> None:
        self.config = config
        self.spool = spool
        self.listening = listening or []
        self.own: OwnIdentity = own_identity(config, self.listening)
        self.dns = DNS(config.delivery.nameservers)
        self.pool = ConnectionPool()
        self.overrides: dict[str, str] = {}
        self.stats = QueueStats()
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        self._active: set[str] = set()
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(config.delivery.max_deliveries)
        self._limiters: dict[str, DestinationLimiter] = {}
        self.breakers = Breakers(
            config.delivery.breaker_failures, float(config.delivery.breaker_cooldown)
        )
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- configuration -----------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """Reload: new routes, limits, schedule and DNS servers apply to the next attempt."""
        old = self.config
        self.config = config
        self.own = own_identity(config, self.listening)
        if old.delivery.nameservers != config.delivery.nameservers:
            self.dns = DNS(config.delivery.nameservers)
        if old.delivery.destinations != config.delivery.destinations:
            self._limiters.clear()
        self.breakers.threshold = config.delivery.breaker_failures
        self.breakers.cooldown = float(config.delivery.breaker_cooldown)
        self._wake.set()

    # ---- scheduling ----------------------------------------------------------------

    def load(self, ids: list[str]) -> None:
        """At start: schedule every recovered message at its earliest due recipient."""
        for id in ids:
            try:
                env = self.spool.load(id)
            except (OSError, ValueError) as exc:
                log.error("queue: cannot load %s: %s", id, exc, extra={"QUEUE_ID": id})
                continue
            due = self._next_due(env)
            if due is not None:
                self.schedule(id, due)

    def add(self, id: str) -> None:
        """A message was just queued: try it now."""
        self.schedule(id, time.time())

    def schedule(self, id: str, due: float) -> None:
        current = self._due.get(id)
        if current is not None and current <= due:
            return
        self._due[id] = due
        heapq.heappush(self._heap, (due, next(self._seq), id))
        self._wake.set()

    def flush(self) -> int:
        """Deliver every queued message now (``empathctl queue flush``)."""
        now = time.time()
        ids = list(self._due)
        for id in ids:
            self._due[id] = now
            heapq.heappush(self._heap, (now, next(self._seq), id))
        self._wake.set()
        return len(ids)

    def _next_due(self, env: Envelope) -> float | None:
        if env.held:
            return None
        times = [
            (r.next_attempt or 0.0) if r.state == "deferred" else 0.0
            for r in env.recipients
            if r.state not in FINAL
        ]
        if not times:
            return 0.0  # everything final but not removed yet: finish the job
        return min(times)

    @property
    def size(self) -> int:
        return len(self._due) + len(self._active)

    async def run(self, stopping: asyncio.Event) -> None:
        """The scheduler loop: start due deliveries within ``max_deliveries``."""
        while not stopping.is_set():
            now = time.time()
            while self._heap and self._heap[0][0] <= now and not stopping.is_set():
                due, _, id = heapq.heappop(self._heap)
                if self._due.get(id) != due or id in self._active:
                    continue  # stale heap entry, or being delivered right now
                del self._due[id]
                await self._sem.acquire()
                self._active.add(id)
                task = asyncio.create_task(self._attempt_guarded(id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            timeout = max(0.0, self._heap[0][0] - time.time()) if self._heap else 60.0
            self._wake.clear()
            stop_wait = asyncio.ensure_future(stopping.wait())
            wake_wait = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait(
                [stop_wait, wake_wait], timeout=min(timeout, 60.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            stop_wait.cancel()
            wake_wait.cancel()

    async def drain(self, timeout: float) -> None:
        """At shutdown: let deliveries in flight finish (their results get recorded)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await self.pool.close()

    async def _attempt_guarded(self, id: str) -> None:
        try:
            await self.attempt(id)
        except Exception:
            log.exception("queue: delivery of %s failed unexpectedly; retrying later", id,
                          extra={"QUEUE_ID": id})
            self.schedule(id, time.time() + _retry_delay(self.config.delivery.retry_schedule, 1))
        finally:
            self._active.discard(id)
            self._sem.release()

    # ---- one attempt -----------------------------------------------------------------

    async def attempt(self, id: str) -> None:
        try:
            env = self.spool.load(id)
        except FileNotFoundError:
            return  # deleted meanwhile (empathctl queue delete)
        if env.held:
            return
        now = time.time()
        cfg = self.config
        due = [
            r for r in env.recipients
            if r.state == "pending" or (r.state == "deferred" and (r.next_attempt or 0) <= now)
        ]
        expired = now - env.received_at >= cfg.delivery.max_queue_lifetime
        bounced: list[tuple[Recipient, RcptResult]] = []
        if expired:
            for r in env.recipients:
                if r.state not in FINAL:
                    res = RcptResult(
                        r.address, "bounced", "4.4.7",
                        "delivery time expired; last error: " + (r.last_error or "none"),
                    )
                    self._apply(env, r, res, now)
                    bounced.append((r, res))
            await self.spool.update_async(env)
        else:
            by_domain: dict[str, list[Recipient]] = defaultdict(list)
            for r in due:
                by_domain[_domain(r.address)].append(r)
            for domain, rcpts in by_domain.items():
                results = await self._deliver_domain(env, domain, rcpts)
                for r, res in zip(rcpts, results, strict=True):
                    self._apply(env, r, res, now)
                    if res.status == "bounced":
                        bounced.append((r, res))
                # Record before anything else happens: a recipient marked delivered is
                # never tried again, even after a crash right after this line.
                await self.spool.update_async(env)
        if bounced:
            await self._send_dsn(env, bounced, "failure")
        await self._maybe_delay_warning(env, now)
        if all(r.state in FINAL for r in env.recipients):
            await self._remove(env.id)
        else:
            due_next = self._next_due(env)
            if due_next is not None:
                self.schedule(env.id, due_next)

    def _apply(self, env: Envelope, r: Recipient, res: RcptResult, now: float) -> None:
        extra = {"QUEUE_ID": env.id, "EMPATH_EVENT": res.status}
        r.attempts += 1
        self.stats.attempts[res.status] += 1
        if res.status == "delivered":
            r.state, r.next_attempt = "delivered", None
            r.last_error = None
            self.stats.delivered += 1
            log.info("delivered id=%s to=<%s> relay=%s tls=%s status=%s %s", env.id,
                     r.address, res.remote_mta or "-", res.tls or "none", res.enhanced,
                     res.text, extra=extra)
        elif res.status == "bounced":
            r.state, r.next_attempt = "bounced", None
            r.last_error = res.diagnostic
            self.stats.bounced += 1
            log.info("bounced id=%s to=<%s> relay=%s status=%s %s", env.id, r.address,
                     res.remote_mta or "-", res.enhanced, res.text, extra=extra)
        else:
            delay = _retry_delay(self.config.delivery.retry_schedule, r.attempts)
            r.state, r.next_attempt = "deferred", now + delay
            r.last_error = res.diagnostic
            self.stats.deferred += 1
            log.info("deferred id=%s to=<%s> relay=%s status=%s %s (retry in %ds)", env.id,
                     r.address, res.remote_mta or "-", res.enhanced, res.text, delay,
                     extra=extra)

    async def _deliver_domain(
        self, env: Envelope, domain: str, rcpts: list[Recipient]
    ) -> list[RcptResult]:
        cfg = self.config
        route = await resolve_route(domain, cfg, self.dns, overrides=self.overrides, own=self.own)
        if route.failure is not None:
            f = route.failure
            status = "bounced" if f.permanent else "deferred"
            return [RcptResult(r.address, status, f.enhanced, f.text) for r in rcpts]
        if route.kind == "maildir":
            assert route.path is not None
            data_path = self.spool.queue_dir / f"{env.id}.msg"
            return await asyncio.to_thread(
                deliver_maildir, route.path, rcpts, data_path,
                hostname=cfg.hostname, sender=env.sender,
            )
        policy = cfg.delivery.destinations.get(domain)
        limiter = self._limiter(domain)
        targets = self._allowed_targets(route)
        if not targets:
            return [RcptResult(r.address, "deferred", "4.4.1",
                               "all next hops are failing (circuit breaker open)")
                    for r in rcpts]
        settings = ClientSettings(
            helo=cfg.hostname,
            tls=policy.tls if policy is not None else "may",
            own_hostname=cfg.hostname,
            lmtp=route.kind == "lmtp",
        )
        await limiter.acquire()
        try:
            results = await deliver(
                env, rcpts, self.spool.queue_dir / f"{env.id}.msg", targets, settings,
                pool=self.pool,
            )
        finally:
            limiter.release()
        self._record_breaker(targets, results)
        return results

    def _limiter(self, domain: str) -> DestinationLimiter:
        lim = self._limiters.get(domain)
        if lim is None:
            policy = self.config.delivery.destinations.get(domain)
            lim = DestinationLimiter(
                policy.max_connections if policy else None, policy.rate if policy else None
            )
            self._limiters[domain] = lim
        return lim

    @staticmethod
    def _target_key(t: Target) -> str:
        return f"{t.address}:{t.port}" if not t.address.startswith("/") else t.address

    def _allowed_targets(self, route: Route) -> list[Target]:
        now = time.monotonic()
        return [t for t in route.targets if self.breakers.get(self._target_key(t)).allow(now)]

    def _record_breaker(self, targets: list[Target], results: list[RcptResult]) -> None:
        now = time.monotonic()
        # A server that answered anything (even 5xx) is up; only "no answer at all"
        # (connection errors carry no reply code) counts against the breaker.
        answered = {r.remote_mta for r in results if r.code is not None}
        for t in targets:
            b = self.breakers.get(self._target_key(t))
            if t.name in answered:
                b.success()
            elif all(r.code is None and r.status == "deferred" for r in results):
                b.failure(now)

    # ---- bounces ------------------------------------------------------------------

    async def _send_dsn(
        self, env: Envelope, failed: list[tuple[Recipient, RcptResult]], kind: str
    ) -> None:
        cfg = self.config
        if env.sender == "":
            # Never bounce a bounce: a failed null-sender message goes to the postmaster,
            # once; a failed one of those is only logged.
            if env.metadata.get("dsn") == "double":
                log.error("double bounce %s undeliverable; dropped", env.id,
                          extra={"QUEUE_ID": env.id})
                return
            to, marker = cfg.postmaster, "double"
            results = [res for _, res in failed]
        else:
            results = [res for r, res in failed if should_notify(env, r, kind)]  # type: ignore[arg-type]
            to, marker = env.sender, kind
        if not results:
            return
        with self.spool.open_data(env.id) as original:
            data = build_dsn(
                envelope=env, results=results, kind=kind,  # type: ignore[arg-type]
                hostname=cfg.hostname, original=original, now=time.time(),
            )
        new_id = await self.enqueue_local(to, data, metadata={"dsn": marker, "about": env.id})
        log.info("dsn id=%s kind=%s about=%s to=<%s>", new_id, kind, env.id, to,
                 extra={"QUEUE_ID": env.id, "EMPATH_EVENT": "dsn"})

    async def _maybe_delay_warning(self, env: Envelope, now: float) -> None:
        threshold = self.config.delivery.delay_warning
        if (threshold is None or env.sender == "" or env.metadata.get("delay_warned")
                or now - env.received_at < threshold):
            return
        delayed = [
            (r, RcptResult(r.address, "deferred", "4.0.0", r.last_error or "delayed"))
            for r in env.recipients
            if r.state == "deferred"
        ]
        if not delayed:
            return
        env.metadata["delay_warned"] = True
        await self.spool.update_async(env)
        await self._send_dsn(env, delayed, "delay")

    async def enqueue_local(self, to: str, data: bytes, *, metadata: dict[str, object]) -> str:
        """Queue a message we generated ourselves (a DSN), from the null sender."""
        writer = self.spool.create()
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        env = Envelope(
            id=writer.id, sender="", recipients=[Recipient(address=to)],
            received_at=time.time(), client_addr="127.0.0.1", client_port=0,
            helo=self.config.hostname, body="8BITMIME" if not data.isascii() else "7BIT",
            metadata=dict(metadata),
        )
        await self.spool.commit(writer, env)
        self.add(env.id)
        return env.id

    async def _remove(self, id: str) -> None:
        try:
            await self.spool.remove_async(id)
            log.info("removed id=%s (all recipients final)", id,
                     extra={"QUEUE_ID": id, "EMPATH_EVENT": "removed"})
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("queue: cannot remove %s: %s; will retry", id, exc,
                      extra={"QUEUE_ID": id})
            self.schedule(id, time.time() + REMOVE_RETRY)
