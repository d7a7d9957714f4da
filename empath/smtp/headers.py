"""The message's header section as it streams into the spool (RFC 5322 §2.2, §3.6).

Two jobs, done line by line between the DATA reader and the queue file:

* ``limits.max_header_size``: the header section (every line before the first empty
  one) may not exceed that many octets. Past it, nothing more is written and the
  session refuses the message with ``552 5.3.4`` after the final dot: a header that
  big is an attack on every parser downstream (ours, filters, the recipient's MUA),
  not mail.
* On the submission listener, a message without ``Message-ID:`` or ``Date:`` gets
  them (RFC 6409 §8.3, §8.2): large providers refuse mail that lacks a Message-ID.
  They go at the top, right after our ``Received:``; to put them there the header
  section is held back until it ends, which ``max_header_size`` bounds.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable

__all__ = ["HeaderFilter", "submission_fields"]

# A field's name: printable US-ASCII except ":" (RFC 5322 §3.6.8), then optional WSP
# (the obsolete syntax, §4.5) and the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")

Missing = Callable[[set[bytes]], bytes]


class HeaderFilter:
    """``feed`` each unstuffed line of the message (or ``feed_block`` whole lines), then
    ``finish`` at the final dot.

    ``missing``, when given, returns the fields to add given the lower-case names
    present; the header section is then held back until its end.
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int,
                 missing: Missing | None = None) -> None:
        self.sink = sink
        self.max_size = max_size
        self.missing = missing
        self.size = 0
        self.too_big = False
        self.in_header = True
        self.names: set[bytes] = set()
        self._held: list[bytes] | None = [] if missing is not None else None

    def feed(self, line: bytes) -> None:
        if self.too_big:
            return
        if not self.in_header:
            self.sink(line)
            return
        field = _FIELD.match(line)
        continuation = line[:1] in (b" ", b"\t") and self.size > 0
        if field is None and not continuation:
            # The empty line, or a body without one: the header section is over.
            self.in_header = False
            self._release(blank_follows=line == b"\r\n")
            self.sink(line)
            return
        self.size += len(line)
        if self.size > self.max_size:
            self.too_big = True
            self._held = None
            return
        if field is not None:
            self.names.add(field.group(1).lower())
        if self._held is not None:
            self._held.append(line)
        else:
            self.sink(line)

    def feed_block(self, block: bytes) -> None:
        """Whole unstuffed lines: those of the header section go through ``feed``,
        the body after it to the sink in one piece."""
        if self.too_big:
            return
        if not self.in_header:
            self.sink(block)
            return
        start, end = 0, len(block)
        while start < end:
            nl = block.find(b"\n", start)
            stop = end if nl < 0 else nl + 1
            self.feed(block[start:stop])
            start = stop
            if self.too_big:
                return
            if not self.in_header:
                if start < end:
                    self.sink(block[start:])
                return

    def finish(self) -> None:
        """At the end of data: a message that is all header is released now."""
        if self.in_header and not self.too_big:
            self.in_header = False
            self._release(blank_follows=True)

    def _release(self, *, blank_follows: bool) -> None:
        held, self._held = self._held, None
        if held is None or self.missing is None:
            return
        added = self.missing(self.names)
        if added:
            # A message with no header at all needs the empty line after ours, or its
            # first body line would read as a (broken) header field.
            self.sink(added if held or blank_follows else added + b"\r\n")
        for line in held:
            self.sink(line)


def submission_fields(queue_id: str, hostname: str, now: float | None = None) -> Missing:
    """``missing`` for a submitted message: Message-ID and Date if it lacks them."""

    def missing(names: set[bytes]) -> bytes:
        at = time.time() if now is None else now
        out = b""
        if b"message-id" not in names:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(at))
            out += f"Message-ID: <{stamp}.{queue_id}@{hostname}>\r\n".encode("ascii")
        if b"date" not in names:
            out += f"Date: {email.utils.formatdate(at, localtime=True)}\r\n".encode("ascii")
        return out

    return missing
