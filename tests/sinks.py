"""Test servers for the delivery client: scripted SMTP (aiosmtpd) and LMTP sinks.

Every sink listens on a loopback address of its own (127.0.0.N: Linux routes the whole
127/8 to ``lo``), so several can share a port number and "the next MX" is simply
another address. Each one records what it received — connections, EHLO names, the
raw MAIL/RCPT arguments with their parameters, the message bytes, whether TLS was
active — for the tests to assert on.

- ``SMTPSink``: aiosmtpd's server with a ``Script`` deciding the EHLO extensions and the
  replies (per recipient at RCPT, at the final dot), and misbehaviour (drop mid-DATA,
  drop or hang at the final dot, a broken STARTTLS).
- ``LMTPSink``: RFC 2033 on asyncio streams, TCP or Unix socket, one reply per
  recipient after the final dot.
- ``RawServer``: a server that greets with a fixed line (or never), for greeting
  failures and silent servers.
- ``make_tls``: a trustme CA and a server certificate for a host name.

All of them run on the test's own event loop: ``async with SMTPSink(...) as sink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import ssl
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

_addresses = itertools.count(2)


def loopback() -> str:
    """A fresh 127.0.0.N address for one sink (N from 2 to 254, then wraps)."""
    return f"127.0.0.{(next(_addresses) - 2) % 253 + 2}"


# ---- certificates -----------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca: trustme.CA
    ca_file: Path  # PEM of the CA, for ClientSettings.ca_file
    server_context: ssl.SSLContext  # server side, with the certificate for ``hostname``
    hostname: str


def make_tls(directory: Path, hostname: str, ca: trustme.CA | None = None) -> TLSFiles:
    """A CA (new unless given) and a server certificate for ``hostname`` signed by it."""
    ca = ca or trustme.CA()
    cert = ca.issue_cert(hostname)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / f"ca-{id(ca):x}.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TLSFiles(ca, ca_file, ctx, hostname)


# ---- what sinks record --------------------------------------------------------------------


@dataclass
class Transaction:
    connection: int  # which connection (1, 2, ...) of this sink
    helo: str | None  # EHLO/HELO/LHLO name
    tls: bool  # TLS active when MAIL was given
    mail: str  # the raw MAIL argument: "FROM:<a@b> SIZE=12 BODY=8BITMIME"
    rcpts: list[str] = field(default_factory=list)  # raw RCPT arguments, in order
    accepted: list[str] = field(default_factory=list)  # addresses answered 2xx
    data: bytes | None = None  # the message, dot-unstuffed, as received
    replied: bool = False  # the final dot was answered


@dataclass
class Script:
    """How an SMTPSink behaves. Replies are full lines: "451 4.3.0 try later"."""

    hostname: str = "sink.test"  # greeting and EHLO name
    ehlo_hostname: str | None = None  # a different name in the EHLO reply
    starttls: bool = False  # offer STARTTLS (needs a tls context on the sink)
    broken_tls: bool = False  # answer 220 to STARTTLS, then send garbage and close
    eightbitmime: bool = True
    smtputf8: bool = True
    dsn: bool = False
    pipelining: bool = False
    size: int | None = 64 * 1024 * 1024  # advertised SIZE limit; None: no SIZE
    ehlo_reply: str | None = None  # e.g. "502 5.5.1 no ESMTP here" (then HELO works)
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply
    data_reply: str = "250 2.0.0 Ok: queued"  # reply to the final dot
    drop_mid_data: bool = False  # close the connection after some message bytes
    drop_at_dot: bool = False  # close after the final dot without replying
    drop_at_rset: bool = False  # close at RSET without replying (an idle session timed out)
    hang_at: str | None = None  # "mail" | "rcpt" | "dot": never answer there
    hang_after: int | None = None  # answer this many final dots, then hang at every later one
    keep_data: bool = True  # False: record only size and hash (big messages)


class _Handler:
    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        sc = self.sink.script
        server.helo_name = hostname
        self.sink.ehlo_names.append(hostname)
        if sc.ehlo_reply is not None:
            return [sc.ehlo_reply]
        session.host_name = hostname
        lines = [r[4:] for r in responses]
        keep = []
        for line in lines[1:]:
            word = line.split()[0].upper()
            if ((word == "8BITMIME" and not sc.eightbitmime)
                    or (word == "SMTPUTF8" and not sc.smtputf8)
                    or (word == "SIZE" and sc.size is None)
                    or (word == "STARTTLS" and not sc.starttls) or word in ("HELP", "AUTH")):
                continue
            keep.append(line)
        if sc.dsn:
            keep.append("DSN")
        if sc.pipelining:
            keep.append("PIPELINING")
        keep.append("ENHANCEDSTATUSCODES")
        first = sc.ehlo_hostname or sc.hostname
        out = [first, *keep]
        return [("250 " if n == len(out) - 1 else "250-") + x for n, x in enumerate(out)]

    async def handle_MAIL(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        sc = self.sink.script
        if sc.hang_at == "mail":
            await asyncio.Event().wait()
        if sc.mail_reply is not None:
            return sc.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        sc = self.sink.script
        if sc.hang_at == "rcpt":
            await asyncio.Event().wait()
        reply = sc.rcpt_replies.get(address.lower(), "250 2.1.5 Ok")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            if server.txn is not None:
                server.txn.accepted.append(address)
        return reply

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope
                          ) -> str:
        sc = self.sink.script
        content = envelope.original_content or b""
        if server.txn is not None:
            self.sink.sizes.append(len(content))
            if sc.keep_data:
                server.txn.data = bytes(content)
            else:
                self.sink.hashes.append(hashlib.sha256(content).hexdigest())
        envelope.original_content = envelope.content = None
        if sc.hang_at == "dot" or (
                sc.hang_after is not None and len(self.sink.sizes) > sc.hang_after):
            await asyncio.Event().wait()
        if sc.drop_at_dot:
            assert server.transport is not None
            server.transport.abort()  # type: ignore[attr-defined]
            await asyncio.Event().wait()  # cancelled by connection_lost
        if server.txn is not None:
            server.txn.replied = True
        return sc.data_reply


class _SinkSMTP(SMTP):  # type: ignore[misc]
    """aiosmtpd's session, recording raw arguments and accepting DSN parameters."""

    def __init__(self, sink: SMTPSink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self.sink = sink
        self.conn_no = 0
        self.helo_name: str | None = None
        self.txn: Transaction | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the STARTTLS re-entry
            self.sink.connections += 1
            self.conn_no = self.sink.connections
            self.sink.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink.live.discard(self)
        super().connection_lost(error)

    def _record(self, line: str) -> None:
        self.sink.commands.append((self.conn_no, line))

    async def smtp_EHLO(self, arg: str) -> None:
        self._record(f"EHLO {arg}")
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg: str) -> None:
        self._record(f"HELO {arg}")
        self.helo_name = arg
        self.sink.ehlo_names.append(arg)
        await super().smtp_HELO(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._record(f"MAIL {arg}")
        if arg is not None and self.session is not None and self.session.host_name:
            self.txn = Transaction(self.conn_no, self.helo_name,
                                   self._tls_protocol is not None, arg)
            self.sink.transactions.append(self.txn)
        if arg is not None and self.sink.script.dsn:  # aiosmtpd lacks RFC 3461: hide it
            arg = _strip_params(arg, ("RET", "ENVID"))
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._record(f"RCPT {arg}")
        if arg is not None and self.txn is not None:
            self.txn.rcpts.append(arg)
        if arg is not None and self.sink.script.dsn:
            arg = _strip_params(arg, ("NOTIFY", "ORCPT"))
        await super().smtp_RCPT(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._record("RSET")
        self.txn = None
        if self.sink.script.drop_at_rset and self.transport is not None:
            self.transport.abort()
            return
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self._record("QUIT")
        await super().smtp_QUIT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._record("DATA")
        if self.sink.script.drop_mid_data and self.envelope is not None \
                and self.envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.read(1024)
            assert self.transport is not None
            self.transport.abort()
            await asyncio.Event().wait()  # cancelled by connection_lost
            return
        await super().smtp_DATA(arg)
        self.txn = None

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._record("STARTTLS")
        if self.sink.script.broken_tls:
            await self.push("220 2.0.0 Ready to start TLS")
            self._writer.write(b"this is not a TLS server hello\r\n" * 8)
            await self._writer.drain()
            assert self.transport is not None
            self.transport.close()
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException:
            self.sink.tls_failures += 1  # the client refused our certificate
            if self.transport is not None:
                self.transport.close()


def _strip_params(arg: str, names: tuple[str, ...]) -> str:
    head, _, rest = arg.partition(">")
    kept = [p for p in rest.split() if p.split("=", 1)[0].upper() not in names]
    return head + ">" + "".join(" " + p for p in kept)


class SMTPSink:
    """An aiosmtpd SMTP server on (host, port), behaving as ``script`` says."""

    def __init__(self, script: Script | None = None, *, host: str | None = None, port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.script = script or Script()
        self.host = host or loopback()
        self.port = port
        self.tls = tls
        self.connections = 0
        self.commands: list[tuple[int, str]] = []  # (connection, command line)
        self.ehlo_names: list[str] = []
        self.transactions: list[Transaction] = []
        self.sizes: list[int] = []
        self.hashes: list[str] = []
        self.tls_failures = 0  # STARTTLS handshakes that failed
        self.live: set[_SinkSMTP] = set()
        self._server: asyncio.AbstractServer | None = None

    async def kick(self) -> None:
        """Close every open connection from the server side (as an idle timeout does)."""
        for session in list(self.live):
            if session.transport is not None:
                session.transport.close()
        while self.live:
            await asyncio.sleep(0.01)

    @property
    def delivered(self) -> list[Transaction]:
        """Transactions that reached the final dot."""
        return [t for t in self.transactions if t.data is not None]

    def verbs(self, connection: int | None = None) -> list[str]:
        return [c.split()[0] for n, c in self.commands if connection in (None, n)]

    async def start(self) -> SMTPSink:
        loop = asyncio.get_running_loop()
        sc = self.script

        def factory() -> _SinkSMTP:
            return _SinkSMTP(
                self, hostname=sc.hostname, ident="ESMTP sink",
                data_size_limit=sc.size or 512 * 1024 * 1024,
                enable_SMTPUTF8=True, decode_data=False,
                tls_context=self.tls if sc.starttls else None, loop=loop,
            )

        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> SMTPSink:
        return await self.start()

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class _Clients:
    """The connections of a stream server, so that stop() can end them cleanly (a
    handler task still running when the loop ends gets cancelled, and asyncio logs
    that as an error)."""

    def __init__(self) -> None:
        self._open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    def add(self, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[writer] = task

    def done(self, writer: asyncio.StreamWriter) -> None:
        self._open.pop(writer, None)
        writer.close()

    async def close(self) -> None:
        tasks = list(self._open.values())
        for w in list(self._open):
            w.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


# ---- LMTP ---------------------------------------------------------------------------------


class LMTPSink:
    """RFC 2033 server on asyncio streams: TCP (host, port) or a Unix socket ``path``.

    ``rcpt_replies`` answer RCPT per address; ``data_replies`` answer each accepted
    recipient after the final dot (default ``250 2.0.0 <addr> delivered``; None: close
    the connection instead of answering for this recipient and the rest).
    """

    def __init__(self, *, host: str | None = None, port: int = 0, path: Path | None = None,
                 hostname: str = "lmtp.test",
                 rcpt_replies: dict[str, str] | None = None,
                 data_replies: dict[str, str | None] | None = None) -> None:
        self.path = path
        self.host = host or (None if path else loopback())
        self.port = port
        self.hostname = hostname
        self.rcpt_replies = rcpt_replies or {}
        self.data_replies = data_replies or {}
        self.connections = 0
        self.commands: list[tuple[int, str]] = []
        self.transactions: list[Transaction] = []
        self._server: asyncio.AbstractServer | None = None
        self._clients = _Clients()

    @property
    def delivered(self) -> list[Transaction]:
        return [t for t in self.transactions if t.data is not None]

    async def start(self) -> LMTPSink:
        if self.path is not None:
            self._server = await asyncio.start_unix_server(self._client, str(self.path))
        else:
            self._server = await asyncio.start_server(self._client, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._clients.close()
            self._server = None

    async def __aenter__(self) -> LMTPSink:
        return await self.start()

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        self.connections += 1
        conn = self.connections
        helo: str | None = None
        txn: Transaction | None = None

        def send(*lines: str) -> None:
            writer.write("".join(f"{x}\r\n" for x in lines).encode())

        try:
            send(f"220 {self.hostname} LMTP sink ready")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
                self.commands.append((conn, line))
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                if verb == "LHLO":
                    helo = arg
                    send(f"250-{self.hostname}", "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                         "250-8BITMIME", "250-SMTPUTF8", "250 DSN")
                elif verb in ("EHLO", "HELO"):
                    send("500 5.5.1 this is LMTP: LHLO please")
                elif verb == "MAIL" and helo is not None:
                    txn = Transaction(conn, helo, False, arg)
                    self.transactions.append(txn)
                    send("250 2.1.0 Ok")
                elif verb == "RCPT" and txn is not None:
                    txn.rcpts.append(arg)
                    addr = arg.partition("<")[2].partition(">")[0]
                    reply = self.rcpt_replies.get(addr.lower(), "250 2.1.5 Ok")
                    if reply.startswith("2"):
                        txn.accepted.append(addr)
                    send(reply)
                elif verb == "DATA" and txn is not None and txn.accepted:
                    send("354 2.0.0 End data with <CR><LF>.<CR><LF>")
                    chunks: list[bytes] = []
                    while True:
                        data_line = await reader.readline()
                        if not data_line:
                            return
                        if data_line == b".\r\n":
                            break
                        chunks.append(data_line[1:] if data_line.startswith(b".")
                                      else data_line)
                    txn.data = b"".join(chunks)
                    for a in txn.accepted:
                        reply = self.data_replies.get(a.lower(), f"250 2.0.0 <{a}> delivered")
                        if reply is None:
                            await writer.drain()
                            return
                        send(reply)
                    txn = None
                elif verb == "DATA":
                    send("503 5.5.1 no valid recipients")
                elif verb == "RSET":
                    txn = None
                    send("250 2.0.0 Ok")
                elif verb == "NOOP":
                    send("250 2.0.0 Ok")
                elif verb == "QUIT":
                    send("221 2.0.0 Bye")
                    await writer.drain()
                    return
                else:
                    send("503 5.5.1 bad sequence of commands")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.done(writer)


# ---- raw servers --------------------------------------------------------------------------


class RawServer:
    """Greets with ``greeting`` (None: never says anything), then answers every command
    with ``replies[verb]`` or ``reply`` until QUIT. Counts connections."""

    def __init__(self, greeting: str | None, *, reply: str = "503 5.5.1 go away",
                 replies: dict[str, str] | None = None,
                 host: str | None = None, port: int = 0) -> None:
        self.greeting = greeting
        self.reply = reply
        # By the command's first word (upper case, "." for a lone dot): a server that
        # says what a script wants, however wrong; may hold several CRLF-joined lines.
        self.replies = replies or {}
        self.host = host or loopback()
        self.port = port
        self.connections = 0
        self.commands: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._clients = _Clients()

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._clients.close()
            self._server = None

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._clients.add(writer)
        try:
            if self.greeting is None:
                await reader.read()  # silent until the client gives up
                return
            writer.write(self.greeting.encode() + b"\r\n")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").strip()
                self.commands.append(line)
                if line.upper() == "QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                verb = line.split(" ", 1)[0].upper()
                writer.write(self.replies.get(verb, self.reply).encode() + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.done(writer)


def unused_port(host: str) -> int:
    """A port nothing listens on at ``host`` right now (connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---- sinks on a background event loop ------------------------------------------------

_T = TypeVar("_T")
_Sink = TypeVar("_Sink", SMTPSink, LMTPSink, RawServer)


class SinkLoop:
    """Sinks on an event loop of their own, in a thread, so that they answer the daemon
    while a test blocks waiting for it (the ``sinks`` fixture of tests/conftest.py)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.started: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 15.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, sink: _Sink) -> _Sink:
        """Start ``sink`` on this loop; it is stopped at close()."""
        started = self.run(sink.start())
        self.started.append(started)
        return started

    def stop(self, sink: Any) -> None:
        self.run(sink.stop())
        self.started.remove(sink)

    def close(self) -> None:
        for sink in list(self.started):
            self.stop(sink)
        self.run(_cancel_others())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _cancel_others() -> None:
    """End sessions the sinks still serve (pooled client connections), cleanly."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
