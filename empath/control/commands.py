"""The control commands, and what the daemon provides to serve them.

The supervisor builds one ``ControlHandlers`` and hands it to ``ControlServer``:
its queue manager and spool (the queue and route commands are implemented here,
in ``queueops``, directly on them), and four callables for what only the
supervisor knows (status, reload, connections, log level). A callable left None
makes its command answer ``unavailable``.

Every command is ``async (ctx, args) -> result``: ``args`` is the request's
``args`` object, checked here (unknown or mistyped arguments are ``bad-request``),
and the result is JSON-able. A command that changes something calls ``ctx.audit``
with what changed; the server logs it with the peer's uid and pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import empath
from empath.control import queueops
from empath.control.auth import Peer
from empath.control.protocol import ProtocolError
from empath.queue import QueueManager
from empath.spool import Spool

__all__ = [
    "COMMANDS",
    "LOG_LEVELS",
    "Command",
    "CommandContext",
    "ControlHandlers",
    "Stream",
    "reload_outcome",
]

log = logging.getLogger("empath.control")

LOG_LEVELS = ("debug", "info", "warning", "error")
WATCH_INTERVAL = 2.0
MIN_WATCH_INTERVAL = 0.1


@dataclass(eq=False)
class ControlHandlers:
    """What the daemon gives the control server.

    - ``queue``, ``spool``: the running QueueManager and its Spool.
    - ``status() -> Mapping``: facts about the daemon for ``empathctl status``
      (version, pid, uptime, workers, config path, listeners…): any JSON-able
      mapping; the server adds ``queue`` (scheduler and counters) to it.
    - ``reload() -> Awaitable[result]``: re-read and apply the configuration,
      finishing when it was applied or refused. The result is a Mapping or an
      object with attributes ``ok: bool``, ``applied: bool`` (in force although
      not ok, e.g. a worker failed; default: ok), ``errors: Sequence`` (str() of
      each is shown), ``restart_needed: Sequence[str]`` (keys that changed but
      apply only after a restart), ``changed: Sequence[str]`` and ``generation:
      int``; missing ones default to ok / empty. ``Supervisor.reload`` returning
      its ``ReloadResult`` fits as is. Raising counts as refused, with the
      exception text as error.
    - ``connections() -> Mapping`` (or an awaitable of one): the open SMTP
      sessions, ``{"connections": [one mapping per session], "workers": [one
      mapping per worker asked: index, pid, ok, and error when it did not
      answer]}``; see ``Supervisor._control_connections``. A plain sequence of
      rows is taken as ``connections`` with no worker list.
    - ``set_log_level(level)``: ``level`` is one of debug, info, warning, error.
    """

    queue: QueueManager
    spool: Spool
    status: Callable[[], Mapping[str, Any]] | None = None
    reload: Callable[[], Awaitable[object]] | None = None
    connections: Callable[[], Any] | None = None
    set_log_level: Callable[[str], object] | None = None
    # Serialises reloads started from the control socket.
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reload_tasks: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class CommandContext:
    handlers: ControlHandlers
    peer: Peer
    cmd: str
    # audit(text, **fields): log a change made by this request.
    audit: Callable[..., None]


@dataclass(frozen=True)
class Stream:
    """A streamed result: each item is sent as one response line with ``more``."""

    items: AsyncIterator[Any]


CommandFn = Callable[[CommandContext, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    fn: CommandFn
    # Changes state: refusals are audit-logged too.
    mutating: bool
    help: str


# ------------------------------------------------------------------ arguments


class _Args:
    """Typed access to a request's arguments; every argument must be known."""

    def __init__(self, args: dict[str, Any], known: Sequence[str]) -> None:
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ProtocolError("bad-request", f"unknown argument(s): {', '.join(unknown)}")
        self._args = args

    def opt_str(self, key: str) -> str | None:
        v = self._args.get(key)
        if v is not None and not isinstance(v, str):
            raise ProtocolError("bad-request", f"argument {key!r} must be a string")
        return v

    def required(self, key: str) -> str:
        v = self.opt_str(key)
        if v is None or not v.strip():
            raise ProtocolError("bad-request", f"argument {key!r} is required")
        return v

    def flag(self, key: str) -> bool:
        v = self._args.get(key, False)
        if type(v) is not bool:
            raise ProtocolError("bad-request", f"argument {key!r} must be true or false")
        return v

    def opt_count(self, key: str) -> int | None:
        """A whole number >= 0, or None when absent."""
        v = self._args.get(key)
        if v is None:
            return None
        if type(v) is not int or v < 0:
            raise ProtocolError("bad-request",
                                f"argument {key!r} must be a whole number, 0 or more")
        return v

    def opt_number(self, key: str) -> float | None:
        v = self._args.get(key)
        if v is None:
            return None
        if type(v) not in (int, float) or v <= 0:
            raise ProtocolError("bad-request", f"argument {key!r} must be a positive number")
        return float(v)


def _require(fn: Any, what: str) -> Any:
    if fn is None:
        raise ProtocolError("unavailable", f"{what} is not available in this daemon")
    return fn


# ------------------------------------------------------------------ commands


async def _status(ctx: CommandContext, args: dict[str, Any]) -> Any:
    _Args(args, ())
    h = ctx.handlers
    base: dict[str, Any] = {"version": empath.__version__}
    if h.status is not None:
        base.update(h.status())
    qm = h.queue
    base["queue"] = {
        "scheduled": qm.size,
        "active": qm.active,
        "mode": qm.config.delivery.mode,
        "overrides": len(qm.overrides),
        "since_start": {"delivered": qm.stats.delivered, "deferred": qm.stats.deferred,
                        "bounced": qm.stats.bounced, "dsns": qm.stats.dsns},
    }
    return base


async def _queue_list(ctx: CommandContext, args: dict[str, Any]) -> Any:
    a = _Args(args, ("status", "domain", "limit", "offset", "stream"))
    status = a.opt_str("status")
    domain = a.opt_str("domain")
    limit = a.opt_count("limit")
    offset = a.opt_count("offset") or 0
    stream = a.flag("stream")
    pages = queueops.list_pages(
        ctx.handlers.queue, ctx.handlers.spool, state=status,
        domain=queueops.domain_arg(domain) if domain is not None else None,
        offset=offset, limit=limit,
    )
    if stream:
        return Stream(pages)
    return await queueops.collect_list(pages, limit=limit)


async def _queue_show(ctx: CommandContext, args: dict[str, Any]) -> Any:
    id = queueops.queue_id(_Args(args, ("id",)).required("id"))
    return await queueops.show_message(ctx.handlers.queue, ctx.handlers.spool, id)


async def _queue_retry(ctx: CommandContext, args: dict[str, Any]) -> Any:
    a = _Args(args, ("id", "all"))
    everything = a.flag("all")
    raw_id = a.opt_str("id")
    if everything == (raw_id is not None):
        raise ProtocolError("bad-request", "give either a queue id or all=true")
    h = ctx.handlers
    if raw_id is not None:
        id = queueops.queue_id(raw_id)
        result = await queueops.retry_message(h.queue, h.spool, id)
        ctx.audit(f"retry id={id}: next attempt now for {len(result['recipients'])} "
                  "deferred recipient(s)", QUEUE_ID=id)
        return result
    result = await queueops.retry_all(h.queue, h.spool)
    ctx.audit(f"retry all: {result['messages']} message(s) due now")
    return result


async def _queue_flush(ctx: CommandContext, args: dict[str, Any]) -> Any:
    _Args(args, ())
    result = await queueops.flush_queue(ctx.handlers.queue, ctx.handlers.spool)
    ctx.audit(f"flush: {result['messages']} message(s) due now")
    return result


async def _queue_hold(ctx: CommandContext, args: dict[str, Any]) -> Any:
    id = queueops.queue_id(_Args(args, ("id",)).required("id"))
    result = await queueops.hold_message(ctx.handlers.queue, ctx.handlers.spool, id, True)
    ctx.audit(f"hold id={id}" + ("" if result["changed"] else " (already held)"), QUEUE_ID=id)
    return result


async def _queue_release(ctx: CommandContext, args: dict[str, Any]) -> Any:
    id = queueops.queue_id(_Args(args, ("id",)).required("id"))
    result = await queueops.release_message(ctx.handlers.queue, ctx.handlers.spool, id)
    ctx.audit(f"release id={id}" + ("" if result["changed"] else " (was not held)"),
              QUEUE_ID=id)
    return result


async def _queue_delete(ctx: CommandContext, args: dict[str, Any]) -> Any:
    id = queueops.queue_id(_Args(args, ("id",)).required("id"))
    result = await queueops.delete_message(ctx.handlers.queue, ctx.handlers.spool, id)
    rcpts = ",".join(f"<{r}>" for r in result["recipients"]) or "-"
    ctx.audit(f"delete id={id} from=<{result['sender']}> to={rcpts} (no bounce sent)",
              QUEUE_ID=id)
    return result


async def _watch(ctx: CommandContext, interval: float, count: int | None) -> AsyncIterator[Any]:
    n = 0
    while True:
        yield await queueops.queue_stats(ctx.handlers.queue, ctx.handlers.spool)
        n += 1
        if count is not None and n >= count:
            return
        await asyncio.sleep(interval)


async def _queue_stats(ctx: CommandContext, args: dict[str, Any]) -> Any:
    a = _Args(args, ("watch", "interval", "count"))
    watch = a.flag("watch")
    interval = max(a.opt_number("interval") or WATCH_INTERVAL, MIN_WATCH_INTERVAL)
    count_arg = a.opt_number("count")
    if count_arg is not None and count_arg != int(count_arg):
        raise ProtocolError("bad-request", "argument 'count' must be a whole number")
    if not watch:
        return await queueops.queue_stats(ctx.handlers.queue, ctx.handlers.spool)
    return Stream(_watch(ctx, interval, int(count_arg) if count_arg is not None else None))


async def _dns_cache(ctx: CommandContext, args: dict[str, Any]) -> Any:
    clear = _Args(args, ("clear",)).flag("clear")
    result = queueops.dns_cache(ctx.handlers.queue, clear=clear)
    if clear:
        ctx.audit(f"dns cache cleared: {result['cleared']} entries")
    return result


async def _route_list(ctx: CommandContext, args: dict[str, Any]) -> Any:
    _Args(args, ())
    return queueops.route_list(ctx.handlers.queue)


async def _route_set(ctx: CommandContext, args: dict[str, Any]) -> Any:
    a = _Args(args, ("domain", "nexthop"))
    domain = queueops.domain_arg(a.required("domain"))
    result = queueops.route_set(ctx.handlers.queue, domain, a.required("nexthop"))
    ctx.audit(f"route set {domain} {result['nexthop']} (was "
              f"{result['previous'] or 'no override'}; config: "
              f"{result['config_nexthop'] or 'none'})")
    return result


async def _route_unset(ctx: CommandContext, args: dict[str, Any]) -> Any:
    domain = queueops.domain_arg(_Args(args, ("domain",)).required("domain"))
    result = queueops.route_unset(ctx.handlers.queue, domain)
    ctx.audit(f"route unset {domain} (was {result['previous']}; now "
              f"{result['config_nexthop'] or 'default routing'})")
    return result


async def _log_level(ctx: CommandContext, args: dict[str, Any]) -> Any:
    level = _Args(args, ("level",)).required("level").strip().lower()
    if level not in LOG_LEVELS:
        raise ProtocolError("bad-request",
                            f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
    setter = _require(ctx.handlers.set_log_level, "changing the log level")
    setter(level)
    ctx.audit(f"log level set to {level} (until the next reload or restart)")
    return {"level": level}


async def _connections(ctx: CommandContext, args: dict[str, Any]) -> Any:
    _Args(args, ())
    fn = _require(ctx.handlers.connections, "the connection list")
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, Mapping):
        out = dict(result)
        out.setdefault("workers", [])
        out["connections"] = [dict(row) for row in out.get("connections") or []]
        return out
    return {"connections": [dict(row) for row in result], "workers": []}


def reload_outcome(raw: object) -> dict[str, Any]:
    """Normalise whatever ``ControlHandlers.reload`` returned (see its docs)."""
    def get(key: str, default: Any) -> Any:
        if isinstance(raw, Mapping):
            return raw.get(key, default)
        return getattr(raw, key, default)

    def strings(key: str) -> list[str]:
        value = get(key, None)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return [str(v) for v in value]

    ok = bool(get("ok", True))
    out: dict[str, Any] = {
        "ok": ok,
        # False: refused, the old configuration is in force. True with ok False: in
        # force in the supervisor, but not everywhere (see errors).
        "applied": bool(get("applied", ok)),
        "errors": strings("errors"),
        "restart_needed": strings("restart_needed"),
        "changed": strings("changed"),
    }
    generation = get("generation", None)
    if isinstance(generation, int) and not isinstance(generation, bool):
        out["generation"] = generation
    return out


async def _run_reload(h: ControlHandlers) -> dict[str, Any]:
    fn = _require(h.reload, "reloading")
    async with h.reload_lock:
        try:
            raw = await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("control: reload failed")
            return {"ok": False, "applied": False, "errors": [str(exc) or type(exc).__name__],
                    "restart_needed": [], "changed": []}
    return reload_outcome(raw)


async def _reload(ctx: CommandContext, args: dict[str, Any]) -> Any:
    wait = _Args(args, ("wait",)).flag("wait")
    h = ctx.handlers
    _require(h.reload, "reloading")
    if not wait:
        ctx.audit("reload requested (not waiting for the result)")

        async def background() -> None:
            outcome = await _run_reload(h)
            if not outcome["ok"]:
                log.error("control: reload refused: %s", "; ".join(outcome["errors"]))

        task = asyncio.create_task(background())
        h.reload_tasks.add(task)
        task.add_done_callback(h.reload_tasks.discard)
        return {"started": True}
    outcome = await _run_reload(h)
    if not outcome["ok"]:  # the server logs the refusal
        errors = "; ".join(outcome["errors"]) or "no reason given"
        if outcome["applied"]:
            text = f"configuration applied, but not everywhere: {errors}"
        else:
            text = f"configuration refused, the old one stays in effect: {errors}"
        raise ProtocolError("refused", text, detail=outcome)
    ctx.audit("reload applied" + (f"; changed: {', '.join(outcome['changed'])}"
                                  if outcome["changed"] else ""))
    return outcome


COMMANDS: dict[str, Command] = {
    "status": Command(_status, False, "daemon status"),
    "queue.list": Command(_queue_list, False,
                          "queued messages [status, domain, limit, offset, stream]"),
    "queue.show": Command(_queue_show, False, "one message's envelope and headers [id]"),
    "queue.retry": Command(_queue_retry, True, "deferred recipients due now [id | all]"),
    "queue.hold": Command(_queue_hold, True, "hold a message [id]"),
    "queue.release": Command(_queue_release, True, "release a held message [id]"),
    "queue.delete": Command(_queue_delete, True, "delete a message, no bounce [id]"),
    "queue.flush": Command(_queue_flush, True, "try everything not held now"),
    "queue.stats": Command(_queue_stats, False, "queue counts [watch, interval, count]"),
    "dns.cache": Command(_dns_cache, True, "DNS cache entries [clear]"),
    "route.list": Command(_route_list, False, "configured routes and runtime overrides"),
    "route.set": Command(_route_set, True, "runtime route override [domain, nexthop]"),
    "route.unset": Command(_route_unset, True, "remove a runtime override [domain]"),
    "log.level": Command(_log_level, True, "set the log level [level]"),
    "connections": Command(_connections, False, "open SMTP sessions, from every worker"),
    "reload": Command(_reload, True, "re-read the configuration [wait]"),
}


async def cancel_reloads(h: ControlHandlers) -> None:
    """At shutdown: background reloads started by ``reload`` without wait."""
    for task in list(h.reload_tasks):
        task.cancel()
    for task in list(h.reload_tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
