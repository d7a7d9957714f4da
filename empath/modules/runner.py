"""Running modules: SMTP hooks in the workers, events in the supervisor.

Guarantees (docs/modules.md has the whole list):

- Order is config order; the first module that rejects or tempfails ends the stage,
  later modules are not asked.
- Every call has its module's time budget (``timeout``, ``asyncio.timeout``). A
  module that raises, runs out of time, returns something that is not a verdict or
  leaves metadata that is not JSON (or too big) is *failing*: the call has no
  effect (its headers, metadata and hold are dropped), the failure is logged with
  the module's name (``EMPATH_EVENT=module-error``) and counted in
  ``empath_module_errors_total{module,hook}``, and the client gets ``451 4.3.0``
  (``421 4.3.0`` and a close at connect) — unless the module is ``fail_open``,
  when the next module is asked as if it had accepted.
- Events cannot change anything: they run one at a time, in the order they
  happened, on a bounded in-memory queue; one not yet run when the daemon stops
  is lost (the message's context is not: it is in the spool).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from empath import metrics
from empath.addr import Mailbox
from empath.modules.api import (
    EVENTS,
    HOOKS,
    MAX_ADDED_HEADERS,
    Accept,
    ConnectContext,
    DataContext,
    DeliveryResult,
    Event,
    Headers,
    HeloContext,
    MailContext,
    RcptContext,
    RecipientInfo,
    Reject,
    SessionInfo,
    Tempfail,
)
from empath.modules.loader import Loaded, Role, build_all

if TYPE_CHECKING:
    from empath.config.model import Config
    from empath.spool import Envelope, Recipient, Spool, SpoolWriter

__all__ = ["METADATA_MAX", "DataVerdict", "EventDispatcher", "ModuleSet", "SessionHooks"]

log = logging.getLogger("empath.modules")

EVENT = "module-error"  # EMPATH_EVENT of every module failure
METRIC = "empath_module_errors_total"
TEMPFAIL = "451 4.3.0 Error: local error in processing, try again later"
# Bytes of one module's metadata as JSON: the envelope is rewritten after every
# delivery attempt, so it stays small.
METADATA_MAX = 16 * 1024
# Events waiting for their modules; beyond this they are dropped (and counted).
EVENT_QUEUE_MAX = 10_000
# Octets of the header section read for on_data (the rest is the body's).
HEADER_READ_MAX = 1024 * 1024 + 64 * 1024
_COPY_CHUNK = 1024 * 1024


class _Session(Protocol):
    """What the hooks read from an SMTP session (empath.smtp.session.SMTPSession)."""

    cfg: Config

    def describe(self) -> dict[str, Any]: ...


class _Txn(Protocol):
    """What the hooks read from an SMTP transaction (empath.smtp.session.Transaction)."""

    sender: str
    body: str
    smtputf8: bool
    size_declared: int | None
    ret: str | None
    envid: str | None
    recipients: list[str]


class _Failure(Exception):
    """A module call that failed; the text says how (for the log line)."""


def _metadata_text(md: Any, name: str) -> str:
    """``md`` as the JSON that will be stored; _Failure if it cannot be."""
    if not isinstance(md, dict):
        raise _Failure(f"metadata replaced by a {type(md).__name__}; it must stay a dict")
    try:
        text = json.dumps(md, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise _Failure(f"metadata is not JSON-able: {exc}") from None
    if len(text) > METADATA_MAX:
        raise _Failure(f"metadata is {len(text)} bytes as JSON, more than {METADATA_MAX}")
    return text


def _reply_of(result: Any) -> str | None:
    if result is None or isinstance(result, Accept):
        return None
    if isinstance(result, Reject | Tempfail):
        return result.reply
    raise _Failure(f"returned {result!r}; expected None, ACCEPT, Reject or Tempfail")


async def _call(m: Loaded, key: str, arg: Any) -> Any:
    """One call within the module's time budget; _Failure for anything wrong."""
    try:
        async with asyncio.timeout(m.spec.timeout):
            result = m.calls[key](arg)
            if inspect.isawaitable(result):
                result = await result
    except TimeoutError:
        raise _Failure(f"no answer within {m.spec.timeout:g} s") from None
    except _Failure:
        raise
    except Exception as exc:
        raise _Failure(f"raised {type(exc).__name__}: {exc}") from exc
    return result


def _failed(m: Loaded, key: str, exc: _Failure, fields: dict[str, str]) -> None:
    metrics.inc(METRIC, (m.name, key))
    what = "continuing as if it accepted (fail_open)" if m.spec.fail_open else "tempfail"
    cause = exc.__cause__
    log.error("module %s failed in %s: %s; %s", m.name, key, exc, what,
              exc_info=(type(cause), cause, cause.__traceback__) if cause else None,
              extra={"EMPATH_EVENT": EVENT, "MODULE": m.name, "MODULE_HOOK": key, **fields})


class ModuleSet:
    """The modules of one config generation, built for one process.

    Sessions hold the set they started with; after a reload the old set is
    ``retire``\\ d and closed when its last session has ended."""

    def __init__(self, loaded: list[Loaded], config: Config) -> None:
        self.modules = loaded
        self.config = config
        self.by_call: dict[str, list[Loaded]] = {
            key: [m for m in loaded if key in m.calls] for key in (*HOOKS, *EVENTS)}
        self.users = 0
        self.retired = False
        self._closing: asyncio.Task[None] | None = None
        for m in loaded:
            for key in m.calls:
                if key != "close":  # every series exists from the start, at 0
                    metrics.inc(METRIC, (m.name, key), 0.0)

    @classmethod
    def create(cls, config: Config, role: Role) -> ModuleSet:
        return cls(build_all(config, role), config)

    def session(self, session: _Session) -> SessionHooks:
        return SessionHooks(self, session)

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users <= 0:
            self._close_soon()

    def retire(self) -> None:
        """Replaced by a newer set: close once nobody uses this one."""
        self.retired = True
        if self.users <= 0:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None and any("close" in m.calls for m in self.modules):
            with contextlib.suppress(RuntimeError):  # no loop: nothing to close on
                self._closing = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        for m in self.modules:
            if "close" in m.calls:
                try:
                    await _close(m)
                except _Failure as exc:
                    _failed(m, "close", exc, {})
        self.modules = []
        self.by_call = {key: [] for key in self.by_call}


async def _close(m: Loaded) -> None:
    try:
        async with asyncio.timeout(m.spec.timeout):
            result = m.calls["close"]()
            if inspect.isawaitable(result):
                await result
    except TimeoutError:
        raise _Failure(f"close did not finish within {m.spec.timeout:g} s") from None
    except Exception as exc:
        raise _Failure(f"raised {type(exc).__name__}: {exc}") from exc


# ---- SMTP hooks -------------------------------------------------------------------


@dataclass(eq=False)
class _TxnState:
    txn: Any
    metadata: dict[str, str]  # module name → its metadata as JSON text
    headers: list[bytes]
    hold: tuple[str, str] | None = None  # (module, reason)
    prefix: bytes = b""  # what the spool file starts with: Received: + early headers
    received: bytes = b""


@dataclass(frozen=True, slots=True)
class DataVerdict:
    """The outcome of on_data: a refusal (``reply``; the writer is aborted), or the
    writer to commit (a new one when modules added headers) with ``held`` and the
    envelope ``metadata``."""

    reply: str | None
    writer: Any = None
    held: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    reason: str = "policy"  # empath_messages_rejected_total's reason for ``reply``


class SessionHooks:
    """The hooks of one SMTP session, with what modules set at connect and HELO."""

    def __init__(self, modules: ModuleSet, session: _Session) -> None:
        self.set = modules
        self.session = session
        self._acquired = False
        self._metadata: dict[str, str] = {}  # session level, as JSON text
        self._headers: list[bytes] = []
        self._txn: _TxnState | None = None

    def release(self) -> None:
        """The session ended (called once, for a session that got its greeting)."""
        if self._acquired:
            self._acquired = False
            self.set.release()

    def _info(self) -> SessionInfo:
        d = self.session.describe()
        return SessionInfo(
            client_addr=str(d["client"]), client_port=int(d["port"]), role=str(d["role"]),
            listener=str(d["listener"]), helo=d["helo"], tls=bool(d["tls"]),
            tls_version=d["tls_version"], authenticated=d["authenticated"],
        )

    def _fields(self) -> dict[str, str]:
        return {"CLIENT_ADDR": str(self.session.describe()["client"])}

    async def _stage(
        self, key: str, make: Callable[..., Any], metadata: dict[str, str],
        headers: list[bytes], state: _TxnState | None = None,
    ) -> str | None:
        """Ask every module with this hook, in order; the reply that ends the stage,
        or None when all accepted. Successful calls' effects are kept in place."""
        info = self._info()
        for m in self.set.by_call[key]:
            md = json.loads(metadata.get(m.name, "{}"))
            ctx = make(m.name, info, md)
            try:
                try:
                    reply = _reply_of(await _call(m, key, ctx))
                    text = _metadata_text(ctx.metadata, m.name)
                    added = ctx._headers
                    if sum(map(len, headers)) + sum(map(len, added)) > MAX_ADDED_HEADERS:
                        raise _Failure(f"added headers exceed {MAX_ADDED_HEADERS} octets")
                finally:
                    for f in getattr(ctx, "_files", ()):
                        f.close()
            except _Failure as exc:
                _failed(m, key, exc, self._fields())
                if m.spec.fail_open:
                    continue
                return TEMPFAIL
            if text != "{}" or m.name in metadata:
                metadata[m.name] = text
            headers.extend(added)
            if state is not None and getattr(ctx, "_hold", None) is not None:
                state.hold = (m.name, ctx._hold)
            if reply is not None:
                log.info("module %s refused %s: %s", m.name, key, reply,
                         extra={"EMPATH_EVENT": "rejected", "MODULE": m.name, **self._fields()})
                return reply
        return None

    async def connect(self) -> str | None:
        """After admission, before the greeting: a reply to send before closing, or None."""
        self.set.acquire()
        self._acquired = True
        if not self.set.by_call["connect"]:
            return None
        reply = await self._stage(
            "connect", lambda n, i, md: ConnectContext(n, i, md),
            self._metadata, self._headers)
        if reply is None:
            return None
        # RFC 5321 §4.3.1: only 220, 421 or 554 may greet; we then close.
        hostname = self.set.config.hostname
        if reply.startswith("5"):
            return f"554 {reply[4:]}"
        if reply == TEMPFAIL:
            return f"421 4.3.0 {hostname} Error: local error in processing, try again later"
        return f"421 {reply[4:]}"

    async def helo(self, name: str, esmtp: bool) -> str | None:
        """Before HELO/EHLO's 250 (which ends any transaction)."""
        if not self.set.by_call["helo"]:
            self._txn = None
            return None
        metadata, headers = dict(self._metadata), list(self._headers)
        reply = await self._stage(
            "helo", lambda n, i, md: HeloContext(n, i, md, helo=name, esmtp=esmtp),
            metadata, headers)
        if reply is None:  # a refused HELO leaves the session as it was
            self._metadata, self._headers, self._txn = metadata, headers, None
        return reply

    async def mail(self, txn: _Txn) -> str | None:
        """Before MAIL's 250; starts this transaction's module state."""
        state = _TxnState(txn, dict(self._metadata), list(self._headers))
        self._txn = state
        if not self.set.by_call["mail"]:
            return None
        return await self._stage(
            "mail", lambda n, i, md: MailContext(
                n, i, md, sender=txn.sender, body=txn.body, size=txn.size_declared,
                smtputf8=txn.smtputf8, ret=txn.ret, envid=txn.envid),
            state.metadata, state.headers, state)

    def _state(self, txn: _Txn) -> _TxnState:
        if self._txn is None or self._txn.txn is not txn:
            self._txn = _TxnState(txn, dict(self._metadata), list(self._headers))
        return self._txn

    async def rcpt(self, txn: _Txn, address: str, mailbox: Mailbox | None) -> str | None:
        """Before RCPT's 250 for a recipient the relay policy accepted."""
        state = self._state(txn)
        if not self.set.by_call["rcpt"]:
            return None
        cfg = self.session.cfg
        local = mailbox is None or mailbox.domain in cfg.local_domains
        postmaster = mailbox is None or (local and mailbox.local.lower() == "postmaster")
        return await self._stage(
            "rcpt", lambda n, i, md: RcptContext(
                n, i, md, sender=txn.sender, recipient=address,
                recipients=tuple(txn.recipients), local_domain=local, postmaster=postmaster),
            state.metadata, state.headers, state)

    def prefix(self, txn: _Txn, received: bytes) -> bytes:
        """The start of the spool file: our Received: header and the headers modules
        added before DATA."""
        state = self._state(txn)
        state.received = received
        state.prefix = received + b"".join(state.headers)
        state.headers = []  # written now; on_data's go in with a copy
        return state.prefix

    async def data(self, txn: _Txn, writer: SpoolWriter, spool: Spool) -> DataVerdict:
        """After the message is read, before the commit. Aborts the writer(s) on a
        refusal or on cancellation."""
        state = self._state(txn)
        if not self.set.by_call["data"]:
            return self._verdict(state, writer)
        try:
            try:
                writer._flush()  # the modules read the file: nothing may wait in memory
                headers, body_offset = _read_headers(writer.path)
            except OSError as exc:
                log.error("queue file write failed: %s", exc)
                writer.abort()
                return DataVerdict(
                    "451 4.3.0 Error: local error writing the queue file, try again",
                    reason="storage")
            reply = await self._stage(
                "data", lambda n, i, md: DataContext(
                    n, i, md, sender=txn.sender, recipients=tuple(txn.recipients),
                    size=writer.size, headers=headers, _path=str(writer.path),
                    _body_offset=body_offset),
                state.metadata, state.headers, state)
            if reply is not None:
                writer.abort()
                return DataVerdict(reply)
            if state.headers:
                try:
                    writer = await _with_headers(spool, writer, state)
                except OSError as exc:
                    log.error("queue file write failed: %s", exc)
                    writer.abort()
                    return DataVerdict(
                        "451 4.3.0 Error: local error writing the queue file, try again",
                        reason="storage")
        except BaseException:
            writer.abort()
            raise
        return self._verdict(state, writer)

    def _verdict(self, state: _TxnState, writer: Any) -> DataVerdict:
        persisted = {n: json.loads(t) for n, t in state.metadata.items() if t != "{}"}
        if state.hold is not None:
            log.info("held by module %s: %s", *state.hold,
                     extra={"EMPATH_EVENT": "held", "MODULE": state.hold[0],
                            "QUEUE_ID": writer.id, **self._fields()})
        return DataVerdict(None, writer, state.hold is not None,
                           {"modules": persisted} if persisted else {})


def _read_headers(path: Any) -> tuple[Headers, int]:
    """The header fields of the spooled message and the offset of its body."""
    with open(path, "rb") as f:
        data = b""
        end = -1
        while len(data) < HEADER_READ_MAX:
            chunk = f.read(64 * 1024)
            if not chunk:
                break
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                break
    if end >= 0:
        head, body_offset = data[:end + 2], end + 4
    else:
        head, body_offset = data[:HEADER_READ_MAX], len(data)
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line.decode("utf-8", "surrogateescape"))
            continue
        name_b, colon, value_b = line.partition(b":")
        if colon and name_b and not name_b[:1].isspace():
            fields.append((name_b.decode("ascii", "replace").rstrip(),
                           value_b.decode("utf-8", "surrogateescape").lstrip(" \t")))
    return Headers(fields), body_offset


async def _with_headers(spool: Spool, old: SpoolWriter, state: _TxnState) -> SpoolWriter:
    """A new spool file with on_data's headers after ours: the message is copied
    (in chunks, yielding to other sessions), the old file aborted. The queue id
    changes, so our Received: header is rewritten to name the new one."""
    new = spool.create()
    try:
        received = state.received.replace(f" id {old.id}".encode(), f" id {new.id}".encode())
        new.write(received + state.prefix[len(state.received):] + b"".join(state.headers))
        with open(old.path, "rb") as f:
            f.seek(len(state.prefix))
            while chunk := f.read(_COPY_CHUNK):
                new.write(chunk)
                await asyncio.sleep(0)
    except BaseException:
        new.abort()
        raise
    old.abort()
    return new


# ---- events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Queued:
    kind: str
    event: Event  # with the whole "modules" metadata; each module gets its own part
    metadata: str  # env.metadata["modules"] as JSON text


class EventDispatcher:
    """Queue events for the supervisor's modules and run them, one at a time."""

    def __init__(self, config: Config) -> None:
        self.modules = ModuleSet.create(config, "supervisor")
        self._queue: asyncio.Queue[_Queued] | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def apply_config(self, config: Config) -> None:
        """A reload: new instances for the next events; the old ones are closed."""
        try:
            new = ModuleSet.create(config, "supervisor")
        except Exception as exc:  # validated moments ago; a file changed meanwhile
            log.error("modules: keeping the previous instances: %s", exc,
                      extra={"EMPATH_EVENT": EVENT})
            return
        old, self.modules = self.modules, new
        old.retire()

    def wants(self, kind: str) -> bool:
        return bool(self.modules.by_call[kind])

    def fire(self, kind: str, env: Envelope, *, recipient: Recipient | None = None,
             result: Any = None, due: list[Recipient] | None = None) -> None:
        """Note that ``kind`` happened to ``env`` (as it stands, about to be recorded)."""
        if not self.modules.by_call[kind]:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._queue is None:
            self._queue = asyncio.Queue(EVENT_QUEUE_MAX)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        outcome = None
        if result is not None:
            outcome = DeliveryResult(status=result.status, enhanced=result.enhanced,
                                     diagnostic=result.diagnostic, remote_mta=result.remote_mta,
                                     tls=result.tls)
        event = Event(
            kind=kind, queue_id=env.id, sender=env.sender,
            recipients=tuple(RecipientInfo(r.address, r.state, r.attempts, r.last_error)
                             for r in env.recipients),
            received_at=env.received_at, client_addr=env.client_addr, helo=env.helo,
            authenticated=env.authenticated, size=env.size, held=env.held, metadata={},
            recipient=recipient.address if recipient is not None else None, result=outcome,
            due=tuple(r.address for r in due or ()),
        )
        modules_md = env.metadata.get("modules")
        try:
            text = json.dumps(modules_md if isinstance(modules_md, dict) else {})
        except (TypeError, ValueError):
            text = "{}"
        try:
            self._queue.put_nowait(_Queued(kind, event, text))
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.inc("empath_module_events_dropped_total")
            if self.dropped % 1000 == 1:
                log.warning("modules: event queue full (%d); dropped %d events so far",
                            EVENT_QUEUE_MAX, self.dropped, extra={"EMPATH_EVENT": EVENT})

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            item = await queue.get()
            modules = self.modules
            modules.acquire()
            try:
                everything = json.loads(item.metadata)
                for m in modules.by_call[item.kind]:
                    own = everything.get(m.name, {})
                    event = replace(item.event, metadata=own if isinstance(own, dict) else {})
                    try:
                        await _call(m, item.kind, event)
                    except _Failure as exc:
                        _failed(m, item.kind, exc, {"QUEUE_ID": item.event.queue_id})
            finally:
                modules.release()
                queue.task_done()

    async def drain(self, timeout: float) -> None:
        """At shutdown: run what is queued (up to ``timeout``), then close the modules."""
        if self._queue is not None and self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.modules.close()

