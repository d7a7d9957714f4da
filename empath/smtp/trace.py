"""The ``Received:`` trace header (RFC 5321 §4.4, RFC 3848 protocol names)."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

__all__ = ["received_header", "with_protocol"]


def with_protocol(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP…"""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if utf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


_date_cache: tuple[int, str] = (-1, "")


def _date(timestamp: float) -> str:
    """RFC 5322 date of ``timestamp`` (UTC), formatted once per second: every message
    received in the same second carries the same text anyway."""
    global _date_cache
    second = int(timestamp)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.format_datetime(datetime.fromtimestamp(second, UTC)))
    return _date_cache[1]


def _clean(text: str) -> str:
    # The HELO name is client-controlled: keep it printable and free of comment syntax
    # so it cannot forge structure in the header.
    out = "".join(c if c.isprintable() and c not in "()\\" else "?" for c in text)
    return out[:255] or "unknown"


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    tls_info: str | None,
    timestamp: float,
) -> bytes:
    """Build the header, folded at 78 columns, ending in CRLF.

    ``for <addr>`` is given only for a single recipient: listing several would disclose
    Bcc recipients to each other.
    """
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    parts = [f"from {_clean(helo)} ([{ip}])", f"by {hostname} (empath)"]
    if tls_info:
        parts.append(f"({_clean(tls_info)})")
    parts.append(f"with {protocol} id {queue_id}")
    if len(recipients) == 1:
        parts.append(f"for <{recipients[0]}>")
    text = "Received: " + "\r\n\t".join(parts) + ";\r\n\t" + _date(timestamp) + "\r\n"
    return text.encode("utf-8", "surrogateescape")
