"""Queue and route operations of the control plane, on a ``QueueManager`` and its ``Spool``.

Reading (list, show, stats) loads envelopes from disk in a worker thread, so a
large queue does not stall the event loop; only the envelope records are read, never
message bodies (``show`` reads the header block of one message).

Changing a message (retry, hold, release, delete) follows one rule: the queue
manager owns an envelope while it delivers the message, and writes it back with the
results. So a message being delivered is never changed (``conflict``, after a short
wait for the attempt to end). Otherwise the message is first taken off the
schedule (synchronously, so the scheduler cannot start an attempt meanwhile), then
its envelope is written or removed through the spool's thread pool, never blocking
the event loop on an fsync. Retrying needs no write at all: the queue manager is
told to disregard the recorded next-attempt times once (``retry_now``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

from empath.addr import AddressError, normalize_domain
from empath.config.nexthop import parse_next_hop
from empath.control.protocol import MAX_LIST, ProtocolError
from empath.queue import QueueManager
from empath.queue.manager import message_state as recorded_state
from empath.spool import CorruptEnvelope, Envelope, Spool, is_message_id

__all__ = [
    "MESSAGE_STATES",
    "active_ids",
    "collect_list",
    "delete_message",
    "dns_cache",
    "flush_queue",
    "hold_message",
    "list_pages",
    "queue_stats",
    "release_message",
    "retry_all",
    "retry_message",
    "route_list",
    "route_set",
    "route_unset",
    "show_message",
]

FINAL = ("delivered", "bounced")
# Message-level states shown by ``queue list`` / counted by ``queue stats``.
MESSAGE_STATES = ("pending", "deferred", "held", "active")
# How long a change waits for a delivery in progress to finish before giving up.
ACTIVE_WAIT = 5.0
# Bytes of a message read by ``queue show`` looking for the end of its header.
MAX_HEADER_BYTES = 256 * 1024
# Domains listed by ``queue stats`` (the busiest ones).
STATS_DOMAINS = 50
# Messages per page of a ``queue list`` answer, and envelopes read per thread hop.
LIST_PAGE = 100
LOAD_CHUNK = 500
# Seconds a streamed listing may go without sending a page (then an empty one).
LIST_KEEPALIVE = 5.0


# ------------------------------------------------------------------ helpers


def active_ids(qm: QueueManager) -> frozenset[str]:
    """Ids being delivered right now."""
    return qm.active_ids()


def _is_active(qm: QueueManager, id: str) -> bool:
    return qm.is_active(id)


def queue_id(value: Any) -> str:
    """A queue id from a request (case-insensitive); bad-request otherwise."""
    if not isinstance(value, str):
        raise ProtocolError("bad-request", "a queue id is required")
    id = value.strip().upper()
    if not is_message_id(id):
        raise ProtocolError("bad-request", f"{value!r} is not a queue id")
    return id


def domain_arg(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError("bad-request", "a domain is required")
    try:
        return normalize_domain(value)
    except AddressError as exc:
        raise ProtocolError("bad-request", str(exc)) from None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _not_found(id: str) -> ProtocolError:
    return ProtocolError("not-found", f"no message {id} in the queue")


def _load(spool: Spool, id: str) -> Envelope:
    try:
        return spool.load(id)
    except FileNotFoundError:
        raise _not_found(id) from None
    except (OSError, CorruptEnvelope) as exc:
        raise ProtocolError("internal", f"cannot read message {id}: {exc}") from None


def _load_some(spool: Spool, ids: list[str]) -> list[Envelope]:
    """Thread: the readable envelopes among ``ids``, in their order."""
    envelopes: list[Envelope] = []
    for id in ids:
        try:
            envelopes.append(spool.load(id))
        except (OSError, CorruptEnvelope):
            continue  # gone since the directory was listed, or unreadable (see stats)
    return envelopes


def _quarantined(spool: Spool) -> int:
    try:
        with os.scandir(spool.quarantine_dir) as it:
            return sum(1 for _ in it)
    except OSError:
        return 0


def message_state(env: Envelope, active: bool) -> str:
    """The queue's rule (empath.queue.manager.message_state), plus ``active``."""
    return "active" if active else recorded_state(env)


def _next_due(env: Envelope) -> float | None:
    """When the scheduler will next try ``env`` (QueueManager._next_due's rule)."""
    if env.held:
        return None
    times = [(r.next_attempt or 0.0) if r.state == "deferred" else 0.0
             for r in env.recipients if r.state not in FINAL]
    return min(times) if times else 0.0


def summary(env: Envelope, *, active: bool, now: float) -> dict[str, Any]:
    """One message as ``queue list`` shows it."""
    next_attempt = _next_due(env)
    if next_attempt is not None:
        next_attempt = max(next_attempt, now)  # due already: "now"
    last_error = next((r.last_error for r in env.recipients
                       if r.state not in FINAL and r.last_error), None)
    return {
        "id": env.id,
        "state": message_state(env, active),
        "received_at": env.received_at,
        "age": max(0.0, now - env.received_at),
        "size": env.size,
        "sender": env.sender,
        "held": env.held,
        "next_attempt": next_attempt,
        "last_error": last_error,
        "recipients": [
            {"address": r.address, "state": r.state, "attempts": r.attempts,
             "next_attempt": r.next_attempt, "last_error": r.last_error}
            for r in env.recipients
        ],
    }


async def _wait_idle(qm: QueueManager, id: str, what: str) -> None:
    """Wait a little for a delivery of ``id`` in progress; conflict if it goes on."""
    deadline = time.monotonic() + ACTIVE_WAIT
    while _is_active(qm, id):
        if time.monotonic() >= deadline:
            raise ProtocolError(
                "conflict",
                f"message {id} is being delivered right now; cannot {what} it until "
                "this attempt is over — try again in a moment",
            )
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------ reading


def list_pages(qm: QueueManager, spool: Spool, *, state: str | None = None,
               domain: str | None = None, offset: int = 0, limit: int | None = None,
               page: int = LIST_PAGE) -> AsyncIterator[list[dict[str, Any]]]:
    """Queued messages, oldest first, in pages of at most ``page`` messages:
    optionally only those in ``state`` or with a recipient still to be delivered
    at ``domain``, skipping the first ``offset`` that match and stopping after
    ``limit``. Envelopes are read in chunks, in a worker thread, so neither a long
    queue nor a slow disk holds up the event loop or builds one huge answer.

    The arguments are checked now (ProtocolError), before the first page is asked for.
    """
    if state is not None and state not in MESSAGE_STATES:
        raise ProtocolError("bad-request",
                            f"unknown state {state!r}; expected one of {', '.join(MESSAGE_STATES)}")
    return _pages(qm, spool, state, domain, offset, limit, page)


async def _pages(qm: QueueManager, spool: Spool, state: str | None, domain: str | None,
                 offset: int, limit: int | None, page: int
                 ) -> AsyncIterator[list[dict[str, Any]]]:
    if limit == 0:
        return
    ids = await asyncio.to_thread(spool.ids)
    skip = offset
    sent = 0
    out: list[dict[str, Any]] = []
    last = time.monotonic()
    for start in range(0, len(ids), LOAD_CHUNK):
        if time.monotonic() - last >= LIST_KEEPALIVE:
            # Long without a match (a rare --status on a huge queue): a page, even an
            # empty one, so the client knows the daemon is still at it.
            yield out
            out = []
            last = time.monotonic()
        envelopes = await asyncio.to_thread(_load_some, spool, ids[start:start + LOAD_CHUNK])
        active = active_ids(qm)
        now = time.time()
        for env in envelopes:
            if domain is not None and not any(
                r.state not in FINAL and _domain(r.address) == domain for r in env.recipients
            ):
                continue
            item = summary(env, active=env.id in active, now=now)
            if state is not None and item["state"] != state:
                continue
            if skip:
                skip -= 1
                continue
            out.append(item)
            sent += 1
            if len(out) >= page:
                yield out
                out = []
                last = time.monotonic()
            if limit is not None and sent >= limit:
                break
        if limit is not None and sent >= limit:
            break
    if out:
        yield out


async def collect_list(pages: AsyncIterator[list[dict[str, Any]]], *,
                       limit: int | None) -> list[dict[str, Any]]:
    """The pages as one list (a non-streamed answer): refused as ``too-large``
    beyond ``MAX_LIST`` messages, which could make a response line of hundreds
    of megabytes."""
    out: list[dict[str, Any]] = []
    try:
        async for items in pages:
            out += items
            if len(out) > MAX_LIST:
                raise ProtocolError(
                    "too-large",
                    f"more than {MAX_LIST} messages match: that is too many for one answer; "
                    "ask for fewer (limit, offset) or for a stream (stream: true), "
                    "as empathctl does")
    finally:
        aclose = getattr(pages, "aclose", None)
        if aclose is not None:
            await aclose()
    return out[:limit] if limit is not None else out


def _read_headers(spool: Spool, id: str) -> tuple[list[list[str]], bool]:
    """Thread: the header fields of message ``id`` as [name, unfolded value] pairs,
    and whether the header block was longer than we read."""
    with spool.open_data(id) as f:
        data: bytes = f.read(MAX_HEADER_BYTES)
    if data.startswith((b"\r\n", b"\n")):
        end = 0  # no header at all
    else:
        ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
        end = min(ends) if ends else len(data)
    # Cut short only if we stopped reading before the header ended.
    truncated = end == len(data) and len(data) >= MAX_HEADER_BYTES
    text = data[:end].decode("utf-8", "replace")
    fields: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            fields[-1][1] += " " + line.strip()  # unfolding (RFC 5322 §2.2.3)
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields.append([name, value.strip()])
        else:
            fields.append(["", line])  # not a header field; show it as it is
    return fields, truncated


async def show_message(qm: QueueManager, spool: Spool, id: str) -> dict[str, Any]:
    env = await asyncio.to_thread(_load, spool, id)
    try:
        headers, truncated = await asyncio.to_thread(_read_headers, spool, id)
    except FileNotFoundError:
        raise _not_found(id) from None
    except OSError as exc:
        raise ProtocolError("internal", f"cannot read message {id}: {exc}") from None
    return {
        "message": summary(env, active=_is_active(qm, id), now=time.time()),
        "envelope": dataclasses.asdict(env),
        "headers": headers,
        "headers_truncated": truncated,
    }


async def queue_stats(qm: QueueManager, spool: Spool) -> dict[str, Any]:
    """From the queue manager's in-memory index: no envelope is read, so this stays
    fast with 100,000 messages queued. ``unreadable`` counts quarantined entries."""
    unreadable = await asyncio.to_thread(_quarantined, spool)
    active = active_ids(qm)
    now = time.time()
    states: Counter[str] = Counter(dict.fromkeys(MESSAGE_STATES, 0))
    rcpt_states: Counter[str] = Counter({"pending": 0, "deferred": 0, "delivered": 0,
                                         "bounced": 0})
    domains: dict[str, Counter[str]] = defaultdict(Counter)
    oldest_id: str | None = None
    oldest_at = 0.0
    size = 0
    index = qm.index
    for id, entry in index.items():
        states["active" if id in active else entry.state] += 1
        size += entry.size
        if oldest_id is None or entry.received_at < oldest_at:
            oldest_id, oldest_at = id, entry.received_at
        seen: set[str] = set()
        for d, state in entry.rcpts:
            rcpt_states[state] += 1
            if state in FINAL:
                continue
            domains[d][state] += 1
            if d not in seen:
                seen.add(d)
                domains[d]["messages"] += 1
    by_domain: list[dict[str, Any]] = sorted(
        ({"domain": d, "messages": c["messages"], "pending": c["pending"],
          "deferred": c["deferred"]} for d, c in domains.items()),
        key=lambda x: (-(x["pending"] + x["deferred"]), x["domain"]),
    )
    stats = qm.stats
    return {
        "messages": len(index),
        "size": size,
        "by_state": dict(states),
        "recipients": dict(rcpt_states),
        "by_domain": by_domain[:STATS_DOMAINS],
        "domains": len(by_domain),
        "oldest_id": oldest_id,
        "oldest_age": max(0.0, now - oldest_at) if oldest_id is not None else None,
        "unreadable": unreadable,
        "mode": qm.config.delivery.mode,
        "scheduler": {"scheduled": qm.size, "active": qm.active,
                      "max_deliveries": qm.config.delivery.max_deliveries},
        "since_start": {"delivered": stats.delivered, "deferred": stats.deferred,
                        "bounced": stats.bounced, "dsns": stats.dsns},
        "destinations": qm.limiter_state(),
    }


# ------------------------------------------------------------------ changing


def _deferred(env: Envelope) -> list[str]:
    return [r.address for r in env.recipients if r.state == "deferred"]


async def retry_message(qm: QueueManager, spool: Spool, id: str) -> dict[str, Any]:
    """Try ``id`` now, its deferred recipients included."""
    await _wait_idle(qm, id, "retry")
    env = _load(spool, id)
    if env.held:
        raise ProtocolError("conflict", f"message {id} is on hold; release it first")
    qm.retry_now(id)
    return {"id": id, "recipients": _deferred(env)}


async def retry_all(qm: QueueManager, spool: Spool) -> dict[str, Any]:
    """Every message that is not held is tried now, deferred recipients included.

    Held messages are never on the schedule, so they stay; nothing is read or
    written on disk for this.
    """
    busy = sorted(qm.active_ids())
    messages = qm.flush()
    return {"messages": messages, "active": busy, "mode": qm.config.delivery.mode}


async def flush_queue(qm: QueueManager, spool: Spool) -> dict[str, Any]:
    """``queue flush``: try everything not held now, deferred recipients included."""
    return await retry_all(qm, spool)


async def hold_message(qm: QueueManager, spool: Spool, id: str, held: bool) -> dict[str, Any]:
    """Set or clear the message's hold; returns whether it changed."""
    await _wait_idle(qm, id, "hold" if held else "release")
    env = _load(spool, id)
    changed = env.held != held
    if held:
        qm.unschedule(id)  # before the write: no attempt can start meanwhile
    if changed:
        env.held = held
        try:
            await spool.update_async(env)
        except FileNotFoundError:
            raise _not_found(id) from None
    qm.track(env)
    if not held:
        due = _next_due(env)
        if due is not None:
            qm.schedule(id, due)
    return {"id": id, "held": held, "changed": changed}


async def release_message(qm: QueueManager, spool: Spool, id: str) -> dict[str, Any]:
    return await hold_message(qm, spool, id, False)


async def delete_message(qm: QueueManager, spool: Spool, id: str) -> dict[str, Any]:
    """Remove the message from the spool, without a bounce (like ``postsuper -d``)."""
    await _wait_idle(qm, id, "delete")
    env = _load(spool, id)
    qm.unschedule(id)
    try:
        await spool.remove_async(id)
    except FileNotFoundError:
        qm.forget(id)
        raise _not_found(id) from None
    qm.forget(id)
    return {"id": id, "sender": env.sender,
            "recipients": [r.address for r in env.recipients if r.state not in FINAL]}


# ------------------------------------------------------------------ DNS, routes


def dns_cache(qm: QueueManager, *, clear: bool) -> dict[str, Any]:
    if clear:
        return {"cleared": qm.dns.clear_cache()}
    return {"entries": qm.dns.cache_entries()}


def route_list(qm: QueueManager) -> dict[str, Any]:
    config_routes = qm.config.delivery.routes
    overrides = qm.overrides
    routes = []
    for domain in sorted(set(config_routes) | set(overrides)):
        if domain in overrides:
            entry: dict[str, Any] = {"domain": domain, "nexthop": overrides[domain],
                                     "source": "override"}
            if domain in config_routes:
                entry["config_nexthop"] = config_routes[domain]
        else:
            entry = {"domain": domain, "nexthop": config_routes[domain], "source": "config"}
        routes.append(entry)
    d = qm.config.delivery
    return {"routes": routes, "mode": d.mode, "relayhost": d.relayhost}


def route_set(qm: QueueManager, domain: str, nexthop: Any) -> dict[str, Any]:
    if not isinstance(nexthop, str) or not nexthop.strip():
        raise ProtocolError("bad-request", "a next hop is required (e.g. smtp:HOST:PORT)")
    try:
        canonical = str(parse_next_hop(nexthop.strip()))
    except ValueError as exc:
        text = str(exc)
        if not text.startswith("next hop"):
            text = f"next hop {nexthop.strip()!r}: {text}"
        raise ProtocolError("bad-request", text) from None
    previous = qm.overrides.get(domain)
    qm.overrides[domain] = canonical
    return {"domain": domain, "nexthop": canonical, "previous": previous,
            "config_nexthop": qm.config.delivery.routes.get(domain)}


def route_unset(qm: QueueManager, domain: str) -> dict[str, Any]:
    previous = qm.overrides.pop(domain, None)
    if previous is None:
        raise ProtocolError("not-found", f"no runtime route override for {domain}")
    return {"domain": domain, "previous": previous,
            "config_nexthop": qm.config.delivery.routes.get(domain)}
