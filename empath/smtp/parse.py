"""Parsing of MAIL FROM / RCPT TO arguments (RFC 5321 §4.1.2, RFC 1869 parameters).

Pure functions: a parse error carries the exact reply the session sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from empath.addr import AddressError, Mailbox, parse_mailbox

__all__ = ["PathArgs", "ReplyError", "parse_path_args"]

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value = 1*(%d33-60 / %d62-126)
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VALUE_FORBIDDEN = re.compile(r"[\x00-\x20=\x7f]")


class ReplyError(Exception):
    """A parse failure; ``reply`` is the full SMTP reply line to send."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class PathArgs:
    raw: str  # the address between the angle brackets, as sent ("" for <>)
    mailbox: Mailbox | None  # None for the null path or bare <Postmaster>
    params: dict[str, str | None] = field(default_factory=dict)  # keyword upper-cased


def parse_path_args(
    arg: str,
    keyword: str,
    *,
    allow_utf8: bool,
    allow_null: bool,
    allow_postmaster: bool,
    bad_address_code: str,
) -> PathArgs:
    """Parse ``FROM:<addr> [params]`` or ``TO:<addr> [params]``.

    ``keyword`` is ``FROM:`` or ``TO:``. ``bad_address_code`` is the enhanced code for a
    syntactically bad address (5.1.7 for senders, 5.1.3 for recipients).
    """
    syntax = f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}:<address>"
    if arg[: len(keyword)].upper() != keyword:
        raise ReplyError(syntax)
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise ReplyError(syntax)
    end = rest.find(">")
    if end < 0:
        raise ReplyError(syntax)
    raw = rest[1:end]
    tail = rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise ReplyError(syntax)
    # Source routes (@a,@b:user@c) must be accepted and ignored (RFC 5321 §4.1.2, C.).
    if raw.startswith("@"):
        colon = raw.find(":")
        if colon < 0:
            raise ReplyError(f"501 {bad_address_code} Bad address syntax")
        raw = raw[colon + 1 :]
    mailbox: Mailbox | None
    if raw == "":
        if not allow_null:
            raise ReplyError(f"501 {bad_address_code} Null address not allowed here")
        mailbox = None
    elif allow_postmaster and raw.lower() == "postmaster":
        mailbox = None
    else:
        if not raw.isascii() and not allow_utf8:
            raise ReplyError("553 5.6.7 Non-ASCII address requires SMTPUTF8")
        try:
            mailbox = parse_mailbox(raw, allow_utf8=allow_utf8)
        except AddressError as exc:
            raise ReplyError(f"501 {bad_address_code} Bad address syntax: {exc}") from None
    params: dict[str, str | None] = {}
    for token in tail.split():
        key, eq, value = token.partition("=")
        if not _KEYWORD.match(key) or (eq and (not value or _VALUE_FORBIDDEN.search(value))):
            raise ReplyError(f"501 5.5.4 Bad parameter syntax: {token[:40]}")
        ukey = key.upper()
        if ukey in params:
            raise ReplyError(f"501 5.5.4 Duplicate parameter {ukey}")
        params[ukey] = value if eq else None
    return PathArgs(raw=raw, mailbox=mailbox, params=params)
