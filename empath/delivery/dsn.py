"""Delivery status notifications: RFC 3464 bounces and delay warnings.

``build_dsn`` turns the results for one queued message into a
``multipart/report; report-type=delivery-status`` message (RFC 6522) with three
parts: a human explanation, the machine-readable report, and the original's
headers (or, for ``RET=FULL`` failures, the whole original, up to a size cap).
The bytes it returns use CRLF and keep every line under 998 octets, so the queue
can store them as they are.

The notification policy lives here too, so every caller applies the same rules:

* ``should_notify`` — RFC 3461 NOTIFY per recipient; never for the null sender.
* ``bounce_recipient`` / ``bounce_envelope_sender`` / ``dsn_metadata`` — who a
  DSN goes to and how it is marked, including the double-bounce rule.
* ``transport_flags`` — the BODY= and SMTPUTF8 a DSN must be queued with.

Conventions this module assumes of the spool record (``empath.spool.envelope``):
``Recipient.orcpt`` and ``Envelope.envid`` hold the ESMTP parameter values as
received, i.e. still xtext-encoded (``rfc822;a+2Bb@example.com``), because that is
the form they are passed on to the next hop in. The report shows them decoded,
as Postfix does: a reader wants the address, not its ESMTP encoding.
"""

from __future__ import annotations

import io
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO, Literal

from empath.delivery.types import RcptResult
from empath.spool.envelope import Envelope, Recipient

__all__ = [
    "DOUBLE_BOUNCE",
    "DSN_METADATA_KEY",
    "MAX_FULL_RETURN",
    "MAX_HEADER_RETURN",
    "DsnKind",
    "bounce_envelope_sender",
    "bounce_recipient",
    "build_dsn",
    "dsn_metadata",
    "should_notify",
    "transport_flags",
]

DsnKind = Literal["failure", "delay", "success"]

# RET=FULL returns the whole message only up to this size; beyond it the DSN
# carries the headers alone. Returning a 25 MB attachment to a sender whose own
# mailbox may be the reason it failed helps nobody, and Postfix caps it too
# (bounce_size_limit).
MAX_FULL_RETURN = 10 * 1024 * 1024
# Headers are read up to the first empty line; a message that is (nearly) all
# header must not turn into a huge DSN either.
MAX_HEADER_RETURN = 256 * 1024

# Key in ``Envelope.metadata`` marking a message as a DSN we generated, with the
# value "failure", "delay" or DOUBLE_BOUNCE (the queue manager uses the same
# names). Metadata never comes from the wire, so unlike a header the mark cannot
# be forged by a client.
DSN_METADATA_KEY = "dsn"
DOUBLE_BOUNCE = "double"

# RFC 5322 §2.1.1: at most 998 octets per line, CRLF excluded.
_MAX_LINE = 998
# Where to fold the fields and text we write ourselves (RFC 5322 SHOULD of 78).
_FOLD_AT = 78
# readline() bound while looking for the end of the header, so that a single
# enormous line cannot be pulled into memory in one piece.
_READ_LINE = 64 * 1024

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")  # RFC 6533 utf-8-addr-xtext
_NEWLINES = re.compile(rb"\r\n|\r|\n")
# A body line the 8bit/7bit content transfer encodings cannot carry.
_UNSAFE_BODY = re.compile(rb"[^\r\n]{999}|\x00")


# --- notification policy ----------------------------------------------------------


def should_notify(envelope: Envelope, recipient: Recipient, kind: DsnKind) -> bool:
    """Whether ``recipient``'s sender wants a ``kind`` DSN about it (RFC 3461 §4.1).

    * The null sender never gets one: a bounce is never bounced (RFC 5321 §4.5.5,
      RFC 3461 §6.2). Failed DSNs go to postmaster instead, see ``bounce_recipient``.
    * ``NOTIFY=NEVER`` suppresses every DSN.
    * With an explicit NOTIFY list, only the listed conditions are reported.
    * Without NOTIFY, RFC 3461 §4.1 says "FAILURE" (or "FAILURE,DELAY") is implied:
      failures are reported, and delays too; whether delay warnings are sent at
      all (and after how long) is the caller's configuration, as in Postfix.
    """
    if envelope.sender == "":
        return False
    notify = recipient.notify
    if notify is None:
        return kind in ("failure", "delay")  # success only when asked for
    if "NEVER" in notify:
        return False
    return {"failure": "FAILURE", "delay": "DELAY", "success": "SUCCESS"}[kind] in notify


def bounce_envelope_sender() -> str:
    """The envelope sender of every DSN: the null reverse-path ``<>``.

    RFC 5321 §4.5.5 and RFC 3461 §6.2: a notification must not be able to cause
    another one, which the null sender guarantees (``should_notify`` is False
    for it, and remote MTAs treat ``<>`` the same way).
    """
    return ""


def bounce_recipient(
    envelope: Envelope, *, postmaster: str | None = None, kind: DsnKind = "failure"
) -> str | None:
    """Who gets a DSN about ``envelope``'s recipients, or None for nobody.

    * Normally the original envelope sender.
    * Never the null sender: the failed message was itself a bounce (or another
      automatic message), and bouncing bounces is how mail loops start. Without
      ``postmaster`` the answer for it is None.
    * Double bounce: a failed null-sender message means some sender will never
      learn what happened to their mail. That deserves a human's attention, so —
      as Postfix does for ``2bounce`` — a failure notice goes to ``postmaster``
      (pass the configured address) instead. It is queued from the null sender
      too, marked ``{DSN_METADATA_KEY: DOUBLE_BOUNCE}`` (see ``dsn_metadata``);
      if that notice fails in turn, nobody is told: the chain ends there, after
      at most one message to the postmaster. Delays of null-sender mail are
      never reported (``kind="delay"`` gives None).
    """
    if envelope.sender != "":
        return envelope.sender
    if kind != "failure" or not postmaster:
        return None
    if envelope.metadata.get(DSN_METADATA_KEY) == DOUBLE_BOUNCE:
        return None
    return postmaster


def dsn_metadata(failed: Envelope, kind: DsnKind) -> dict[str, str]:
    """The ``Envelope.metadata`` to queue a DSN about ``failed`` with.

    It marks the DSN as ours — ``kind``, or DOUBLE_BOUNCE when ``failed`` had the
    null sender — so that ``bounce_recipient`` ends the chain if it fails.
    """
    if failed.sender == "":
        return {DSN_METADATA_KEY: DOUBLE_BOUNCE}
    return {DSN_METADATA_KEY: kind}


def transport_flags(dsn: bytes, *, failed: Envelope, recipient: str) -> tuple[str, bool]:
    """``(body, smtputf8)`` for queueing ``dsn`` (from ``build_dsn``) to ``recipient``.

    The DSN carries 8-bit octets when the original or a diagnostic did, so it must
    travel as ``BODY=8BITMIME``; it needs SMTPUTF8 when the original did (its
    headers and addresses appear in it) or when the recipient address is UTF-8.
    """
    body = "7BIT" if dsn.isascii() else "8BITMIME"
    return body, failed.smtputf8 or not recipient.isascii()


# --- building the report ------------------------------------------------------------


def build_dsn(
    *,
    envelope: Envelope,
    results: Sequence[RcptResult],
    kind: DsnKind,
    hostname: str,
    original: BinaryIO | bytes,
    now: float,
    message_id_domain: str | None = None,
    recipient: str | None = None,
    will_retry_until: float | None = None,
    max_full_return: int = MAX_FULL_RETURN,
) -> bytes:
    """Build the DSN for ``results`` (the recipients to report) of ``envelope``.

    ``original`` is the queued message, as bytes or as a binary stream positioned
    at its start; only the header is read unless ``RET=FULL`` applies, and never
    more than ``max_full_return`` + 1 bytes. ``recipient`` is the DSN's ``To:``
    (default: the original sender; for a double bounce pass the configured
    postmaster — ``bounce_recipient`` — else ``postmaster@hostname`` is used).
    ``will_retry_until`` is when a delayed message expires (delay DSNs only).

    Queue the result from ``bounce_envelope_sender()`` with ``dsn_metadata`` and
    the ``transport_flags``. Raises ValueError when there is nothing to report.
    """
    if kind not in ("failure", "delay", "success"):
        raise ValueError(f"unknown DSN kind {kind!r}")
    if not results:
        raise ValueError("a DSN needs at least one recipient result")
    if recipient is None:
        # A DSN about a null-sender message can only be a double bounce, which
        # is for the postmaster; without the configured address, this host's
        # postmaster (which RFC 5321 §4.5.1 requires to exist) is named.
        recipient = envelope.sender or f"postmaster@{hostname}"
    to = _clean(recipient)
    if not to:
        raise ValueError("empty recipient for the DSN")

    stream: BinaryIO = io.BytesIO(original) if isinstance(original, bytes | bytearray) else original
    # RFC 3461 §4.3: RET governs "failed" DSNs; delay warnings carry headers only.
    want_full = kind == "failure" and envelope.ret == "FULL"
    returned = _read_original(
        stream, full=want_full, max_full=max_full_return, smtputf8=envelope.smtputf8
    )

    if kind == "success":
        returned.label = ""
    status_text = _delivery_status(envelope, results, kind, hostname, now, will_retry_until)
    global_status = envelope.smtputf8 or not status_text.isascii()
    human = _human_text(envelope, results, kind, hostname, now, will_retry_until, returned)

    parts: list[tuple[list[str], bytes]] = []
    parts.append((_text_headers(human), human.encode()))
    parts.append(
        (
            [
                "Content-Description: Delivery report",
                "Content-Type: message/global-delivery-status"
                if global_status
                else "Content-Type: message/delivery-status",
                *(["Content-Transfer-Encoding: 8bit"] if not status_text.isascii() else []),
            ],
            status_text.encode(),
        )
    )
    parts.append((returned.part_headers(), returned.content))

    boundary = _boundary(now, hostname, [content for _, content in parts])
    eight_bit = any(not content.isascii() for _, content in parts)
    subject = {
        "failure": "Undelivered Mail Returned to Sender",
        "delay": "Delayed Mail (still being retried)",
        "success": "Successful Mail Delivery Report",
    }[kind]
    mid_domain = message_id_domain or hostname
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(12)}@{mid_domain}>",
        # RFC 3834 §5: a notification is an automatic reply to the message; it
        # keeps vacation responders and the like from answering it.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if eight_bit:
        # RFC 2045 §6.4: a multipart's encoding must not be narrower than its parts'.
        headers.append("Content-Transfer-Encoding: 8bit")

    out = bytearray()
    out += _lines(headers)
    out += b"\r\nThis is a MIME-encapsulated message.\r\n"
    for part_headers, content in parts:
        out += b"\r\n--" + boundary.encode() + b"\r\n"
        out += _lines(part_headers)
        out += b"\r\n"
        out += content
    out += b"\r\n--" + boundary.encode() + b"--\r\n"
    return bytes(out)


@dataclass
class _Returned:
    """What of the original goes into the third part, and how it is labelled."""

    content: bytes  # CRLF line endings, ends with CRLF (or is empty)
    full: bool  # the whole message, not just the header
    utf8: bool  # RFC 6532 UTF-8 header: label it message/global*
    note: str | None = None  # why a requested full return was not made
    label: str = "Undelivered "  # part description prefix; "" in a success report

    def part_headers(self) -> list[str]:
        if self.full:
            ctype = "message/global" if self.utf8 else "message/rfc822"
            desc = f"{self.label}Message"
        else:
            ctype = "message/global-headers" if self.utf8 else "text/rfc822-headers"
            desc = f"{self.label}Message Headers"
        headers = [f"Content-Description: {desc}", f"Content-Type: {ctype}"]
        if not self.content.isascii():
            headers.append("Content-Transfer-Encoding: 8bit")
        return headers


def _read_original(stream: BinaryIO, *, full: bool, max_full: int, smtputf8: bool) -> _Returned:
    note: str | None = None
    if full:
        data = _read_up_to(stream, max_full + 1)
        if len(data) > max_full:
            note = f"it is larger than {max_full // (1024 * 1024)} MB"
        else:
            data = _NEWLINES.sub(b"\r\n", data)
            if _UNSAFE_BODY.search(data) is None:
                if data and not data.endswith(b"\r\n"):
                    data += b"\r\n"
                header = data.split(b"\r\n\r\n", 1)[0]
                return _Returned(data, full=True, utf8=smtputf8 or _is_utf8_8bit(header))
            note = "it has lines too long or NUL characters for a mail message"
        stream = io.BytesIO(data)
    header = _fit_lines(_NEWLINES.sub(b"\r\n", _read_header(stream)).replace(b"\x00", b""))
    return _Returned(header, full=False, utf8=smtputf8 or _is_utf8_8bit(header), note=note)


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    # A raw (unbuffered) stream may return short reads before EOF.
    chunks: list[bytes] = []
    while n > 0:
        chunk = stream.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_header(stream: BinaryIO) -> bytes:
    """The header section of the message in ``stream``: up to the first empty line.

    At most MAX_HEADER_RETURN bytes, cut before a header field that does not fit
    (a half field would be misleading, and folded continuations would dangle).
    """
    out = bytearray()
    field_start = 0  # offset in ``out`` of the last header field's first line
    at_line_start = True
    while True:
        line = stream.readline(_READ_LINE)
        if not line:
            break
        if at_line_start and line in (b"\r\n", b"\n"):
            break
        if at_line_start and line[:1] not in (b" ", b"\t"):
            field_start = len(out)
        if len(out) + len(line) > MAX_HEADER_RETURN:
            del out[field_start:]
            break
        out += line
        at_line_start = line.endswith(b"\n")
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return bytes(out)


def _fit_lines(block: bytes) -> bytes:
    """Fold header lines longer than 998 octets, so the DSN stays valid mail.

    Folding inserts CRLF + space, which RFC 5322 readers unfold to a space: the
    copy stays readable, and it is only a diagnostic copy. Cuts avoid the middle
    of a UTF-8 sequence.
    """
    if not block:
        return block
    out: list[bytes] = []
    for line in block.split(b"\r\n")[:-1]:  # the block ends with CRLF
        while len(line) > _MAX_LINE:
            cut = _MAX_LINE - 8
            while cut > 1 and 0x80 <= line[cut] <= 0xBF:
                cut -= 1
            out.append(line[:cut])
            line = b" " + line[cut:]
        out.append(line)
    return b"\r\n".join(out) + b"\r\n"


def _is_utf8_8bit(data: bytes) -> bool:
    """8-bit and valid UTF-8: an RFC 6532 header. Other 8-bit junk (legacy
    charsets sent raw) is not UTF-8, so labelling it message/global* would lie."""
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _delivery_status(
    envelope: Envelope,
    results: Sequence[RcptResult],
    kind: DsnKind,
    hostname: str,
    now: float,
    will_retry_until: float | None,
) -> str:
    """The message/delivery-status body (RFC 3464 §2.1): per-message fields, then
    one block per recipient, blocks separated by an empty line. No empty line at
    the end: the grammar has none, and parsers would see an empty block."""
    lines: list[str] = []
    envid = _decode_xtext(envelope.envid) if envelope.envid is not None else None
    if envid:
        lines += _field("Original-Envelope-Id", envid)
    lines += _field("Reporting-MTA", f"dns; {hostname}")
    lines += _field("Arrival-Date", _date(envelope.received_at))
    # Extension fields (RFC 3464 §2.4) so the postmaster can find the message in
    # logs and `empathctl queue show`, as Postfix does with X-Postfix-Queue-ID.
    lines += _field("X-Empath-Queue-ID", envelope.id)
    if envelope.sender:
        lines += _field("X-Empath-Sender", _address_field(envelope.sender))

    by_address = {r.address: r for r in envelope.recipients}
    by_lower = {r.address.lower(): r for r in envelope.recipients}
    default_status = {"failure": "5.0.0", "delay": "4.0.0", "success": "2.0.0"}[kind]
    for result in results:
        lines.append("")  # ends the previous block
        rcpt = by_address.get(result.address) or by_lower.get(result.address.lower())
        if rcpt is not None and rcpt.orcpt:
            lines += _field("Original-Recipient", _orcpt_field(rcpt.orcpt))
        lines += _field("Final-Recipient", _address_field(result.address))
        action: str
        if kind == "success":
            action = result.success_action or "delivered"
        else:
            action = "failed" if kind == "failure" else "delayed"
        lines += _field("Action", action)
        # An expired message may well fail with a 4.x.x status (the last error
        # was temporary), so the status is reported as it is, not forced to 5.
        status = result.enhanced if _ENHANCED.fullmatch(result.enhanced) else default_status
        lines += _field("Status", status)
        if result.remote_mta:
            lines += _field("Remote-MTA", f"dns; {_clean(result.remote_mta)}")
        if result.code is not None or result.text:
            lines += _field("Diagnostic-Code", _clean(result.diagnostic))
        lines += _field("Last-Attempt-Date", _date(now))
        if kind == "delay" and will_retry_until is not None:
            lines += _field("Will-Retry-Until", _date(will_retry_until))
    return "".join(line + "\r\n" for line in lines)


def _human_text(
    envelope: Envelope,
    results: Sequence[RcptResult],
    kind: DsnKind,
    hostname: str,
    now: float,
    will_retry_until: float | None,
    returned: _Returned,
) -> str:
    paras: list[str] = [f"This is the mail system at host {hostname}."]
    attached = "message" if returned.full else "message's headers"
    if kind == "success":
        paras.append(
            "Your message was successfully delivered to the destinations listed "
            "below (\"relayed\" means it was passed on to a system that does not "
            f"report delivery). A delivery report and your {attached} are attached."
        )
    elif kind == "failure":
        paras.append(
            "Your message could not be delivered to one or more recipients. The "
            f"reasons are listed below; a delivery report and your {attached} are "
            "attached."
        )
    else:
        paras.append("THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.")
        until = (
            f"until {_date(will_retry_until)}"
            if will_retry_until is not None
            else "until it expires"
        )
        paras.append(
            "Your message has not yet been delivered to the recipients listed below "
            f"after {_age(now - envelope.received_at)}. The mail system will keep "
            f"trying {until}, and tell you if it gives up."
        )
    if envelope.sender == "":
        # Only a double bounce reaches this point (see bounce_recipient): say why
        # the postmaster, not the sender, is reading it.
        paras.append(
            "The undeliverable message was itself a delivery status notification "
            "(its envelope sender is empty), so this report goes to the postmaster."
        )
    if returned.note:
        paras.append(f"Only the headers of your message are attached because {returned.note}.")
    paras.append(f"Queue ID {envelope.id}, received {_date(envelope.received_at)}.")

    out: list[str] = []
    for para in paras:
        out += textwrap.wrap(para, width=_FOLD_AT - 2, break_on_hyphens=False)
        out.append("")
    for result in results:
        out.append(f"<{_clean(result.address)}>:")
        reply = _clean(result.text)
        if result.code is not None:
            reply = f"{result.code} {result.enhanced} {reply}"
        elif result.enhanced:
            reply = f"{result.enhanced} {reply}"
        if result.remote_mta:
            reply = f"host {_clean(result.remote_mta)} said: {reply}"
        out += textwrap.wrap(
            reply,
            width=_FOLD_AT - 2,
            initial_indent="    ",
            subsequent_indent="    ",
            break_on_hyphens=False,
        ) or ["    (no details)"]
        out.append("")
    return "".join(line + "\r\n" for line in out[:-1])


def _text_headers(text: str) -> list[str]:
    headers = ["Content-Description: Notification"]
    if text.isascii():
        headers.append("Content-Type: text/plain; charset=us-ascii")
    else:
        headers += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return headers


# --- small helpers --------------------------------------------------------------------


def _clean(text: str) -> str:
    """One line of printable text from anything a remote server or client said.

    Control characters (CR, LF: header injection and broken fields) and runs of
    white space become single spaces; strings carrying surrogate escapes (raw
    bytes from the wire) are re-decoded as UTF-8 with replacement characters.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    text = raw.decode("utf-8", "replace")
    return " ".join(_CONTROL.sub(" ", text).split())


def _address_field(address: str) -> str:
    """``address-type; address`` for Final-Recipient and friends. A UTF-8 address
    uses RFC 6533's "utf-8" type (it appears only in global-delivery-status)."""
    address = _clean(address)
    return f"rfc822;{address}" if address.isascii() else f"utf-8;{address}"


def _orcpt_field(orcpt: str) -> str:
    """``Original-Recipient`` value from an ORCPT parameter ``addr-type;xtext``."""
    addr_type, sep, value = orcpt.partition(";")
    if not sep:  # not in parameter form: take it as a plain address
        return _address_field(orcpt)
    addr_type = _clean(addr_type) or "rfc822"
    decoded = _decode_xtext(value)
    if addr_type.lower() == "utf-8":
        decoded = _UNICODE_ESCAPE.sub(lambda m: _chr(m.group(1), m.group(0)), decoded)
    if not decoded.isascii() and addr_type.lower() == "rfc822":
        addr_type = "utf-8"
    return f"{addr_type};{decoded}"


def _decode_xtext(value: str) -> str:
    """RFC 3461 §4 xtext → text; the encoded form when the decoded one would not
    be a printable line (xtext can smuggle CR LF and NUL)."""
    try:
        decoded = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
        decoded = decoded.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return _clean(value)
    if _CONTROL.search(decoded):
        return _clean(value)
    return _clean(decoded)


def _chr(hexdigits: str, fallback: str) -> str:
    cp = int(hexdigits, 16)
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF or cp < 0x20 or cp == 0x7F:
        return fallback
    return chr(cp)


def _field(name: str, value: str) -> list[str]:
    """A header-style field folded at spaces to about 78 columns (RFC 5322 §2.2.3).

    A "word" too long for one line is cut hard so no line exceeds 998 octets;
    continuation lines start with a space, which unfolding turns back into one.
    """
    words: list[str] = []
    for word in value.split(" "):
        # 240 characters are at most 960 octets in UTF-8, under the 998 limit.
        words += [word[i : i + 240] for i in range(0, len(word), 240)] or [""]
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > _FOLD_AT and current.strip() not in (f"{name}:", ""):
            lines.append(current)
            current = ""
        current += " " + word
    lines.append(current)
    return lines


def _lines(lines: Iterable[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


def _date(t: float) -> str:
    # Clamped to years 1970..9999: a damaged but finite time in an envelope must
    # not make the bounce impossible to build (datetime refuses other years).
    t = min(max(t, 0.0), 253402300799.0)
    # "+0000", not "-0000": we know the time is UTC (RFC 5322 §3.3).
    return format_datetime(datetime.fromtimestamp(t, tz=UTC))


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 2 * 3600:
        n, unit = round(seconds / 60), "minute"
    elif seconds < 2 * 86400:
        n, unit = round(seconds / 3600), "hour"
    else:
        n, unit = round(seconds / 86400), "day"
    return f"{n} {unit}" + ("" if n == 1 else "s")


def _boundary(now: float, hostname: str, contents: Sequence[bytes]) -> str:
    """A boundary that occurs in none of the parts (RFC 2046 §5.1.1): random, and
    checked, since a returned message could contain anything."""
    while True:
        boundary = f"{int(now)}.{secrets.token_hex(12)}/{hostname}"[:70]
        marker = b"--" + boundary.encode()
        if not any(marker in content for content in contents):
            return boundary
