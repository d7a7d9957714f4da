"""Delivery end to end, as numbered scenarios: the real daemon (2 workers) takes mail
over SMTP, resolves MX through a real dnsmasq on loopback, and delivers to real SMTP
and LMTP sinks (tests/sinks.py) and to a real Maildir. DSNs come back to a local
sender's Maildir, where they are parsed with the stdlib ``email`` package.

Every sink listens on its own 127.0.10.N address, all on one port (``MX_PORT``,
given to the daemon as ``delivery.mx_port``), so "the next MX" is simply another
address. The sinks run on an event loop in a background thread while the test
body waits for what the daemon did, polling the spool, the sinks and the Maildir.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.dnsmasq import DnsmasqServer, dnsmasq_fixture
from tests.harness import (
    Daemon,
    RawClient,
    children_of,
    commit_unreported,
    free_port,
    queued_id,
    send_message,
    spool_ids,
    spool_record,
    wait_until,
)
from tests.sinks import LMTPSink, Script, SinkLoop, SMTPSink, make_tls

T = TypeVar("T")
MakeDaemon = Callable[..., Daemon]

OUR_NAME = "mx.empath.test"
MX_PORT = free_port()
LMTP_PORT = free_port()

IP = {
    "mx1.primary.test": "127.0.10.1",
    "mx2.primary.test": "127.0.10.2",
    "afallback.test": "127.0.10.3",
    "mx1.backup.test": "127.0.10.4",
    "mx.slow.test": "127.0.10.5",
    "mx.down.test": "127.0.10.9",
    "mx.tls.test": "127.0.10.11",
    "lmtp.host.test": "127.0.10.20",
    OUR_NAME: "127.0.10.100",  # nothing listens there: it is "us" by name
}

dns_server = dnsmasq_fixture(
    mx={
        "primary.test": [(10, "mx1.primary.test"), (20, "mx2.primary.test")],
        "nullmx.test": [(0, ".")],
        # We are the backup (20) of backup.test, and the best MX of loop.test.
        "backup.test": [(10, "mx1.backup.test"), (20, OUR_NAME)],
        "loop.test": [(10, OUR_NAME), (20, "mx1.backup.test")],
        "slow.test": [(10, "mx.slow.test")],
        "down.test": [(10, "mx.down.test")],
        "tls.test": [(10, "mx.tls.test")],
    },
    hosts={name: [ip] for name, ip in IP.items()},
)

SENDER = "alice@test.example"


# ---- sinks on a background event loop ------------------------------------------------


def mx_sink(sinks: SinkLoop, name: str, script: Script | None = None, **kw: Any) -> SMTPSink:
    """An SMTP sink at ``name``'s address in the test DNS, on the MX port."""
    return sinks.start(SMTPSink(script, host=IP[name], port=MX_PORT, **kw))


def lmtp_sink(sinks: SinkLoop, **kw: Any) -> LMTPSink:
    return sinks.start(LMTPSink(host=IP["lmtp.host.test"], port=LMTP_PORT, **kw))


# ---- the daemon, mail and the spool ------------------------------------------------


def start_daemon(
    make_daemon: MakeDaemon, dns: DnsmasqServer, mail: Path, *, env: dict[str, str] | None = None,
    **delivery: Any,
) -> Daemon:
    cfg = {
        "mode": "mx",
        "nameservers": [dns.nameserver],
        "mx_port": MX_PORT,
        "retry_schedule": [1],
        "routes": {"test.example": f"maildir:{mail}"},
        **delivery,
    }
    d = make_daemon(start=False, hostname=OUR_NAME, local_domains=["test.example"], delivery=cfg)
    d.extra_env.update(env or {})
    d.start()
    return d


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    root = tmp_path / "mail"
    root.mkdir()
    return root


def message(subject: str, extra_headers: bytes = b"") -> bytes:
    return (
        extra_headers
        + f"From: Alice <{SENDER}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@test.example>\r\n\r\n"
        "Hello.\r\n..a line that starts with a dot\r\n".encode()
    )


def send(d: Daemon, rcpts: list[str], subject: str, *, sender: str = SENDER,
         extra_headers: bytes = b"") -> str:
    code, text = asyncio.run(
        send_message(d.smtp_port, sender, rcpts, message(subject, extra_headers), "delivery")
    )
    assert code == 250, text
    return queued_id(text)


async def _send_with(port: int, mail_cmd: str, rcpt_cmds: list[str], body: bytes) -> str:
    c = await RawClient.connect(port, "delivery-params")
    try:
        await c.greet()
        for cmd in [mail_cmd, *rcpt_cmds]:
            code, text = await c.cmd(cmd)
            assert code == 250, (cmd, text)
        code, text = await c.cmd("DATA")
        assert code == 354, text
        c.send(body + b".\r\n")
        code, text = await c.reply()
        assert code == 250, text
        await c.cmd("QUIT")
        return queued_id(text)
    finally:
        await c.close()


def send_with(d: Daemon, mail_cmd: str, rcpt_cmds: list[str], subject: str,
              body: bytes | None = None) -> str:
    return asyncio.run(_send_with(d.smtp_port, mail_cmd, rcpt_cmds, body or message(subject)))


def envelope(d: Daemon, qid: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = spool_record(d.queue_dir, qid)
    except (FileNotFoundError, ValueError):
        return None  # gone, or (never seen here) mid-rename
    return data


def rcpt_state(d: Daemon, qid: str, address: str) -> dict[str, Any] | None:
    env = envelope(d, qid)
    if env is None:
        return None
    return next(r for r in env["recipients"] if r["address"] == address)


def wait_rcpt(d: Daemon, qid: str, address: str, what: str,
              pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Wait until ``address``'s state in the spool record satisfies ``pred``; return it."""
    def check() -> dict[str, Any] | None:
        r = rcpt_state(d, qid, address)
        return r if r is not None and pred(r) else None

    return wait_until(check, what, d)  # type: ignore[no-any-return]


def gone(d: Daemon, qid: str) -> bool:
    return not (d.queue_dir / f"{qid}.msg").exists()


def maildir_messages(mail: Path, user: str) -> list[EmailMessage]:
    new = mail / user / "new"
    if not new.is_dir():
        return []
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for p in sorted(new.iterdir())
    ]


def dsns(mail: Path, user: str = "alice") -> list[EmailMessage]:
    return [m for m in maildir_messages(mail, user)
            if m.get_content_type() == "multipart/report"]


def report_fields(dsn: EmailMessage) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The per-message fields and per-recipient blocks of a DSN's delivery-status part."""
    part = next(p for p in dsn.walk() if p.get_content_type() in (
        "message/delivery-status", "message/global-delivery-status"))
    # Parsed from the text, not by the stdlib (which turns message/delivery-status
    # into sub-messages but leaves the global variant unparsed).
    text = part.as_bytes().decode().replace("\r\n", "\n").split("\n\n", 1)[1]
    text = re.sub(r"\n[ \t]+", " ", text)  # unfold
    blocks = [
        {k.strip().lower(): v.strip() for k, _, v in
         (line.partition(":") for line in block.splitlines() if line[:1] not in " \t")}
        for block in text.split("\n\n") if block.strip()
    ]
    return blocks[0], blocks[1:]


def one_dsn(mail: Path, d: Daemon, user: str = "alice") -> EmailMessage:
    found = wait_until(lambda: dsns(mail, user), f"a DSN in {user}'s Maildir", d)
    assert len(found) == 1, [m["Subject"] for m in found]
    return found[0]  # type: ignore[no-any-return]


# ---- 01-03: routing by MX ------------------------------------------------------------


def test_01_mx_preference_delivers_to_the_best_mx(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1, mx2 = mx_sink(sinks, "mx1.primary.test"), mx_sink(sinks, "mx2.primary.test")
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["bob@primary.test"], "scenario 01")
    wait_until(lambda: gone(d, qid), "the message to leave the queue", d)
    assert len(mx1.delivered) == 1 and not mx2.transactions
    txn = mx1.delivered[0]
    assert txn.helo == OUR_NAME
    assert txn.mail.startswith(f"FROM:<{SENDER}>")
    assert txn.rcpts == ["TO:<bob@primary.test>"]
    data = txn.data
    assert data is not None
    # Byte-exact apart from our trace header, dot-stuffing undone by the sink.
    assert data.startswith(b"Received: from ")
    assert f"by {OUR_NAME} (empath)".encode() in data.split(b"\r\n\r\n")[0]
    assert data.endswith(message("scenario 01").replace(b"\r\n..", b"\r\n."))
    assert "delivered id=" + qid in d.log()


def test_02_secondary_mx_when_the_primary_is_down(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx2 = mx_sink(sinks, "mx2.primary.test")  # nothing listens on mx1
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["bob@primary.test"], "scenario 02")
    wait_until(lambda: gone(d, qid), "delivery via the secondary", d)
    assert len(mx2.delivered) == 1
    assert "relay=mx2.primary.test" in d.log()


def test_03_a_record_fallback_without_mx(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    host = mx_sink(sinks, "afallback.test")
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["carol@afallback.test"], "scenario 03")
    wait_until(lambda: gone(d, qid), "delivery to the domain's A record", d)
    assert [t.rcpts for t in host.delivered] == [["TO:<carol@afallback.test>"]]


# ---- 04-07: failures, retries and bounces ------------------------------------------


def test_04_null_mx_bounces_at_once_with_5_1_10(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["nobody@nullmx.test"], "scenario 04")
    dsn = one_dsn(mail, d)
    _, (block,) = report_fields(dsn)
    assert block["final-recipient"] == "rfc822;nobody@nullmx.test"
    assert (block["action"], block["status"]) == ("failed", "5.1.10")
    wait_until(lambda: gone(d, qid), "the bounced message to leave the queue", d)


def test_05_tempfail_then_success_on_the_next_scheduled_attempt(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "451 4.7.1 greylisted, try again later"}))
    d = start_daemon(make_daemon, dns_server, mail, retry_schedule=[2, 3600])
    qid = send(d, ["bob@primary.test"], "scenario 05")
    first = wait_rcpt(d, qid, "bob@primary.test", "a deferral",
                      lambda r: r["state"] == "deferred")
    assert first["attempts"] == 1
    assert "451 4.7.1 greylisted" in first["last_error"]
    assert first["next_attempt"] is not None
    mx1.script.rcpt_replies.clear()  # the greylist lets it through now
    wait_until(lambda: gone(d, qid), "delivery at the second attempt", d)
    assert len(mx1.delivered) == 1
    assert not dsns(mail)  # a deferral is not a bounce


def test_06_permanent_failure_dsn_field_by_field(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "550 5.1.1 <bob@primary.test>: user unknown"}))
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["bob@primary.test"], "scenario 06")
    dsn = one_dsn(mail, d)
    # Envelope: from the null sender (Return-Path written by our Maildir delivery).
    assert dsn["Return-Path"] == "<>"
    assert dsn["From"] == f"Mail Delivery System <MAILER-DAEMON@{OUR_NAME}>"
    assert [a.addr_spec for a in dsn["To"].addresses] == [SENDER]
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    per_message, (block,) = report_fields(dsn)
    assert per_message["reporting-mta"] == f"dns; {OUR_NAME}"
    assert per_message["x-empath-queue-id"] == qid
    assert block["final-recipient"] == "rfc822;bob@primary.test"
    assert (block["action"], block["status"]) == ("failed", "5.1.1")
    assert block["remote-mta"] == "dns; mx1.primary.test"
    assert block["diagnostic-code"] == "smtp; 550 5.1.1 <bob@primary.test>: user unknown"
    headers = next(p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers")
    returned = headers.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert b"Subject: scenario 06" in returned and b"Hello." not in returned
    wait_until(lambda: gone(d, qid), "the bounced message to leave the queue", d)


def test_06b_failed_bounce_goes_to_postmaster_once(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "550 5.1.1 user unknown"}))
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["bob@primary.test"], "scenario 06b", sender="")  # itself a bounce
    dsn = one_dsn(mail, d, user="postmaster")
    _, (block,) = report_fields(dsn)
    assert block["final-recipient"] == "rfc822;bob@primary.test"
    wait_until(lambda: gone(d, qid) and not spool_ids(d.queue_dir),
               "the queue to empty", d)
    assert len(dsns(mail, "postmaster")) == 1  # never bounced back to <>


def test_07_mixed_domains_one_bad_recipient_bounces_alone(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test")
    other = mx_sink(sinks, "afallback.test", Script(
        rcpt_replies={"carol@afallback.test": "550 5.1.1 no such user"}))
    d = start_daemon(make_daemon, dns_server, mail)
    rcpts = ["bob@primary.test", "carol@afallback.test", "dave@primary.test", "eve@test.example"]
    qid = send(d, rcpts, "scenario 07")
    dsn = one_dsn(mail, d)
    _, blocks = report_fields(dsn)
    assert [b["final-recipient"] for b in blocks] == ["rfc822;carol@afallback.test"]
    wait_until(lambda: gone(d, qid), "every recipient final", d)
    # One transaction per next hop: both primary.test recipients in one.
    assert [t.rcpts for t in mx1.delivered] == [["TO:<bob@primary.test>",
                                                 "TO:<dave@primary.test>"]]
    assert not other.delivered
    assert [m["Subject"] for m in maildir_messages(mail, "eve")] == ["scenario 07"]


# ---- 08: backup MX and loops -----------------------------------------------------------


def test_08_backup_mx_relays_to_the_primary_and_best_mx_without_route_bounces(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    primary = mx_sink(sinks, "mx1.backup.test")
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["x@backup.test"], "scenario 08 backup")
    wait_until(lambda: gone(d, qid), "relay to the primary MX", d)
    assert len(primary.delivered) == 1
    # We are loop.test's best MX but it is no local domain and has no route:
    # delivering would loop, so it bounces (5.4.6), and the better-than-us rule
    # means the worse MX (mx1.backup.test) is not tried either.
    qid = send(d, ["y@loop.test"], "scenario 08 loop")
    dsn = one_dsn(mail, d)
    _, (block,) = report_fields(dsn)
    assert (block["action"], block["status"]) == ("failed", "5.4.6")
    assert len(primary.delivered) == 1
    wait_until(lambda: gone(d, qid), "the looping message to leave the queue", d)


def test_08b_next_hop_greeting_with_our_name_is_a_loop(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx_sink(sinks, "mx1.primary.test", Script(hostname=OUR_NAME))
    d = start_daemon(make_daemon, dns_server, mail)
    send(d, ["bob@primary.test"], "scenario 08b")
    _, (block,) = report_fields(one_dsn(mail, d))
    assert block["status"] == "5.4.6"


def test_08c_too_many_received_headers_bounce_as_a_loop(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test")
    d = start_daemon(make_daemon, dns_server, mail)
    hops = b"".join(b"Received: from h%d.example by h%d.example; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                    % (i, i + 1) for i in range(50))
    send(d, ["bob@primary.test"], "scenario 08c", extra_headers=hops)  # + ours = 51
    _, (block,) = report_fields(one_dsn(mail, d))
    assert block["status"] == "5.4.6"
    assert not mx1.transactions


# ---- 09: DSN parameters ------------------------------------------------------------------


def test_09_notify_never_suppresses_the_bounce(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "550 5.1.1 user unknown"}))
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send_with(d, f"MAIL FROM:<{SENDER}>", ["RCPT TO:<bob@primary.test> NOTIFY=NEVER"],
                    "scenario 09")
    wait_until(lambda: gone(d, qid), "the bounced message to leave the queue", d)
    # The bounce is recorded and logged, but nobody is notified: a DSN would have
    # been queued before the original left, and the queue is empty.
    assert f"bounced id={qid}" in d.log()
    assert not spool_ids(d.queue_dir)
    assert not maildir_messages(mail, "alice")


def test_09b_dsn_parameters_pass_on_and_success_is_reported_when_they_cannot(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    with_dsn = mx_sink(sinks, "mx1.primary.test", Script(dsn=True))
    without = mx_sink(sinks, "afallback.test", Script(dsn=False))
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send_with(
        d, f"MAIL FROM:<{SENDER}> RET=HDRS ENVID=env+2B09",
        ["RCPT TO:<bob@primary.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@primary.test",
         "RCPT TO:<carol@afallback.test> NOTIFY=SUCCESS"],
        "scenario 09b")
    wait_until(lambda: gone(d, qid), "both deliveries", d)
    (txn,) = with_dsn.delivered
    assert txn.mail.endswith(" RET=HDRS ENVID=env+2B09")
    assert txn.rcpts == ["TO:<bob@primary.test> NOTIFY=SUCCESS,FAILURE "
                         "ORCPT=rfc822;bob@primary.test"]
    (plain,) = without.delivered
    assert plain.mail == f"FROM:<{SENDER}> SIZE={len(plain.data or b'')}"
    assert plain.rcpts == ["TO:<carol@afallback.test>"]
    # Only the hop that could not carry NOTIFY on makes us report: "relayed".
    per_message, blocks = report_fields(one_dsn(mail, d))
    assert per_message["original-envelope-id"] == "env+09"
    assert [(b["final-recipient"], b["action"], b["status"]) for b in blocks] == [
        ("rfc822;carol@afallback.test", "relayed", "2.0.0")]


def test_09c_success_notice_for_final_delivery(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, mail: Path
) -> None:
    d = start_daemon(make_daemon, dns_server, mail)
    send_with(d, "MAIL FROM:<bob@test.example>",
              ["RCPT TO:<eve@test.example> NOTIFY=SUCCESS"], "scenario 09c")
    dsn = one_dsn(mail, d, user="bob")
    assert dsn["Subject"] == "Successful Mail Delivery Report"
    _, (block,) = report_fields(dsn)
    assert (block["action"], block["status"]) == ("delivered", "2.0.0")
    assert [m["Subject"] for m in maildir_messages(mail, "eve")] == ["scenario 09c"]


# ---- 10-11: restarts and crashes ----------------------------------------------------------


def test_10_restart_keeps_each_next_attempt_time(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "451 4.3.0 try later"}))
    d = start_daemon(make_daemon, dns_server, mail, retry_schedule=[4, 3600])
    qid = send(d, ["bob@primary.test"], "scenario 10")
    before = wait_rcpt(d, qid, "bob@primary.test", "a deferral",
                       lambda r: r["state"] == "deferred")
    assert d.stop() == 0
    mx1.script.rcpt_replies.clear()
    tries_before = len(mx1.commands)
    d.start()
    after = rcpt_state(d, qid, "bob@primary.test")
    assert after == before  # state, attempts, next_attempt and last error survive exactly
    wait_until(lambda: gone(d, qid), "delivery at the kept next-attempt time", d)
    # The restart did not try early: the first command after it came at or after
    # the recorded next-attempt time.
    assert len(mx1.delivered) == 1
    assert len(mx1.commands) > tries_before
    assert mx1.delivered[0].connection > 1
    assert time.time() >= before["next_attempt"]


def test_11_kill_9_during_delivery_delivers_everything_and_repeats_nothing_recorded(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    fast = mx_sink(sinks, "mx1.primary.test")
    slow = mx_sink(sinks, "mx.slow.test", Script(hang_at="dot"))
    d = start_daemon(make_daemon, dns_server, mail)
    qid = send(d, ["bob@primary.test", "sue@slow.test"], "scenario 11")
    wait_rcpt(d, qid, "bob@primary.test", "bob recorded as delivered",
              lambda r: r["state"] == "delivered")
    wait_until(lambda: slow.transactions and slow.transactions[0].data is not None,
               "the slow server holding the final dot", d)
    d.kill()  # kill -9, supervisor and workers, with sue's delivery in flight
    sinks.stop(slow)
    slow_again = mx_sink(sinks, "mx.slow.test")
    d.start()
    wait_until(lambda: gone(d, qid), "sue's delivery after the restart", d)
    assert len(fast.delivered) == 1  # recorded as delivered: never sent again
    assert len(slow_again.delivered) == 1


def test_11b_kill_9_mid_stream_many_messages(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    # The server answers 15 messages and then holds every later final dot, so the kill
    # lands mid-stream however fast delivery runs on this machine.
    mx1 = mx_sink(sinks, "mx1.primary.test", Script(pipelining=True, hang_after=15))
    d = start_daemon(make_daemon, dns_server, mail)
    ids = [send(d, ["bob@primary.test"], f"bulk {i}") for i in range(60)]

    def recorded_done(qid: str) -> bool:
        r = rcpt_state(d, qid, "bob@primary.test")
        return r is None or r["state"] == "delivered"  # None: removed, all final

    wait_until(lambda: len(mx1.delivered) > 15 and any(map(recorded_done, ids)),
               "15 deliveries answered and one held at the dot", d)
    d.kill()
    # What the spool says is done at the moment of the crash must not be repeated.
    done = {qid for qid in ids if recorded_done(qid)}
    assert done and len(done) < len(ids), "the crash was meant to come mid-stream"
    sinks.stop(mx1)
    mx_again = mx_sink(sinks, "mx1.primary.test", Script(pipelining=True))
    d.start()
    wait_until(lambda: all(gone(d, qid) for qid in ids), "the whole queue delivered", d,
               timeout=60)

    def subject(t: Any) -> str:
        return email.message_from_bytes(t.data)["Subject"]  # type: ignore[no-any-return]

    got = [subject(t) for t in mx1.delivered if t.replied] + list(map(subject, mx_again.delivered))
    assert set(got) == {f"bulk {i}" for i in range(60)}  # nothing lost
    for i, qid in enumerate(ids):
        if qid in done:
            assert got.count(f"bulk {i}") == 1, f"{qid} was recorded done, yet repeated"


def test_11c_mail_a_killed_worker_never_reported_is_delivered_without_a_restart(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, mail: Path
) -> None:
    # A worker tells the supervisor about each message it acknowledged in batches; a
    # kill -9 can take the last notices with it. Such a message is in the spool, as
    # this one is (committed the way a worker commits), and nobody was told of it.
    d = start_daemon(make_daemon, dns_server, mail)
    qid = commit_unreported(d.state_dir, message("never reported"), SENDER,
                            "carol@test.example")
    time.sleep(1.5)  # the supervisor's scheduler ticks meanwhile: it does not know of it
    assert not maildir_messages(mail, "carol") and not gone(d, qid)
    assert d.proc is not None
    os.kill(min(children_of(d.proc.pid)), signal.SIGKILL)
    wait_until(lambda: gone(d, qid), "delivery of the unreported message", d)
    assert [m["Subject"] for m in maildir_messages(mail, "carol")] == ["never reported"]
    assert f"were never reported by it; queued now: {qid}" in d.log()


# ---- 12: TLS policy per destination ---------------------------------------------------


def test_12_tls_verify_delivers_over_verified_tls_and_encrypt_defers_without_it(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path,
    tmp_path: Path,
) -> None:
    tls = make_tls(tmp_path / "tls", "mx.tls.test")
    secure = mx_sink(sinks, "mx.tls.test", Script(starttls=True), tls=tls.server_context)
    plain = mx_sink(sinks, "afallback.test", Script(starttls=False))
    d = start_daemon(
        make_daemon, dns_server, mail, env={"SSL_CERT_FILE": str(tls.ca_file)},
        destinations={"tls.test": {"tls": "verify"}, "afallback.test": {"tls": "encrypt"}},
    )
    qid = send(d, ["t@tls.test"], "scenario 12 verify")
    wait_until(lambda: gone(d, qid), "delivery over verified TLS", d)
    assert [t.tls for t in secure.delivered] == [True]
    assert "verified" in d.log().split(f"delivered id={qid}")[1].splitlines()[0]
    qid = send(d, ["u@afallback.test"], "scenario 12 encrypt")
    r = wait_rcpt(d, qid, "u@afallback.test", "a deferral for missing TLS",
                  lambda r: r["state"] == "deferred")
    assert "TLS is required, but was not offered" in r["last_error"]
    assert not plain.delivered


# ---- 13: limits --------------------------------------------------------------------------


def test_13_per_destination_concurrency_limit(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test")
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(mx1.live))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    d = start_daemon(make_daemon, dns_server, mail,
                     destinations={"primary.test": {"max_connections": 1}})
    ids = [send(d, ["bob@primary.test"], f"limit {i}") for i in range(8)]
    wait_until(lambda: all(gone(d, q) for q in ids), "all eight delivered", d)
    stop.set()
    sampler.join()
    assert len(mx1.delivered) == 8
    assert peak[0] == 1


def test_13b_circuit_breaker_stops_trying_a_dead_host(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    d = start_daemon(make_daemon, dns_server, mail, breaker_failures=2,
                     breaker_cooldown=3600)
    qid = send(d, ["x@down.test"], "scenario 13b")
    r = wait_rcpt(d, qid, "x@down.test", "the breaker to open",
                  lambda r: "circuit breaker" in (r["last_error"] or ""))
    assert r["attempts"] == 3  # two refused connections, then not tried
    host = mx_sink(sinks, "mx.down.test")  # it comes back, but the breaker is open
    wait_rcpt(d, qid, "x@down.test", "more attempts", lambda r: r["attempts"] >= 5)
    assert host.connections == 0


# ---- 14-15: other next hops ----------------------------------------------------------


def test_14_lmtp_route_reads_one_reply_per_recipient(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    lmtp = lmtp_sink(sinks, data_replies={"full@lmtp.test": "552 5.2.2 mailbox full"})
    d = start_daemon(make_daemon, dns_server, mail,
                     routes={"test.example": f"maildir:{mail}",
                             "lmtp.test": f"lmtp:lmtp.host.test:{LMTP_PORT}"})
    qid = send(d, ["ok@lmtp.test", "full@lmtp.test"], "scenario 14")
    _, (block,) = report_fields(one_dsn(mail, d))
    assert (block["final-recipient"], block["status"]) == ("rfc822;full@lmtp.test", "5.2.2")
    wait_until(lambda: gone(d, qid), "both recipients final", d)
    assert rcpt_state(d, qid, "ok@lmtp.test") is None
    assert len(lmtp.delivered) == 1 and lmtp.delivered[0].helo == OUR_NAME


def test_15_smtputf8_mail_to_a_server_without_it_bounces_5_6_7(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test", Script(smtputf8=False))
    d = start_daemon(make_daemon, dns_server, mail)
    body = "From: alice@test.example\r\nSubject: grüße\r\n\r\nHallo.\r\n".encode()
    send_with(d, f"MAIL FROM:<{SENDER}> SMTPUTF8 BODY=8BITMIME",
              ["RCPT TO:<jürgen@primary.test>"], "scenario 15", body=body)
    _, (block,) = report_fields(one_dsn(mail, d))
    assert block["status"] == "5.6.7"
    assert not mx1.delivered


# ---- 16-17: lifetime and delay warnings ------------------------------------------------


def test_16_max_queue_lifetime_bounces_the_rest(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "451 4.2.1 mailbox busy"}))
    d = start_daemon(make_daemon, dns_server, mail, max_queue_lifetime=2)
    qid = send(d, ["bob@primary.test"], "scenario 16")
    _, (block,) = report_fields(one_dsn(mail, d))
    assert (block["action"], block["status"]) == ("failed", "4.4.7")
    assert "delivery time expired" in block["diagnostic-code"]
    assert "smtp; 451 4.2.1 mailbox busy" in block["diagnostic-code"]
    wait_until(lambda: gone(d, qid), "the expired message to leave the queue", d)


def test_17_delay_warning_once(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx_sink(sinks, "mx1.primary.test", Script(
        rcpt_replies={"bob@primary.test": "451 4.2.1 mailbox busy"}))
    d = start_daemon(make_daemon, dns_server, mail, delay_warning=1)
    qid = send(d, ["bob@primary.test"], "scenario 17")
    dsn = one_dsn(mail, d)
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    _, (block,) = report_fields(dsn)
    assert (block["action"], block["status"]) == ("delayed", "4.2.1")
    assert block["diagnostic-code"] == "smtp; 451 4.2.1 mailbox busy"
    assert "will-retry-until" in block
    wait_rcpt(d, qid, "bob@primary.test", "more attempts", lambda r: r["attempts"] >= 4)
    assert len(dsns(mail)) == 1  # warned once, not at every attempt


# ---- 18: hold, then reload to deliver ------------------------------------------------


def test_18_hold_keeps_mail_until_a_reload_to_mx(
    make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop, mail: Path
) -> None:
    mx1 = mx_sink(sinks, "mx1.primary.test")
    d = start_daemon(make_daemon, dns_server, mail, mode="hold")
    qid = send(d, ["bob@primary.test"], "scenario 18")
    time.sleep(1.0)
    assert not gone(d, qid) and not mx1.transactions
    d.config["delivery"]["mode"] = "mx"
    d.write_config()
    assert d.proc is not None
    d.proc.send_signal(1)  # SIGHUP
    wait_until(lambda: gone(d, qid), "delivery after the reload", d)
    assert len(mx1.delivered) == 1
