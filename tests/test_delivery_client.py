"""The outbound SMTP/LMTP client against real sink servers on loopback (tests/sinks.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from empath.delivery.client import CHUNK_SIZE, ClientSettings, ConnectionPool, deliver
from empath.delivery.types import RcptResult, Target
from empath.spool import Envelope, Recipient, new_message_id
from tests.sinks import (
    LMTPSink,
    RawServer,
    Script,
    SMTPSink,
    loopback,
    make_tls,
    unused_port,
)

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

HELO = "client.empath.test"
OWN = "mx.empath.test"
BODY = (b"Received: from client.test\r\nFrom: a@origin.test\r\nTo: b@dest.test\r\n"
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nmiddle\r\n. \r\n"
        b"last line\r\n")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


def settings(**kw: Any) -> ClientSettings:
    base: dict[str, Any] = dict(helo=HELO, own_hostname=OWN, tls="none", connect_timeout=5.0,
                                command_timeout=5.0, final_timeout=5.0)
    base.update(kw)
    return ClientSettings(**base)


def message(tmp_path: Path, data: bytes = BODY, rcpts: list[str] | None = None,
            **env_kw: Any) -> tuple[Envelope, list[Recipient], Path]:
    recipients = [Recipient(address=a) for a in (rcpts or ["b@dest.test"])]
    env = Envelope(id=new_message_id(), sender=env_kw.pop("sender", "a@origin.test"),
                   recipients=recipients, received_at=time.time(), client_addr="127.0.0.1",
                   client_port=0, helo="client.test", size=len(data), **env_kw)
    path = tmp_path / f"{env.id}.msg"
    path.write_bytes(data)
    return env, recipients, path


def target(server: SMTPSink | LMTPSink | RawServer, name: str = "mx1.dest.test") -> Target:
    assert server.host is not None
    return Target(name=name, address=server.host, port=server.port)


async def send(tmp_path: Path, targets: list[Target], *, pool: ConnectionPool | None = None,
               body: bytes = BODY, rcpts: list[str] | None = None,
               env_kw: dict[str, Any] | None = None, **kw: Any) -> list[RcptResult]:
    env, recipients, path = message(tmp_path, body, rcpts, **(env_kw or {}))
    own_pool = pool is None
    pool = pool or ConnectionPool()
    try:
        results = await deliver(env, recipients, path, targets, settings(**kw), pool=pool)
    finally:
        if own_pool:
            await pool.close()
    assert [r.address for r in results] == [r.address for r in recipients]
    for r in results:
        assert r.enhanced[0] == {"delivered": "2", "deferred": "4", "bounced": "5"}[r.status]
    return results


# ---- plain delivery ----------------------------------------------------------------------


def test_plain_delivery_is_byte_exact(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            [res] = await send(tmp_path, [target(sink)])
            assert res.status == "delivered"
            assert (res.code, res.enhanced, res.text) == (250, "2.0.0", "Ok: queued")
            assert res.remote_mta == "mx1.dest.test" and res.tls is None
            [txn] = sink.delivered
            assert txn.data == BODY
            assert txn.helo == HELO and not txn.tls
            assert txn.mail == f"FROM:<a@origin.test> SIZE={len(BODY)}"
            assert txn.rcpts == ["TO:<b@dest.test>"]
            assert "STARTTLS" not in sink.verbs()

    run(main)


def _fill(n: int) -> bytes:
    """``n`` bytes of short CRLF lines (n >= 2)."""
    out = b""
    while n > 1000:
        out += b"x" * 498 + b"\r\n"
        n -= 500
    return out + b"y" * (n - 2) + b"\r\n"


def test_dot_stuffing_across_chunk_boundaries(tmp_path: Path) -> None:
    # A line starting with "." right at a chunk boundary, and a CRLF split across one.
    body = _fill(CHUNK_SIZE) + b".at the boundary\r\n"
    body += _fill(2 * CHUNK_SIZE + 1 - len(body))
    assert body[2 * CHUNK_SIZE - 1: 2 * CHUNK_SIZE + 1] == b"\r\n"
    body += b".after a split CRLF\r\n.\r\nend\r\n"

    async def main() -> None:
        async with SMTPSink() as sink:
            [res] = await send(tmp_path, [target(sink)], body=body)
            assert res.status == "delivered"
            assert sink.delivered[0].data == body

    run(main)


def test_body_without_final_crlf_is_terminated(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            [res] = await send(tmp_path, [target(sink)], body=b"Subject: x\r\n\r\nno newline")
            assert res.status == "delivered"
            assert sink.delivered[0].data == b"Subject: x\r\n\r\nno newline\r\n"

    run(main)


def test_missing_data_file_defers(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            env, rcpts, path = message(tmp_path)
            path.unlink()
            pool = ConnectionPool()
            [res] = await deliver(env, rcpts, path, [target(sink)], settings(), pool=pool)
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.3.0", None)
            assert sink.connections == 0

    run(main)


# ---- envelope parameters --------------------------------------------------------------------

DSN_ENV = dict(body="8BITMIME", smtputf8=True, ret="HDRS", envid="q+2B1=x")


def test_parameters_sent_when_offered(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(dsn=True)) as sink:
            env, rcpts, path = message(tmp_path, rcpts=["b@dest.test", "c@dest.test"],
                                       **DSN_ENV)
            rcpts[0].notify = ("SUCCESS", "FAILURE")
            rcpts[0].orcpt = "rfc822;b+40dest.test"
            pool = ConnectionPool()
            results = await deliver(env, rcpts, path, [target(sink)], settings(), pool=pool)
            await pool.close()
            assert [r.status for r in results] == ["delivered", "delivered"]
            [txn] = sink.delivered
            assert txn.mail == (f"FROM:<a@origin.test> SIZE={len(BODY)} BODY=8BITMIME SMTPUTF8"
                                " RET=HDRS ENVID=q+2B1=x")
            assert txn.rcpts == ["TO:<b@dest.test> NOTIFY=SUCCESS,FAILURE "
                                 "ORCPT=rfc822;b+40dest.test", "TO:<c@dest.test>"]

    run(main)


def test_parameters_not_sent_when_not_offered(tmp_path: Path) -> None:
    async def main() -> None:
        # 8BITMIME and SMTPUTF8 offered but not needed by this 7-bit message; no SIZE, no DSN
        async with SMTPSink(Script(dsn=False, size=None)) as sink:
            env, rcpts, path = message(tmp_path, ret="FULL", envid="abc")
            rcpts[0].notify = ("NEVER",)
            rcpts[0].orcpt = "rfc822;b+40dest.test"
            pool = ConnectionPool()
            [res] = await deliver(env, rcpts, path, [target(sink)], settings(), pool=pool)
            await pool.close()
            assert res.status == "delivered"
            [txn] = sink.delivered
            assert txn.mail == "FROM:<a@origin.test>"
            assert txn.rcpts == ["TO:<b@dest.test>"]

    run(main)


def test_null_sender_and_utf8_address(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            [res] = await send(tmp_path, [target(sink)], rcpts=["jörg@dest.test"],
                               env_kw=dict(sender="", smtputf8=True))
            assert res.status == "delivered"
            [txn] = sink.delivered
            assert txn.mail == f"FROM:<> SIZE={len(BODY)} SMTPUTF8"
            assert txn.rcpts == ["TO:<jörg@dest.test>"]

    run(main)


def test_8bit_to_server_without_8bitmime_bounces(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(eightbitmime=False)) as sink:
            results = await send(tmp_path, [target(sink)], rcpts=["b@dest.test", "c@dest.test"],
                                 env_kw=dict(body="8BITMIME"))
            for res in results:
                assert (res.status, res.enhanced, res.code) == ("bounced", "5.6.3", None)
                assert res.remote_mta == "mx1.dest.test"
                assert "8BITMIME" in res.text
            assert "MAIL" not in sink.verbs()

    run(main)


def test_smtputf8_to_server_without_it_bounces(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(smtputf8=False)) as sink:
            [res] = await send(tmp_path, [target(sink)], env_kw=dict(smtputf8=True))
            assert (res.status, res.enhanced, res.code) == ("bounced", "5.6.7", None)
            assert res.remote_mta == "mx1.dest.test"
            assert "MAIL" not in sink.verbs()

    run(main)


def test_message_over_advertised_size_bounces(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(size=100)) as sink:
            [res] = await send(tmp_path, [target(sink)], body=b"x" * 200 + b"\r\n")
            assert (res.status, res.enhanced, res.code) == ("bounced", "5.3.4", None)
            assert "MAIL" not in sink.verbs()

    run(main)


def test_helo_fallback_without_extensions(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(ehlo_reply="502 5.5.1 EHLO not here")) as sink:
            [res] = await send(tmp_path, [target(sink)])
            assert res.status == "delivered"
            assert sink.verbs()[:2] == ["EHLO", "HELO"]
            assert sink.delivered[0].mail == "FROM:<a@origin.test>"  # no SIZE: no ESMTP
            [res] = await send(tmp_path, [target(sink)], env_kw=dict(body="8BITMIME"))
            assert (res.status, res.enhanced) == ("bounced", "5.6.3")

    run(main)


# ---- replies --------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True])
def test_mixed_recipient_results(tmp_path: Path, pipelining: bool) -> None:
    replies = {"bad@dest.test": "550 5.1.1 no such user",
               "later@dest.test": "451 4.2.0 try again later",
               "full@dest.test": "452 mailbox full"}

    async def main() -> None:
        async with SMTPSink(Script(rcpt_replies=replies, pipelining=pipelining)) as sink:
            results = await send(tmp_path, [target(sink)],
                                 rcpts=["bad@dest.test", "later@dest.test", "ok@dest.test",
                                        "full@dest.test"])
            got = [(r.status, r.code, r.enhanced, r.text) for r in results]
            assert got == [
                ("bounced", 550, "5.1.1", "no such user"),
                ("deferred", 451, "4.2.0", "try again later"),
                ("delivered", 250, "2.0.0", "Ok: queued"),
                ("deferred", 452, "4.0.0", "mailbox full"),  # synthesised from the class
            ]
            assert all(r.remote_mta == "mx1.dest.test" for r in results)
            [txn] = sink.delivered
            assert txn.accepted == ["ok@dest.test"] and txn.data == BODY

    run(main)


def test_no_recipient_accepted_sends_no_data(tmp_path: Path) -> None:
    replies = {"x@dest.test": "550 5.1.1 unknown", "y@dest.test": "450 4.2.1 busy"}

    async def main() -> None:
        async with SMTPSink(Script(rcpt_replies=replies)) as sink:
            results = await send(tmp_path, [target(sink)], rcpts=list(replies))
            assert [r.status for r in results] == ["bounced", "deferred"]
            assert "DATA" not in sink.verbs()

    run(main)


def test_pipelined_group_ends_with_data(tmp_path: Path) -> None:
    """With PIPELINING, MAIL, the RCPTs and DATA go out together (RFC 2920); when no
    recipient is accepted the server's refusal of DATA ends it: no message is sent,
    and the session stays in step for the next one."""
    replies = {"x@dest.test": "550 5.1.1 unknown", "y@dest.test": "450 4.2.1 busy"}

    async def main() -> None:
        async with SMTPSink(Script(rcpt_replies=replies, pipelining=True)) as sink:
            pool = ConnectionPool()
            results = await send(tmp_path, [target(sink)], rcpts=list(replies), pool=pool)
            assert [(r.status, r.enhanced) for r in results] == \
                [("bounced", "5.1.1"), ("deferred", "4.2.1")]
            assert sink.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
            assert sink.delivered == []
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered" and sink.connections == 1
            [txn] = sink.delivered
            assert txn.data == BODY
            await pool.close()

    run(main)


def test_pipelined_data_accepted_without_recipients_gets_a_lone_dot(tmp_path: Path) -> None:
    """A broken server that says 354 to a pipelined DATA after refusing every RCPT gets
    just "." (RFC 2920 §3.1) — never the message — and its connection is not reused."""
    replies = {"EHLO": "250-raw.dest.test\r\n250 PIPELINING", "MAIL": "250 2.1.0 ok",
               "RCPT": "550 5.1.1 unknown", "DATA": "354 go ahead anyway",
               ".": "250 2.0.0 queued nothing", "RSET": "250 2.0.0 ok"}

    async def main() -> None:
        async with RawServer("220 raw.dest.test ESMTP", replies=replies) as raw:
            pool = ConnectionPool()
            [res] = await send(tmp_path, [target(raw)], pool=pool)
            assert (res.status, res.enhanced) == ("bounced", "5.1.1")
            await send(tmp_path, [target(raw)], pool=pool)
            await pool.close()
            first = raw.commands[:raw.commands.index(".") + 1]
            assert [c.split(" ", 1)[0] for c in first] == ["EHLO", "MAIL", "RCPT", "DATA", "."]
            assert raw.connections == 2  # the odd session was not reused

    run(main)


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(("reply", "status", "enhanced"), [
    ("550 5.7.1 sender rejected", "bounced", "5.7.1"),
    ("451 4.7.1 greylisted", "deferred", "4.7.1"),
])
def test_mail_from_rejected(tmp_path: Path, reply: str, status: str, enhanced: str,
                            pipelining: bool) -> None:
    async def main() -> None:
        async with SMTPSink(Script(mail_reply=reply, pipelining=pipelining)) as sink:
            pool = ConnectionPool()
            results = await send(tmp_path, [target(sink)], rcpts=["b@dest.test", "c@dest.test"],
                                 pool=pool)
            assert [(r.status, r.code, r.enhanced) for r in results] == \
                [(status, int(reply[:3]), enhanced)] * 2
            if pipelining:  # RCPTs and DATA went out with MAIL; replies read and ignored
                assert sink.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
            else:
                assert "RCPT" not in sink.verbs()
            # The session stayed in step: the next message reuses it.
            sink.script.mail_reply = None
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered" and sink.connections == 1
            await pool.close()

    run(main)


def test_421_at_rcpt_defers_everyone_and_drops_the_connection(tmp_path: Path) -> None:
    replies = {"x@dest.test": "421 4.3.2 shutting down"}

    async def main() -> None:
        async with SMTPSink(Script(rcpt_replies=replies)) as sink:
            pool = ConnectionPool()
            results = await send(tmp_path, [target(sink)], pool=pool,
                                 rcpts=["ok@dest.test", "x@dest.test", "later@dest.test"])
            assert [(r.status, r.code, r.enhanced) for r in results] == \
                [("deferred", 421, "4.3.2")] * 3
            assert "DATA" not in sink.verbs() and sink.verbs().count("RCPT") == 2
            assert pool.idle_count() == 0
            await pool.close()

    run(main)


@pytest.mark.parametrize(("reply", "status", "enhanced"), [
    ("451 4.3.0 queue trouble", "deferred", "4.3.0"),
    ("554 5.6.0 content rejected", "bounced", "5.6.0"),
    ("452 out of room", "deferred", "4.0.0"),
    ("550 4.7.1 confused class", "bounced", "5.7.1"),  # the reply code's class wins
])
def test_final_dot_failure(tmp_path: Path, reply: str, status: str, enhanced: str) -> None:
    async def main() -> None:
        async with SMTPSink(Script(data_reply=reply)) as sink:
            results = await send(tmp_path, [target(sink)], rcpts=["b@dest.test", "c@dest.test"])
            for res in results:
                assert (res.status, res.code, res.enhanced) == (status, int(reply[:3]), enhanced)
                assert res.text == reply.split(" ", 2)[2] or reply.endswith(res.text)

    run(main)


# ---- targets and connection failures ----------------------------------------------------------


def test_primary_down_uses_second_target(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            down = Target("mx1.dest.test", loopback(), sink.port)  # nothing listens there
            [res] = await send(tmp_path, [down, target(sink, "mx2.dest.test")])
            assert res.status == "delivered" and res.remote_mta == "mx2.dest.test"
            assert len(sink.delivered) == 1

    run(main)


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy, come back later", "554 5.7.1 go away"])
def test_failed_greeting_uses_second_target(tmp_path: Path, greeting: str) -> None:
    async def main() -> None:
        async with RawServer(greeting) as bad, SMTPSink() as sink:
            [res] = await send(tmp_path, [target(bad), target(sink, "mx2.dest.test")])
            assert res.status == "delivered" and res.remote_mta == "mx2.dest.test"
            assert bad.connections == 1 and bad.commands == ["QUIT"]

    run(main)


def test_all_targets_down_defers_441(tmp_path: Path) -> None:
    async def main() -> None:
        hosts = [loopback(), loopback()]
        ports = [unused_port(h) for h in hosts]
        targets = [Target(f"mx{n}.dest.test", h, p)
                   for n, (h, p) in enumerate(zip(hosts, ports, strict=True), 1)]
        results = await send(tmp_path, targets, rcpts=["b@dest.test", "c@dest.test"])
        for res in results:
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.1", None)
            assert res.text.startswith(f"connect to mx2.dest.test[{hosts[1]}]:{ports[1]}")
            assert "refused" in res.text.lower()

    run(main)


def test_every_target_5xx_greeting_bounces(tmp_path: Path) -> None:
    async def main() -> None:
        async with RawServer("554 5.7.1 no mail here") as a, RawServer("554 not you") as b:
            [res] = await send(tmp_path, [target(a), target(b, "mx2.dest.test")])
            assert (res.status, res.code, res.enhanced) == ("bounced", 554, "5.0.0")
            assert res.remote_mta == "mx2.dest.test" and "not you" in res.text
            # one 5xx and one unreachable: not everyone said no, so try again later
            host = loopback()
            down = Target("mx3.dest.test", host, unused_port(host))
            [res] = await send(tmp_path, [target(a), down])
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.1", None)

    run(main)


def test_greeting_4xx_everywhere_defers(tmp_path: Path) -> None:
    async def main() -> None:
        async with RawServer("421 4.3.2 shutting down") as a:
            [res] = await send(tmp_path, [target(a)])
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.1", None)
            assert "421 shutting down" in res.text

    run(main)


def test_connection_dropped_mid_data_defers(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(drop_mid_data=True)) as sink:
            body = BODY + b"x" * 998 + b"\r\n" * 200
            results = await send(tmp_path, [target(sink)], body=body,
                                 rcpts=["b@dest.test", "c@dest.test"])
            for res in results:
                assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.2", None)
                assert res.remote_mta == "mx1.dest.test"
            assert sink.delivered == []

    run(main)


def test_connection_dropped_at_final_dot_is_not_delivered(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(drop_at_dot=True)) as sink:
            [res] = await send(tmp_path, [target(sink)])
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.2", None)
            assert "more than once" in res.text

    run(main)


def test_silent_server_times_out(tmp_path: Path) -> None:
    async def main() -> None:
        async with RawServer(None) as silent:
            [res] = await send(tmp_path, [target(silent)], command_timeout=0.3)
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.1", None)
            assert "timed out while receiving the initial server greeting" in res.text

    run(main)


@pytest.mark.parametrize("where", ["mail", "rcpt", "dot"])
def test_server_silent_mid_transaction_defers_442(tmp_path: Path, where: str) -> None:
    async def main() -> None:
        async with SMTPSink(Script(hang_at=where)) as sink:
            [res] = await send(tmp_path, [target(sink)], command_timeout=0.3, final_timeout=0.3)
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.4.2", None)
            assert "timed out" in res.text

    run(main)


@pytest.mark.parametrize("script", [Script(hostname="MX.empath.test"),
                                    Script(ehlo_hostname="mx.empath.test.")])
def test_greeting_with_own_hostname_is_a_loop(tmp_path: Path, script: Script) -> None:
    async def main() -> None:
        async with SMTPSink(script) as sink, SMTPSink() as other:
            results = await send(tmp_path, [target(sink), target(other, "mx2.dest.test")],
                                 rcpts=["b@dest.test", "c@dest.test"])
            for res in results:
                assert (res.status, res.enhanced, res.code) == ("bounced", "5.4.6", None)
                assert res.text == "mail for dest.test loops back to myself"
            assert "MAIL" not in sink.verbs()
            assert other.connections == 0

    run(main)


# ---- TLS ----------------------------------------------------------------------------------------

MX = "mx.tls.test"


def tls_target(sink: SMTPSink, name: str = MX) -> Target:
    return target(sink, name)


def test_tls_none_never_starttls(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, MX)

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="none")
            assert res.status == "delivered" and res.tls is None
            assert "STARTTLS" not in sink.verbs() and not sink.delivered[0].tls

    run(main)


def test_tls_may_uses_tls_when_offered(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, "some.other.name")  # not verified under "may"

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="may")
            assert res.status == "delivered"
            assert res.tls is not None and res.tls.startswith("TLSv1.")
            assert not res.tls.endswith("verified")
            assert sink.verbs()[:6] == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA"]
            assert sink.delivered[0].tls and sink.delivered[0].data == BODY

    run(main)


def test_tls_may_plain_when_not_offered(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(starttls=False)) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="may")
            assert res.status == "delivered" and res.tls is None

    run(main)


def test_tls_may_broken_handshake_falls_back_to_plain(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, MX)

    async def main() -> None:
        async with SMTPSink(Script(starttls=True, broken_tls=True),
                            tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="may")
            assert res.status == "delivered" and res.tls is None
            assert sink.connections == 2
            assert "STARTTLS" in sink.verbs(1) and "STARTTLS" not in sink.verbs(2)
            assert sink.delivered[0].connection == 2 and sink.delivered[0].data == BODY

    run(main)


def test_tls_encrypt_not_offered_defers(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(starttls=False)) as a, SMTPSink(Script(starttls=False)) as b:
            [res] = await send(tmp_path, [tls_target(a), tls_target(b, "mx2.tls.test")],
                               tls="encrypt")
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.7.4", None)
            assert res.text == (f"TLS is required, but was not offered by "
                                f"mx2.tls.test[{b.host}]:{b.port}")
            assert "MAIL" not in a.verbs() + b.verbs()

    run(main)


def test_tls_encrypt_broken_handshake_defers(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, MX)

    async def main() -> None:
        async with SMTPSink(Script(starttls=True, broken_tls=True),
                            tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="encrypt")
            assert (res.status, res.enhanced) == ("deferred", "4.7.5")
            assert sink.connections == 1 and "MAIL" not in sink.verbs()

    run(main)


def test_tls_encrypt_unverified_cert_is_fine(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, "wrong.name.test")

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="encrypt")
            assert res.status == "delivered" and res.tls is not None
            assert not res.tls.endswith("verified")

    run(main)


def test_tls_verify_good_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, MX)

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="verify", ca_file=tls.ca_file)
            assert res.status == "delivered"
            assert res.tls is not None and res.tls.startswith("TLSv1.")
            assert res.tls.endswith(" verified")
            assert sink.delivered[0].tls

    run(main)


def test_tls_verify_wrong_host_name_defers(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, "other.tls.test")

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="verify", ca_file=tls.ca_file)
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.7.5", None)
            assert "certificate verification failed" in res.text
            assert "MAIL" not in sink.verbs()

    run(main)


def test_tls_verify_untrusted_ca_defers(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, MX)
    stranger = make_tls(tmp_path / "other", MX)  # a different CA

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="verify",
                               ca_file=stranger.ca_file)
            assert (res.status, res.enhanced, res.code) == ("deferred", "4.7.5", None)
            assert "certificate verification failed" in res.text
            assert "MAIL" not in sink.verbs()

    run(main)


def test_tls_verify_not_offered_defers(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(starttls=False)) as sink:
            [res] = await send(tmp_path, [tls_target(sink)], tls="verify")
            assert (res.status, res.enhanced) == ("deferred", "4.7.4")

    run(main)


# ---- LMTP ---------------------------------------------------------------------------------------

LMTP_RCPTS = ["a@local.test", "b@local.test", "c@local.test", "d@local.test"]


async def _lmtp_case(tmp_path: Path, sink: LMTPSink, tgt: Target) -> None:
    results = await send(tmp_path, [tgt], rcpts=LMTP_RCPTS, lmtp=True, tls="may",
                         own_hostname=sink.hostname)  # a local LMTP server is not a loop
    got = [(r.status, r.code, r.enhanced, r.text) for r in results]
    assert got == [
        ("delivered", 250, "2.0.0", "<a@local.test> delivered"),
        ("deferred", 452, "4.2.2", "mailbox full"),
        ("bounced", 550, "5.1.1", "no such user"),
        ("bounced", 550, "5.1.1", "gone at RCPT"),
    ]
    assert all(r.remote_mta == tgt.name for r in results)
    assert sink.commands[0][1] == f"LHLO {HELO}"
    [txn] = sink.delivered
    assert txn.data == BODY and txn.accepted == LMTP_RCPTS[:3]


def _lmtp_sink(**kw: Any) -> LMTPSink:
    return LMTPSink(rcpt_replies={"d@local.test": "550 5.1.1 gone at RCPT"},
                    data_replies={"b@local.test": "452 4.2.2 mailbox full",
                                  "c@local.test": "550 5.1.1 no such user"}, **kw)


def test_lmtp_tcp_per_recipient_results(tmp_path: Path) -> None:
    async def main() -> None:
        async with _lmtp_sink() as sink:
            await _lmtp_case(tmp_path, sink, target(sink, "lmtp.local.test"))

    run(main)


def test_lmtp_connection_lost_between_replies(tmp_path: Path) -> None:
    async def main() -> None:
        async with LMTPSink(data_replies={"b@local.test": None}) as sink:
            results = await send(tmp_path, [target(sink, "lmtp.local.test")], lmtp=True,
                                 rcpts=["a@local.test", "b@local.test", "c@local.test"])
            assert [(r.status, r.code, r.enhanced) for r in results] == [
                ("delivered", 250, "2.0.0"), ("deferred", None, "4.4.2"),
                ("deferred", None, "4.4.2")]

    run(main)


def test_lmtp_unix_socket_per_recipient_results(tmp_path: Path) -> None:
    path = tmp_path / "lmtp.sock"

    async def main() -> None:
        async with _lmtp_sink(path=path) as sink:
            await _lmtp_case(tmp_path, sink, Target(str(path), str(path), 0))

    run(main)


# ---- connection reuse ------------------------------------------------------------------


def test_connection_reuse(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            pool = ConnectionPool()
            for _ in range(3):
                [res] = await send(tmp_path, [target(sink)], pool=pool)
                assert res.status == "delivered"
            assert sink.connections == 1 and len(sink.delivered) == 3
            assert sink.verbs().count("EHLO") == 1 and sink.verbs().count("RSET") == 2
            assert pool.idle_count() == 1
            await pool.close()
            await asyncio.sleep(0.05)
            assert sink.verbs()[-1] == "QUIT"

    run(main)


def test_connection_reused_after_failed_transaction(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink(Script(rcpt_replies={"no@dest.test": "550 5.1.1 no"})) as sink:
            pool = ConnectionPool()
            [res] = await send(tmp_path, [target(sink)], pool=pool, rcpts=["no@dest.test"])
            assert res.status == "bounced"
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered"
            assert sink.connections == 1
            assert sink.verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA"]
            await pool.close()

    run(main)


@pytest.mark.parametrize("pipelining", [False, True])
def test_connection_that_dies_at_rset_costs_no_deferral(tmp_path: Path,
                                                        pipelining: bool) -> None:
    """A pooled session the server drops as it is reused (RSET unanswered; with
    PIPELINING the RSET heads the MAIL group) is replaced by a fresh connection: the
    message is delivered once, not deferred."""
    async def main() -> None:
        async with SMTPSink(Script(pipelining=pipelining)) as sink:
            pool = ConnectionPool()
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered"
            sink.script.drop_at_rset = True
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered", res
            assert sink.connections == 2 and len(sink.delivered) == 2
            assert sink.verbs().count("RSET") == 1
            await pool.close()

    run(main)


def test_connection_closed_while_idle_is_not_reused(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            pool = ConnectionPool()
            await send(tmp_path, [target(sink)], pool=pool)
            await sink.kick()
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered"
            assert sink.connections == 2 and len(sink.delivered) == 2
            await pool.close()

    run(main)


def test_concurrent_deliveries_never_share_a_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            pool = ConnectionPool(max_per_target=4)
            results = await asyncio.gather(*(send(tmp_path, [target(sink)], pool=pool)
                                             for _ in range(6)))
            assert all(r.status == "delivered" for [r] in results)
            assert sink.connections == 6
            assert len({t.connection for t in sink.delivered}) == 6
            assert pool.idle_count() == 4  # bounded per target
            [res] = await send(tmp_path, [target(sink)], pool=pool)
            assert res.status == "delivered" and sink.connections == 6
            await pool.close()
            assert pool.idle_count() == 0

    run(main)


def test_idle_connection_expires(tmp_path: Path) -> None:
    async def main() -> None:
        async with SMTPSink() as sink:
            pool = ConnectionPool(idle_timeout=0.1)
            await send(tmp_path, [target(sink)], pool=pool)
            assert pool.idle_count() == 1
            await asyncio.sleep(0.3)
            assert pool.idle_count() == 0
            assert "QUIT" in sink.verbs()
            await send(tmp_path, [target(sink)], pool=pool)
            assert sink.connections == 2
            await pool.close()

    run(main)


def test_pool_is_per_tls_policy(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, MX)

    async def main() -> None:
        async with SMTPSink(Script(starttls=True), tls=tls.server_context) as sink:
            pool = ConnectionPool()
            [plain] = await send(tmp_path, [tls_target(sink)], pool=pool, tls="none")
            [secure] = await send(tmp_path, [tls_target(sink)], pool=pool, tls="may")
            assert plain.tls is None and secure.tls is not None
            assert sink.connections == 2
            [again] = await send(tmp_path, [tls_target(sink)], pool=pool, tls="may")
            assert again.tls == secure.tls and sink.connections == 2
            await pool.close()

    run(main)


# ---- memory ----------------------------------------------------------------------------

_CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from empath.delivery.client import ClientSettings, ConnectionPool, deliver
    from empath.delivery.types import Target
    from empath.spool import Envelope, Recipient, new_message_id

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise SystemExit("no " + field)

    async def main():
        path, host, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        def envelope(data):  # the data is all of the file here (a plain file)
            return Envelope(id=new_message_id(), sender="a@origin.test",
                            recipients=[Recipient("b@dest.test")], received_at=time.time(),
                            client_addr="127.0.0.1", client_port=0, helo="client.test",
                            size=data.stat().st_size)
        pool = ConnectionPool()
        settings = ClientSettings(helo="client.test", own_hostname="mx.empath.test",
                                  tls="none", command_timeout=60, final_timeout=60)
        target = Target("mx.dest.test", host, port)
        # Warm up (imports, thread pool, first connection), then measure the peak.
        warm = envelope(Path(sys.argv[4]))
        await deliver(warm, warm.recipients, Path(sys.argv[4]), [target], settings, pool=pool)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            hwm = True
        except OSError:
            hwm = False
        before = rss("VmRSS")
        peak = before
        done = False

        async def sample():
            nonlocal peak
            while not done:
                peak = max(peak, rss("VmRSS"))
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        env = envelope(path)
        [res] = await deliver(env, env.recipients, path, [target], settings, pool=pool)
        done = True
        await sampler
        if hwm:
            peak = max(peak, rss("VmHWM"))
        await pool.close()
        print(json.dumps({"status": res.status, "before": before, "peak": peak}))

    asyncio.run(main())
""")


def test_large_message_streams_with_bounded_memory(tmp_path: Path) -> None:
    line = b"." + b"m" * 996 + b"\r\n"  # every line needs stuffing
    count = 25 * 1024 * 1024 // len(line) + 1
    big = tmp_path / "big.msg"
    digest = hashlib.sha256()
    with big.open("wb") as f:
        header = b"Subject: big\r\n\r\n"
        f.write(header)
        digest.update(header)
        for _ in range(count):
            f.write(line)
            digest.update(line)
    size = big.stat().st_size
    assert size > 25 * 1024 * 1024
    small = tmp_path / "small.msg"
    small.write_bytes(BODY)

    async def main() -> dict[str, Any]:
        async with SMTPSink(Script(keep_data=False)) as sink:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO), *filter(None, [env.get("PYTHONPATH")])])
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CLIENT_SCRIPT, str(big), sink.host, str(sink.port),
                str(small), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 300)
            assert proc.returncode == 0, err.decode()
            report: dict[str, Any] = json.loads(out)
            assert sink.sizes[-1] == size
            assert sink.hashes[-1] == digest.hexdigest()
            return report

    report = run(main)
    assert report["status"] == "delivered"
    growth = report["peak"] - report["before"]
    assert growth < 8 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB for a {size} byte message"
