"""The queue manager: decides when each queued message is tried, and records results.

The spool is the queue: each recipient's state (pending, deferred with its next
attempt and last error, delivered, bounced) lives in the message's envelope record
and is written back — fsync'ed — after every transaction, before anything else
happens. A recipient recorded as delivered is never tried again; a crash between a
remote ``250`` and that write is the one window in which a copy can be repeated,
and it is as short as one fsync.

In memory there is only a heap of (due time, id) and a small index of each
message's state and arrival time (for metrics and queue summaries): the scheduler
never rescans the disk to decide what to do next. One attempt of a message runs one transaction per
recipient domain, concurrently; each domain's results are recorded as soon as
they are known.

Bounces: a DSN is committed to the spool *before* the bounced recipients are
recorded as bounced, so a crash in between can at worst repeat a bounce, never
lose one (Postfix's order too: bounce log, then queue file).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from empath import metrics
from empath.config.model import Config
from empath.delivery.client import ClientSettings, ConnectionPool, deliver
from empath.delivery.dkim import DkimSigner
from empath.delivery.dns import DNS
from empath.delivery.dsn import (
    DsnKind,
    bounce_recipient,
    build_dsn,
    dsn_metadata,
    should_notify,
    transport_flags,
)
from empath.delivery.hops import MAX_HOPS, received_count
from empath.delivery.maildir import deliver_maildir
from empath.delivery.route import OwnIdentity, Route, own_identity, resolve_route
from empath.delivery.types import RcptResult, RcptStatus, Target
from empath.modules.runner import EventDispatcher
from empath.queue.limits import Breakers, DestinationLimiter
from empath.spool import Envelope, Recipient, Spool
from empath.spool.envelope import Attempt

__all__ = ["QueueManager", "QueueStats", "Recovered", "recovered"]

log = logging.getLogger("empath.queue")

FINAL = ("delivered", "bounced")
# Seconds before a failed removal of a finished message is tried again.
REMOVE_RETRY = 60.0
# Metadata key: the delay warning for this message was sent.
DELAY_WARNED = "delay_warned"
# In-memory marker only (never written): the final results of this attempt are to be
# recorded by removing the message rather than by rewriting its envelope.
_UNRECORDED = "_unrecorded"
# empath_dsn_sent_total's action label: the DSN's Action field (RFC 3464)
_DSN_ACTION = {"failure": "failed", "delay": "delayed", "success": "delivered"}


@dataclass(slots=True)
class Indexed:
    """What the queue keeps in memory of one message in the spool: enough for
    ``queue stats`` and the metrics without reading any file."""

    state: str  # pending | deferred | held (active is the scheduler's own set)
    received_at: float
    size: int
    rcpts: tuple[tuple[str, str], ...]  # (domain, state) per recipient


def message_state(env: Envelope) -> str:
    """pending | deferred | held, as recorded (``active`` is the scheduler's own)."""
    if env.held:
        return "held"
    if any(r.state == "pending" for r in env.recipients):
        return "pending"
    if any(r.state == "deferred" for r in env.recipients):
        return "deferred"
    return "pending"  # every recipient final: about to be removed


def _indexed(env: Envelope) -> Indexed:
    return Indexed(message_state(env), env.received_at, env.size,
                   tuple((_domain(r.address), r.state) for r in env.recipients))


def first_due(env: Envelope) -> float | None:
    """When the message is next to be tried (0.0: now), None while it is held."""
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


# What the scheduler takes of a message found in the spool at start: its Indexed
# fields, then when it is due (first_due). Made by recovery
# (``Spool.recover(digest=recovered)``) in its processes, so it is a plain tuple:
# small to hold for a whole spool until ``load``, quick to pickle back (a dataclass
# unpickles through dataclasses.fields() for each one).
Recovered = tuple[str, float, int, tuple[tuple[str, str], ...], float | None]


def recovered(env: Envelope) -> Recovered:
    i = _indexed(env)
    return i.state, i.received_at, i.size, i.rcpts, first_due(env)


@dataclass
class QueueStats:
    """Counters since start, per recipient (for metrics and ``empathctl status``)."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    dsns: int = 0
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def retry_delay(schedule: tuple[int, ...], attempts: int) -> int:
    """Seconds to wait after the ``attempts``-th failed try; the last interval repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def _days(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds:.0f} seconds"


def _target_key(t: Target) -> str:
    return t.address if t.address.startswith("/") else f"{t.address}:{t.port}"


class QueueManager:
    def __init__(
        self, config: Config, spool: Spool, *, listening: list[tuple[str, int]] | None = None
    ) -> None:
        self.config = config
        self.spool = spool
        self.listening = list(listening or [])
        self.own: OwnIdentity = own_identity(config, self.listening)
        self.dns = DNS(config.delivery.nameservers)
        # Up to one idle connection per concurrent delivery may wait for the next
        # message to the same host: a burst to one destination then costs a handful
        # of connections, not one per message (Postfix's connection cache does the
        # same). Idle ones go after 10 s so we do not hog the remote's slots.
        self.pool = ConnectionPool(max_per_target=config.delivery.max_deliveries,
                                   max_total=max(64, 2 * config.delivery.max_deliveries),
                                   idle_timeout=10.0)
        # DKIM keys in force: set by the supervisor at start and reload (load_keys).
        self.dkim = DkimSigner()
        # Runtime next-hop overrides (``empathctl route set``): domain → next hop.
        self.overrides: dict[str, str] = {}
        # Modules' queue events (on_received, on_delivered, …); new instances at reload.
        self.events = EventDispatcher(config)
        # (id, recipient) → whether its route rested on DNSSEC-authenticated answers,
        # from routing until the attempt's history entry is written (``_apply``).
        self._dnssec_of: dict[tuple[str, str], bool | None] = {}
        self.stats = QueueStats()
        self.breakers = Breakers(
            config.delivery.breaker_failures, float(config.delivery.breaker_cooldown)
        )
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        self._active: set[str] = set()
        self._forced: set[str] = set()  # retry_now: ignore next_attempt once
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(config.delivery.max_deliveries)
        self._limiters: dict[str, DestinationLimiter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Every message in the spool that the queue knows of, kept current with each
        # recorded state change (``index``).
        self._index: dict[str, Indexed] = {}

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
        if old.delivery.max_deliveries != config.delivery.max_deliveries:
            # Deliveries holding the old semaphore release it into the old object.
            self._sem = asyncio.Semaphore(config.delivery.max_deliveries)
        self.breakers.threshold = config.delivery.breaker_failures
        self.breakers.cooldown = float(config.delivery.breaker_cooldown)
        self.events.apply_config(config)
        self._wake.set()

    # ---- scheduling ----------------------------------------------------------------

    def load(self, ids: Iterable[str], found: dict[str, Recovered] | None = None) -> None:
        """At start: schedule every recovered message at its earliest due recipient.

        ``found``: what the spool's recovery made of those it read (taken out of it as
        they are used, so the memory goes with them); the others are read here."""
        for id in ids:
            r = found.pop(id, None) if found is not None else None
            if r is None:
                try:
                    r = recovered(self.spool.load(id))
                except FileNotFoundError:
                    continue  # delivered or deleted since it was listed
                except (OSError, ValueError) as exc:
                    log.error("queue: cannot load %s: %s", id, exc, extra={"QUEUE_ID": id})
                    continue
            state, received_at, size, rcpts, due = r
            self._index[id] = Indexed(state, received_at, size, rcpts)
            if due is not None:
                self.schedule(id, due)

    def adopt(self, ids: Iterable[str]) -> list[str]:
        """Take on the queued messages among ``ids`` that the index does not know: the
        ones a worker committed and acknowledged but died before reporting (its
        ``queued`` notice lost with it). Returns their ids. A live worker's message
        whose notice is still on its way may be among them; its ``add`` then finds it
        known and scheduled, and changes nothing."""
        unknown = [id for id in ids if id not in self._index]
        self.load(unknown)
        adopted = [id for id in unknown if id in self._index]
        for id in adopted:  # received, as far as modules can tell, only now
            self._fire_received(id)
        return adopted

    def add(self, id: str, *, received_at: float | None = None, size: int = 0,
            domains: tuple[str, ...] = ()) -> bool:
        """A message was just queued (the worker says what it holds): try it now.
        False when it was known already (adopted before its notice arrived): modules
        heard of it then, and are not told twice."""
        now = time.time()
        self.schedule(id, now)
        if id in self._index:
            return False
        self._index[id] = Indexed("pending", received_at or now, size,
                                  tuple((d, "pending") for d in domains))
        self._fire_received(id)
        return True

    def _fire_received(self, id: str) -> None:
        if self.events.wants("received"):  # modules get the context as persisted
            try:
                self.events.fire("received", self.spool.load(id))
            except (OSError, ValueError) as exc:
                log.error("queue: cannot load %s: %s", id, exc, extra={"QUEUE_ID": id})

    # ---- the index: states without reading the spool -----------------------------

    def track(self, env: Envelope) -> None:
        """Note ``env``'s state as recorded (after a load, an attempt, a hold)."""
        self._index[env.id] = _indexed(env)

    @property
    def index(self) -> dict[str, Indexed]:
        """id → what is known of it; read-only for callers (``queue stats``)."""
        return self._index

    def forget(self, id: str) -> None:
        """``id`` left the spool (delivered, bounced, deleted)."""
        self._index.pop(id, None)
        self.unschedule(id)

    def state_counts(self) -> dict[str, int]:
        """Messages by state: pending, deferred, held, and active (being delivered)."""
        counts = dict.fromkeys(("pending", "deferred", "held", "active"), 0)
        active = self._active
        for id, entry in self._index.items():
            counts["active" if id in active else entry.state] += 1
        return counts

    def oldest_received(self) -> float | None:
        """Arrival time of the oldest message in the queue, None when it is empty."""
        return min((e.received_at for e in self._index.values()), default=None)

    def schedule(self, id: str, due: float) -> None:
        current = self._due.get(id)
        if current is not None and current <= due:
            return
        self._due[id] = due
        heapq.heappush(self._heap, (due, next(self._seq), id))
        self._wake.set()

    def retry_now(self, id: str) -> None:
        """Try ``id`` now, deferred recipients included (``empathctl queue retry``).

        Kept in memory only: the next attempt disregards the recorded next-attempt
        times once; nothing is rewritten on disk for it.
        """
        self._forced.add(id)
        self.schedule(id, time.time())

    def flush(self) -> int:
        """Deliver every scheduled message now (``empathctl queue flush``); held mail
        is never scheduled, so it stays. Returns how many were scheduled."""
        ids = list(self._due)
        for id in ids:
            self.retry_now(id)
        return len(ids)

    def unschedule(self, id: str) -> None:
        """Forget ``id`` (held or deleted): its heap entries go stale and are skipped."""
        self._due.pop(id, None)
        self._forced.discard(id)

    def is_active(self, id: str) -> bool:
        """Whether an attempt of ``id`` is starting or running right now."""
        return id in self._active

    def active_ids(self) -> frozenset[str]:
        return frozenset(self._active)

    @property
    def size(self) -> int:
        """Messages known to the scheduler (waiting or being delivered)."""
        return len(self._due) + len(self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    def next_due(self, id: str) -> float | None:
        return self._due.get(id)

    async def run(self, stopping: asyncio.Event) -> None:
        """The scheduler loop: start due deliveries within ``max_deliveries``."""
        while not stopping.is_set():
            # mode "hold": everything stays queued; a reload to mx/relay starts delivery.
            holding = self.config.delivery.mode == "hold"
            while not holding and self._heap and self._heap[0][0] <= time.time():
                due, _, id = heapq.heappop(self._heap)
                if self._due.get(id) != due:
                    continue  # stale heap entry
                if id in self._active:
                    # Scheduled again while an attempt runs (queue retry, a reload):
                    # look again in a second rather than start a second attempt.
                    self._due[id] = time.time() + 1.0
                    heapq.heappush(self._heap, (self._due[id], next(self._seq), id))
                    continue
                del self._due[id]
                # Active from here: while we wait for a slot, the control plane must
                # already see that this message is about to be tried.
                self._active.add(id)
                sem = self._sem
                await sem.acquire()
                if stopping.is_set():
                    sem.release()
                    self._active.discard(id)
                    self.schedule(id, due)
                    return
                task = asyncio.create_task(self._attempt_guarded(id, sem))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            timeout = 60.0
            if self._heap and not holding:
                timeout = min(timeout, max(0.0, self._heap[0][0] - time.time()))
            self._wake.clear()
            stop_wait = asyncio.ensure_future(stopping.wait())
            wake_wait = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait(
                [stop_wait, wake_wait], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            stop_wait.cancel()
            wake_wait.cancel()

    async def drain(self, timeout: float) -> None:
        """At shutdown: let deliveries in flight finish (their results get recorded).

        Whatever is still running after ``timeout`` is cancelled; its recipients keep
        their last recorded state and are tried again at the next start.
        """
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.events.drain(min(timeout, 5.0))
        await self.pool.close()

    async def _attempt_guarded(self, id: str, sem: asyncio.Semaphore) -> None:
        try:
            await self.attempt(id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("queue: delivery of %s failed unexpectedly; retrying later", id,
                          extra={"QUEUE_ID": id})
            self.schedule(id, time.time() + retry_delay(self.config.delivery.retry_schedule, 1))
        finally:
            self._active.discard(id)
            sem.release()

    # ---- one attempt -----------------------------------------------------------------

    async def attempt(self, id: str) -> None:
        """Try every due recipient of message ``id`` once, and record the results."""
        try:
            env = self.spool.load(id)
        except FileNotFoundError:
            self._index.pop(id, None)
            return  # deleted meanwhile (empathctl queue delete)
        forced = id in self._forced
        self._forced.discard(id)
        if env.held:
            self.track(env)
            return
        now = time.time()
        due = [
            r for r in env.recipients
            if r.state == "pending"
            or (r.state == "deferred" and (forced or (r.next_attempt or 0) <= now))
        ]
        lock = asyncio.Lock()  # one envelope write at a time, in result order
        bounced: list[tuple[Recipient, RcptResult]] = []
        succeeded: list[tuple[Recipient, RcptResult]] = []
        deferred: list[tuple[Recipient, RcptResult]] = []
        # recipient → the next-hop kind it was tried at (the metrics' nexthop label)
        hop_of: dict[str, str] = {}
        if due:
            self.events.fire("delivery_attempt", env, due=due)
            # Inline, like the spool.load above: a read of the header section from
            # the page cache costs less than handing it to a thread.
            hops = received_count(self.spool.data_path(id), env.size)
            if hops > MAX_HOPS:
                text = f"mail loop: message has {hops} Received: headers (limit {MAX_HOPS})"
                bounced = [(r, RcptResult(r.address, "bounced", "5.4.6", text)) for r in due]
            else:
                by_domain: dict[str, list[Recipient]] = defaultdict(list)
                for r in due:
                    by_domain[_domain(r.address)].append(r)
                async with asyncio.TaskGroup() as tg:
                    for domain, rcpts in by_domain.items():
                        tg.create_task(self._domain_attempt(
                            env, domain, rcpts, lock, bounced, succeeded, deferred, hop_of))
        if bounced:
            await self._bounce(env, bounced, hop_of)
        if succeeded:
            # NOTIFY=SUCCESS (RFC 3461): sent after the delivery is recorded; a crash
            # in between loses this report rather than repeating the delivery.
            await self._send_dsn(env, succeeded, "success")
        if deferred:
            await self._maybe_delay_warning(env, deferred, time.time())
        if all(r.state in FINAL for r in env.recipients):
            await self._remove(env)
        else:
            self.track(env)
            due_next = first_due(env)
            if due_next is not None:
                self.schedule(env.id, due_next)

    async def _domain_attempt(
        self, env: Envelope, domain: str, rcpts: list[Recipient], lock: asyncio.Lock,
        bounced: list[tuple[Recipient, RcptResult]],
        succeeded: list[tuple[Recipient, RcptResult]],
        deferred: list[tuple[Recipient, RcptResult]],
        hop_of: dict[str, str],
    ) -> None:
        results, hop = await self._deliver_domain(env, domain, rcpts)
        for r in rcpts:
            hop_of[r.address] = hop
        now = time.time()
        expired = now - env.received_at >= self.config.delivery.max_queue_lifetime
        changed = False
        for r, res in zip(rcpts, results, strict=True):
            if res.status == "deferred" and expired:
                # Status 4.4.7 (RFC 3463: delivery time expired); the last error, as
                # the server gave it, stays in the text for the sender to read.
                res = RcptResult(
                    res.address, "bounced", "4.4.7",
                    f"delivery time expired after {_days(now - env.received_at)}; "
                    f"last error: {res.diagnostic}",
                    None, res.remote_mta, res.tls,
                )
                self.events.fire("expired", env, recipient=r, result=res)  # then bounced
            if res.status == "bounced":
                bounced.append((r, res))  # recorded after the DSN is queued
                continue
            self._apply(env, r, res, now, hop)
            changed = True
            if res.status == "delivered" and res.success_action is not None:
                succeeded.append((r, res))
            elif res.status == "deferred":
                deferred.append((r, res))
        if not changed:
            return
        if not bounced and all(r.state in FINAL for r in env.recipients):
            # This was the last transaction and the message is done: removing it
            # (attempt() does, next) records that as durably as a rewrite would, so
            # one fsync'ed write is saved per message. If the removal fails,
            # ``_remove`` writes the envelope instead.
            env.metadata[_UNRECORDED] = True
            return
        # Record before anything else happens: a recipient marked delivered is
        # never tried again, even after a crash right after this line.
        async with lock:
            await self.spool.update_async(env)

    def _apply(self, env: Envelope, r: Recipient, res: RcptResult, now: float,
               hop: str) -> None:
        extra: dict[str, Any] = {"QUEUE_ID": env.id, "EMPATH_EVENT": res.status,
                                 "RCPT_DOMAIN": _domain(r.address), "DSN_STATUS": res.enhanced}
        r.attempts += 1
        # The attempt's history entry (bounded, oldest dropped): what `queue show` tells
        # an admin about a stuck message. Written with the state change just below.
        r.record(Attempt.make(now, res.status, res.enhanced, res.diagnostic,
                              res.remote_mta, res.tls,
                              self._dnssec_of.pop((env.id, r.address), None)))
        self.stats.attempts[res.status] += 1
        metrics.inc("empath_delivery_attempts_total", (res.status, hop))
        if res.status in FINAL:
            metrics.observe("empath_queue_residence_seconds",
                            max(0.0, now - env.received_at), (res.status,))
        relay = res.remote_mta or "-"
        if res.status == "delivered":
            r.state, r.next_attempt, r.last_error = "delivered", None, None
            self.stats.delivered += 1
            log.info("delivered id=%s to=<%s> relay=%s tls=%s status=%s %s", env.id,
                     r.address, relay, res.tls or "none", res.enhanced, res.text, extra=extra)
        elif res.status == "bounced":
            r.state, r.next_attempt, r.last_error = "bounced", None, res.diagnostic
            self.stats.bounced += 1
            log.info("bounced id=%s to=<%s> relay=%s status=%s %s", env.id, r.address,
                     relay, res.enhanced, res.text, extra=extra)
        else:
            delay = retry_delay(self.config.delivery.retry_schedule, r.attempts)
            r.state, r.next_attempt, r.last_error = "deferred", now + delay, res.diagnostic
            self.stats.deferred += 1
            log.info("deferred id=%s to=<%s> relay=%s status=%s %s (retry in %ds)", env.id,
                     r.address, relay, res.enhanced, res.text, delay, extra=extra)
        self.events.fire(res.status, env, recipient=r, result=res)

    async def _deliver_domain(
        self, env: Envelope, domain: str, rcpts: list[Recipient]
    ) -> tuple[list[RcptResult], str]:
        """The recipients' results, and the next-hop kind (mx, smtp, lmtp, maildir)."""
        cfg = self.config
        route = await resolve_route(domain, cfg, self.dns, overrides=self.overrides, own=self.own)
        hop = "mx" if route.nexthop.startswith("mx:") else route.kind
        self._dnssec_of.update(((env.id, r.address), route.dnssec) for r in rcpts)
        if route.failure is not None:
            f = route.failure
            status: RcptStatus = "bounced" if f.permanent else "deferred"
            return [RcptResult(r.address, status, f.enhanced, f.text) for r in rcpts], hop
        started = time.monotonic()
        try:
            return await self._transact(env, domain, rcpts, route), hop
        finally:
            metrics.observe("empath_delivery_duration_seconds",
                            time.monotonic() - started, (hop,))

    async def _transact(
        self, env: Envelope, domain: str, rcpts: list[Recipient], route: Route
    ) -> list[RcptResult]:
        cfg = self.config
        data_path = self.spool.data_path(env.id)
        limiter = self._limiter(domain)
        if route.kind == "maildir":
            assert route.path is not None
            await limiter.acquire()
            try:
                return await asyncio.to_thread(
                    deliver_maildir, route.path, rcpts, data_path,
                    hostname=cfg.hostname, sender=env.sender, size=env.size,
                )
            finally:
                limiter.release()
        targets = self._allowed_targets(route)
        if not targets:
            return [RcptResult(r.address, "deferred", "4.4.1",
                               f"next hop {route.nexthop or domain} is failing; "
                               "circuit breaker open, not tried")
                    for r in rcpts]
        policy = cfg.delivery.destinations.get(domain)
        settings = ClientSettings(
            helo=cfg.hostname,
            own_hostname=cfg.hostname,
            tls=policy.tls if policy is not None else "may",
            lmtp=route.kind == "lmtp",
        )
        # Signed per message, not per transaction (cached); LMTP is final delivery.
        prefix = b"" if settings.lmtp else await self.dkim.header(env, data_path, cfg)
        await limiter.acquire()
        try:
            results = await deliver(env, rcpts, data_path, targets, settings, pool=self.pool,
                                    prefix=prefix)
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

    def limiter_state(self) -> dict[str, dict[str, Any]]:
        """Per-destination limits in use (for ``empathctl`` and metrics)."""
        return {
            d: {"active": lim.active, "max_connections": lim.max_connections, "rate": lim.rate}
            for d, lim in self._limiters.items()
        }

    def _allowed_targets(self, route: Route) -> list[Target]:
        now = time.monotonic()
        return [t for t in route.targets if self.breakers.get(_target_key(t)).allow(now)]

    def _record_breaker(self, targets: list[Target], results: list[RcptResult]) -> None:
        now = time.monotonic()
        # A server that answered anything (even 5xx) is up; only "no answer at all"
        # (connection errors carry no reply code) counts against the breaker.
        answered = {r.remote_mta for r in results if r.code is not None}
        no_answer = all(r.code is None and r.status == "deferred" for r in results)
        for t in targets:
            b = self.breakers.get(_target_key(t))
            if t.name in answered:
                b.success()
            elif no_answer:
                b.failure(now)

    # ---- bounces ------------------------------------------------------------------

    async def _bounce(self, env: Envelope, bounced: list[tuple[Recipient, RcptResult]],
                      hop_of: dict[str, str]) -> None:
        """Queue the failure DSN, then record the recipients as bounced."""
        await self._send_dsn(env, bounced, "failure")
        now = time.time()
        for r, res in bounced:
            # "none": bounced before any next hop was chosen (a mail loop)
            self._apply(env, r, res, now, hop_of.get(r.address, "none"))
        await self.spool.update_async(env)

    async def _send_dsn(
        self, env: Envelope, failed: list[tuple[Recipient, RcptResult]], kind: DsnKind
    ) -> None:
        cfg = self.config
        to = bounce_recipient(env, postmaster=cfg.postmaster, kind=kind)
        if to is None:
            if env.sender == "":
                log.warning("no %s notice for null-sender message %s (never bounce a bounce)",
                            kind, env.id, extra={"QUEUE_ID": env.id})
            return
        if env.sender == "":
            results = [res for _, res in failed]  # double bounce: postmaster hears of all
        else:
            results = [res for r, res in failed if should_notify(env, r, kind)]
        if not results:
            return
        now = time.time()
        with self.spool.open_data(env.id, env.size) as original:
            data = await asyncio.to_thread(
                build_dsn, envelope=env, results=results, kind=kind, hostname=cfg.hostname,
                original=original, now=now, recipient=to,
                will_retry_until=env.received_at + cfg.delivery.max_queue_lifetime,
            )
        body, smtputf8 = transport_flags(data, failed=env, recipient=to)
        metadata: dict[str, Any] = {**dsn_metadata(env, kind), "about": env.id}
        new_id = await self.enqueue_local(to, data, metadata=metadata, body=body,
                                          smtputf8=smtputf8)
        self.stats.dsns += 1
        metrics.inc("empath_dsn_sent_total", (_DSN_ACTION[kind],))
        log.info("dsn id=%s kind=%s about=%s to=<%s>", new_id, kind, env.id, to,
                 extra={"QUEUE_ID": env.id, "EMPATH_EVENT": f"dsn-{kind}"})

    async def _maybe_delay_warning(
        self, env: Envelope, deferred: list[tuple[Recipient, RcptResult]], now: float
    ) -> None:
        """Once per message, after ``delivery.delay_warning`` seconds in the queue: tell
        the sender which recipients are still being retried, and why."""
        threshold = self.config.delivery.delay_warning
        if (threshold is None or env.sender == "" or env.metadata.get(DELAY_WARNED)
                or now - env.received_at < threshold):
            return
        await self._send_dsn(env, deferred, "delay")
        env.metadata[DELAY_WARNED] = True
        await self.spool.update_async(env)

    async def enqueue_local(
        self, to: str, data: bytes, *, metadata: dict[str, Any], body: str = "7BIT",
        smtputf8: bool = False,
    ) -> str:
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
            helo=self.config.hostname, body=body, smtputf8=smtputf8, metadata=dict(metadata),
        )
        await self.spool.commit(writer, env)
        self.track(env)
        self.add(env.id)
        return env.id

    async def _remove(self, env: Envelope) -> None:
        id = env.id
        unrecorded = bool(env.metadata.pop(_UNRECORDED, False))
        try:
            await self.spool.remove_async(id)
            self._index.pop(id, None)
            log.info("removed id=%s (all recipients final)", id,
                     extra={"QUEUE_ID": id, "EMPATH_EVENT": "removed"})
        except FileNotFoundError:
            self._index.pop(id, None)
        except OSError as exc:
            log.error("queue: cannot remove %s: %s; will retry", id, exc,
                      extra={"QUEUE_ID": id})
            if unrecorded:
                # The results were to be recorded by the removal: record them now,
                # or the retry would deliver again.
                try:
                    await self.spool.update_async(env)
                except OSError as exc2:
                    log.error("queue: cannot record results of %s either: %s", id, exc2,
                              extra={"QUEUE_ID": id})
            self.schedule(id, time.time() + REMOVE_RETRY)
