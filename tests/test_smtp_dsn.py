"""The DSN extension (RFC 3461) on the receiving side, seen from the wire.

EHLO offers ``DSN``; ``RET``/``ENVID`` on MAIL FROM and ``NOTIFY``/``ORCPT`` on RCPT TO
are validated (``501 5.5.4`` for a malformed or repeated one, the session going on)
and land in the spool record exactly: ``Envelope.ret`` upper-case, ``Envelope.envid``
and ``Recipient.orcpt`` as received (still xtext), ``Recipient.notify`` as a list of
upper-case values. Everything runs against the real daemon over loopback.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.smtp.dsnparams import (
    MAX_ENVID,
    is_xtext,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
)
from empath.smtp.parse import ReplyError
from empath.spool import Envelope
from tests.conftest import require_tool
from tests.harness import Daemon, RawClient, queued_id, record_swaks, spool_record_bytes

MakeDaemon = Callable[..., Daemon]

BODY = b"Subject: dsn\r\nFrom: a@test.example\r\n\r\nHello.\r\n"
# Many refusals in one session must not reach max_errors (421) before the checks end.
LIMITS = {"max_errors": 1000}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def envelope(d: Daemon, qid: str) -> dict[str, Any]:
    raw = spool_record_bytes(d.queue_dir, qid)
    Envelope.from_bytes(raw)  # the record the queue will load back
    result: dict[str, Any] = json.loads(raw)
    return result


def by_address(env: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["address"]: r for r in env["recipients"]}


async def session(d: Daemon, context: str, *, port: int | None = None) -> RawClient:
    c = await RawClient.connect(port or d.smtp_port, context)
    await c.greet()
    return c


async def expect(c: RawClient, command: str, code: int, enhanced: str) -> str:
    got, text = await c.cmd(command)
    assert (got, text[:5]) == (code, enhanced), (command, got, text)
    return text


async def finish_data(c: RawClient) -> str:
    """DATA with BODY on an open transaction; returns the queue id."""
    await expect(c, "DATA", 354, "End d")
    c.send(BODY + b".\r\n")
    code, text = await c.reply()
    assert code == 250, text
    return queued_id(text)


# ---------------------------------------------------------------------------------
# EHLO
# ---------------------------------------------------------------------------------


def test_ehlo_lists_dsn_on_every_role(make_daemon: MakeDaemon) -> None:
    d = make_daemon()

    async def go() -> None:
        for port in (d.smtp_port, d.submission_port):
            c = await RawClient.connect(port, "dsn-ehlo")
            lines = await c.greet()
            keywords = [line[4:] for line in lines]
            assert "DSN" in keywords[1:], (port, lines)
            if port == d.smtp_port:  # added after the others, whose order is unchanged
                assert keywords[1:] == [
                    "PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8",
                    "ENHANCEDSTATUSCODES", "DSN",
                ], lines
            await expect(c, "QUIT", 221, "2.0.0")
            await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# values reach the spool record exactly
# ---------------------------------------------------------------------------------


def test_dsn_parameters_are_stored_exactly(make_daemon: MakeDaemon) -> None:
    d = make_daemon()

    async def go() -> tuple[str, str]:
        c = await session(d, "dsn-store")
        await expect(c, "MAIL FROM:<a@test.example> RET=hdrs ENVID=QQ+2B1.a/b+3Dc~", 250,
                     "2.1.0")
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=success,Delay "
                        "ORCPT=rfc822;x+2Bfoo@test.example", 250, "2.1.5")
        await expect(c, "RCPT TO:<y@test.example> notify=NEVER", 250, "2.1.5")
        await expect(c, "RCPT TO:<z@test.example>", 250, "2.1.5")
        await expect(c, "RCPT TO:<w@test.example> ORCPT=RFC822;Other+40elsewhere.example",
                     250, "2.1.5")
        await expect(c, "RCPT TO:<Postmaster> NOTIFY=FAILURE,FAILURE", 250, "2.1.5")
        first = await finish_data(c)
        # Second transaction on the same session: nothing carried over; RET=FULL.
        await expect(c, "MAIL FROM:<b@test.example> RET=Full", 250, "2.1.0")
        await expect(c, "RCPT TO:<x@test.example>", 250, "2.1.5")
        second = await finish_data(c)
        await expect(c, "QUIT", 221, "2.0.0")
        await c.close()
        return first, second

    first, second = run(go())
    env = envelope(d, first)
    assert (env["ret"], env["envid"]) == ("HDRS", "QQ+2B1.a/b+3Dc~")
    rcpts = by_address(env)
    assert [r["address"] for r in env["recipients"]] == [
        "x@test.example", "y@test.example", "z@test.example", "w@test.example",
        "postmaster@test.example",
    ]
    assert rcpts["x@test.example"]["notify"] == ["SUCCESS", "DELAY"]
    assert rcpts["x@test.example"]["orcpt"] == "rfc822;x+2Bfoo@test.example"
    assert (rcpts["y@test.example"]["notify"], rcpts["y@test.example"]["orcpt"]) == (
        ["NEVER"], None)
    assert (rcpts["z@test.example"]["notify"], rcpts["z@test.example"]["orcpt"]) == (None, None)
    assert rcpts["w@test.example"]["notify"] is None
    assert rcpts["w@test.example"]["orcpt"] == "RFC822;Other+40elsewhere.example"
    assert rcpts["postmaster@test.example"]["notify"] == ["FAILURE"]

    env2 = envelope(d, second)
    assert (env2["ret"], env2["envid"]) == ("FULL", None)
    assert env2["recipients"][0]["notify"] is None
    assert env2["recipients"][0]["orcpt"] is None


def test_utf8_orcpt(make_daemon: MakeDaemon) -> None:
    """RFC 6533: utf-8;… with \\x{…} escapes; raw UTF-8 only in an SMTPUTF8 transaction."""
    d = make_daemon(limits=LIMITS)

    async def go() -> tuple[str, str]:
        c = await session(d, "dsn-utf8")
        await expect(c, "MAIL FROM:<a@test.example>", 250, "2.1.0")
        await expect(c, "RCPT TO:<x@test.example> ORCPT=utf-8;j\\x{FC}rgen@b\\x{fc}cher.example",
                     250, "2.1.5")
        # raw UTF-8 without SMTPUTF8: refused, session goes on
        await expect(c, "RCPT TO:<y@test.example> ORCPT=utf-8;jürgen@test.example", 501, "5.5.4")
        ascii_id = await finish_data(c)
        await expect(c, "MAIL FROM:<a@test.example> SMTPUTF8", 250, "2.1.0")
        await expect(c, "RCPT TO:<jürgen@bücher.example> NOTIFY=FAILURE "
                        "ORCPT=UTF-8;jürgen@bücher.example", 250, "2.1.5")
        # rfc822 is xtext: never raw UTF-8, SMTPUTF8 or not
        await expect(c, "RCPT TO:<y@test.example> ORCPT=rfc822;jürgen@test.example", 501, "5.5.4")
        utf8_id = await finish_data(c)
        await c.close()
        return ascii_id, utf8_id

    ascii_id, utf8_id = run(go())
    env = envelope(d, ascii_id)
    assert [(r["address"], r["orcpt"]) for r in env["recipients"]] == [
        ("x@test.example", "utf-8;j\\x{FC}rgen@b\\x{fc}cher.example"),
    ]
    env = envelope(d, utf8_id)
    assert len(env["recipients"]) == 1
    assert env["recipients"][0]["orcpt"] == "UTF-8;jürgen@bücher.example"
    assert env["recipients"][0]["notify"] == ["FAILURE"]


def test_repeated_rcpt_keeps_the_first_parameters(make_daemon: MakeDaemon) -> None:
    d = make_daemon(limits=LIMITS)

    async def go() -> str:
        c = await session(d, "dsn-dup")
        await expect(c, "MAIL FROM:<a@test.example>", 250, "2.1.0")
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=SUCCESS ORCPT=rfc822;first@test.example",
                     250, "2.1.5")
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=NEVER ORCPT=rfc822;second@test.example",
                     250, "2.1.5")
        await expect(c, "RCPT TO:<x@TEST.example>", 250, "2.1.5")  # same mailbox
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=NEVER,DELAY", 501, "5.5.4")
        await expect(c, "RCPT TO:<y@test.example>", 250, "2.1.5")
        await expect(c, "RCPT TO:<y@test.example> NOTIFY=DELAY", 250, "2.1.5")
        qid = await finish_data(c)
        await c.close()
        return qid

    env = envelope(d, run(go()))
    assert [(r["address"], r["notify"], r["orcpt"]) for r in env["recipients"]] == [
        ("x@test.example", ["SUCCESS"], "rfc822;first@test.example"),
        ("y@test.example", None, None),
    ]


def test_pipelined_dsn_transaction(make_daemon: MakeDaemon) -> None:
    """One write: MAIL, RCPTs (one malformed) and DATA; replies come back in order."""
    d = make_daemon(limits=LIMITS)

    async def go() -> str:
        c = await session(d, "dsn-pipeline")
        c.send(b"MAIL FROM:<a@test.example> RET=HDRS ENVID=pipe+2B1\r\n"
               b"RCPT TO:<x@test.example> NOTIFY=NEVER,SUCCESS\r\n"
               b"RCPT TO:<y@test.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;y@test.example\r\n"
               b"RCPT TO:<z@test.example> FROB=1\r\n"
               b"DATA\r\n")
        replies = [await c.reply() for _ in range(5)]
        assert [(code, text[:5]) for code, text in replies[:4]] == [
            (250, "2.1.0"), (501, "5.5.4"), (250, "2.1.5"), (555, "5.5.4"),
        ], replies
        assert replies[4][0] == 354, replies
        c.send(BODY + b".\r\nQUIT\r\n")
        code, text = await c.reply()
        assert code == 250, text
        assert (await c.reply())[0] == 221
        await c.close()
        return queued_id(text)

    env = envelope(d, run(go()))
    assert (env["ret"], env["envid"]) == ("HDRS", "pipe+2B1")
    assert [(r["address"], r["notify"], r["orcpt"]) for r in env["recipients"]] == [
        ("y@test.example", ["FAILURE", "DELAY"], "rfc822;y@test.example"),
    ]


# ---------------------------------------------------------------------------------
# malformed parameters: 501 5.5.4, and the session goes on
# ---------------------------------------------------------------------------------

BAD_MAIL = [
    "RET=FOO",
    "RET",
    "RET=FULL RET=HDRS",
    "RET=HDRS ret=hdrs",
    "RET=FULL,HDRS",
    "ENVID",
    "ENVID=a+2",  # truncated hexchar
    "ENVID=a+2b",  # hexchar digits must be upper-case
    "ENVID=a+zzb",
    "ENVID=a+0D+0Ab",  # decodes to CR LF
    "ENVID=a+00b",  # decodes to NUL
    "ENVID=a+C3+A9",  # decodes to non-ASCII
    "ENVID=é",  # not xtext at all
    "ENVID=" + "x" * 101,
    "ENVID=abc ENVID=abc",
    "ENVID=abc RET=FULL envid=def",
]

BAD_RCPT = [
    "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=FAILURE,NEVER",
    "NOTIFY=NEVER,NEVER",
    "NOTIFY=SOMETIMES",
    "NOTIFY=SUCCESS,,FAILURE",
    "NOTIFY=SUCCESS,",
    "NOTIFY=SUCCESS;FAILURE",
    "NOTIFY",
    "NOTIFY=SUCCESS NOTIFY=FAILURE",
    "ORCPT",
    "ORCPT=x@test.example",  # no address type
    "ORCPT=x400;x@test.example",  # not rfc822 or utf-8
    "ORCPT=;x@test.example",
    "ORCPT=rfc822;",  # no address
    "ORCPT=rfc822;a+2b@test.example",
    "ORCPT=rfc822;a+4@test.example",
    "ORCPT=rfc822;a+0Ab@test.example",
    "ORCPT=rfc822;j+C3+BCrgen@test.example",
    "ORCPT=rfc822;" + "a" * 490 + "@test.example",  # over 500 characters
    "ORCPT=utf-8;a+2Bb@test.example",  # "+" is not a utf-8-addr-xtext character
    "ORCPT=utf-8;a\\b@test.example",  # "\" only as \x{…}
    "ORCPT=utf-8;a\\x{D800}b@test.example",  # a surrogate
    "ORCPT=utf-8;a\\x{0A}b@test.example",  # a control character
    "ORCPT=utf-8;a\\x{110000}b@test.example",
    "ORCPT=utf-8;a\\x{F}b@test.example",  # HEXPOINT has 2 to 6 digits
    "ORCPT=utf-8;jürgen@test.example",  # raw UTF-8 without SMTPUTF8
    "ORCPT=rfc822;a@test.example ORCPT=rfc822;a@test.example",
]


def test_malformed_dsn_parameters_are_refused(make_daemon: MakeDaemon) -> None:
    d = make_daemon(limits=LIMITS)

    async def go() -> str:
        c = await session(d, "dsn-bad")
        for params in BAD_MAIL:
            await expect(c, f"MAIL FROM:<a@test.example> {params}", 501, "5.5.4")
            await expect(c, "NOOP", 250, "2.0.0")
        text = await expect(c, "MAIL FROM:<a@test.example> RET=WHATEVER", 501, "5.5.4")
        assert "RET" in text, text
        text = await expect(c, "MAIL FROM:<a@test.example> ENVID=a+0Db", 501, "5.5.4")
        assert "ENVID" in text, text
        # a following valid MAIL works; then every malformed RCPT is refused alone
        await expect(c, "MAIL FROM:<a@test.example> RET=HDRS ENVID=" + "e" * 100, 250, "2.1.0")
        for params in BAD_RCPT:
            await expect(c, f"RCPT TO:<x@test.example> {params}", 501, "5.5.4")
            await expect(c, "NOOP", 250, "2.0.0")
        text = await expect(c, "RCPT TO:<x@test.example> NOTIFY=NEVER,SUCCESS", 501, "5.5.4")
        assert "NOTIFY" in text and "NEVER" in text, text
        text = await expect(c, "RCPT TO:<x@test.example> ORCPT=x400;x", 501, "5.5.4")
        assert "ORCPT" in text, text
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=DELAY ORCPT=rfc822;" + "o" * 493,
                     250, "2.1.5")  # exactly 500 characters
        qid = await finish_data(c)
        await expect(c, "QUIT", 221, "2.0.0")
        await c.close()
        return qid

    env = envelope(d, run(go()))
    assert (env["ret"], env["envid"]) == ("HDRS", "e" * 100)
    assert [(r["address"], r["notify"], r["orcpt"]) for r in env["recipients"]] == [
        ("x@test.example", ["DELAY"], "rfc822;" + "o" * 493),
    ]


def test_unknown_rcpt_parameter_is_still_555(make_daemon: MakeDaemon) -> None:
    d = make_daemon(limits=LIMITS)

    async def go() -> None:
        c = await session(d, "dsn-unknown")
        await expect(c, "MAIL FROM:<a@test.example> FROB=1", 555, "5.5.4")
        await expect(c, "MAIL FROM:<a@test.example>", 250, "2.1.0")
        text = await expect(c, "RCPT TO:<x@test.example> FROB=1", 555, "5.5.4")
        assert "FROB" in text, text
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=SUCCESS XYZZY", 555, "5.5.4")
        await expect(c, "RCPT TO:<x@test.example> RET=FULL", 555, "5.5.4")  # a MAIL parameter
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=SUCCESS", 250, "2.1.5")
        await expect(c, "RSET", 250, "2.0.0")
        await c.close()

    run(go())


def test_helo_session_refuses_dsn_parameters(make_daemon: MakeDaemon) -> None:
    d = make_daemon(limits=LIMITS)

    async def go() -> str:
        c = await RawClient.connect(d.smtp_port, "dsn-helo")
        assert (await c.reply(record=False))[0] == 220
        c.send(b"HELO old.client.test\r\n")
        assert (await c.reply(record=False))[0] == 250
        await expect(c, "MAIL FROM:<a@test.example> RET=FULL", 501, "5.5.4")
        await expect(c, "MAIL FROM:<a@test.example> ENVID=abc", 501, "5.5.4")
        await expect(c, "MAIL FROM:<a@test.example>", 250, "2.1.0")
        await expect(c, "RCPT TO:<x@test.example> NOTIFY=NEVER", 555, "5.5.4")
        await expect(c, "RCPT TO:<x@test.example> ORCPT=rfc822;x@test.example", 555, "5.5.4")
        await expect(c, "RCPT TO:<x@test.example>", 250, "2.1.5")
        qid = await finish_data(c)
        await c.close()
        return qid

    env = envelope(d, run(go()))
    assert (env["ret"], env["envid"]) == (None, None)
    assert [(r["notify"], r["orcpt"]) for r in env["recipients"]] == [(None, None)]


# ---------------------------------------------------------------------------------
# swaks
# ---------------------------------------------------------------------------------


def _swaks(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    swaks = require_tool("swaks")
    return subprocess.run(
        [swaks, "--server", f"127.0.0.1:{port}", "--helo", "swaks.client.test", *extra],
        capture_output=True, text=True, timeout=60,
    )


def test_swaks_pipeline_sees_dsn(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    proc = _swaks(d.smtp_port, "--pipeline", "--from", "a@test.example",
                  "--to", "x@test.example", "--header", "Subject: swaks dsn")
    finals = record_swaks(proc.stdout, "swaks-dsn-ehlo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.strip().startswith("<-  250 DSN") or line.strip() == "<-  250-DSN"
               for line in proc.stdout.splitlines()), proc.stdout
    queued = [f for f in finals if "queued as" in f]
    assert len(queued) == 1, finals
    env = envelope(d, queued_id(queued[0]))
    assert (env["ret"], env["envid"], env["recipients"][0]["notify"]) == (None, None, None)


# ---------------------------------------------------------------------------------
# the parameter parsers alone
# ---------------------------------------------------------------------------------


def _xtext(text: str) -> str:
    return "".join(ch if 33 <= ord(ch) <= 126 and ch not in "+=" else f"+{ord(ch):02X}"
                   for ch in text)


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=33))
def test_any_printable_envid_in_xtext_is_accepted_verbatim(text: str) -> None:
    encoded = _xtext(text)
    assert len(encoded) <= MAX_ENVID
    assert is_xtext(encoded)
    assert parse_envid(encoded) == encoded


@given(st.text(max_size=600), st.booleans())
def test_parsers_only_raise_reply_error(value: str, utf8: bool) -> None:
    for parse in (parse_ret, parse_envid, parse_notify,
                  lambda v: parse_orcpt(v, smtputf8=utf8)):
        try:
            parse(value)
        except ReplyError as exc:
            assert exc.reply.startswith("501 5.5.4 Bad "), exc.reply


@pytest.mark.parametrize(("value", "want"), [
    ("NEVER", ("NEVER",)),
    ("never", ("NEVER",)),
    ("Success", ("SUCCESS",)),
    ("DELAY,failure,SUCCESS", ("DELAY", "FAILURE", "SUCCESS")),
    ("FAILURE,FAILURE", ("FAILURE",)),
])
def test_parse_notify(value: str, want: tuple[str, ...]) -> None:
    assert parse_notify(value) == want
