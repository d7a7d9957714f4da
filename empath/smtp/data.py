"""Reading the DATA section safely (RFC 5321 §4.1.4, §4.5.2, §2.3.8).

Only ``<CRLF>.<CRLF>`` ends the data. A line ending in a bare LF, or containing a bare
CR or a NUL, marks the whole message as rejected (we do not "normalise" it): this is
the strict form of Postfix's ``smtpd_forbid_bare_newline`` and makes SMTP smuggling
(``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r``, ``\\r\\n.\\r``, ``\\r\\n\\x00.\\r\\n``) impossible: such
sequences can neither end this message nor start another one, and we never pass them
on to a next hop that might read them differently.

Data is checked, unstuffed and handed to ``sink`` a block of whole lines at a time
as it arrives (``DataScanner``, driven by the connection's receive buffer), so nothing
holds the whole message in memory and no Python code runs per line: the checks are
``bytes`` methods and one regular expression over each block.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DataOutcome", "DataResult", "DataScanner"]

# 998 octets of text + CRLF (RFC 5322 §2.1.1), plus one for a transparency dot.
MAX_LINE = 1001
# A line whose unstuffed form is over 998 octets + CRLF: 1000 octets before its LF,
# or 1001 when the first is a transparency dot.
_LONG_LINE = re.compile(rb"^(?:[^.\n][^\n]{999}|\.[^\n]{1000})", re.M)
_END = b"\r\n.\r\n"


class DataOutcome(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    BARE_NEWLINE = "bare CR or LF"
    NUL = "NUL character"
    WRITE_ERROR = "write error"


@dataclass(slots=True)
class DataResult:
    outcome: DataOutcome
    size: int  # unstuffed octets seen (counted even after a failure)
    eight_bit: bool  # any octet ≥ 0x80 seen
    error: OSError | None = None


class DataScanner:
    """Finds the end of the data in what arrives, checking and unstuffing on the way.

    ``feed(buffer)`` takes what can be decided from the front of the buffer (whole
    lines, or a piece of a line too long to keep) and says how many octets it took;
    the caller removes them and feeds again when more has arrived, until ``done``.
    After the first problem the rest is still read (and discarded) up to the
    terminator, so the session stays in step with the client and can answer once.
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self.sink = sink
        self.max_size = max_size
        self.done = False
        self.outcome = DataOutcome.OK
        self.size = 0
        self.eight_bit = False
        self.error: OSError | None = None
        # The terminator is "." CRLF *after a CRLF*: a "." line that follows a bare LF
        # (``\n.\r\n``) must not end the data, or what follows would be read as
        # commands. True while what was consumed so far ends in CRLF.
        self._after_crlf = True
        self._in_long_line = False  # the front of the buffer continues a skipped line
        self._last = b"\n"  # the last octet consumed

    def result(self) -> DataResult:
        return DataResult(self.outcome, self.size, self.eight_bit, self.error)

    def feed(self, buf: bytes | bytearray) -> int:
        if self.done:
            return 0
        if self._in_long_line:
            return self._skip_long_line(buf)
        if self._after_crlf and buf[:3] == b".\r\n":
            self.done = True
            return 3
        end = buf.find(_END)
        if end >= 0:
            self._block(bytes(buf[: end + 2]))
            self.done = True
            return end + 5
        nl = buf.rfind(b"\n")
        if nl < 0:
            if len(buf) > MAX_LINE:
                # No line end yet and already too long to be a valid line: drop it
                # now rather than hold it; what follows is the tail of the same line.
                self._fail(DataOutcome.LINE_TOO_LONG)
                self.size += len(buf)
                self._in_long_line = True
                self._last = bytes(buf[-1:])
                return len(buf)
            return 0
        block = bytes(buf[: nl + 1])
        self._after_crlf = block[-2:] == b"\r\n"
        self._block(block)
        return nl + 1

    def _skip_long_line(self, buf: bytes | bytearray) -> int:
        nl = buf.find(b"\n")
        if nl < 0:
            self.size += len(buf)
            self._last = bytes(buf[-1:])
            return len(buf)
        before = buf[nl - 1: nl] if nl > 0 else self._last
        self._after_crlf = before == b"\r"
        self._in_long_line = False
        self.size += nl + 1
        return nl + 1

    def _fail(self, outcome: DataOutcome) -> None:
        if self.outcome is DataOutcome.OK:
            self.outcome = outcome

    def _block(self, block: bytes) -> None:
        """Whole lines, starting at the start of a line."""
        if block[:1] == b"." or b"\n." in block:
            data = block.replace(b"\n.", b"\n")
            if data[:1] == b".":
                data = data[1:]
        else:
            data = block
        self.size += len(data)
        if self.outcome is not DataOutcome.OK:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self._fail(DataOutcome.BARE_NEWLINE)
        elif b"\x00" in block:
            self._fail(DataOutcome.NUL)
        elif (len(block) >= MAX_LINE - 1 and max(map(len, block.split(b"\n"))) >= MAX_LINE - 1
              and _LONG_LINE.search(block)):
            # The split is the quick test (no line near the limit: most blocks); the
            # expression, which walks each line, says whether a dot makes it allowed.
            self._fail(DataOutcome.LINE_TOO_LONG)
        elif self.size > self.max_size:
            self._fail(DataOutcome.TOO_BIG)
        else:
            if not self.eight_bit and not data.isascii():
                self.eight_bit = True
            try:
                self.sink(data)
            except OSError as exc:
                self._fail(DataOutcome.WRITE_ERROR)
                self.error = exc
