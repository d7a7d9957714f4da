"""Reading the DATA section safely (RFC 5321 §4.1.4, §4.5.2, §2.3.8).

Only ``<CRLF>.<CRLF>`` ends the data. A line ending in a bare LF, or containing a bare
CR or a NUL, marks the whole message as rejected (we do not "normalise" it): this is
the strict form of Postfix's ``smtpd_forbid_bare_newline`` and makes SMTP smuggling
(``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r``, ``\\r\\n.\\r``, ``\\r\\n\\x00.\\r\\n``) impossible: such
sequences can neither end this message nor start another one, and we never pass them
on to a next hop that might read them differently.

Data is unstuffed and handed to ``sink`` line by line as it arrives, so nothing
needs to hold the whole message in memory.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DataOutcome", "DataResult", "read_data"]

# 998 octets of text + CRLF (RFC 5322 §2.1.1), plus one for a transparency dot.
MAX_LINE = 1001


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


async def read_data(
    reader: asyncio.StreamReader,
    sink: Callable[[bytes], None],
    max_size: int,
    progress: Callable[[int], None] | None = None,
) -> DataResult:
    """Read up to the end-of-data line, unstuffing into ``sink``.

    ``progress`` is told how many octets each read took off the wire (for the
    session's DATA deadline, which moves on with progress, not with every byte).

    After the first problem the rest is still read (and discarded) up to the
    terminator, so the session stays in sync with the client and can answer once.
    """
    outcome = DataOutcome.OK
    size = 0
    eight_bit = False
    error: OSError | None = None
    readuntil = reader.readuntil
    in_long_line = False
    # The terminator is "." CRLF *after a CRLF*: a "." line that follows a bare LF
    # (``\n.\r\n``) must not end the data, or what follows would be read as commands.
    # ``tail`` holds the last two octets consumed, across drained long-line pieces.
    tail = b"\r\n"
    while True:
        try:
            line = await readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            # Longer than the stream limit: drain it and remember. What follows is
            # the tail of the same line, which must never be taken for "." (that
            # would end DATA early and let the rest be read as commands).
            tail = (tail + await reader.readexactly(exc.consumed))[-2:]
            if progress is not None:
                progress(exc.consumed)
            if outcome is DataOutcome.OK:
                outcome = DataOutcome.LINE_TOO_LONG
            size += exc.consumed
            in_long_line = True
            continue
        if progress is not None:
            progress(len(line))
        after_crlf = tail == b"\r\n"
        tail = (tail + line)[-2:]
        if in_long_line:
            in_long_line = False
            size += len(line)
            continue
        if line == b".\r\n" and after_crlf:
            break
        if line[:1] == b".":
            line = line[1:]
        size += len(line)
        if outcome is not DataOutcome.OK:
            continue
        if line[-2:-1] != b"\r" or b"\r" in line[:-2]:
            outcome = DataOutcome.BARE_NEWLINE
        elif b"\x00" in line:
            outcome = DataOutcome.NUL
        elif len(line) > MAX_LINE - 1:
            outcome = DataOutcome.LINE_TOO_LONG
        elif size > max_size:
            outcome = DataOutcome.TOO_BIG
        else:
            if not eight_bit and not line.isascii():
                eight_bit = True
            try:
                sink(line)
            except OSError as exc:
                outcome = DataOutcome.WRITE_ERROR
                error = exc
    return DataResult(outcome=outcome, size=size, eight_bit=eight_bit, error=error)
