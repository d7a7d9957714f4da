"""RFC 3464 DSNs: built, parsed back with the stdlib ``email`` package, checked field by field."""

from __future__ import annotations

import email
import email.policy
import io
import re
from email.message import EmailMessage, MIMEPart
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath.delivery.dsn import (
    DOUBLE_BOUNCE,
    DSN_METADATA_KEY,
    MAX_FULL_RETURN,
    MAX_HEADER_RETURN,
    bounce_envelope_sender,
    bounce_recipient,
    build_dsn,
    dsn_metadata,
    should_notify,
    transport_flags,
)
from empath.delivery.types import RcptResult
from empath.spool.envelope import Envelope, Recipient
from empath.spool.ids import new_message_id

HOST = "mx.example.com"
RECEIVED = 1_700_000_000.0
NOW = RECEIVED + 3 * 3600
DATE_RECEIVED = "Tue, 14 Nov 2023 22:13:20 +0000"
DATE_NOW = "Wed, 15 Nov 2023 01:13:20 +0000"

ORIGINAL = (
    b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
    b"\tby mx.example.com with ESMTP id X; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <q3@example.org>\r\n"
    b"\r\n"
    b"The secret body text.\r\n"
    b"Second line.\r\n"
)
ORIGINAL_HEADERS = ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"

USER_UNKNOWN = RcptResult(
    "bob@example.net", "bounced", "5.1.1", "<bob@example.net>: user unknown", 550, "mx.example.net"
)


def make_env(**kw: Any) -> Envelope:
    fields: dict[str, Any] = {
        "id": new_message_id(),
        "sender": "alice@example.org",
        "recipients": [Recipient("bob@example.net", state="bounced")],
        "received_at": RECEIVED,
        "client_addr": "192.0.2.7",
        "client_port": 40000,
        "helo": "client.example.org",
    }
    fields.update(kw)
    return Envelope(**fields)


def build(env: Envelope, results: list[RcptResult], **kw: Any) -> bytes:
    args: dict[str, Any] = {
        "envelope": env,
        "results": results,
        "kind": "failure",
        "hostname": HOST,
        "original": ORIGINAL,
        "now": NOW,
    }
    args.update(kw)
    dsn = build_dsn(**args)
    assert_wire_format(dsn)
    return dsn


def assert_wire_format(data: bytes) -> None:
    """CRLF everywhere, no bare CR or LF, no line over 998 octets (RFC 5322 §2.1.1)."""
    assert data.endswith(b"\r\n")
    for n, line in enumerate(data.split(b"\r\n")[:-1]):
        assert b"\n" not in line, f"bare LF in line {n}: {line[:80]!r}"
        assert b"\r" not in line, f"bare CR in line {n}: {line[:80]!r}"
        assert len(line) <= 998, f"line {n} has {len(line)} octets"


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.defects == []
    return msg


def raw_parts(data: bytes, msg: EmailMessage) -> list[tuple[bytes, bytes]]:
    """(headers, content) of each top-level part, exactly as on the wire."""
    boundary = msg.get_boundary()
    assert boundary is not None
    delim = b"\r\n--" + boundary.encode()
    chunks = data.split(delim)
    assert chunks[-1] == b"--\r\n", "closing delimiter ends the message"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, sep, content = chunk[2:].partition(b"\r\n\r\n")
        assert sep
        parts.append((head, content))
    return parts


def status_blocks(content: bytes) -> list[list[tuple[str, str]]]:
    """Parse a (global-)delivery-status body into blocks of unfolded (name, value)."""
    text = content.decode("utf-8")
    blocks = []
    for block in text.split("\r\n\r\n"):
        fields: list[tuple[str, str]] = []
        for line in block.split("\r\n"):
            if not line:
                continue
            if line[0] in " \t":
                name, value = fields[-1]
                fields[-1] = (name, value + line)
            else:
                name, sep, value = line.partition(":")
                assert sep, f"not a field: {line!r}"
                fields.append((name, value.strip()))
        blocks.append(fields)
    return blocks


def structure(data: bytes) -> tuple[EmailMessage, list[MIMEPart]]:
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert len(parts) == 3
    return msg, parts


# --- one failed recipient -------------------------------------------------------------


def test_single_failure_field_by_field() -> None:
    env = make_env()
    data = build(env, [USER_UNKNOWN])
    msg, parts = structure(data)

    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.example\.com>", msg["Message-ID"])
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert data.isascii()
    assert transport_flags(data, failed=env, recipient="alice@example.org") == ("7BIT", False)

    # The human part names the recipient, the remote MTA and what it said.
    human = parts[0].get_content()
    assert "<bob@example.net>:" in human
    assert "host mx.example.net said: 550 5.1.1 <bob@example.net>: user unknown" in " ".join(
        human.split()
    )
    assert env.id in human

    # The report, parsed by the stdlib and by hand, agrees field for field.
    stdlib_blocks = parts[1].get_payload()
    assert isinstance(stdlib_blocks, list)
    assert len(stdlib_blocks) == 2
    _, status = raw_parts(data, msg)[1]
    blocks = status_blocks(status)
    assert blocks == [
        [
            ("Reporting-MTA", f"dns; {HOST}"),
            ("Arrival-Date", DATE_RECEIVED),
            ("X-Empath-Queue-ID", env.id),
            ("X-Empath-Sender", "rfc822;alice@example.org"),
        ],
        [
            ("Final-Recipient", "rfc822;bob@example.net"),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.net"),
            ("Diagnostic-Code", "smtp; 550 5.1.1 <bob@example.net>: user unknown"),
            ("Last-Attempt-Date", DATE_NOW),
        ],
    ]
    assert [list(b.items()) for b in stdlib_blocks if not isinstance(b, str)] == blocks

    # Default RET: headers only; the body never leaves in a bounce.
    assert parts[2].get_content().replace("\r\n", "\n") == ORIGINAL_HEADERS.decode().replace(
        "\r\n", "\n"
    )
    assert b"secret body" not in data


def test_message_ids_unique_and_domain_overridable() -> None:
    env = make_env()
    ids = {parse(build(env, [USER_UNKNOWN]))["Message-ID"] for _ in range(50)}
    assert len(ids) == 50
    msg = parse(build(env, [USER_UNKNOWN], message_id_domain="bounces.example.com"))
    assert msg["Message-ID"].endswith("@bounces.example.com>")


# --- several recipients -----------------------------------------------------------------


def test_several_recipients_mixed_codes_mta_and_orcpt() -> None:
    env = make_env(
        envid="QQ314159+2Bx",
        recipients=[
            # ORCPT as received: xtext, "+2B" is "+".
            Recipient("bob@example.net", orcpt="rfc822;Bob+2Bsales@Example.NET"),
            Recipient("carol@null.example"),
            Recipient("dave@example.net", orcpt="rfc822;dave@example.net"),
            Recipient("erin@slow.example"),
        ],
    )
    results = [
        USER_UNKNOWN,
        RcptResult("carol@null.example", "bounced", "5.1.10", "null MX: domain accepts no mail"),
        RcptResult("dave@example.net", "bounced", "5.2.2", "mailbox full", 552, "mx2.example.net"),
        # Expired in the queue after temporary errors: failed, but with the 4.x.x
        # status that was last seen (as Postfix reports it).
        RcptResult("erin@slow.example", "bounced", "4.4.7", "connection timed out; gave up", None),
    ]
    data = build(env, results)
    msg, parts = structure(data)
    blocks = status_blocks(raw_parts(data, msg)[1][1])
    assert blocks[0][0] == ("Original-Envelope-Id", "QQ314159+x")
    assert blocks[0][1] == ("Reporting-MTA", f"dns; {HOST}")
    assert blocks[1:] == [
        [
            ("Original-Recipient", "rfc822;Bob+sales@Example.NET"),
            ("Final-Recipient", "rfc822;bob@example.net"),
            ("Action", "failed"),
            ("Status", "5.1.1"),
            ("Remote-MTA", "dns; mx.example.net"),
            ("Diagnostic-Code", "smtp; 550 5.1.1 <bob@example.net>: user unknown"),
            ("Last-Attempt-Date", DATE_NOW),
        ],
        [
            ("Final-Recipient", "rfc822;carol@null.example"),
            ("Action", "failed"),
            ("Status", "5.1.10"),
            ("Diagnostic-Code", "X-Empath; null MX: domain accepts no mail"),
            ("Last-Attempt-Date", DATE_NOW),
        ],
        [
            ("Original-Recipient", "rfc822;dave@example.net"),
            ("Final-Recipient", "rfc822;dave@example.net"),
            ("Action", "failed"),
            ("Status", "5.2.2"),
            ("Remote-MTA", "dns; mx2.example.net"),
            ("Diagnostic-Code", "smtp; 552 5.2.2 mailbox full"),
            ("Last-Attempt-Date", DATE_NOW),
        ],
        [
            ("Final-Recipient", "rfc822;erin@slow.example"),
            ("Action", "failed"),
            ("Status", "4.4.7"),
            ("Diagnostic-Code", "X-Empath; connection timed out; gave up"),
            ("Last-Attempt-Date", DATE_NOW),
        ],
    ]
    human = " ".join(parts[0].get_content().split())
    for r in results:
        assert f"<{r.address}>:" in human
    assert "host mx2.example.net said: 552 5.2.2 mailbox full" in human
    assert "5.1.10 null MX: domain accepts no mail" in human


def test_orcpt_that_decodes_to_control_characters_stays_encoded() -> None:
    env = make_env(recipients=[Recipient("bob@example.net", orcpt="rfc822;a+0D+0AX:@b")])
    data = build(env, [USER_UNKNOWN])
    msg, _ = structure(data)
    blocks = status_blocks(raw_parts(data, msg)[1][1])
    assert blocks[1][0] == ("Original-Recipient", "rfc822;a+0D+0AX:@b")


# --- delay ----------------------------------------------------------------------------------


def test_delay_warning() -> None:
    env = make_env(ret="FULL")  # RET applies to failures only (RFC 3461 §4.3)
    until = RECEIVED + 5 * 86400
    result = RcptResult(
        "bob@example.net", "deferred", "4.2.1", "try again later", 421, "mx.example.net"
    )
    data = build(env, [result], kind="delay", will_retry_until=until)
    msg, parts = structure(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert [p.get_content_type() for p in parts][2] == "text/rfc822-headers"
    assert b"secret body" not in data
    blocks = status_blocks(raw_parts(data, msg)[1][1])
    assert blocks[1] == [
        ("Final-Recipient", "rfc822;bob@example.net"),
        ("Action", "delayed"),
        ("Status", "4.2.1"),
        ("Remote-MTA", "dns; mx.example.net"),
        ("Diagnostic-Code", "smtp; 421 4.2.1 try again later"),
        ("Last-Attempt-Date", DATE_NOW),
        ("Will-Retry-Until", "Sun, 19 Nov 2023 22:13:20 +0000"),
    ]
    human = " ".join(parts[0].get_content().split())
    assert "WARNING ONLY" in human
    assert "after 3 hours" in human
    assert "keep trying until Sun, 19 Nov 2023 22:13:20 +0000" in human


def test_delay_without_expiry_omits_will_retry_until() -> None:
    result = RcptResult("bob@example.net", "deferred", "4.4.1", "connection refused")
    data = build(make_env(), [result], kind="delay")
    msg, _ = structure(data)
    fields = dict(status_blocks(raw_parts(data, msg)[1][1])[1])
    assert "Will-Retry-Until" not in fields
    assert fields["Action"] == "delayed"
    assert "Remote-MTA" not in fields


# --- RET ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_ret_hdrs_and_default_return_headers_only(ret: str | None) -> None:
    data = build(make_env(ret=ret), [USER_UNKNOWN])
    msg, parts = structure(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert raw_parts(data, msg)[2][1] == ORIGINAL_HEADERS
    assert b"secret body" not in data


def test_ret_full_returns_the_whole_message() -> None:
    data = build(make_env(ret="FULL"), [USER_UNKNOWN])
    msg, parts = structure(data)
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2]["Content-Description"] == "Undelivered Message"
    inner = parts[2].get_payload(0)
    assert not isinstance(inner, str)
    assert inner["Subject"] == "quarterly numbers"
    assert inner["Message-ID"] == "<q3@example.org>"
    assert raw_parts(data, msg)[2][1] == ORIGINAL


def test_ret_full_8bit_body_is_labelled() -> None:
    original = ORIGINAL.replace(b"secret body", "gehéime Zahlen".encode())
    env = make_env(ret="FULL", body="8BITMIME")
    data = build(env, [USER_UNKNOWN], original=original)
    msg, parts = structure(data)
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert transport_flags(data, failed=env, recipient=env.sender) == ("8BITMIME", False)


def test_lf_only_original_is_converted_to_crlf() -> None:
    original = ORIGINAL.replace(b"\r\n", b"\n")
    for ret in ("FULL", "HDRS"):
        build(make_env(ret=ret), [USER_UNKNOWN], original=original)  # checks the wire format


def test_ret_full_with_overlong_lines_falls_back_to_headers() -> None:
    original = ORIGINAL + b"x" * 5000 + b"\r\n"
    data = build(make_env(ret="FULL"), [USER_UNKNOWN], original=original)
    _, parts = structure(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Only the headers" in parts[0].get_content()


def test_overlong_header_lines_are_folded() -> None:
    original = b"X-Long: " + b"a" * 3000 + b"\r\n" + ORIGINAL
    data = build(make_env(), [USER_UNKNOWN], original=original)
    msg, _ = structure(data)
    returned = raw_parts(data, msg)[2][1]
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", returned)
    assert unfolded.replace(b" ", b"").startswith(b"X-Long:" + b"a" * 3000 + b"\r\n")


class CountingReader(io.RawIOBase):
    """A file that records how many bytes were read from it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)


def test_20mb_original_with_ret_full_falls_back_to_headers(tmp_path: Path) -> None:
    path = tmp_path / "big.msg"
    line = b"A" * 76 + b"\r\n"
    with path.open("wb") as f:
        f.write(ORIGINAL)
        for _ in range(20 * 1024 * 1024 // len(line)):
            f.write(line)
    assert path.stat().st_size > 20 * 1024 * 1024
    with path.open("rb") as raw:
        reader = CountingReader(raw)
        data = build(make_env(ret="FULL"), [USER_UNKNOWN], original=reader)
    assert reader.bytes_read <= MAX_FULL_RETURN + 1
    assert len(data) < 16 * 1024
    msg, parts = structure(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert raw_parts(data, msg)[2][1] == ORIGINAL_HEADERS
    assert "larger than 10 MB" in " ".join(parts[0].get_content().split())


def test_headers_only_reads_no_further_than_the_header(tmp_path: Path) -> None:
    body = b"B" * 76 + b"\r\n"
    stream = io.BytesIO(ORIGINAL_HEADERS + b"\r\n" + body * 100_000)
    reader = CountingReader(stream)
    buffered = io.BufferedReader(reader, buffer_size=8192)
    build(make_env(), [USER_UNKNOWN], original=buffered)
    assert reader.bytes_read <= 2 * 8192


def test_message_that_is_all_header_is_capped() -> None:
    original = b"".join(b"X-Junk-%d: %s\r\n" % (i, b"j" * 60) for i in range(20_000))
    data = build(make_env(), [USER_UNKNOWN], original=original)
    assert len(data) < 300 * 1024
    msg, _ = structure(data)
    returned = raw_parts(data, msg)[2][1]
    assert returned.endswith(b"j" * 60 + b"\r\n")  # whole fields only
    assert MAX_HEADER_RETURN - 100 < len(returned) <= MAX_HEADER_RETURN  # and no fewer


def test_absurd_times_in_a_damaged_envelope_still_build() -> None:
    data = build(make_env(received_at=1e300), [USER_UNKNOWN])
    structure(data)


# --- SMTPUTF8 -------------------------------------------------------------------------------


def test_smtputf8_original_uses_global_types() -> None:
    sender = "ålice@exämple.org"
    rcpt = "用户@例子.广告"
    original = (
        f"From: Ålice <{sender}>\r\nTo: <{rcpt}>\r\nSubject: Grüße\r\n\r\nHallo\r\n"
    ).encode()
    env = make_env(
        sender=sender,
        smtputf8=True,
        body="8BITMIME",
        recipients=[
            Recipient(rcpt, orcpt="utf-8;\\x{7528}\\x{6237}@\\x{4F8B}\\x{5B50}.\\x{5E7F}\\x{544A}")
        ],
    )
    result = RcptResult(rcpt, "bounced", "5.1.1", "unbekannter Empfänger", 550, "mx.例子.广告")
    data = build(env, [result], original=original)
    msg, parts = structure(data)

    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    assert f"\r\nTo: <{sender}>\r\n" in head
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    raw = raw_parts(data, msg)
    assert b"Content-Transfer-Encoding: 8bit" in raw[1][0]
    assert b"Content-Transfer-Encoding: 8bit" in raw[2][0]
    assert raw[2][1] == original.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert parts[0].get_content_charset() == "utf-8"
    blocks = status_blocks(raw[1][1])
    assert blocks[0][-1] == ("X-Empath-Sender", f"utf-8;{sender}")
    assert blocks[1] == [
        ("Original-Recipient", f"utf-8;{rcpt}"),
        ("Final-Recipient", f"utf-8;{rcpt}"),
        ("Action", "failed"),
        ("Status", "5.1.1"),
        ("Remote-MTA", "dns; mx.例子.广告"),
        ("Diagnostic-Code", "smtp; 550 5.1.1 unbekannter Empfänger"),
        ("Last-Attempt-Date", DATE_NOW),
    ]
    assert transport_flags(data, failed=env, recipient=sender) == ("8BITMIME", True)

    full = build(env, [result], original=original, kind="failure", now=NOW)
    assert b"message/global-headers" in full
    env.ret = "FULL"
    full = build(env, [result], original=original)
    _, parts = structure(full)
    assert parts[2].get_content_type() == "message/global"


def test_8bit_utf8_headers_without_smtputf8_use_global_headers() -> None:
    original = "Subject: Grüße\r\n\r\nx\r\n".encode()
    data = build(make_env(), [USER_UNKNOWN], original=original)
    _, parts = structure(data)
    assert parts[1].get_content_type() == "message/delivery-status"  # the report is ASCII
    assert parts[2].get_content_type() == "message/global-headers"


def test_legacy_8bit_headers_are_not_labelled_utf8() -> None:
    original = b"Subject: Gr\xfc\xdfe\r\n\r\nx\r\n"  # Latin-1, not UTF-8
    data = build(make_env(), [USER_UNKNOWN], original=original)
    msg, parts = structure(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Content-Transfer-Encoding: 8bit" in raw_parts(data, msg)[2][0]


# --- hostile input stays well-formed -------------------------------------------------------


def test_diagnostic_injection_and_long_text() -> None:
    evil = RcptResult(
        "bob@example.net",
        "bounced",
        "5.7.1",
        "rejected\r\nAction: delivered\r\n\r\nX-Evil: 1 " + "y" * 3000,
        554,
        "mx.example.net\r\nX-Evil: 2",
    )
    data = build(make_env(), [evil])
    msg, _ = structure(data)
    blocks = status_blocks(raw_parts(data, msg)[1][1])
    assert len(blocks) == 2
    names = [name for name, _ in blocks[1]]
    assert names.count("Action") == 1
    assert "X-Evil" not in names
    fields = dict(blocks[1])
    assert fields["Action"] == "failed"
    assert fields["Diagnostic-Code"].startswith("smtp; 554 5.7.1 rejected Action: delivered X-Evil")


def test_invalid_enhanced_code_gets_a_generic_status() -> None:
    bad = RcptResult("bob@example.net", "bounced", "550", "odd server", 550)
    data = build(make_env(), [bad])
    msg, _ = structure(data)
    assert dict(status_blocks(raw_parts(data, msg)[1][1])[1])["Status"] == "5.0.0"


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=2000),
    code=st.one_of(st.none(), st.integers(400, 599)),
    mta=st.one_of(st.none(), st.text(min_size=1, max_size=300)),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
)
def test_any_diagnostic_yields_a_valid_message(
    text: str, code: int | None, mta: str | None, ret: str | None
) -> None:
    result = RcptResult("bob@example.net", "bounced", "5.0.0", text, code, mta)
    data = build(make_env(ret=ret), [result])  # checks the wire format
    msg, _ = structure(data)
    blocks = status_blocks(raw_parts(data, msg)[1][1])
    assert len(blocks) == 2
    assert [n for n, _ in blocks[1]][:3] == ["Final-Recipient", "Action", "Status"]


# --- refusals -----------------------------------------------------------------------------


def test_double_bounce_goes_to_postmaster() -> None:
    env = make_env(sender="", metadata={DSN_METADATA_KEY: "failure"})
    data = build(env, [USER_UNKNOWN], recipient="postmaster@example.com")
    msg, parts = structure(data)
    assert msg["To"].addresses[0].addr_spec == "postmaster@example.com"
    assert "postmaster" in parts[0].get_content()
    blocks = status_blocks(raw_parts(data, msg)[1][1])
    assert "X-Empath-Sender" not in dict(blocks[0])
    # Without the configured address: this host's postmaster, never "<>".
    msg = parse(build(env, [USER_UNKNOWN]))
    assert msg["To"].addresses[0].addr_spec == f"postmaster@{HOST}"


def test_no_results_is_an_error() -> None:
    with pytest.raises(ValueError):
        build(make_env(), [])


# --- NOTIFY (RFC 3461) and who gets the DSN ------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "notify", "failure", "delay"),
    [
        ("a@x", None, True, True),
        ("a@x", ("NEVER",), False, False),
        ("a@x", ("FAILURE",), True, False),
        ("a@x", ("DELAY",), False, True),
        ("a@x", ("SUCCESS",), False, False),
        ("a@x", ("FAILURE", "DELAY"), True, True),
        ("a@x", ("SUCCESS", "FAILURE"), True, False),
        ("a@x", ("SUCCESS", "DELAY"), False, True),
        ("a@x", ("SUCCESS", "FAILURE", "DELAY"), True, True),
        ("", None, False, False),
        ("", ("FAILURE", "DELAY"), False, False),
    ],
)
def test_should_notify_table(
    sender: str, notify: tuple[str, ...] | None, failure: bool, delay: bool
) -> None:
    env = make_env(sender=sender)
    rcpt = Recipient("bob@example.net", notify=notify)
    assert should_notify(env, rcpt, "failure") is failure
    assert should_notify(env, rcpt, "delay") is delay


@given(
    sender=st.sampled_from(["", "alice@example.org"]),
    notify=st.one_of(
        st.none(),
        st.lists(st.sampled_from(["NEVER", "SUCCESS", "FAILURE", "DELAY"]), unique=True).map(tuple),
    ),
    kind=st.sampled_from(["failure", "delay"]),
)
def test_should_notify_property(sender: str, notify: tuple[str, ...] | None, kind: Any) -> None:
    got = should_notify(make_env(sender=sender), Recipient("b@x", notify=notify), kind)
    keyword = "FAILURE" if kind == "failure" else "DELAY"
    if sender == "" or (notify is not None and "NEVER" in notify):
        assert got is False
    elif notify is None:
        assert got is True
    else:
        assert got is (keyword in notify)


def test_bounce_addressing_and_double_bounce_rule() -> None:
    pm = "postmaster@example.com"
    assert bounce_envelope_sender() == ""
    normal = make_env()
    assert bounce_recipient(normal) == "alice@example.org"
    assert bounce_recipient(normal, postmaster=pm) == "alice@example.org"
    assert bounce_recipient(normal, postmaster=pm, kind="delay") == "alice@example.org"
    assert dsn_metadata(normal, "failure") == {DSN_METADATA_KEY: "failure"}
    assert dsn_metadata(normal, "delay") == {DSN_METADATA_KEY: "delay"}

    # A bounce (ours or anyone's) that fails is never bounced to its null sender...
    for bounce in (
        make_env(sender=""),
        make_env(sender="", metadata=dsn_metadata(normal, "delay")),
    ):
        assert bounce_recipient(bounce) is None
        assert bounce_recipient(bounce, postmaster=pm, kind="delay") is None
        # ... but the postmaster hears about it, once, marked as a double bounce.
        assert bounce_recipient(bounce, postmaster=pm) == pm
        assert dsn_metadata(bounce, "failure") == {DSN_METADATA_KEY: DOUBLE_BOUNCE}

    # And the double bounce failing ends the chain.
    double = make_env(sender="", metadata=dsn_metadata(make_env(sender=""), "failure"))
    assert double.metadata == {DSN_METADATA_KEY: "double"}  # what the queue manager checks
    assert bounce_recipient(double, postmaster=pm) is None


def test_dsn_envelope_metadata_survives_the_spool_record() -> None:
    env = make_env(sender=bounce_envelope_sender(), metadata=dsn_metadata(make_env(), "failure"))
    assert Envelope.from_bytes(env.to_bytes()).metadata == {DSN_METADATA_KEY: "failure"}
