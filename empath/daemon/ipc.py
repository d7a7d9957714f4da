"""Supervisor ↔ worker messages: newline-delimited JSON over a Unix socketpair.

Small and boring on purpose: one line per message, a ``t`` field for its type.

supervisor → worker:
  ``config``  {text, source, gen, spool}: the configuration to run. The first one a
              worker gets is its start-up config; later ones are reloads. ``gen`` is
              the supervisor's config generation; ``spool`` is the spool directory in
              use (fixed for the daemon's life, whatever a reloaded ``state_dir`` says).
  ``admit``   {n, refuse}: the answer to a worker's ``admit``.
  ``stop``    {}: shut down as on SIGTERM.
  ``log-level`` {level}: log at this level until the next config.
  ``request`` {id, q}: a question the worker answers with ``response`` and the same
              ``id``. ``q`` is ``sessions``: its open SMTP sessions (``empathctl
              connections``); or ``metrics``: a snapshot of its counts
              (empath/metrics/store.py), asked at each scrape. The supervisor gives
              up waiting after a while and reports the worker as not answering.
worker → supervisor:
  ``ready``   {pid, gen}: serving, with config generation ``gen``.
  ``applied`` {gen, error}: a reloaded config is in force for new sessions (error
              null), or could not be applied (error says why; the old one stays).
  ``admit``   {n, ip} / ``release`` {ip}: per-client accounting (empath/daemon/anvil.py).
              ``release`` and ``queued`` are sent ``later`` (within ``LATER``, with the
              worker's next admit at the latest, never after it): for those few
              milliseconds a client that reconnects through the other worker still
              counts its closed connection, and a worker killed meanwhile takes its
              last notices with it (the supervisor then looks in the spool).
  ``queued``  {id, at, size, domains}: a message was spooled (received at ``at``,
              ``size`` bytes, one recipient domain per recipient); the queue manager
              takes it from here.
  ``response`` {id, result, error}: the answer to ``request`` ``id`` (error null, or
              why there is no result).
  ``metrics`` {snapshot}: its final counts, sent as it stops.
  ``auth-failed`` {n, ip}: a failed SMTP AUTH from ``ip``; the supervisor counts it per
              address (across workers) and answers ``auth-failed`` {n, count} with the
              failures in the current window.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
from typing import Any

__all__ = ["Channel", "open_channel"]

MAX_LINE = 16 * 1024 * 1024  # a config text travels this way
# A message nobody waits for (``send(..., later=True)``) leaves at most this many seconds
# after it was sent, with whatever is sent meanwhile: under load each wake-up of the
# other side then takes several, where one per loop turn woke it for each.
LATER = 0.005


# One encoder for every message: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
# Decoding text, not bytes: json.loads(bytes) first sniffs the encoding (BOMs, UTF-16/32),
# which for these short ASCII lines costs as much as the parse.
_decode = json.JSONDecoder().decode


class Channel:
    """Messages sent in one turn of the event loop leave in one write: under load a
    worker's admits, releases and queued notices for many sessions share a syscall,
    and the other side wakes once for all of them. Order is kept. Reading is the
    mirror image: one read takes whatever has arrived and ``recv`` hands the messages
    out one by one without waiting again (a readline per message costs the
    supervisor more than the accounting the message is for)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._out: list[bytes] = []
        self._soon = False  # a flush at the end of this loop turn is scheduled
        self._later: asyncio.TimerHandle | None = None  # the flush of `later` messages
        self._loop = asyncio.get_running_loop()
        self._lines: collections.deque[bytes] = collections.deque()
        self._partial = bytearray()  # the start of a line whose end has not come yet

    def send(self, msg: dict[str, Any], *, later: bool = False) -> None:
        """Queue ``msg``; it leaves at the end of this loop turn, or with ``later`` (for
        a notice nobody waits on) within ``LATER`` seconds. Either way order is kept:
        everything queued leaves together."""
        if self.writer.is_closing():
            return
        if not later:
            if not self._soon:
                self._soon = True
                self._loop.call_soon(self.flush)
        elif not self._out and not self._soon:
            self._later = self._loop.call_later(LATER, self.flush)
        self._out.append(_encode(msg).encode())

    def flush(self) -> None:
        """Write what ``send`` has gathered (at the end of the loop turn, or now)."""
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._out and not self.writer.is_closing():
            self._out.append(b"")
            self.writer.write(b"\n".join(self._out))
        self._out.clear()

    async def drain(self) -> None:
        """Flush, then wait until the socket has taken everything."""
        self.flush()
        await self.writer.drain()

    async def recv(self) -> dict[str, Any] | None:
        """Next message, or None at EOF (the other side is gone; a partial line at the
        end is dropped) or when a line outgrows ``MAX_LINE``."""
        lines = self._lines
        while not lines:
            try:
                data = await self.reader.read(1 << 16)
            except ConnectionError:
                return None
            if not data:
                return None
            partial = self._partial
            if b"\n" not in data:
                partial += data
                if len(partial) > MAX_LINE:
                    return None
                continue
            *complete, rest = data.split(b"\n")
            if partial:
                complete[0] = bytes(partial) + complete[0]
            partial[:] = rest
            lines.extend(line for line in complete if line)
        msg = _decode(lines.popleft().decode())
        if not isinstance(msg, dict):
            raise ValueError("IPC message is not an object")
        return msg

    def close(self) -> None:
        self.flush()
        self.writer.close()


async def open_channel(sock: socket.socket) -> Channel:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
    return Channel(reader, writer)
