"""The DSN extension's ESMTP parameters on the receiving side (RFC 3461 §4, RFC 6533 §3).

MAIL FROM takes ``RET=FULL|HDRS`` and ``ENVID=<xtext>``; RCPT TO takes
``NOTIFY=NEVER|<list of SUCCESS,FAILURE,DELAY>`` and ``ORCPT=<addr-type>;<value>``.

Pure functions: each returns the value to keep in the spool record or raises
``ReplyError`` with the exact ``501 5.5.4`` reply. ENVID and ORCPT are returned as
received, still encoded, because that is the form they are passed on to the next
hop in (``empath.delivery.dsn`` decodes them for the report). Duplicate keywords
are refused earlier, by ``parse_path_args``.
"""

from __future__ import annotations

import re

from empath.smtp.parse import ReplyError

__all__ = [
    "MAX_ENVID",
    "MAX_ORCPT",
    "is_xtext",
    "parse_envid",
    "parse_notify",
    "parse_orcpt",
    "parse_ret",
]

# RFC 3461 §4.4 and §4.2; both limits apply to the value as sent (xtext-encoded).
MAX_ENVID = 100
MAX_ORCPT = 500

_NOTIFY_CONDITIONS = frozenset({"SUCCESS", "FAILURE", "DELAY"})

# RFC 3461 §4: xtext = *( xchar / hexchar ); xchar = "!".."~" except "+" and "=";
# hexchar = "+" followed by two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 6533 §3: utf-8-addr-xtext = 1*( QCHAR / EmbeddedUnicodeChar ), QCHAR being
# printable ASCII except "+", "=" and "\"; EmbeddedUnicodeChar = "\x{" HEXPOINT "}".
# With SMTPUTF8, utf-8-addr-unitext also allows UTF-8 characters as they are.
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")
_QCHAR = re.compile(r"[!-*,-<>-\[\]-~]")

_ADDR_TYPES = ("rfc822", "utf-8")


def _bad(keyword: str, why: str) -> ReplyError:
    return ReplyError(f"501 5.5.4 Bad {keyword} parameter: {why}")


def is_xtext(value: str) -> bool:
    """True when ``value`` is syntactically valid RFC 3461 xtext."""
    return _XTEXT.fullmatch(value) is not None


def _printable_xtext(value: str) -> bool:
    """Valid xtext whose decoded form is printable US-ASCII (space included)."""
    if not is_xtext(value):
        return False
    return all(0x20 <= int(m.group(1), 16) <= 0x7E for m in _HEXCHAR.finditer(value))


def parse_ret(value: str | None) -> str:
    """``RET=FULL|HDRS`` (any case) → ``"FULL"`` or ``"HDRS"``."""
    ret = (value or "").upper()
    if ret not in ("FULL", "HDRS"):
        raise _bad("RET", "must be FULL or HDRS")
    return ret


def parse_envid(value: str | None) -> str:
    """``ENVID=<xtext>`` → the xtext, unchanged."""
    if not value:
        raise _bad("ENVID", "a value is required")
    if len(value) > MAX_ENVID:
        raise _bad("ENVID", f"longer than {MAX_ENVID} characters")
    if not _printable_xtext(value):
        raise _bad("ENVID", "not xtext of printable US-ASCII (RFC 3461 4)")
    return value


def parse_notify(value: str | None) -> tuple[str, ...]:
    """``NOTIFY=NEVER`` or a comma list of SUCCESS, FAILURE, DELAY (any case).

    Returns the upper-cased values in the order given; a repeated condition is
    kept once (it asks for nothing more).
    """
    if not value:
        raise _bad("NOTIFY", "a value is required")
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return ("NEVER",)
    if "NEVER" in items:
        raise _bad("NOTIFY", "NEVER cannot be combined with other values")
    conditions: list[str] = []
    for item in items:
        if item not in _NOTIFY_CONDITIONS:
            raise _bad("NOTIFY", "must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        if item not in conditions:
            conditions.append(item)
    return tuple(conditions)


def parse_orcpt(value: str | None, *, smtputf8: bool) -> str:
    """``ORCPT=rfc822;<xtext>`` or ``ORCPT=utf-8;<utf-8-addr>`` → the value, unchanged.

    The address type is matched case-insensitively. For ``utf-8`` (RFC 6533) the
    address may carry UTF-8 characters as they are only in an SMTPUTF8 transaction.
    """
    if not value:
        raise _bad("ORCPT", "a value is required")
    if len(value) > MAX_ORCPT:
        raise _bad("ORCPT", f"longer than {MAX_ORCPT} characters")
    addr_type, sep, address = value.partition(";")
    if not sep or addr_type.lower() not in _ADDR_TYPES:
        raise _bad("ORCPT", "must be rfc822;<address> or utf-8;<address>")
    if not address:
        raise _bad("ORCPT", "empty address")
    if addr_type.lower() == "rfc822":
        if not _printable_xtext(address):
            raise _bad("ORCPT", "address is not xtext of printable US-ASCII (RFC 3461 4)")
    elif not _utf8_addr_ok(address, smtputf8=smtputf8):
        if not smtputf8 and not address.isascii():
            raise _bad("ORCPT", "UTF-8 characters require SMTPUTF8")
        raise _bad("ORCPT", "address is not a valid utf-8 address (RFC 6533 3)")
    return value


def _utf8_addr_ok(address: str, *, smtputf8: bool) -> bool:
    i = 0
    while i < len(address):
        ch = address[i]
        if ch == "\\":
            m = _UNICODE_ESCAPE.match(address, i)
            if m is None or not _scalar_ok(int(m.group(1), 16)):
                return False
            i = m.end()
            continue
        # Characters beyond ASCII, as they are, only in an SMTPUTF8 transaction;
        # a lone surrogate is an undecodable octet from the wire.
        unitext = smtputf8 and ord(ch) > 0x7F and _scalar_ok(ord(ch))
        if _QCHAR.fullmatch(ch) is None and not unitext:
            return False
        i += 1
    return True


def _scalar_ok(cp: int) -> bool:
    """A Unicode scalar value that is not a control character."""
    return (
        0x20 <= cp <= 0x10FFFF
        and cp != 0x7F
        and not 0x80 <= cp <= 0x9F
        and not 0xD800 <= cp <= 0xDFFF
    )
