"""Mail-loop evidence in a queued message: its ``Received:`` trace headers.

RFC 5321 §6.3: a message that has passed through too many hosts is looping and
must be bounced rather than relayed once more. Postfix counts ``Received:`` lines
against ``hopcount_limit`` (50); so do we, reading only the header section.
"""

from __future__ import annotations

from pathlib import Path

from empath.spool import open_message

__all__ = ["MAX_HOPS", "received_count"]

MAX_HOPS = 50
# The header section is read at most this far: a header larger than this is not
# a normal message, and a loop has shown itself long before.
_HEADER_LIMIT = 1024 * 1024


def received_count(path: Path, size: int | None = None) -> int:
    """Number of ``Received:`` fields in the header of the message at ``path`` (its
    first ``size`` octets when given: a queue file).

    Blocking, but small: it reads the header section only (at most 1 MiB), usually
    from the page cache.
    """
    count = 0
    read = 0
    with open_message(path, size) as f:
        for line in f:
            read += len(line)
            if line in (b"\r\n", b"\n") or read > _HEADER_LIMIT:
                break
            if line[:9].lower() == b"received:":
                count += 1
    return count
