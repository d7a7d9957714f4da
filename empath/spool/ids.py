"""Queue ids: ULID-like, sortable by creation time, unique without coordination.

An id is 26 Crockford base32 characters (upper case) encoding 128 bits: a 48-bit
unix time in milliseconds followed by 80 random bits. Because the time comes first
and the alphabet is in ASCII order, sorting ids as strings sorts messages by the
millisecond they were created; within one millisecond the order is arbitrary.

Uniqueness comes from the 80 random bits alone (no counter, no pid, no lock), so
any number of threads and processes can mint ids at once, and a fork cannot make
parent and child repeat each other's sequence as a monotonic counter would.
"""

from __future__ import annotations

import os
import re
import time

__all__ = ["MESSAGE_ID_LENGTH", "is_message_id", "message_id_time", "new_message_id"]

# Crockford's alphabet: digits and upper-case letters without I, L, O, U.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
MESSAGE_ID_LENGTH = 26
# 26 × 5 = 130 bits for 128 bits of value: the first character carries only the
# top 3 bits, so it is 0–7. Anything else (lower case, separators, "..", "/")
# is refused, which is what lets ids be used as file names safely.
_ID_RE = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


def new_message_id() -> str:
    """Return a fresh id: 48-bit ms timestamp + 80 bits from the OS CSPRNG."""
    ms = time.time_ns() // 1_000_000
    n = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(MESSAGE_ID_LENGTH):
        chars.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(chars))


def is_message_id(s: object) -> bool:
    """True if ``s`` is a well-formed id (and therefore a safe file-name stem)."""
    return isinstance(s, str) and _ID_RE.fullmatch(s) is not None


def message_id_time(id: str) -> float:
    """The creation time (unix seconds, ms resolution) encoded in ``id``."""
    if not is_message_id(id):
        raise ValueError(f"not a message id: {id!r}")
    n = 0
    for c in id[:10]:  # the first 10 chars are bits 80–129: exactly the timestamp
        n = n << 5 | _DECODE[c]
    return n / 1000.0
