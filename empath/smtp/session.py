"""One SMTP session: the command loop, the replies and the moment ``250`` is sent.

The bytes underneath (receive buffer, deadlines, back-pressure, the STARTTLS switch)
are ``empath.smtp.connection``'s; the DATA checks are ``empath.smtp.data``'s.
Everything a client sees — replies with enhanced status codes, relay policy, limits —
is decided in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from empath import metrics
from empath.addr import Mailbox
from empath.smtp import auth
from empath.smtp.connection import Connection, LineTooLong
from empath.smtp.data import DataOutcome, DataScanner
from empath.smtp.dsnparams import parse_envid, parse_notify, parse_orcpt, parse_ret
from empath.smtp.headers import HeaderFilter, submission_fields
from empath.smtp.parse import PathArgs, ReplyError, parse_path_args
from empath.smtp.policy import decide_rcpt, in_networks
from empath.smtp.replies import ensure_enhanced
from empath.smtp.trace import received_header, with_protocol
from empath.spool import Envelope, Recipient, SpoolError
from empath.systemd import events

if TYPE_CHECKING:
    from empath.smtp.server import Front

__all__ = ["SMTPSession"]

log = logging.getLogger("empath.smtp")

# Commands are short; 1000 octets leaves room for ESMTP parameters (RFC 5321 §4.5.3.1.4).
MAX_COMMAND = 1000
# The longest line kept in the buffer: an AUTH response may reach 12,288 octets
# (RFC 4954 §4); anything longer is skipped to its end and answered with 500.
MAX_LINE = 12288
# Inside DATA the deadline (limits.data_timeout) moves on each time this many more
# octets have arrived: a big message on a slow link gets through, a client trickling
# a byte now and then does not keep its slot.
DATA_PROGRESS = 64 * 1024
_HEADER_TOO_BIG = "552 5.3.4 Message header size exceeds fixed maximum header size"

_DATA_REJECT = {
    DataOutcome.TOO_BIG: "552 5.3.4 Message size exceeds fixed maximum message size",
    DataOutcome.LINE_TOO_LONG: (
        "554 5.6.0 Message rejected: line longer than 998 characters (RFC 5322 2.1.1)"
    ),
    DataOutcome.BARE_NEWLINE: (
        "554 5.6.0 Message rejected: bare CR or LF; lines must end in CRLF (RFC 5321 2.3.8)"
    ),
    DataOutcome.NUL: "554 5.6.0 Message rejected: NUL character in message",
    DataOutcome.WRITE_ERROR: "451 4.3.0 Error: local error writing the queue file, try again",
}
# empath_messages_rejected_total's reason for each refused DATA outcome
_DATA_REASON = {
    DataOutcome.TOO_BIG: "size",
    DataOutcome.LINE_TOO_LONG: "syntax",
    DataOutcome.BARE_NEWLINE: "smuggling",
    DataOutcome.NUL: "syntax",
    DataOutcome.WRITE_ERROR: "storage",
}


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """A recipient's RFC 3461 parameters, as they go into the spool record."""

    notify: tuple[str, ...] | None = None  # upper-case NOTIFY values
    orcpt: str | None = None  # ORCPT as received: "rfc822;<xtext>" or "utf-8;<...>"


@dataclass(slots=True)
class Transaction:
    sender: str  # "" for <>
    body: str  # 7BIT | 8BITMIME
    smtputf8: bool
    size_declared: int | None
    ret: str | None = None  # RFC 3461 RET, upper-case
    envid: str | None = None  # RFC 3461 ENVID, still xtext-encoded
    recipients: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    # RFC 3461 NOTIFY and ORCPT per accepted recipient; a repeated RCPT keeps the first.
    rcpt_dsn: dict[str, RcptDsn] = field(default_factory=dict)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _recipient_key(mailbox: Mailbox) -> str:
    # Local parts are case-sensitive (RFC 5321 §2.4); the domain is normalised.
    return mailbox.address


class SMTPSession(Connection):
    def _fields(self, event: str | None = None, **more: str) -> dict[str, str]:
        """Journal fields for this session's log lines (see empath.systemd.events)."""
        fields = {"CLIENT_ADDR": self.client_ip, **more}
        if event is not None:
            fields["EMPATH_EVENT"] = event
        return fields

    def __init__(self, front: Front, role: str) -> None:
        cfg = front.config
        super().__init__(asyncio.get_running_loop(), timeout=cfg.limits.command_timeout,
                         line_limit=MAX_LINE)
        self.tls_context = front.tls_context
        self.front = front
        self.role = role
        self.cfg = cfg  # fixed for the session's life: a reload affects new sessions
        self.hooks = front.modules.session(self)  # empath/modules: so are its modules
        self.helo: str | None = None
        self.esmtp = False
        self.txn: Transaction | None = None
        self.errors = 0
        self.busy = False  # inside DATA or committing: shutdown lets it finish
        self.closing = False
        self.client_ip = ""
        self.client_port = 0
        self.admitted = False
        self.authenticated: str | None = None
        # For ``empathctl connections``: when the client connected (wall clock for
        # people, monotonic for the duration), where, and how far it got.
        self.connected_at = time.time()
        self._connected_mono = time.monotonic()
        self.local = ""  # the listener's address:port
        self.messages = 0  # queued in this session
        self._tls_handshake = False
        self._session_timer: asyncio.TimerHandle | None = None  # limits.max_session_time
        self._receiving = False  # reading DATA (as opposed to committing it)

    # ---- output ---------------------------------------------------------------

    def _write(self, line: str) -> None:
        self.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    async def push(self, status: str | bytes) -> None:
        """Send one reply line; adds an enhanced code if missing and counts errors."""
        if isinstance(status, bytes):
            status = status.decode("utf-8", "surrogateescape")
        status = ensure_enhanced(status)
        if status[:1] in ("4", "5"):
            self.errors += 1
        self._write(status)
        await self.drain()

    async def refuse(self, reason: str, reply: str) -> None:
        """Refuse a MAIL, RCPT or DATA, counted by reason (relay, size, syntax, policy,
        smuggling, storage) in empath_messages_rejected_total. Protocol-sequence
        errors (503) are not refusals of mail and go through ``push``."""
        metrics.inc("empath_messages_rejected_total", (reason,))
        await self.push(reply)

    def close_with(self, reply: str) -> None:
        """Send a final reply (421) and close, from any task."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):  # the peer may be gone already
            self._write(reply)
        self.transport.close()

    def timed_out(self) -> None:
        if self.busy:
            reply = f"421 4.4.2 {self.cfg.hostname} Error: timeout exceeded during DATA"
        else:
            reply = f"421 4.4.2 {self.cfg.hostname} Error: timeout exceeded"
        if not self.closing and self.transport is not None:
            metrics.inc("empath_smtp_timeouts_total",
                        (self.role, "data" if self.busy else "command"))
        log.info("timeout client=%s", self.client_ip, extra=self._fields())
        self.close_with(reply)

    def _session_expired(self) -> None:
        if self.busy and not self._receiving:
            # Committing a message: its reply comes first, or the client would send
            # it again although it is queued.
            self._session_timer = self.loop.call_later(1.0, self._session_expired)
            return
        if not self.closing and self.transport is not None:
            metrics.inc("empath_smtp_timeouts_total", (self.role, "session"))
        log.info("session time limit client=%s", self.client_ip, extra=self._fields())
        self.close_with(f"421 4.7.0 {self.cfg.hostname} Error: session time limit exceeded")

    # ---- what it is doing (empathctl connections) -------------------------------

    @property
    def state(self) -> str:
        """``greeting`` (no HELO/EHLO yet, also again after STARTTLS), ``command``
        (between transactions), ``mail`` (MAIL accepted, before DATA), ``data``
        (receiving or committing a message), ``tls`` (STARTTLS handshake) or
        ``closing``."""
        if self.closing or self.transport is None:
            return "closing"
        if self._tls_handshake:
            return "tls"
        if self.busy:
            return "data"
        if self.helo is None:
            return "greeting"
        if self.txn is not None:
            return "mail"
        return "command"

    def describe(self) -> dict[str, Any]:
        """This session as one row of ``empathctl connections`` (JSON-able)."""
        tls = self.tls and not self._tls_handshake
        version = None
        if tls and self.transport is not None:
            ssl_object = self.transport.get_extra_info("ssl_object")
            version = ssl_object.version() if ssl_object is not None else None
        return {
            "client": self.client_ip,
            "port": self.client_port,
            "peer": _hostport(self.client_ip, self.client_port),
            "role": self.role,
            "listener": self.local,
            "state": self.state,
            "helo": self.helo,
            "tls": tls,
            "tls_version": version,
            "authenticated": self.authenticated,
            "messages": self.messages,
            "connected_at": self.connected_at,
            "duration": max(0.0, time.monotonic() - self._connected_mono),
        }

    # ---- connection ------------------------------------------------------------

    def closed(self) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self.admitted:
            self.admitted = False
            self.front.session_closed(self)

    async def serve(self) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        sockname = self.transport.get_extra_info("sockname") if self.transport else None
        if isinstance(sockname, tuple):
            self.local = _hostport(str(sockname[0]), int(sockname[1]))
        refusal = await self.front.admit(self)
        if refusal is not None:
            self.close_with(refusal)
            return
        self.admitted = True
        self._session_timer = self.loop.call_later(self.cfg.limits.max_session_time,
                                                   self._session_expired)
        refusal = await self.hooks.connect()
        if refusal is not None:
            self.close_with(refusal)
            return
        self._write(f"220 {self.cfg.hostname} ESMTP empath")
        max_errors = self.cfg.limits.max_errors
        readline = self.readline
        while self.transport is not None and not self.closing:
            try:
                line = await readline()
            except LineTooLong:
                await self.push("500 5.5.6 Error: command line too long")
                self._check_errors(max_errors)
                continue
            if not line:
                break  # EOF: Connection closes our side too
            await self._dispatch(line)
            self._check_errors(max_errors)

    def _check_errors(self, max_errors: int) -> None:
        if self.errors >= max_errors and not self.closing:
            log.info("too many errors client=%s errors=%d", self.client_ip, self.errors,
                     extra=self._fields())
            self.close_with(f"421 4.7.0 {self.cfg.hostname} Error: too many errors")

    async def _dispatch(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r\n")
        if len(line) > MAX_COMMAND:
            await self.push("500 5.5.6 Error: command line too long")
            return
        verb_b, _, arg_b = line.partition(b" ")
        try:
            verb = verb_b.decode("ascii").upper()
        except UnicodeDecodeError:
            await self.push("500 5.5.2 Error: bad syntax")
            return
        handler = _COMMANDS.get(verb)
        if handler is None:
            await self.push("500 5.5.2 Error: command not recognized")
            return
        arg = arg_b.strip().decode("utf-8", "surrogateescape") if arg_b.strip() else None
        self.set_deadline()
        try:
            await handler(self, arg)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            # A bug must cost one command, not the session (and never silence).
            log.exception("internal error handling %s from %s", verb, self.client_ip)
            await self.push("451 4.3.0 Error: internal error, try again later")
        if not self.closing and self.transport is not None:
            # limits.command_timeout is per command line, counted from this reply; the
            # bytes of the next line do not reset it.
            self.set_deadline()

    # ---- commands ----------------------------------------------------------------

    def _reset_txn(self) -> None:
        self.txn = None

    async def smtp_HELO(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        if (refusal := await self.hooks.helo(arg, esmtp=False)) is not None:
            await self.push(refusal)
            return
        self._reset_txn()
        self.helo, self.esmtp = arg, False
        await self.push(f"250 {self.cfg.hostname}")

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        if (refusal := await self.hooks.helo(arg, esmtp=True)) is not None:
            await self.push(refusal)
            return
        self._reset_txn()
        self.helo, self.esmtp = arg, True
        lines = [
            self.cfg.hostname,
            "PIPELINING",
            f"SIZE {self.cfg.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        if auth.offered(self):
            lines.append("AUTH " + " ".join(auth.MECHANISMS))
        # One write for the whole reply: one segment on the wire, one syscall.
        last = len(lines) - 1
        self.write("".join(f"250{' ' if i == last else '-'}{text}\r\n"
                           for i, text in enumerate(lines)).encode("utf-8", "surrogateescape"))
        await self.drain()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.helo is None:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.role == "submission" and self.authenticated is None:
            await self.refuse("policy", "530 5.7.0 Authentication required")
            return
        if self.txn is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if arg is None:
            await self.refuse("syntax", "501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            path = parse_path_args(
                arg, "FROM:", allow_utf8=True, allow_null=True,
                allow_postmaster=False, bad_address_code="5.1.7",
            )
        except ReplyError as exc:
            await self.refuse("syntax", exc.reply)
            return
        txn_or_reply = self._mail_params(path)
        if isinstance(txn_or_reply, str):
            reason = "size" if txn_or_reply.startswith("552") else "syntax"
            await self.refuse(reason, txn_or_reply)
            return
        not_owned = auth.sender_refusal(self, txn_or_reply.sender)
        if not_owned is not None:
            log.info("sender not owned client=%s user=%s from=<%s>", self.client_ip,
                     self.authenticated, txn_or_reply.sender,
                     extra=self._fields(events.REJECTED))
            await self.refuse("policy", not_owned)
            return
        if self.front.shutting_down:
            self.close_with(f"421 4.3.2 {self.cfg.hostname} Service shutting down")
            return
        try:
            # At most a second old: statvfs at every MAIL was 1.5% of a busy
            # worker's loop, and free space does not swing that fast.
            free = self.front.spool.free_space(max_age=1.0)
        except OSError:
            free = 0
        if free < self.cfg.limits.min_free_space:
            log.warning("spool below min_free_space: %d bytes free", free)
            await self.refuse("storage", "452 4.3.1 Insufficient system storage")
            return
        if (refusal := await self.hooks.mail(txn_or_reply)) is not None:
            await self.refuse("policy", refusal)
            return
        self.txn = txn_or_reply
        await self.push("250 2.1.0 Ok")

    def _mail_params(self, path: PathArgs) -> Transaction | str:
        params = dict(path.params)
        if params and not self.esmtp:
            return "501 5.5.4 Parameters require EHLO"
        body = (params.pop("BODY", None) or "7BIT").upper()
        if body not in ("7BIT", "8BITMIME"):
            return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
        smtputf8 = "SMTPUTF8" in params
        if smtputf8 and params.pop("SMTPUTF8") is not None:
            return "501 5.5.4 SMTPUTF8 takes no value"
        if not path.raw.isascii() and not smtputf8:
            return "553 5.6.7 Non-ASCII sender address requires SMTPUTF8"
        size: int | None = None
        if "SIZE" in params:
            value = params.pop("SIZE")
            if value is None or not value.isdigit() or len(value) > 20:
                return "501 5.5.4 Bad SIZE parameter"
            size = int(value)
            if size > self.cfg.limits.max_message_size:
                return "552 5.3.4 Message size exceeds fixed maximum message size"
        # AUTH=<> may be sent by any client; it carries no authority here (RFC 4954 §5).
        params.pop("AUTH", None)
        try:
            ret = parse_ret(params.pop("RET")) if "RET" in params else None
            envid = parse_envid(params.pop("ENVID")) if "ENVID" in params else None
        except ReplyError as exc:
            return exc.reply
        if params:
            return f"555 5.5.4 Unsupported MAIL parameter {next(iter(params))}"
        sender = path.mailbox.address if path.mailbox is not None else ""
        return Transaction(
            sender=sender, body=body, smtputf8=smtputf8, size_declared=size,
            ret=ret, envid=envid,
        )

    def _rcpt_params(self, txn: Transaction, path: PathArgs) -> RcptDsn | str:
        params = dict(path.params)
        if not params:
            return RcptDsn()
        if not self.esmtp:  # DSN parameters exist only for an EHLO session
            return f"555 5.5.4 Unsupported RCPT parameter {next(iter(params))}"
        unknown = [k for k in params if k not in ("NOTIFY", "ORCPT")]
        if unknown:
            return f"555 5.5.4 Unsupported RCPT parameter {unknown[0]}"
        try:
            notify = parse_notify(params["NOTIFY"]) if "NOTIFY" in params else None
            orcpt = (
                parse_orcpt(params["ORCPT"], smtputf8=txn.smtputf8)
                if "ORCPT" in params else None
            )
        except ReplyError as exc:
            return exc.reply
        return RcptDsn(notify=notify, orcpt=orcpt)

    async def smtp_RCPT(self, arg: str | None) -> None:
        txn = self.txn
        if txn is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if arg is None:
            await self.refuse("syntax", "501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path = parse_path_args(
                arg, "TO:", allow_utf8=txn.smtputf8, allow_null=False,
                allow_postmaster=True, bad_address_code="5.1.3",
            )
        except ReplyError as exc:
            await self.refuse("syntax", exc.reply)
            return
        dsn = self._rcpt_params(txn, path)
        if isinstance(dsn, str):
            await self.refuse("syntax", dsn)
            return
        cfg = self.cfg
        if len(txn.recipients) >= cfg.limits.max_recipients:
            await self.refuse("policy", "452 4.5.3 Error: too many recipients")
            return
        may_relay = self.authenticated is not None or in_networks(
            self.client_ip, cfg.relay_networks
        )
        decision = decide_rcpt(cfg, path.mailbox, client_may_relay=may_relay)
        if not decision.accept:
            log.info("relay denied client=%s rcpt=<%s>", self.client_ip, path.raw,
                     extra=self._fields(events.REJECTED,
                                        RCPT_DOMAIN=path.raw.rpartition("@")[2].lower()))
            await self.refuse("relay", decision.reply)
            return
        address = _recipient_key(path.mailbox) if path.mailbox is not None else cfg.postmaster
        if address not in txn.seen and (
                refusal := await self.hooks.rcpt(txn, address, path.mailbox)) is not None:
            await self.refuse("policy", refusal)
            return
        if address not in txn.seen:
            txn.seen.add(address)
            txn.recipients.append(address)
            txn.rcpt_dsn[address] = dsn
        await self.push(decision.reply)

    async def smtp_DATA(self, arg: str | None) -> None:
        txn = self.txn
        if self.helo is None:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return
        if txn is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not txn.recipients:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg is not None:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        front = self.front
        writer = front.spool.create()  # no disk work yet; storage errors come at commit
        self.busy = True
        try:
            await self._receive(txn, writer)
        finally:
            self.busy = False
            self.txn = None
        if front.shutting_down:
            self.close_with(f"421 4.3.2 {self.cfg.hostname} Service shutting down")

    async def _receive(self, txn: Transaction, writer: Any) -> None:
        cfg = self.cfg
        now = time.time()
        tls_info = self._tls_info()
        header = received_header(
            helo=self.helo or "unknown",
            client_ip=self.client_ip,
            hostname=cfg.hostname,
            protocol=with_protocol(
                esmtp=self.esmtp, tls=tls_info is not None,
                auth=self.authenticated is not None, utf8=txn.smtputf8,
            ),
            queue_id=writer.id,
            recipients=txn.recipients,
            tls_info=tls_info,
            timestamp=now,
        )
        try:
            writer.write(self.hooks.prefix(txn, header))  # + headers modules added so far
        except OSError as exc:
            writer.abort()
            log.error("queue file write failed: %s", exc)
            await self.refuse("storage",
                              "451 4.3.0 Error: local error writing the queue file, try again")
            return
        self._write("354 End data with <CR><LF>.<CR><LF>")
        data_timeout = cfg.limits.data_timeout
        self.set_deadline(data_timeout)
        missing = (submission_fields(writer.id, cfg.hostname, now)
                   if self.role == "submission" else None)
        headers = HeaderFilter(writer.write, cfg.limits.max_header_size, missing)
        arrived = 0

        def progress(n: int) -> None:
            nonlocal arrived
            arrived += n
            if arrived >= DATA_PROGRESS:
                arrived = 0
                self.set_deadline(data_timeout)

        self._receiving = True
        scanner = DataScanner(headers.feed_block, cfg.limits.max_message_size)
        try:
            await self.read_data(scanner, progress)
            result = scanner.result()
            if result.outcome is DataOutcome.OK and not headers.too_big:
                try:
                    headers.finish()
                except OSError as exc:
                    result.outcome, result.error = DataOutcome.WRITE_ERROR, exc
        except BaseException:
            writer.abort()
            raise
        finally:
            self._receiving = False
        self.set_deadline()  # committing, then the next command: command_timeout
        if result.outcome is DataOutcome.OK and headers.too_big:
            writer.abort()
            log.info("message rejected client=%s reason=header larger than %d octets",
                     self.client_ip, cfg.limits.max_header_size,
                     extra=self._fields(events.REJECTED))
            await self.refuse("size", _HEADER_TOO_BIG)
            return
        if result.outcome is not DataOutcome.OK:
            writer.abort()
            if result.error is not None:
                log.error("queue file write failed: %s", result.error)
            else:
                log.info(
                    "message rejected client=%s reason=%s", self.client_ip, result.outcome.value,
                    extra=self._fields(events.REJECTED),
                )
            await self.refuse(_DATA_REASON[result.outcome], _DATA_REJECT[result.outcome])
            return
        verdict = await self.hooks.data(txn, writer, self.front.spool)  # on_data, may copy
        if verdict.reply is not None:
            await self.refuse(verdict.reason, verdict.reply)
            return
        writer = verdict.writer
        envelope = Envelope(
            id=writer.id,
            sender=txn.sender,
            recipients=[
                Recipient(address=a, notify=txn.rcpt_dsn[a].notify, orcpt=txn.rcpt_dsn[a].orcpt)
                for a in txn.recipients
            ],
            received_at=now,
            client_addr=self.client_ip,
            client_port=self.client_port,
            helo=self.helo or "",
            tls=tls_info,
            authenticated=self.authenticated,
            body="8BITMIME" if (result.eight_bit or txn.body == "8BITMIME") else "7BIT",
            smtputf8=txn.smtputf8,
            ret=txn.ret,
            envid=txn.envid,
            held=verdict.held,
            metadata=verdict.metadata,  # {"modules": {name: …}} as modules set it
        )
        try:
            await self.front.spool.commit(writer, envelope)
        except SpoolError as exc:
            log.error("queue commit failed id=%s: %s", writer.id, exc)
            await self.refuse("storage", "451 4.3.0 Error: local error in processing, try again")
            return
        except BaseException:
            writer.abort()
            raise
        self.messages += 1
        self.front.message_queued(envelope, self)
        await self.push(f"250 2.0.0 Ok: queued as {envelope.id}")

    def _tls_info(self) -> str | None:
        if not self.tls:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return "TLS"
        cipher = ssl_object.cipher()
        name = cipher[0] if cipher else "unknown"
        return f"using {ssl_object.version()} with cipher {name}"

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg is not None:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._reset_txn()
        await self.push("250 2.0.0 Ok")

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str | None) -> None:
        self.closing = True
        await self.push("221 2.0.0 Bye")
        if self.transport is not None:
            self.transport.close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        if arg is None:
            await self.push("501 5.5.4 Syntax: VRFY address")
            return
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 Error: EXPN not supported")

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push(
            "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
            + (" STARTTLS" if self.tls_context is not None else "")
        )

    async def smtp_AUTH(self, arg: str | None) -> None:
        await auth.smtp_auth(self, arg)

    async def smtp_BDAT(self, arg: str | None) -> None:
        await self.push("502 5.5.1 Error: CHUNKING not supported")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_context is None:
            await self.push("502 5.5.1 Error: STARTTLS not available")
            return
        if self.tls:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        if arg is not None:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        self._tls_handshake = True
        try:
            # Throws away anything pipelined in plaintext behind the command.
            await self.start_tls(self.tls_context, self.cfg.limits.command_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("TLS handshake failed client=%s: %s", self.client_ip, exc,
                     extra=self._fields())
            self.closing = True
            return
        finally:
            self._tls_handshake = False
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        version = ssl_object.version() if ssl_object is not None else None
        metrics.inc("empath_smtp_tls_sessions_total", (self.role, version or "unknown"))
        # RFC 3207 §4.2: forget everything learnt before TLS.
        self.helo, self.esmtp = None, False
        self.authenticated = None
        self._reset_txn()


# Verb -> handler, built once (a per-session table of bound methods cost a dict
# and 14 method objects for every connection).
_COMMANDS: dict[str, Any] = {
    "EHLO": SMTPSession.smtp_EHLO,
    "HELO": SMTPSession.smtp_HELO,
    "MAIL": SMTPSession.smtp_MAIL,
    "RCPT": SMTPSession.smtp_RCPT,
    "DATA": SMTPSession.smtp_DATA,
    "RSET": SMTPSession.smtp_RSET,
    "NOOP": SMTPSession.smtp_NOOP,
    "QUIT": SMTPSession.smtp_QUIT,
    "VRFY": SMTPSession.smtp_VRFY,
    "EXPN": SMTPSession.smtp_EXPN,
    "HELP": SMTPSession.smtp_HELP,
    "STARTTLS": SMTPSession.smtp_STARTTLS,
    "AUTH": SMTPSession.smtp_AUTH,
    "BDAT": SMTPSession.smtp_BDAT,
}
