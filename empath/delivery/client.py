"""The outbound SMTP and LMTP client: one transaction per call, results per recipient.

``deliver`` tries the targets in order until one of them takes a session (greeting,
EHLO/LHLO and STARTTLS as the TLS policy demands), runs one mail transaction on it and
maps every reply to an ``RcptResult``. Connections that stay healthy go back to the
``ConnectionPool`` and carry the next message to the same host.

Built on aiosmtplib's ``SMTPProtocol`` (writing, the command lock, flow control,
``execute_command``), its ``SMTPResponse`` and errors and its EHLO parser. Its reply
reader is replaced: aiosmtplib (2.0 and 5.x alike) parses at most one reply per
received segment and drops data that arrives while no command is waiting, which
loses replies when a server answers several commands at once (PIPELINING) and the
per-recipient replies LMTP sends after the final dot (RFC 2033). ``aiosmtplib.SMTP``
is not used: it instantiates its own protocol class, has one timeout for every stage
and may STARTTLS on its own (5.x, ``start_tls=None``); we connect in plain text,
EHLO and STARTTLS ourselves, with the timeouts in ``ClientSettings``.

What a result means (Postfix's conventions):

- a reply from the server → its code, its enhanced status code (synthesised from the
  reply class, RFC 3463, when it has none) and its text; ``remote_mta`` is the
  target's host name;
- no target took a session → every recipient deferred, ``4.4.1`` (``4.7.x`` when TLS
  required by policy was the obstacle), ``code`` None; bounced only when every target
  answered the greeting (or EHLO and HELO) with a 5xx;
- the connection broke or timed out inside a transaction → ``4.4.2``, ``code`` None,
  for every recipient not yet final. A recipient is delivered only after the reply to
  the final dot was read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, cast

from aiosmtplib import SMTPResponse
from aiosmtplib.errors import (
    SMTPException,
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.esmtp import parse_esmtp_extensions
from aiosmtplib.protocol import SMTPProtocol

from empath import metrics
from empath.config.model import TLSPolicy
from empath.delivery.types import RcptResult, RcptStatus, Target
from empath.spool import Envelope, Recipient, open_message

__all__ = ["ClientSettings", "ConnectionPool", "deliver"]

log = logging.getLogger("empath.delivery.client")

# Message bytes read from the spool file and written per step; with the transport's
# flow control this bounds the memory one delivery needs, whatever the message size.
CHUNK_SIZE = 128 * 1024
# A reply line longer than this, or a reply with more lines, is a protocol error.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 200
# RSET on a pooled connection is a liveness check: it must not take long.
MAX_RSET_TIMEOUT = 30.0

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    helo: str  # our hostname, sent in EHLO/LHLO
    # A next hop that greets (220 banner or first line of the EHLO reply) with this
    # name is ourselves: mail loop, bounce 5.4.6. Not checked for LMTP (a local LMTP
    # server normally greets with this machine's name), as Postfix's lmtp does not.
    own_hostname: str
    tls: TLSPolicy = "may"  # none | may | encrypt | verify
    lmtp: bool = False
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # greeting, EHLO, MAIL, RCPT, DATA; each data write
    # Reply to the final dot: RFC 5321 4.5.3.2.6 says 10 minutes; shorter resends
    # mail the remote already took.
    final_timeout: float = 600.0
    # Extra trust anchors for tls=verify (default: system store; SSL_CERT_FILE works).
    ca_file: Path | None = None


# ---- errors ----------------------------------------------------------------------------


class _Lost(Exception):
    """The conversation broke: disconnect, timeout or garbage. ``str()`` says where."""


class _Stale(Exception):
    """A pooled connection failed the RSET that began its transaction: nothing of the
    message was sent, so another connection may carry it."""


class _TLSFailed(Exception):
    """The TLS handshake (or certificate check) failed; the connection is unusable."""


class _DataFileError(Exception):
    """The spool data file could not be read."""


@dataclass(eq=False)
class _TargetFailed(Exception):
    """A target that did not give us a session; ``kind`` orders the final verdict."""

    target: Target
    kind: Literal["connect", "reply", "tls"]
    text: str
    enhanced: str = "4.4.1"
    code: int | None = None
    permanent: bool = False

    def __str__(self) -> str:
        return self.text


class _MailLoop(Exception):
    def __init__(self, target: Target) -> None:
        super().__init__(target.name)
        self.target = target


# ---- the protocol ------------------------------------------------------------------------


class _ReplyProtocol(SMTPProtocol):
    """aiosmtplib's protocol with a reply reader that queues every reply received.

    Replies are parsed as bytes arrive and kept in order until read, however many
    arrive in one segment or before anyone asks; end of stream is reported after the
    replies that came before it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._evloop = loop
        self._inbuf = bytearray()
        self._partial: list[str] = []
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._failure: Exception | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    # -- reading

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._inbuf += data
        while self._failure is None:
            end = self._inbuf.find(b"\n")
            if end < 0:
                if len(self._inbuf) > MAX_REPLY_LINE:
                    self._fail(SMTPResponseException(-1, "reply line too long"))
                break
            line = bytes(self._inbuf[: end + 1])
            del self._inbuf[: end + 1]
            self._feed(line)
        self._wake()

    def _feed(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r\n")
        if (len(raw) > MAX_REPLY_LINE or len(line) < 3 or not line[:3].isdigit()
                or line[3:4] not in (b"", b" ", b"-")):
            shown = line[:80].decode("ascii", "backslashreplace")
            self._fail(SMTPResponseException(-1, f"malformed reply line {shown!r}"))
            return
        self._partial.append(line[4:].decode("utf-8", "surrogateescape").strip())
        if line[3:4] == b"-":
            if len(self._partial) > MAX_REPLY_LINES:
                self._fail(SMTPResponseException(-1, "reply has too many lines"))
            return
        self._replies.append(SMTPResponse(int(line[:3]), "\n".join(self._partial)))
        self._partial = []

    def _fail(self, exc: Exception) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake()
        if isinstance(exc, SMTPResponseException) and self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("connection closed by the server"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        # The base class would set an exception on its own (unused) reply future.
        waiter = self._response_waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        super().connection_lost(exc)
        lost = SMTPServerDisconnected("connection lost" + (f": {exc}" if exc else ""))
        if exc is not None:
            lost.__cause__ = exc
        self._fail(lost)
        self._can_write.set()

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        deadline = None if timeout is None else self._evloop.time() + timeout
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            remaining = None if deadline is None else deadline - self._evloop.time()
            if remaining is not None and remaining <= 0:
                raise SMTPReadTimeoutError("timed out waiting for the server's reply")
            self._wakeup = self._evloop.create_future()
            try:
                await asyncio.wait_for(self._wakeup, remaining)
            except TimeoutError:
                raise SMTPReadTimeoutError("timed out waiting for the server's reply") from None
            finally:
                self._wakeup = None
        return self._replies.popleft()

    @property
    def idle_clean(self) -> bool:
        """Connected, and nothing received that nobody asked for."""
        return (self.transport is not None and not self.transport.is_closing()
                and self._failure is None and not self._replies and not self._inbuf
                and not self._partial)

    # -- writing

    def pause_writing(self) -> None:
        super().pause_writing()
        self._can_write.clear()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._can_write.set()

    async def drain(self, timeout: float) -> None:
        if not self._can_write.is_set():
            try:
                await asyncio.wait_for(self._can_write.wait(), timeout)
            except TimeoutError:
                raise SMTPTimeoutError("timed out: the server does not read") from None
        if self._failure is not None and self.transport is None:
            raise self._failure


# ---- one connection ------------------------------------------------------------------------


def _where(t: Target) -> str:
    if t.address.startswith("/"):
        return t.address if t.name == t.address else f"{t.name}[{t.address}]"
    addr = f"[{t.address}]" if ":" in t.address else t.address
    return f"{t.name}[{t.address}]:{t.port}" if t.name != t.address else f"{addr}:{t.port}"


def _is_unix(t: Target) -> bool:
    return t.address.startswith("/")


class _Connection:
    """An established, greeted session with one target, used by one caller at a time."""

    def __init__(self, proto: _ReplyProtocol, target: Target) -> None:
        self.proto = proto
        self.target = target
        self.where = _where(target)
        self.extensions: dict[str, str] = {}
        self.tls: str | None = None
        self.tls_version: str | None = None  # "TLSv1.3"; None in plain text
        self.created = time.monotonic()
        self.transactions = 0
        # Taken from the pool and not yet verified: the next pipelined group starts
        # with RSET (see ConnectionPool._acquire).
        self.rset_due = False

    def _lost(self, stage: str, exc: BaseException) -> _Lost:
        if isinstance(exc, TimeoutError):
            return _Lost(f"conversation with {self.where} timed out while {stage}")
        if isinstance(exc, SMTPResponseException) and not isinstance(exc, ConnectionError):
            return _Lost(f"protocol error from {self.where} while {stage}: {exc.message}")
        return _Lost(f"lost connection with {self.where} while {stage}")

    async def command(self, line: bytes, stage: str, timeout: float) -> SMTPResponse:
        try:
            return await self.proto.execute_command(line, timeout=timeout)
        except (SMTPException, OSError) as exc:
            self.abort()
            raise self._lost(stage, exc) from exc

    def write(self, data: bytes, stage: str) -> None:
        try:
            self.proto.write(data)
        except (SMTPException, OSError) as exc:
            self.abort()
            raise self._lost(stage, exc) from exc

    async def drain(self, stage: str, timeout: float) -> None:
        try:
            await self.proto.drain(timeout)
        except (SMTPException, OSError) as exc:
            self.abort()
            raise self._lost(stage, exc) from exc

    async def reply(self, stage: str, timeout: float) -> SMTPResponse:
        try:
            return await self.proto.read_response(timeout=timeout)
        except (SMTPException, OSError) as exc:
            self.abort()
            raise self._lost(stage, exc) from exc

    async def start_tls(self, ctx: ssl.SSLContext, timeout: float, verified: bool) -> None:
        proto = self.proto
        if not proto.idle_clean:
            # RFC 3207 §4.2: nothing may follow the 220; plaintext injected before the
            # handshake must not be read as if it came over TLS.
            raise _TLSFailed("server sent data after its reply to STARTTLS")
        transport = proto.transport
        assert transport is not None
        name = self.target.name.rstrip(".") or None
        try:
            new = await proto._evloop.start_tls(
                cast(asyncio.Transport, transport), proto, ctx, server_hostname=name,
                ssl_handshake_timeout=timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise _TLSFailed(f"certificate verification failed: {exc.verify_message}") from exc
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            raise _TLSFailed(f"TLS handshake failed: {exc}") from exc
        if new is None:
            raise _TLSFailed("TLS handshake failed")
        proto.transport = new
        sslobj = new.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else None
        cipher = sslobj.cipher() if sslobj is not None else None
        self.tls_version = version or "TLS"
        desc = " ".join(x for x in (version or "TLS", cipher[0] if cipher else "") if x)
        self.tls = desc + (" verified" if verified else "")

    def usable(self) -> bool:
        return self.proto.idle_clean

    def abort(self) -> None:
        """Drop the connection at once (a close() in progress is left to finish)."""
        transport = self.proto.transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.Transport, transport).abort()

    def close(self) -> None:
        """Say QUIT without waiting for the answer, then close."""
        transport = self.proto.transport
        if transport is None:
            return
        if not transport.is_closing():
            with contextlib.suppress(SMTPException, OSError):
                self.proto.write(b"QUIT\r\n")
        transport.close()


# ---- establishing a session ----------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _tls_context(verify: bool, ca_file: str | None, _version: object) -> ssl.SSLContext:
    """Built once per trust configuration (``_version`` changes when it does)."""
    if verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
    else:
        # Opportunistic / encrypt-only: an unverified channel still beats plain text
        # against a passive eavesdropper (RFC 7435); nothing is checked.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _get_tls_context(settings: ClientSettings) -> ssl.SSLContext:
    if settings.tls != "verify":
        return _tls_context(False, None, None)
    ca_file = str(settings.ca_file) if settings.ca_file is not None else None
    # A replaced CA file or another SSL_CERT_FILE takes effect at the next connection.
    stamp = (os.stat(ca_file).st_mtime_ns if ca_file else None, os.environ.get("SSL_CERT_FILE"))
    return _tls_context(True, ca_file, stamp)


def _names_self(message: str, own: str) -> bool:
    words = message.split("\n", 1)[0].split(None, 1)
    return bool(words) and bool(own) and words[0].rstrip(".").lower() == own.rstrip(".").lower()


def _reply_text(r: SMTPResponse) -> str:
    """The reply's text on one line, without the enhanced status codes."""
    parts = []
    for line in r.message.split("\n"):
        m = _ENHANCED.match(line)
        parts.append(line[m.end():].strip() if m else line.strip())
    return " ".join(p for p in parts if p)


def _enhanced(r: SMTPResponse) -> str:
    """The reply's RFC 3463 code; synthesised from the reply class when missing."""
    cls = r.code // 100 if r.code // 100 in (2, 4, 5) else 4
    m = _ENHANCED.match(r.message)
    if m is None:
        return f"{cls}.0.0"
    # The class must agree with the reply code (RFC 3463 §2); the reply code wins.
    return f"{cls}.{int(m.group(2))}.{int(m.group(3))}"


def _refused(target: Target, where: str, r: SMTPResponse, what: str) -> _TargetFailed:
    return _TargetFailed(
        target, "reply", f"host {where} refused to talk to me{what}: {r.code} {_reply_text(r)}",
        enhanced=_enhanced(r), code=r.code, permanent=r.code // 100 == 5,
    )


async def _connect(target: Target, settings: ClientSettings) -> _Connection:
    loop = asyncio.get_running_loop()
    proto = _ReplyProtocol(loop)
    where = _where(target)
    try:
        if _is_unix(target):
            await asyncio.wait_for(
                loop.create_unix_connection(lambda: proto, target.address),
                settings.connect_timeout)
        else:
            await asyncio.wait_for(
                loop.create_connection(lambda: proto, target.address, target.port),
                settings.connect_timeout)
    except TimeoutError:
        raise _TargetFailed(target, "connect", f"connect to {where}: timed out") from None
    except OSError as exc:
        # asyncio's strerror for a refused connection is "Connect call failed (...)".
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)) or type(exc).__name__
        raise _TargetFailed(target, "connect", f"connect to {where}: {reason}") from None
    return _Connection(proto, target)


async def _hello(conn: _Connection, settings: ClientSettings, after_tls: bool) -> None:
    target, where = conn.target, conn.where
    stage = "sending LHLO" if settings.lmtp else "sending EHLO"
    if after_tls:
        stage += " after STARTTLS"
    helo = settings.helo.encode("ascii", "replace")
    try:
        r = await conn.command((b"LHLO " if settings.lmtp else b"EHLO ") + helo, stage,
                               settings.command_timeout)
        if r.code // 100 == 2:
            conn.extensions, _ = parse_esmtp_extensions(r.message)
        elif r.code // 100 == 5 and not settings.lmtp and not after_tls:
            # RFC 5321 §3.2: a server without ESMTP; no extensions then.
            r = await conn.command(b"HELO " + helo, "sending HELO", settings.command_timeout)
            if r.code // 100 != 2:
                conn.close()
                raise _refused(target, where, r, " (HELO)")
            conn.extensions = {}
        else:
            conn.close()
            raise _refused(target, where, r, " (LHLO)" if settings.lmtp else " (EHLO)")
    except _Lost as exc:
        raise _TargetFailed(target, "connect", str(exc)) from None
    if not settings.lmtp and _names_self(r.message, settings.own_hostname):
        conn.close()
        raise _MailLoop(target)


async def _establish(target: Target, settings: ClientSettings, *, tls: bool = True
                     ) -> _Connection:
    """Connect, read the greeting, EHLO, STARTTLS as the policy wants. Raises
    ``_TargetFailed`` or ``_MailLoop``; on success the session is ready for MAIL."""
    conn = await _connect(target, settings)
    try:
        conn = await _setup(conn, target, settings, tls)
    except BaseException:
        conn.abort()
        raise
    metrics.inc("empath_delivery_tls_sessions_total", (conn.tls_version or "none",))
    return conn


async def _setup(conn: _Connection, target: Target, settings: ClientSettings, tls: bool
                 ) -> _Connection:
    where = conn.where
    try:
        greeting = await conn.reply("receiving the initial server greeting",
                                    settings.command_timeout)
    except _Lost as exc:
        raise _TargetFailed(target, "connect", str(exc)) from None
    if greeting.code != 220:
        conn.close()
        raise _refused(target, where, greeting, "")
    if not settings.lmtp and _names_self(greeting.message, settings.own_hostname):
        conn.close()
        raise _MailLoop(target)
    await _hello(conn, settings, after_tls=False)

    policy: TLSPolicy = "none" if _is_unix(target) or not tls else settings.tls
    if policy == "none":
        return conn
    required = policy in ("encrypt", "verify")
    if "starttls" not in conn.extensions:
        if required:
            conn.close()
            raise _TargetFailed(target, "tls", f"TLS is required, but was not offered by {where}",
                                enhanced="4.7.4")
        return conn
    try:
        ctx = _get_tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        conn.close()
        raise _TargetFailed(target, "tls", f"cannot set up TLS: {exc}", enhanced="4.7.5") from None
    try:
        r = await conn.command(b"STARTTLS", "sending STARTTLS", settings.command_timeout)
    except _Lost as exc:
        raise _TargetFailed(target, "connect", str(exc)) from None
    if r.code == 421:  # closing: this target is done for now
        conn.close()
        raise _refused(target, where, r, " (STARTTLS)")
    if r.code != 220:
        if required:
            conn.close()
            raise _TargetFailed(
                target, "tls",
                f"TLS is required, but {where} refused STARTTLS: {r.code} {_reply_text(r)}",
                enhanced="4.7.4")
        log.debug("%s refused STARTTLS (%s %s); continuing in plain text", where, r.code,
                  _reply_text(r))
        return conn
    try:
        await conn.start_tls(ctx, settings.command_timeout, verified=policy == "verify")
    except _TLSFailed as exc:
        conn.abort()
        if required:
            raise _TargetFailed(target, "tls", f"TLS with {where} failed: {exc}",
                                enhanced="4.7.5") from None
        log.debug("TLS with %s failed (%s); reconnecting in plain text", where, exc)
        return await _establish(target, settings, tls=False)
    await _hello(conn, settings, after_tls=True)
    return conn


# ---- the pool ------------------------------------------------------------------------------

_PoolKey = tuple[str, int, str, bool, str, str]


@dataclass(eq=False)
class _Idle:
    key: _PoolKey
    conn: _Connection
    since: float
    timer: asyncio.TimerHandle | None = None


class ConnectionPool:
    """Idle, already-greeted connections kept per (target address, port, tls policy)
    for reuse by the next message to the same host.

    A connection is either idle here or checked out by exactly one ``deliver`` call;
    checkout sends RSET (with PIPELINING: at the head of the transaction's first group,
    saving a round trip), and a connection that fails it, sent anything unasked,
    idled longer than ``idle_timeout`` or lived longer than ``max_age`` is dropped.
    At most ``max_per_target`` idle connections per key and ``max_total`` overall
    (the oldest go first). The key also holds the LMTP flag, our HELO name and the
    target's host name (a connection verified for one name is not reused for another).
    """

    def __init__(self, *, max_per_target: int = 4, max_total: int = 64,
                 idle_timeout: float = 30.0, max_age: float = 300.0) -> None:
        self.max_per_target = max_per_target
        self.max_total = max_total
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self._idle: dict[_PoolKey, list[_Idle]] = {}
        self._count = 0
        self._closed = False

    @staticmethod
    def _key(target: Target, settings: ClientSettings) -> _PoolKey:
        return (target.address, target.port, settings.tls, settings.lmtp, settings.helo,
                target.name.lower())

    def idle_count(self, target: Target | None = None) -> int:
        """Idle connections (to ``target`` on any settings, or all)."""
        if target is None:
            return self._count
        return sum(len(v) for k, v in self._idle.items()
                   if k[0] == target.address and k[1] == target.port)

    def _take(self, item: _Idle) -> None:
        stack = self._idle.get(item.key)
        if stack is None or item not in stack:
            return
        stack.remove(item)
        if not stack:
            del self._idle[item.key]
        self._count -= 1
        if item.timer is not None:
            item.timer.cancel()

    async def _acquire(self, key: _PoolKey, settings: ClientSettings) -> _Connection | None:
        while True:
            stack = self._idle.get(key)
            if not stack:
                return None
            item = stack[-1]  # the most recently used: the likeliest to be alive
            self._take(item)
            conn = item.conn
            now = time.monotonic()
            if (not conn.usable() or now - item.since > self.idle_timeout
                    or now - conn.created > self.max_age):
                conn.close()
                continue
            if "pipelining" in conn.extensions:
                conn.rset_due = True  # checked by the transaction (_Transaction._run)
                return conn
            try:
                r = await conn.command(b"RSET", "sending RSET",
                                       min(settings.command_timeout, MAX_RSET_TIMEOUT))
            except _Lost as exc:
                log.debug("pooled connection dropped: %s", exc)
                continue
            if r.code // 100 != 2:
                log.debug("pooled connection to %s dropped: RSET got %s", conn.where, r.code)
                conn.close()
                continue
            log.debug("reusing connection to %s", conn.where)
            return conn

    def _release(self, key: _PoolKey, conn: _Connection) -> None:
        now = time.monotonic()
        if (self._closed or self.max_per_target <= 0 or self.max_total <= 0
                or not conn.usable() or now - conn.created > self.max_age):
            conn.close()
            return
        item = _Idle(key, conn, now)
        item.timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, item)
        stack = self._idle.setdefault(key, [])
        stack.append(item)
        self._count += 1
        while len(stack) > self.max_per_target:
            self._drop(stack[0])
        while self._count > self.max_total:
            oldest = min((s[0] for s in self._idle.values()), key=lambda i: i.since)
            self._drop(oldest)

    def _drop(self, item: _Idle) -> None:
        self._take(item)
        item.conn.close()

    def _expire(self, item: _Idle) -> None:
        item.timer = None
        self._drop(item)

    async def close(self) -> None:
        """QUIT every idle connection; connections returned later are closed too."""
        self._closed = True
        for stack in list(self._idle.values()):
            for item in list(stack):
                self._drop(item)
        await asyncio.sleep(0)  # let the transports flush QUIT and close


# ---- the transaction ----------------------------------------------------------------------


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _Transaction:
    def __init__(self, conn: _Connection, env: Envelope, rcpts: list[Recipient],
                 data: BinaryIO, size: int, settings: ClientSettings,
                 prefix: bytes = b"") -> None:
        self.conn = conn
        self.prefix = prefix
        self.env = env
        self.rcpts = rcpts
        self.data = data
        self.size = size
        self.settings = settings
        self.out: list[RcptResult | None] = [None] * len(rcpts)
        self.reusable = True

    # -- results

    def _result(self, i: int, status: RcptStatus, enhanced: str, text: str,
                code: int | None = None) -> None:
        action: Literal["delivered", "relayed"] | None = None
        if status == "delivered":
            # LMTP is final delivery. An SMTP server that offered DSN got NOTIFY
            # passed on and reports success itself (RFC 3461 §5.2.2); one that did
            # not is a relay past which nobody will (RFC 3464 "relayed").
            if self.settings.lmtp:
                action = "delivered"
            elif "dsn" not in self.conn.extensions:
                action = "relayed"
        self.out[i] = RcptResult(self.rcpts[i].address, status, enhanced, text, code,
                                 remote_mta=self.conn.target.name, tls=self.conn.tls,
                                 success_action=action)

    def _from_reply(self, i: int, r: SMTPResponse) -> None:
        cls = r.code // 100
        status: RcptStatus = "delivered" if cls == 2 else "bounced" if cls == 5 else "deferred"
        self._result(i, status, _enhanced(r), _reply_text(r) or str(r.code), r.code)
        if r.code == 421:
            self.reusable = False  # the server is closing the connection

    def _rest(self, status: RcptStatus, enhanced: str, text: str,
              code: int | None = None) -> None:
        for i, res in enumerate(self.out):
            if res is None:
                self._result(i, status, enhanced, text, code)

    def _rest_from_reply(self, r: SMTPResponse, which: list[int]) -> None:
        for i in which:
            self._from_reply(i, r)

    def _finish(self) -> tuple[list[RcptResult], bool]:
        results = [r for r in self.out if r is not None]
        assert len(results) == len(self.out)
        return results, self.reusable and self.conn.usable()

    # -- the conversation

    def _mail_line(self) -> bytes:
        env, ext = self.env, self.conn.extensions
        line = b"MAIL FROM:<" + _encode(env.sender) + b">"
        if "size" in ext:
            line += b" SIZE=%d" % self.size
        if env.body == "8BITMIME":
            line += b" BODY=8BITMIME"
        if env.smtputf8:
            line += b" SMTPUTF8"
        if "dsn" in ext:
            if env.ret:
                line += b" RET=" + _encode(env.ret)
            if env.envid:
                line += b" ENVID=" + _encode(env.envid)
        return line

    def _rcpt_line(self, r: Recipient) -> bytes:
        line = b"RCPT TO:<" + _encode(r.address) + b">"
        if "dsn" in self.conn.extensions:
            if r.notify:
                line += b" NOTIFY=" + _encode(",".join(r.notify))
            if r.orcpt:
                line += b" ORCPT=" + _encode(r.orcpt)
        return line

    def _refuse_unsupported(self) -> bool:
        """Content the server cannot take unchanged bounces (we never downgrade)."""
        ext, name = self.conn.extensions, self.conn.target.name
        if self.env.body == "8BITMIME" and "8bitmime" not in ext:
            self._rest("bounced", "5.6.3", f"server {name} does not support 8BITMIME; "
                       "message not delivered rather than mangled")
            return True
        if self.env.smtputf8 and "smtputf8" not in ext:
            self._rest("bounced", "5.6.7", f"server {name} does not support SMTPUTF8, "
                       "which this message requires")
            return True
        limit = ext.get("size", "").split()
        if limit and limit[0].isdigit() and 0 < int(limit[0]) < self.size:
            self._rest("bounced", "5.3.4", f"message size {self.size} exceeds size limit "
                       f"{limit[0]} of server {name}")
            return True
        return False

    async def run(self) -> tuple[list[RcptResult], bool]:
        try:
            await self._run()
        except _Lost as exc:
            self.reusable = False
            self._rest("deferred", "4.4.2", str(exc))
        except _DataFileError as exc:
            self.conn.abort()  # never send the final dot after a short read
            self.reusable = False
            self._rest("deferred", "4.3.0", f"cannot read the queued message: {exc}")
        return self._finish()

    async def _run(self) -> None:
        conn, settings = self.conn, self.settings
        timeout = settings.command_timeout
        if self._refuse_unsupported():
            return
        mail = self._mail_line()
        if _CONTROL.search(mail):
            self._rest("bounced", "5.1.7", "invalid sender address")
            return
        lines: list[tuple[int, bytes]] = []
        for i, r in enumerate(self.rcpts):
            line = self._rcpt_line(r)
            if _CONTROL.search(line):
                self._result(i, "bounced", "5.1.3", "invalid recipient address")
            else:
                lines.append((i, line))
        if not lines:
            return
        conn.transactions += 1

        accepted: list[int] = []
        everyone = [i for i, _ in lines]
        pipelined = "pipelining" in conn.extensions
        if pipelined:
            # RFC 2920: MAIL, every RCPT and DATA (which may end a group) in one write,
            # then the replies in order: one round trip for what took two, as Postfix
            # does it.
            rset = conn.rset_due
            group = [b"RSET"] if rset else []
            group += [mail, *(line for _, line in lines), b"DATA"]
            try:
                conn.write(b"".join(x + b"\r\n" for x in group), "sending MAIL FROM")
            except _Lost as exc:
                if rset:
                    raise _Stale(str(exc)) from exc
                raise
            if rset:
                await self._check_rset(timeout)
            mr = await conn.reply("sending MAIL FROM", timeout)
        else:
            mr = await conn.command(mail, "sending MAIL FROM", timeout)
        if mr.code // 100 != 2:
            self._rest_from_reply(mr, everyone)
            if pipelined and mr.code != 421:
                await self._skip_pipelined(len(lines), timeout)
            return
        for n, (i, line) in enumerate(lines):
            if pipelined:
                rr = await conn.reply("sending RCPT TO", timeout)
            else:
                rr = await conn.command(line, "sending RCPT TO", timeout)
            if rr.code // 100 == 2:
                accepted.append(i)
                continue
            self._from_reply(i, rr)
            if rr.code == 421:  # the server is going away: nobody else gets anywhere
                self._rest_from_reply(rr, accepted + [j for j, _ in lines[n + 1:]])
                return
        if not accepted:
            if pipelined:
                await self._skip_pipelined(0, timeout)
            return

        if pipelined:
            dr = await conn.reply("sending DATA", timeout)
        else:
            dr = await conn.command(b"DATA", "sending DATA", timeout)
        if dr.code != 354:
            if dr.code // 100 == 2:
                # A 2xx here is no promise to deliver anything; treat it as an error.
                self.reusable = False
                text = f"unexpected reply to DATA from {conn.where}: {dr.code}"
                for i in accepted:
                    self._result(i, "deferred", "4.5.0", text, dr.code)
            else:
                self._rest_from_reply(dr, accepted)
            return
        await self._send_body(timeout)

        stage = "sending end of data -- message may be sent more than once"
        if settings.lmtp:
            # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
            for i in accepted:
                fr = await conn.reply(stage, settings.final_timeout)
                self._from_reply(i, fr)
        else:
            fr = await conn.reply(stage, settings.final_timeout)
            self._rest_from_reply(fr, accepted)

    async def _check_rset(self, timeout: float) -> None:
        """The reply to the RSET heading a pooled connection's first group: anything
        but 2xx (or none) means the connection was stale. The server may have taken the
        MAIL and RCPTs behind it, but never data: ``deliver`` drops the connection, and
        them with it."""
        conn = self.conn
        try:
            r = await conn.reply("sending RSET", min(timeout, MAX_RSET_TIMEOUT))
        except _Lost as exc:
            raise _Stale(str(exc)) from exc
        if r.code // 100 != 2:
            raise _Stale(f"RSET got {r.code}")
        conn.rset_due = False

    async def _skip_pipelined(self, rcpt_replies: int, timeout: float) -> None:
        """After a failed MAIL or when no RCPT was accepted: read the pipelined group's
        remaining replies to keep the session in step. A server that still says 354 to
        DATA gets a lone "." (RFC 2920 §3.1) and this connection is not reused."""
        conn = self.conn
        try:
            for _ in range(rcpt_replies):
                await conn.reply("sending RCPT TO", timeout)
            dr = await conn.reply("sending DATA", timeout)
            if dr.code == 354:
                self.reusable = False
                conn.write(b".\r\n", "ending an empty DATA")
                await conn.reply("ending an empty DATA", timeout)
        except _Lost:
            self.reusable = False

    async def _send_body(self, timeout: float) -> None:
        """Stream the spool file with dot-stuffing; end with CRLF.CRLF."""
        conn, f = self.conn, self.data
        stage = "sending message body"
        at_line_start = True
        tail = b""
        if self.prefix:  # whole header lines (DKIM-Signature), none starts with "."
            conn.write(self.prefix, stage)
        # The envelope says how much there is: no read at EOF to find out. A message
        # that fits in one chunk is read inline (from the page cache, just written):
        # cheaper than handing the read to a thread and back; bigger ones are read
        # in a thread, chunk by chunk.
        left = self.size - len(self.prefix)
        while left > 0:
            try:
                if left <= CHUNK_SIZE:
                    chunk = f.read(left)
                else:
                    chunk = await asyncio.to_thread(f.read, CHUNK_SIZE)
            except OSError as exc:
                raise _DataFileError(exc.strerror or str(exc)) from exc
            if not chunk:
                raise _DataFileError("the queue file is shorter than its envelope says")
            left -= len(chunk)
            out = chunk.replace(b"\n.", b"\n..")
            if at_line_start and chunk[:1] == b".":
                out = b"." + out
            at_line_start = chunk[-1:] == b"\n"
            tail = (tail + chunk[-2:])[-2:]
            conn.write(out, stage)
            await conn.drain(stage, timeout)
        conn.write(b".\r\n" if tail in (b"", b"\r\n") else b"\r\n.\r\n", stage)
        await conn.drain(stage, timeout)


# ---- the entry point ----------------------------------------------------------------------


def _all_failed(rcpts: list[Recipient], failures: list[_TargetFailed]) -> list[RcptResult]:
    if not failures:
        return [RcptResult(r.address, "deferred", "4.4.1", "no server to deliver to")
                for r in rcpts]
    last = failures[-1]
    if all(f.permanent for f in failures):
        return [RcptResult(r.address, "bounced", last.enhanced, last.text, last.code,
                           remote_mta=last.target.name) for r in rcpts]
    # The TLS policy being the obstacle is what the operator needs to hear about.
    tls = [f for f in failures if f.kind == "tls"]
    pick = tls[-1] if tls else last
    enhanced = pick.enhanced if pick.kind == "tls" else "4.4.1"
    return [RcptResult(r.address, "deferred", enhanced, pick.text) for r in rcpts]


async def deliver(env: Envelope, rcpts: list[Recipient], data_path: Path, targets: list[Target],
                  settings: ClientSettings, *, pool: ConnectionPool,
                  prefix: bytes = b"") -> list[RcptResult]:
    """One transaction for these recipients (all of one domain / next hop).

    ``prefix`` (header lines, e.g. a DKIM signature) is sent before the spooled data.

    Returns one RcptResult per recipient, in the same order. Never raises for
    anything the network or the next hop does.
    """
    if not rcpts:
        return []
    try:
        # The message's data: the first env.size octets of its queue file.
        f = open_message(data_path, env.size)
    except OSError as exc:
        text = f"cannot open the queued message: {exc.strerror or exc}"
        return [RcptResult(r.address, "deferred", "4.3.0", text) for r in rcpts]
    try:
        size = env.size + len(prefix)
        failures: list[_TargetFailed] = []
        for target in targets:
            key = ConnectionPool._key(target, settings)
            while True:  # until a connection takes the transaction (or none can)
                conn = await pool._acquire(key, settings)
                if conn is None:
                    try:
                        conn = await _establish(target, settings)
                    except _MailLoop as ml:
                        domain = rcpts[0].address.rpartition("@")[2]
                        log.debug("%s greets as %s: mail loop", _where(ml.target),
                                  settings.own_hostname)
                        return [RcptResult(r.address, "bounced", "5.4.6",
                                           f"mail for {domain} loops back to myself",
                                           remote_mta=ml.target.name) for r in rcpts]
                    except _TargetFailed as failure:
                        log.debug("%s", failure.text)
                        failures.append(failure)
                        break
                f.seek(0)
                try:
                    results, reusable = await _Transaction(conn, env, rcpts, f, size,
                                                           settings, prefix).run()
                except _Stale as exc:
                    # Only pooled connections can be stale; a fresh one comes next.
                    conn.abort()
                    log.debug("pooled connection to %s dropped: %s", conn.where, exc)
                    continue
                except BaseException:
                    conn.abort()
                    raise
                if reusable:
                    pool._release(key, conn)
                else:
                    conn.close()
                for res in results:
                    log.debug("%s <%s>: %s %s %s %s", conn.where, res.address, res.status,
                              res.code, res.enhanced, res.text)
                return results
        results = _all_failed(rcpts, failures)
        log.debug("no target took the session: %s %s", results[0].enhanced, results[0].text)
        return results
    finally:
        f.close()
