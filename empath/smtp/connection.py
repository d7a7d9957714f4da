"""The bytes under one SMTP session: what the session reads, writes and times out on.

An ``asyncio.Protocol`` with its own receive buffer, rather than a StreamReader:
commands are taken from the buffer without a wait when they are already there
(pipelining), and the DATA section is checked and written a block at a time, not
line by line (``empath.smtp.data.DataScanner``). The buffer is bounded: reading
from the socket pauses while it holds more than ``HIGH_WATER`` octets.

While the DATA section arrives, every time the buffer runs dry the pending TCP
acknowledgement is sent at once (TCP_QUICKACK) instead of up to 40 ms later: a client
with Nagle's algorithm on holds back its last small write — often the final
``.<CRLF>`` — until what it sent before is acknowledged, and on a connection that
carries more than one message the kernel has by then switched to delayed ACKs, so every
message would wait for the delayed-ACK timer before its ``250``.

Also here: one timer per connection for every deadline (moving a deadline is a
float store; the timer re-arms itself when it fires early), back-pressure for
writes, and the STARTTLS switch, which throws away whatever the client pipelined in
plaintext behind the command (RFC 3207 §4.2; the CVE-2011-0411 class of bugs).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

__all__ = ["Connection", "LineTooLong"]

# Reading pauses above this many buffered octets and resumes below half of it: the
# most one client can make a worker hold, however fast it sends.
HIGH_WATER = 256 * 1024


class LineTooLong(Exception):
    """A command line longer than the limit arrived; it has been skipped to its end."""


class Connection(asyncio.Protocol):
    """Subclasses implement ``serve()`` (the session) and ``timed_out()``; ``closed()``
    is called exactly once when the connection is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, timeout: float,
                 line_limit: int) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.tls = False  # STARTTLS completed
        self.line_limit = line_limit
        self._buf = bytearray()
        self._eof = False
        self._skipping = False  # inside a command line over the limit
        self._waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._timeout = timeout
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._gone = False

    # ---- for subclasses ---------------------------------------------------------

    async def serve(self) -> None:
        raise NotImplementedError

    def timed_out(self) -> None:
        raise NotImplementedError

    def closed(self) -> None:
        """The connection is gone (called once)."""

    # ---- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport
        # subclasses, though they behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.set_deadline()
        self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.serve()
        except ConnectionError:
            pass  # the client went away in the middle of something: nothing to answer
        finally:
            # However the session ended, our side closes too: a half-open session
            # would hold its worker slot and the client's per-address count.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._skipping and not self._buf:
            # Throwing away an overlong command line: keep only what follows its end.
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._buf += data[: nl + 1]  # readline() sees the end and reports it
            data = data[nl + 1:]
        self._buf += data
        if len(self._buf) > HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        # Commands already received are still answered (the client may read after
        # a half-close); the session closes once it has read everything. asyncio
        # ignores True on a TLS transport, so say False there.
        self._eof = True
        self._wake()
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _lost(self) -> None:
        if self._gone:
            return
        self._gone = True
        self.transport = None
        self._eof = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_exception(ConnectionResetError("connection lost"))
        self.closed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # ---- reading ------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more(self) -> None:
        """Wait for more input (or EOF)."""
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _consumed(self, n: int) -> None:
        del self._buf[:n]
        if self._read_paused and len(self._buf) < HIGH_WATER // 2 and self.transport:
            self._read_paused = False
            self.transport.resume_reading()

    async def readline(self) -> bytes:
        """The next line, with its line end; ``b""`` at EOF (a partial line is dropped).

        Raises LineTooLong once a line over ``line_limit`` octets has been read to its
        end and discarded, so the session stays in step with the client.
        """
        while True:
            buf = self._buf
            nl = buf.find(b"\n")
            if nl >= 0:
                line = bytes(buf[: nl + 1])
                self._consumed(nl + 1)
                if self._skipping:
                    self._skipping = False
                    raise LineTooLong
                return line
            if len(buf) > self.line_limit:
                self._skipping = True
                self._consumed(len(buf))
            if self._eof:
                return b""
            await self._more()

    async def read_data(self, scanner: Any, progress: Callable[[int], None]) -> None:
        """Feed input to ``scanner`` (a ``DataScanner``) until it has seen the end of
        the data; ``progress`` is told how many octets each step took off the wire.
        Raises ConnectionResetError if the client leaves first."""
        feed = scanner.feed
        while True:
            if self._buf:
                n = feed(self._buf)
                if n:
                    self._consumed(n)
                    progress(n)
                if scanner.done:
                    return
                if n:
                    continue
            if self._eof:
                raise ConnectionResetError("connection closed during DATA")
            self._ack_now()
            await self._more()

    def _ack_now(self) -> None:
        """Acknowledge what has arrived now rather than after the delayed-ACK timer (see
        the module docstring). The flag is not sticky: the kernel clears it again, so it
        is set at each wait. The socket is looked up here, not when the connection is
        made: most messages arrive whole and never wait, and accepting a connection
        should cost nothing for this."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # the connection went away meanwhile
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    # ---- writing ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its limit."""
        if self.transport is None:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            if self._drained is None:
                self._drained = self.loop.create_future()
            await self._drained

    # ---- deadlines ----------------------------------------------------------------

    def set_deadline(self, seconds: float | None = None) -> None:
        """``timed_out()`` runs ``seconds`` (default: the command timeout) from now,
        unless the deadline is moved again before."""
        self._deadline = self.loop.time() + (self._timeout if seconds is None else seconds)
        timer = self._timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        if self.loop.time() < self._deadline:  # moved on since the timer was set
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self.timed_out()

    # ---- STARTTLS -----------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Switch to TLS as the server. Raises (OSError, ssl.SSLError, TimeoutError) if
        the handshake fails; the connection is closed then."""
        assert self.transport is not None
        # Plaintext pipelined behind STARTTLS must not be read as if it came over
        # TLS. No await between this and start_tls() taking over the socket, so
        # nothing more can slip into the buffer.
        self._buf.clear()
        raw = self.transport
        if self._read_paused:
            self._read_paused = False
            raw.resume_reading()
        try:
            new = await self.loop.start_tls(raw, self, context, server_side=True,
                                            ssl_handshake_timeout=handshake_timeout)
            if new is None:  # only if the transport went away meanwhile
                raise ConnectionResetError("connection lost during the TLS handshake")
        except BaseException:
            # asyncio closes the socket but, the handshake being unfinished, never
            # tells this protocol: the session's bookkeeping must still run.
            raw.close()
            self._lost()
            raise
        self.transport = new
        self.tls = True

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()
