"""The SMTP front seen from the wire: EHLO, relay policy, limits, commands, pipelining,
8-bit and SMTPUTF8, the Received header and STARTTLS.

Everything runs against the real daemon (supervisor + 2 workers) over loopback. Three
module-scoped daemons keep the number of starts small:

* ``plain``   — the default test config (127.0.0.0/8 may relay), no TLS;
* ``outside`` — ``relay_networks: []`` so loopback is an *outside* client, with small
  limits (size 100 000, 3 recipients, 5 errors);
* ``tls``     — the default config plus a self-signed certificate.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import require_tool
from tests.harness import (
    REPLIES,
    Daemon,
    RawClient,
    base_config,
    free_port,
    queued_id,
    record_swaks,
    send_message,
    spool_record,
    strip_received,
    transaction,
)

HOST = "mx.test.example"
OUTSIDE_MAX_SIZE = 100_000

# ---------------------------------------------------------------------------------
# daemons and helpers
# ---------------------------------------------------------------------------------


def _spawn(tmp_path_factory: pytest.TempPathFactory, name: str, **overrides: Any) -> Daemon:
    workdir = tmp_path_factory.mktemp(name)
    smtp, sub = free_port(), free_port()
    cfg = base_config(workdir / "state", smtp, sub)
    cfg.update(overrides)
    d = Daemon(workdir, cfg, smtp, sub)
    d.start()
    return d


def _finish(d: Daemon) -> None:
    if d.proc is not None and d.proc.poll() is None:
        try:
            d.stop(timeout=15)
        except Exception:
            d.kill()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = _spawn(tmp_path_factory, "plain")
    yield d
    _finish(d)


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = _spawn(
        tmp_path_factory, "outside",
        relay_networks=[],
        limits={
            "max_message_size": OUTSIDE_MAX_SIZE,
            "max_recipients": 3,
            "max_errors": 5,
            # loopback is not exempt from per-client limits here; keep them out of the way
            "per_client_rate": 100_000,
            "per_client_connections": 1000,
        },
    )
    yield d
    _finish(d)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    os.chmod(key, 0o600)
    return cert, key


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, cert: tuple[Path, Path]) -> Iterator[Daemon]:
    d = _spawn(tmp_path_factory, "tlsd",
               tls={"certificate": str(cert[0]), "key": str(cert[1])})
    yield d
    _finish(d)


def client_tls_context(cert: Path) -> ssl.SSLContext:
    """Verifies the daemon's self-signed certificate, hostname included."""
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = True
    return ctx


def envelope(d: Daemon, qid: str) -> dict[str, Any]:
    return spool_record(d.queue_dir, qid)


def rcpt_addresses(env: dict[str, Any]) -> list[str]:
    return [r["address"] for r in env["recipients"]]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def connect(d: Daemon, context: str, *, port: int | None = None) -> RawClient:
    c = await RawClient.connect(port or d.smtp_port, context)
    await c.greet()
    return c


async def nothing_more(c: RawClient, wait: float = 0.3) -> bool:
    """True when the server has sent nothing beyond what was read."""
    try:
        extra = await asyncio.wait_for(c.reader.read(1), wait)
    except TimeoutError:
        return True
    return extra == b""


def record(context: str, resp: Any) -> Any:
    """Record an aiosmtplib SMTPResponse (or SMTPResponseException) in the reply audit."""
    REPLIES.append((context, f"{resp.code} {resp.message}"))
    return resp


async def checked(context: str, coro: Any) -> Any:
    try:
        resp = await coro
    except aiosmtplib.SMTPResponseException as exc:
        record(context, exc)
        raise
    return record(context, resp)


BODY = b"Subject: test\r\nFrom: a@test.example\r\n\r\nHello.\r\n"

# ---------------------------------------------------------------------------------
# 1. banner and EHLO
# ---------------------------------------------------------------------------------


def _keywords(lines: list[str]) -> list[str]:
    assert all(line.startswith("250-") for line in lines[:-1]), lines
    assert lines[-1].startswith("250 "), lines
    return [line[4:] for line in lines]


def test_banner_and_ehlo_list_without_tls(plain: Daemon) -> None:
    async def go() -> None:
        c = await RawClient.connect(plain.smtp_port, "ehlo")
        code, text = await c.reply(record=False)
        assert code == 220
        assert text.startswith(f"{HOST} ESMTP"), text
        c.send(b"EHLO client.test\r\n")
        kw = _keywords(await c.lines())
        assert kw[0] == HOST
        for ext in ("SIZE 26214400", "8BITMIME", "SMTPUTF8", "PIPELINING",
                    "ENHANCEDSTATUSCODES"):
            assert ext in kw[1:], (ext, kw)
        assert not any(k.upper().startswith("STARTTLS") for k in kw)
        # STARTTLS when not offered: refused, session goes on
        code, text = await c.cmd("STARTTLS")
        assert code in (454, 502), text
        assert (await c.cmd("NOOP"))[0] == 250
        await c.cmd("QUIT")
        await c.close()

    run(go())


def test_ehlo_size_follows_config(outside: Daemon) -> None:
    async def go() -> None:
        c = await RawClient.connect(outside.smtp_port, "ehlo-size")
        kw = _keywords(await c.greet())
        assert f"SIZE {OUTSIDE_MAX_SIZE}" in kw
        assert "SIZE 26214400" not in kw
        await c.close()

    run(go())


def test_ehlo_offers_starttls_with_tls(tls: Daemon) -> None:
    async def go() -> None:
        c = await RawClient.connect(tls.smtp_port, "ehlo-tls")
        kw = _keywords(await c.greet())
        assert kw[0] == HOST
        assert "STARTTLS" in kw
        await c.close()

    run(go())


def test_helo_then_mail_works_and_says_smtp(plain: Daemon) -> None:
    """Plain HELO (no ESMTP): mail still goes through, Received says 'with SMTP'."""
    async def go() -> str:
        c = await RawClient.connect(plain.smtp_port, "helo")
        await c.reply(record=False)
        c.send(b"HELO old.client.test\r\n")
        code, text = await c.reply(record=False)
        assert code == 250 and HOST in text
        # ESMTP parameters need EHLO
        code, text = await c.cmd("MAIL FROM:<a@test.example> BODY=8BITMIME")
        assert (code, text[:5]) == (501, "5.5.4"), text
        code, text = await transaction(c, "a@test.example", ["x@test.example"], BODY)
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    header = plain.message_bytes(qid).split(b";", 1)[0]
    assert b"with SMTP id" in header


def test_aiosmtplib_client_sees_extensions_and_sends(plain: Daemon) -> None:
    async def go() -> str:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=plain.smtp_port,
                               start_tls=False, local_hostname="aio.client.test")
        await smtp.connect()
        await smtp.ehlo()
        for ext in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
            assert smtp.supports_extension(ext), ext
        assert smtp.esmtp_extensions["size"] == "26214400"
        assert not smtp.supports_extension("starttls")
        await checked("aio", smtp.mail("a@test.example"))
        await checked("aio", smtp.rcpt("x@test.example"))
        resp = await checked("aio", smtp.data(BODY))
        assert resp.code == 250
        await checked("aio", smtp.noop())
        await checked("aio", smtp.quit())
        return queued_id(resp.message)

    qid = run(go())
    assert strip_received(plain.message_bytes(qid)) == BODY


# ---------------------------------------------------------------------------------
# 2. relay policy
# ---------------------------------------------------------------------------------


def test_outside_client_cannot_relay_but_reaches_local_domains(outside: Daemon) -> None:
    async def go() -> str:
        c = await connect(outside, "relay-outside")
        assert (await c.cmd("MAIL FROM:<someone@elsewhere.example>"))[0] == 250
        code, text = await c.cmd("RCPT TO:<x@elsewhere.example>")
        assert (code, text[:5]) == (554, "5.7.1"), text
        # postmaster of a foreign domain is not a loophole
        code, text = await c.cmd("RCPT TO:<postmaster@elsewhere.example>")
        assert (code, text[:5]) == (554, "5.7.1"), text
        for rcpt in ("x@test.example", "x@TEST.Example.", "Postmaster",
                     "postmaster@test.example", "y@xn--bcher-kva.example"):
            code, text = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert (code, text[:5]) == (250, "2.1.5"), (rcpt, text)
        code, text = await c.cmd("DATA")
        assert code == 354
        c.send(BODY + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    got = rcpt_addresses(envelope(outside, qid))
    assert "x@elsewhere.example" not in got and "postmaster@elsewhere.example" not in got
    # x@test.example and x@TEST.Example. are one recipient; postmaster forms are accepted
    assert got.count("x@test.example") == 1
    assert "y@xn--bcher-kva.example" in got
    assert any(a.lower().startswith("postmaster") for a in got)


def test_outside_client_idna_u_label_equals_a_label(outside: Daemon) -> None:
    async def go() -> str:
        c = await connect(outside, "relay-idna")
        assert (await c.cmd("MAIL FROM:<a@elsewhere.example> SMTPUTF8"))[0] == 250
        for rcpt in ("z@bücher.example", "z@xn--bcher-kva.example", "z@BÜCHER.example."):
            code, text = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert (code, text[:5]) == (250, "2.1.5"), (rcpt, text)
        code, text = await c.cmd("DATA")
        assert code == 354
        c.send(BODY + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    got = rcpt_addresses(envelope(outside, qid))
    assert len(got) == 1, got  # three spellings of one address: one copy
    assert got[0] in ("z@xn--bcher-kva.example", "z@bücher.example")


def test_relay_network_client_may_relay(plain: Daemon) -> None:
    async def go() -> str:
        c = await connect(plain, "relay-inside")
        code, text = await transaction(c, "a@test.example", ["x@elsewhere.example"], BODY)
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert rcpt_addresses(envelope(plain, qid)) == ["x@elsewhere.example"]


def test_duplicate_rcpt_yields_one_recipient(plain: Daemon) -> None:
    async def go() -> str:
        c = await connect(plain, "dup")
        code, text = await transaction(
            c, "a@test.example",
            ["x@test.example", "x@test.example", "x@TEST.example.", "other@test.example"],
            BODY,
        )
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    env = envelope(plain, qid)
    assert rcpt_addresses(env) == ["x@test.example", "other@test.example"]
    assert env["sender"] == "a@test.example"
    assert all(r["state"] == "pending" for r in env["recipients"])


# ---------------------------------------------------------------------------------
# 3. null sender, limits, syntax errors
# ---------------------------------------------------------------------------------


def test_null_sender_accepted(plain: Daemon) -> None:
    async def go() -> str:
        c = await connect(plain, "null-sender")
        code, text = await transaction(c, "", ["x@test.example"], BODY)
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert envelope(plain, qid)["sender"] == ""


def test_too_many_recipients(outside: Daemon) -> None:
    async def go() -> str:
        c = await connect(outside, "max-rcpt")
        assert (await c.cmd("MAIL FROM:<a@elsewhere.example>"))[0] == 250
        for i in range(3):
            assert (await c.cmd(f"RCPT TO:<r{i}@test.example>"))[0] == 250
        code, text = await c.cmd("RCPT TO:<r3@test.example>")
        assert (code, text[:5]) == (452, "4.5.3"), text
        code, text = await c.cmd("DATA")
        assert code == 354
        c.send(BODY + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert rcpt_addresses(envelope(outside, qid)) == [f"r{i}@test.example" for i in range(3)]


def test_declared_size_over_limit(outside: Daemon) -> None:
    async def go() -> None:
        c = await connect(outside, "size-declared")
        code, text = await c.cmd(f"MAIL FROM:<a@elsewhere.example> SIZE={OUTSIDE_MAX_SIZE + 1}")
        assert (code, text[:5]) == (552, "5.3.4"), text
        # refused MAIL left no transaction behind
        assert (await c.cmd("RCPT TO:<x@test.example>"))[0] == 503
        code, text = await c.cmd(f"MAIL FROM:<a@elsewhere.example> SIZE={OUTSIDE_MAX_SIZE}")
        assert code == 250, text
        await c.close()

    run(go())


def _body_of_size(n: int) -> bytes:
    """A CRLF body of exactly n (≥ 83) octets with short lines."""
    full, rest = divmod(n, 80)
    lines = [b"x" * 78 + b"\r\n"] * full
    if rest == 1:  # no CRLF line is one octet long: lengthen the last full line
        lines[-1] = b"x" * 79 + b"\r\n"
    elif rest:
        lines.append(b"y" * (rest - 2) + b"\r\n")
    body = b"".join(lines)
    assert len(body) == n
    return body


def test_actual_size_over_limit_rejected_after_dot(outside: Daemon) -> None:
    async def go() -> None:
        before = outside.queued_ids()
        c = await connect(outside, "size-actual")
        # no SIZE declared: the limit is enforced on what actually arrives
        code, text = await c.cmd("MAIL FROM:<a@elsewhere.example>")
        assert code == 250
        assert (await c.cmd("RCPT TO:<x@test.example>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        c.send(_body_of_size(OUTSIDE_MAX_SIZE + 1) + b".\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (552, "5.3.4"), text
        assert outside.queued_ids() == before
        # the session is in sync and usable; a body of exactly the limit is accepted
        body = _body_of_size(OUTSIDE_MAX_SIZE)
        code, text = await transaction(c, "a@elsewhere.example", ["x@test.example"], body,
                                       f" SIZE={OUTSIDE_MAX_SIZE}")
        assert code == 250, text
        assert strip_received(outside.message_bytes(queued_id(text))) == body
        await c.close()

    run(go())


def test_syntax_errors(plain: Daemon) -> None:
    async def go() -> None:
        # MAIL before EHLO
        c = await RawClient.connect(plain.smtp_port, "syntax")
        assert (await c.reply(record=False))[0] == 220
        code, text = await c.cmd("MAIL FROM:<a@test.example>")
        assert (code, text[:5]) == (503, "5.5.1"), text
        await c.close()

        c = await connect(plain, "syntax")
        checks = [
            ("RCPT TO:<x@test.example>", 503, "5.5.1"),  # RCPT before MAIL
            ("DATA", 503, "5.5.1"),  # DATA before MAIL
            ("MAIL FROM:bad", 501, "5.5.4"),
            ("MAIL FROM:<bad>", 501, "5.1.7"),
            ("MAIL FROM:<a@b..example>", 501, "5.1.7"),
            ("MAIL FROM:<a@test.example> FROB=1", 555, "5.5.4"),
            ("MAIL FROM:<a@test.example> BODY=9BIT", 501, "5.5.4"),
            ("FROBNICATE", 500, "5.5.2"),
            ("MAIL FROM:<a@test.example>", 250, "2.1.0"),
            ("MAIL FROM:<b@test.example>", 503, "5.5.1"),  # nested MAIL
            ("DATA", 554, "5.5.1"),  # no valid recipients yet
            ("RCPT TO:<bad>", 501, "5.1.3"),
            ("RCPT TO:<>", 501, "5.1.3"),
            ("RCPT TO:x@test.example", 501, "5.5.4"),
            ("RCPT TO:<x@test.example> FROB=1", 555, "5.5.4"),
            ("RCPT TO:<x@test.example> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
            ("RCPT TO:<x@test.example>", 250, "2.1.5"),
            ("DATA junk", 501, "5.5.4"),
        ]
        for command, want_code, want_enh in checks:
            code, text = await c.cmd(command)
            assert (code, text[:5]) == (want_code, want_enh), (command, code, text)
        # a command line over the limit is refused without losing sync
        code, text = await c.cmd("NOOP " + "x" * 3000)
        assert (code, text[:5]) == (500, "5.5.6"), text
        code, text = await c.cmd("NOOP")
        assert code == 250, text
        await c.close()

    run(go())


def test_invalid_utf8_in_mail_from_gets_a_reply(plain: Daemon) -> None:
    """A stray non-UTF-8 octet in the address must be answered, not hang the session."""
    async def go() -> None:
        c = await connect(plain, "bad-utf8")
        c.send(b"MAIL FROM:<\xff@test.example>\r\n")
        code, text = await c.reply(timeout=5)
        assert code in (501, 553), text
        c.send(b"MAIL FROM:<a@test.example> SMTPUTF8\r\n")
        assert (await c.reply(timeout=5))[0] == 250
        c.send(b"RCPT TO:<j\xfcrgen@test.example>\r\n")
        code, text = await c.reply(timeout=5)
        assert code in (501, 553), text
        assert (await c.cmd("NOOP"))[0] == 250
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 4. max_errors
# ---------------------------------------------------------------------------------


def test_max_errors_drops_only_that_session(outside: Daemon) -> None:
    async def go() -> None:
        good = await connect(outside, "max-errors-bystander")
        bad = await connect(outside, "max-errors")
        for _ in range(4):
            code, text = await bad.cmd("FROBNICATE")
            assert (code, text[:5]) == (500, "5.5.2"), text
        code, text = await bad.cmd("FROBNICATE")  # the 5th error
        assert code == 500, text
        code, text = await bad.reply()
        assert (code, text[:5]) == (421, "4.7.0"), text
        assert await bad.at_eof()
        await bad.close()
        # the other session, open all along, is untouched
        assert (await good.cmd("NOOP"))[0] == 250
        code, text = await transaction(good, "a@elsewhere.example", ["x@test.example"], BODY)
        assert code == 250, text
        await good.close()
        # and new clients are still served
        code, text = await send_message(outside.smtp_port, "a@elsewhere.example",
                                        ["x@test.example"], BODY, "max-errors-after")
        assert code == 250, text

    run(go())


def test_errors_of_all_kinds_count(outside: Daemon) -> None:
    """Relay denials count too: a client probing for relays is dropped after 5."""
    async def go() -> None:
        c = await connect(outside, "max-errors-relay")
        assert (await c.cmd("MAIL FROM:<a@elsewhere.example>"))[0] == 250
        for i in range(4):
            code, text = await c.cmd(f"RCPT TO:<v{i}@elsewhere.example>")
            assert (code, text[:5]) == (554, "5.7.1"), text
        code, text = await c.cmd("RCPT TO:<v9@elsewhere.example>")
        assert code == 554
        code, text = await c.reply()
        assert (code, text[:5]) == (421, "4.7.0"), text
        assert await c.at_eof()
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 5. submission listener
# ---------------------------------------------------------------------------------


def test_submission_requires_auth(plain: Daemon) -> None:
    async def go() -> None:
        c = await connect(plain, "submission", port=plain.submission_port)
        code, text = await c.cmd("MAIL FROM:<a@test.example>")
        assert (code, text[:5]) == (530, "5.7.0"), text
        assert (await c.cmd("RCPT TO:<x@test.example>"))[0] == 503
        await c.close()

    before = plain.queued_ids()
    run(go())
    assert plain.queued_ids() == before


# ---------------------------------------------------------------------------------
# 6. NOOP, RSET, VRFY, HELP, EXPN, QUIT
# ---------------------------------------------------------------------------------


def test_simple_commands(plain: Daemon) -> None:
    async def go() -> None:
        c = await connect(plain, "commands")
        assert await c.cmd("NOOP") == (250, "2.0.0 Ok")
        code, text = await c.cmd("NOOP anything at all")
        assert (code, text[:5]) == (250, "2.0.0")
        code, text = await c.cmd("VRFY x@test.example")
        assert (code, text[:5]) == (252, "2.5.0"), text
        code, text = await c.cmd("HELP")
        assert (code, text[:5]) == (214, "2.0.0"), text
        code, text = await c.cmd("EXPN staff")
        assert (code, text[:5]) == (502, "5.5.1"), text
        # lower case verbs are the same commands
        assert (await c.cmd("noop"))[0] == 250
        # RSET clears the transaction; NOOP does not
        assert (await c.cmd("MAIL FROM:<a@test.example>"))[0] == 250
        assert (await c.cmd("NOOP"))[0] == 250
        assert (await c.cmd("RCPT TO:<x@test.example>"))[0] == 250
        assert await c.cmd("RSET") == (250, "2.0.0 Ok")
        code, text = await c.cmd("RCPT TO:<x@test.example>")
        assert (code, text[:5]) == (503, "5.5.1"), text
        assert (await c.cmd("DATA"))[0] == 503
        # RSET keeps the EHLO: a new transaction needs no new greeting
        assert (await c.cmd("MAIL FROM:<a@test.example>"))[0] == 250
        code, text = await c.cmd("QUIT")
        assert (code, text[:5]) == (221, "2.0.0"), text
        assert await c.at_eof()
        await c.close()

    before = plain.queued_ids()
    run(go())
    assert plain.queued_ids() == before


# ---------------------------------------------------------------------------------
# 7. pipelining
# ---------------------------------------------------------------------------------


def test_pipelined_transaction(plain: Daemon) -> None:
    async def go() -> str:
        c = await connect(plain, "pipelining")
        c.send(b"MAIL FROM:<a@test.example>\r\n"
               b"RCPT TO:<p1@test.example>\r\n"
               b"RCPT TO:<p2@test.example>\r\n"
               b"DATA\r\n")
        replies = [await c.reply() for _ in range(4)]
        assert [r[0] for r in replies] == [250, 250, 250, 354], replies
        assert [r[1][:5] for r in replies[:3]] == ["2.1.0", "2.1.5", "2.1.5"]
        # message, end of data and QUIT in one write
        c.send(BODY + b".\r\nQUIT\r\n")
        code, text = await c.reply()
        assert code == 250, text
        assert (await c.reply())[0] == 221
        assert await c.at_eof()
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert rcpt_addresses(envelope(plain, qid)) == ["p1@test.example", "p2@test.example"]
    assert strip_received(plain.message_bytes(qid)) == BODY


def test_half_closed_client_gets_every_reply_and_its_message_queued(plain: Daemon) -> None:
    """`printf '...' | nc -N host 25`: a client that sends a whole transaction and
    then shuts down its sending side still reads all its replies, and the message is
    queued; then the server closes."""
    async def go() -> str:
        c = await connect(plain, "half-close")
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@test.example>\r\n"
               b"RCPT TO:<half@test.example>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n")
        await c.writer.drain()
        c.writer.write_eof()
        lines = await c.lines()  # the EHLO reply
        assert lines[-1].startswith("250 "), lines
        replies = [await c.reply() for _ in range(5)]
        assert [r[0] for r in replies] == [250, 250, 354, 250, 221], replies
        assert await c.at_eof()
        await c.close()
        return queued_id(replies[3][1])

    qid = run(go())
    assert rcpt_addresses(envelope(plain, qid)) == ["half@test.example"]
    assert strip_received(plain.message_bytes(qid)) == BODY


def test_overlong_command_line_is_refused_and_the_session_goes_on(plain: Daemon) -> None:
    """A command line far beyond any limit (64 KiB, sent in pieces) gets one 500
    5.5.6 once its end arrives, and the next command is read normally."""
    async def go() -> None:
        c = await connect(plain, "long-line")
        for _ in range(16):
            c.send(b"NOOP " + b"x" * 4096)
            await c.writer.drain()
        c.send(b"\r\nNOOP\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (500, "5.5.6"), text
        assert await c.reply() == (250, "2.0.0 Ok")
        assert await nothing_more(c)
        await c.cmd("QUIT")
        await c.close()

    run(go())


def test_pipelined_group_with_a_refused_recipient(outside: Daemon) -> None:
    async def go() -> str:
        c = await connect(outside, "pipelining-refused")
        c.send(b"RSET\r\n"
               b"MAIL FROM:<a@elsewhere.example>\r\n"
               b"RCPT TO:<x@elsewhere.example>\r\n"
               b"RCPT TO:<ok@test.example>\r\n"
               b"DATA\r\n")
        replies = [await c.reply() for _ in range(5)]
        assert [r[0] for r in replies] == [250, 250, 554, 250, 354], replies
        c.send(BODY + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert rcpt_addresses(envelope(outside, qid)) == ["ok@test.example"]


def test_pipelined_data_with_no_valid_recipient_is_refused(outside: Daemon) -> None:
    """RFC 2920: a pipelined DATA after only refused RCPTs fails (503/554) and the
    session stays in sync."""
    async def go() -> None:
        c = await connect(outside, "pipelining-none")
        c.send(b"MAIL FROM:<a@elsewhere.example>\r\n"
               b"RCPT TO:<x@elsewhere.example>\r\n"
               b"DATA\r\n")
        replies = [await c.reply() for _ in range(3)]
        assert [r[0] for r in replies][:2] == [250, 554], replies
        assert replies[2][0] in (503, 554), replies
        assert (await c.cmd("RSET"))[0] == 250
        await c.close()

    before = outside.queued_ids()
    run(go())
    assert outside.queued_ids() == before


def _swaks(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    swaks = require_tool("swaks")
    return subprocess.run(
        [swaks, "--server", f"127.0.0.1:{port}", "--helo", "swaks.client.test", *extra],
        capture_output=True, text=True, timeout=60,
    )


def test_swaks_pipeline(plain: Daemon) -> None:
    proc = _swaks(plain.smtp_port, "--pipeline", "--from", "a@test.example",
                  "--to", "x@test.example,y@test.example",
                  "--header", "Subject: swaks pipelined")
    finals = record_swaks(proc.stdout, "swaks-pipeline")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PIPELINING" in proc.stdout
    queued = [f for f in finals if "queued as" in f]
    assert len(queued) == 1, finals
    assert finals[-1].startswith("221 ")
    qid = queued_id(queued[0])
    assert rcpt_addresses(envelope(plain, qid)) == ["x@test.example", "y@test.example"]
    assert b"Subject: swaks pipelined" in plain.message_bytes(qid)


def test_swaks_relay_denied_for_outside_client(outside: Daemon) -> None:
    proc = _swaks(outside.smtp_port, "--pipeline", "--from", "a@elsewhere.example",
                  "--to", "x@elsewhere.example")
    finals = record_swaks(proc.stdout, "swaks-relay")
    assert proc.returncode != 0
    assert any(f.startswith("554 5.7.1") for f in finals), finals
    assert not any("queued as" in f for f in finals)


# ---------------------------------------------------------------------------------
# 11. 8-bit and SMTPUTF8
# ---------------------------------------------------------------------------------


def test_8bitmime_body_byte_exact(plain: Daemon) -> None:
    body = (b"Subject: 8bit\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            b"Caf\xe9 cr\xe8me br\xfbl\xe9e \xa9\xff\r\n"
            + "Grüße aus Köln — ☃ 🐍\r\n".encode())

    async def go() -> str:
        c = await connect(plain, "8bit")
        code, text = await transaction(c, "a@test.example", ["x@test.example"], body,
                                       " BODY=8BITMIME")
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    assert strip_received(plain.message_bytes(qid)) == body
    assert envelope(plain, qid)["body"] == "8BITMIME"


def test_smtputf8_addresses(plain: Daemon) -> None:
    body = "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nHallo Jürgen.\r\n".encode()

    async def go() -> str:
        c = await connect(plain, "smtputf8")
        code, text = await transaction(c, "dörte@bücher.example", ["jürgen@bücher.example"],
                                       body, " SMTPUTF8 BODY=8BITMIME")
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    env = envelope(plain, qid)
    assert env["smtputf8"] is True
    assert env["sender"] in ("dörte@xn--bcher-kva.example", "dörte@bücher.example")
    assert rcpt_addresses(env)[0] in ("jürgen@xn--bcher-kva.example", "jürgen@bücher.example")
    data = plain.message_bytes(qid)
    assert strip_received(data) == body
    assert "jürgen@".encode() in data.split(b"\r\n\r\n", 1)[0]  # Received: for <jürgen@…>


def test_non_ascii_address_without_smtputf8(plain: Daemon) -> None:
    async def go() -> None:
        c = await connect(plain, "no-smtputf8")
        code, text = await c.cmd("MAIL FROM:<dörte@bücher.example>")
        assert (code, text[:5]) == (553, "5.6.7"), text
        assert (await c.cmd("MAIL FROM:<a@test.example>"))[0] == 250
        code, text = await c.cmd("RCPT TO:<jürgen@bücher.example>")
        assert (code, text[:5]) == (553, "5.6.7"), text
        code, text = await c.cmd("RCPT TO:<x@bücher.example>")
        assert (code, text[:5]) == (553, "5.6.7"), text
        # the A-label spelling is plain ASCII and fine
        code, text = await c.cmd("RCPT TO:<x@xn--bcher-kva.example>")
        assert code == 250, text
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 12. the Received header
# ---------------------------------------------------------------------------------


def _received(data: bytes) -> str:
    """The prepended Received header, unfolded."""
    assert data.startswith(b"Received: ")
    header = data[: len(data) - len(strip_received(data))]
    return header.decode("utf-8").replace("\r\n\t", " ").replace("\r\n ", " ").rstrip("\r\n")


def test_received_header_single_and_multiple_recipients(plain: Daemon) -> None:
    async def go() -> tuple[str, str]:
        c = await connect(plain, "received")
        code, text = await transaction(c, "a@test.example", ["solo@test.example"], BODY)
        assert code == 250, text
        one = queued_id(text)
        code, text = await transaction(c, "a@test.example",
                                       ["r1@test.example", "r2@test.example"], BODY)
        assert code == 250, text
        await c.close()
        return one, queued_id(text)

    one, two = run(go())
    h1 = _received(plain.message_bytes(one))
    assert h1.startswith("Received: from client.test ([127.0.0.1])"), h1
    assert f"by {HOST}" in h1
    assert f"with ESMTP id {one}" in h1
    assert "for <solo@test.example>" in h1
    assert h1.count(";") >= 1 and h1.rsplit(";", 1)[1].strip()  # date after the ';'
    h2 = _received(plain.message_bytes(two))
    assert f"with ESMTP id {two}" in h2
    assert "for <" not in h2 and "r1@test.example" not in h2 and "r2@test.example" not in h2
    assert strip_received(plain.message_bytes(one)) == BODY
    assert strip_received(plain.message_bytes(two)) == BODY
    # exactly one Received header was added
    assert plain.message_bytes(one).count(b"Received:") == 1


def test_received_header_cannot_be_forged_by_helo(plain: Daemon) -> None:
    async def go() -> str:
        c = await RawClient.connect(plain.smtp_port, "received-helo")
        await c.greet("evil.test (by trusted.example)")
        code, text = await transaction(c, "a@test.example", ["x@test.example"], BODY)
        assert code == 250, text
        await c.close()
        return queued_id(text)

    qid = run(go())
    h = _received(plain.message_bytes(qid))
    assert "(by trusted.example)" not in h
    assert f"by {HOST}" in h


# ---------------------------------------------------------------------------------
# 13. STARTTLS
# ---------------------------------------------------------------------------------


def test_starttls_session(tls: Daemon, cert: tuple[Path, Path]) -> None:
    async def go() -> str:
        c = await connect(tls, "starttls")
        code, text = await c.cmd("STARTTLS")
        assert (code, text[:5]) == (220, "2.0.0"), text
        await c.writer.start_tls(client_tls_context(cert[0]), server_hostname=HOST)
        # state reset: no MAIL before a new EHLO
        code, text = await c.cmd("MAIL FROM:<a@test.example>")
        assert (code, text[:5]) == (503, "5.5.1"), text
        c.send(b"EHLO client.test\r\n")
        kw = _keywords(await c.lines())
        assert kw[0] == HOST
        assert "STARTTLS" not in kw
        assert "PIPELINING" in kw and "SIZE 26214400" in kw
        code, text = await c.cmd("STARTTLS")
        assert code in (454, 503), text
        code, text = await transaction(c, "a@test.example", ["x@test.example"], BODY)
        assert code == 250, text
        await c.cmd("QUIT")
        await c.close()
        return queued_id(text)

    qid = run(go())
    h = _received(tls.message_bytes(qid))
    assert f"with ESMTPS id {qid}" in h
    assert "TLS" in h
    assert envelope(tls, qid)["tls"]


def test_starttls_discards_pipelined_plaintext(tls: Daemon, cert: tuple[Path, Path]) -> None:
    """CVE-2011-0411 class: commands injected after STARTTLS in plaintext are dropped."""
    async def go() -> None:
        c = await connect(tls, "starttls-inject")
        c.send(b"STARTTLS\r\nNOOP\r\nEHLO injected.example\r\n"
               b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@test.example>\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (220, "2.0.0"), text
        await c.writer.start_tls(client_tls_context(cert[0]), server_hostname=HOST)
        # the first thing read over TLS answers *our* next command
        code, text = await c.cmd("HELP")
        assert code == 214, (code, text)
        assert await nothing_more(c)
        # and the injected MAIL did not open a transaction
        c.send(b"EHLO client.test\r\n")
        await c.lines()
        code, text = await c.cmd("RCPT TO:<victim@test.example>")
        assert (code, text[:5]) == (503, "5.5.1"), text
        await c.close()

    before = tls.queued_ids()
    run(go())
    assert tls.queued_ids() == before


def test_aiosmtplib_starttls(tls: Daemon, cert: tuple[Path, Path]) -> None:
    async def go() -> str:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=tls.smtp_port, start_tls=False,
                               local_hostname="aio.client.test")
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        ctx = client_tls_context(cert[0])
        ctx.check_hostname = False  # we connect by IP; the chain is still verified
        await checked("aio-starttls", smtp.starttls(tls_context=ctx))
        await smtp.ehlo()
        assert not smtp.supports_extension("starttls")
        await checked("aio-starttls", smtp.mail("a@test.example"))
        await checked("aio-starttls", smtp.rcpt("x@test.example"))
        resp = await checked("aio-starttls", smtp.data(BODY))
        await checked("aio-starttls", smtp.quit())
        return queued_id(resp.message)

    qid = run(go())
    assert "with ESMTPS" in _received(tls.message_bytes(qid))
    assert strip_received(tls.message_bytes(qid)) == BODY


def test_swaks_starttls(tls: Daemon) -> None:
    proc = _swaks(tls.smtp_port, "--tls", "--pipeline", "--from", "a@test.example",
                  "--to", "x@test.example")
    finals = record_swaks(proc.stdout, "swaks-tls")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    queued = [f for f in finals if "queued as" in f]
    assert len(queued) == 1, finals
    assert "with ESMTPS" in _received(tls.message_bytes(queued_id(queued[0])))
