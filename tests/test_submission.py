"""Submission on port 587 (issue 9, part 1): AUTH only after STARTTLS, PLAIN and LOGIN
against ``submission.users_file``, relaying for authenticated users, sender ownership,
Message-ID/Date added to submitted mail, brute force slowed and blocked per address
across workers, the users file re-read on reload, and ``empath passwd``.

Everything runs against the real daemon (supervisor + 2 workers) over loopback, with
``relay_networks: []`` so that 127.0.0.1 is an outside client that may relay only
once authenticated.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from empath.config import ConfigError, load_config_text
from empath.smtp.auth import UsersFileError, parse_users
from tests.conftest import require_tool
from tests.harness import (
    REPO,
    Daemon,
    RawClient,
    free_port,
    queued_id,
    record_swaks,
    spool_record,
    strip_received,
    transaction,
)

MakeDaemon = Callable[..., Daemon]
HOST = "mx.test.example"
FOREIGN = "someone@remote.example"  # not a local domain: relaying
BODY = b"Subject: submitted\r\nFrom: alice@test.example\r\n\r\nHello.\r\n"
FULL_BODY = (b"Message-ID: <given@client.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
             + BODY)

# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------


def write_cert(directory: Path, ca: trustme.CA | None = None) -> tuple[Path, Path, trustme.CA]:
    """A certificate for HOST signed by ``ca`` (new unless given); key mode 0600."""
    ca = ca or trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(HOST)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key, ca


def write_users(path: Path, users: dict[str, str], senders: dict[str, str] | None = None,
                mode: int = 0o640) -> Path:
    """A users file as empath passwd writes it (cost 4: the tests need no slow hashes)."""
    lines = []
    for name, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        extra = f":{senders[name]}" if senders and name in senders else ""
        lines.append(f"{name}:{hashed}{extra}\n")
    path.write_text("".join(lines))
    path.chmod(mode)
    return path


def submission_daemon(make_daemon: MakeDaemon, tmp_path: Path, *, start: bool = True,
                      users: dict[str, str] | None = None,
                      senders: dict[str, str] | None = None,
                      limits: dict[str, Any] | None = None,
                      **overrides: Any) -> Daemon:
    cert, key, ca = write_cert(tmp_path / "tls")
    users_file = write_users(tmp_path / "users", users or {"alice": "correct horse"},
                             senders)
    d = make_daemon(
        start=False,
        relay_networks=[],
        tls={"certificate": str(cert), "key": str(key)},
        submission={"users_file": str(users_file)},
        limits={"auth_failure_delay": 0.05, "per_client_rate": 100_000,
                "per_client_connections": 1000, **(limits or {})},
        **overrides,
    )
    d.ca = ca  # type: ignore[attr-defined]
    d.users_file = users_file  # type: ignore[attr-defined]
    if start:
        d.start()
    return d


def client_context(ca: trustme.CA) -> Any:
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def open_client(port: int, context: str, source: str = "127.0.0.1") -> RawClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return RawClient(reader, writer, context)


async def plain_session(d: Daemon, context: str, *, port: int | None = None,
                        source: str = "127.0.0.1") -> tuple[RawClient, list[str]]:
    c = await open_client(port or d.submission_port, context, source)
    return c, await c.greet()


async def tls_session(d: Daemon, context: str, *, port: int | None = None,
                      source: str = "127.0.0.1") -> tuple[RawClient, list[str]]:
    """Greeting, EHLO, STARTTLS, EHLO again: (client, the EHLO lines over TLS)."""
    c, _ = await plain_session(d, context, port=port, source=source)
    code, text = await c.cmd("STARTTLS")
    assert (code, text[:5]) == (220, "2.0.0"), text
    await c.writer.start_tls(client_context(d.ca), server_hostname=HOST)  # type: ignore[attr-defined]
    c.send(b"EHLO client.test\r\n")
    return c, await c.lines()


def plain_token(user: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def envelope(d: Daemon, qid: str) -> dict[str, Any]:
    return spool_record(d.queue_dir, qid)


def auth_keywords(lines: list[str]) -> list[str]:
    return [line[4:] for line in lines if line[4:].upper().startswith("AUTH")]


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "empath.ctl", "--socket", str(d.state_dir / "control.sock"),
         *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def passwd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("EMPATH_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "empath", "passwd", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------
# 1. AUTH needs TLS
# ---------------------------------------------------------------------------------


def test_auth_is_neither_offered_nor_accepted_in_plaintext(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = submission_daemon(make_daemon, tmp_path)

    async def go() -> None:
        c, lines = await plain_session(d, "auth-plaintext")
        assert auth_keywords(lines) == [], lines
        assert any(line[4:] == "STARTTLS" for line in lines), lines
        # Correct credentials, in plaintext: refused before they are even looked at.
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:6]) == (538, "5.7.11"), text
        code, text = await c.cmd("AUTH LOGIN")
        assert (code, text[:6]) == (538, "5.7.11"), text
        code, text = await c.cmd("MAIL FROM:<alice@test.example>")
        assert (code, text[:5]) == (530, "5.7.0"), text
        await c.close()

        # Over TLS it is offered on submission ...
        c, lines = await tls_session(d, "auth-offered")
        assert auth_keywords(lines) == ["AUTH PLAIN LOGIN"], lines
        code, text = await c.cmd("MAIL FROM:<alice@test.example>")
        assert (code, text[:5]) == (530, "5.7.0"), text  # still nothing without AUTH
        await c.close()
        # ... and never on port 25, TLS or not.
        c, lines = await tls_session(d, "auth-port25", port=d.smtp_port)
        assert auth_keywords(lines) == [], lines
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:5]) == (502, "5.5.1"), text
        await c.close()

    run(go())
    assert d.queued_ids() == set()


def test_auth_plain_and_login_then_relay(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = submission_daemon(make_daemon, tmp_path, users={"alice": "correct horse",
                                                         "bob@test.example": "p4ss wörd"})

    async def go() -> list[str]:
        ids = []
        # PLAIN with an initial response, then relaying to a foreign domain.
        c, _ = await tls_session(d, "auth-plain")
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:5]) == (235, "2.7.0"), text
        code, text = await c.cmd("AUTH PLAIN " + plain_token("alice", "correct horse"))
        assert (code, text[:5]) == (503, "5.5.1"), text  # once per session
        code, text = await transaction(c, "alice@test.example", [FOREIGN, "x@test.example"], BODY)
        assert code == 250, text
        ids.append(queued_id(text))
        await c.cmd("QUIT")
        await c.close()
        # PLAIN with the 334 continuation; authzid equal to the user is fine.
        c, _ = await tls_session(d, "auth-plain-334")
        c.send(b"AUTH PLAIN\r\n")
        assert await c.reader.readline() == b"334 \r\n"
        code, text = await c.cmd(plain_token("bob@test.example", "p4ss wörd",
                                             authzid="bob@test.example"))
        assert (code, text[:5]) == (235, "2.7.0"), text
        code, text = await transaction(c, "bob@test.example", [FOREIGN], FULL_BODY)
        assert code == 250, text
        ids.append(queued_id(text))
        await c.close()
        # LOGIN, prompted for both, and with the user name as initial response.
        c, _ = await tls_session(d, "auth-login")
        c.send(b"AUTH LOGIN\r\n")
        assert await c.reader.readline() == b"334 VXNlcm5hbWU6\r\n"  # Username:
        c.send(f"{b64('alice')}\r\n".encode())
        assert await c.reader.readline() == b"334 UGFzc3dvcmQ6\r\n"  # Password:
        code, text = await c.cmd(b64("correct horse"))
        assert (code, text[:5]) == (235, "2.7.0"), text
        await c.close()
        c, _ = await tls_session(d, "auth-login-initial")
        c.send(f"AUTH login {b64('alice')}\r\n".encode())
        assert await c.reader.readline() == b"334 UGFzc3dvcmQ6\r\n"
        code, text = await c.cmd(b64("correct horse"))
        assert (code, text[:5]) == (235, "2.7.0"), text
        code, text = await transaction(c, "alice@test.example", [FOREIGN], BODY)
        assert code == 250, text
        ids.append(queued_id(text))
        await c.close()
        return ids

    first, second, third = run(go())
    env = envelope(d, first)
    assert env["authenticated"] == "alice"
    assert [r["address"] for r in env["recipients"]] == [FOREIGN, "x@test.example"]
    assert envelope(d, second)["authenticated"] == "bob@test.example"
    assert "with ESMTPSA" in d.message_bytes(first).decode()
    # A message that had its own Message-ID and Date is kept byte for byte.
    assert strip_received(d.message_bytes(second)) == FULL_BODY
    assert envelope(d, third)["authenticated"] == "alice"


def test_submitted_mail_gets_message_id_and_date(make_daemon: MakeDaemon,
                                                 tmp_path: Path) -> None:
    d = submission_daemon(make_daemon, tmp_path)

    async def go() -> tuple[str, str, str]:
        c, _ = await tls_session(d, "fixup")
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert code == 235, text
        code, text = await transaction(c, "alice@test.example", [FOREIGN], BODY)
        assert code == 250, text
        missing_both = queued_id(text)
        only_date = b"Date: Tue, 2 Jan 2024 10:00:00 +0100\r\n" + BODY
        code, text = await transaction(c, "alice@test.example", [FOREIGN], only_date)
        assert code == 250, text
        has_date = queued_id(text)
        await c.close()
        # Port 25 leaves a relayed message as it is: only submission fixes mail up.
        c, _ = await plain_session(d, "fixup-25", port=d.smtp_port)
        code, text = await transaction(c, "someone@remote.example", ["x@test.example"], BODY)
        assert code == 250, text
        await c.close()
        return missing_both, has_date, queued_id(text)

    missing_both, has_date, port25 = run(go())
    lines = strip_received(d.message_bytes(missing_both)).split(b"\r\n")
    # At the top, right after our Received:, then the message as sent.
    assert re.fullmatch(rb"Message-ID: <\d{14}\." + missing_both.encode()
                        + rb"@mx\.test\.example>", lines[0]), lines[:3]
    assert lines[1].startswith(b"Date: ")
    date = email.utils.parsedate_to_datetime(lines[1][6:].decode())
    assert date.tzinfo is not None and abs(date.timestamp() - time.time()) < 3600
    assert b"\r\n".join(lines[2:]) == BODY
    kept = strip_received(d.message_bytes(has_date))
    assert kept.startswith(b"Message-ID: <") and kept.count(b"Date: ") == 1
    assert kept.split(b"\r\n", 1)[1] == b"Date: Tue, 2 Jan 2024 10:00:00 +0100\r\n" + BODY
    assert strip_received(d.message_bytes(port25)) == BODY


def test_bad_malformed_and_cancelled_auth(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = submission_daemon(make_daemon, tmp_path, limits={"auth_failures": 50})

    async def go() -> None:
        c, _ = await tls_session(d, "auth-bad")
        for token in (plain_token("alice", "wrong"), plain_token("mallory", "correct horse"),
                      plain_token("alice", "correct horse", authzid="bob")):
            code, text = await c.cmd(f"AUTH PLAIN {token}")
            assert (code, text[:5]) == (535, "5.7.8"), text
        code, text = await c.cmd("AUTH PLAIN not*base64!")
        assert (code, text[:5]) == (501, "5.5.2"), text
        code, text = await c.cmd(f"AUTH PLAIN {b64('no separators')}")
        assert (code, text[:5]) == (501, "5.5.2"), text
        c.send(b"AUTH PLAIN\r\n")
        assert await c.reader.readline() == b"334 \r\n"
        code, text = await c.cmd("*")
        assert (code, text[:5]) == (501, "5.7.0"), text
        code, text = await c.cmd("AUTH CRAM-MD5")
        assert (code, text[:5]) == (504, "5.5.4"), text
        code, text = await c.cmd("AUTH")
        assert (code, text[:5]) == (501, "5.5.4"), text
        # Nothing of that authenticated the session.
        code, text = await c.cmd("MAIL FROM:<alice@test.example>")
        assert (code, text[:5]) == (530, "5.7.0"), text
        # After all that, the right password still works.
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:5]) == (235, "2.7.0"), text
        code, text = await c.cmd("MAIL FROM:<alice@test.example>")
        assert code == 250, text
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:5]) == (503, "5.5.1"), text
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 2. brute force: slowed, counted per address across workers, blocked
# ---------------------------------------------------------------------------------


def test_brute_force_is_blocked_per_address(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    metrics_port = free_port()
    d = submission_daemon(make_daemon, tmp_path, limits={"auth_failures": 3},
                          metrics={"listen": f"127.0.0.1:{metrics_port}"})

    async def go() -> None:
        # One failure per session, three sessions (so, most likely, both workers): the
        # count is the address's, kept by the supervisor.
        for attempt in range(2):
            c, _ = await tls_session(d, "brute")
            code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', f'guess{attempt}')}")
            assert (code, text[:5]) == (535, "5.7.8"), text
            await c.close()
        c, _ = await tls_session(d, "brute")
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'guess2')}")
        assert (code, text[:5]) == (421, "4.7.0"), text
        assert "too many authentication failures" in text
        assert await c.at_eof()
        # The address is refused at connect now, on both listeners, even with the
        # right password in hand.
        for port in (d.submission_port, d.smtp_port):
            c = await open_client(port, "brute-blocked")
            code, text = await c.reply()
            assert (code, text[:5]) == (421, "4.7.0"), text
            assert "too many authentication failures from 127.0.0.1" in text
            assert await c.at_eof()
        # Another address is served meanwhile, and the real user gets in from it.
        c, _ = await tls_session(d, "brute-other", source="127.0.0.2")
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:5]) == (235, "2.7.0"), text
        code, text = await transaction(c, "alice@test.example", [FOREIGN], BODY)
        assert code == 250, text
        await c.close()

    run(go())
    samples = scrape(metrics_port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("empath_smtp_auth_total", listener="submission", result="failure") == 3
    assert value("empath_smtp_auth_total", listener="submission", result="success") == 1
    assert value("empath_smtp_connections_refused_total", listener="submission",
                 reason="auth_failures") == 1
    assert value("empath_smtp_connections_refused_total", listener="smtp",
                 reason="auth_failures") == 1
    log = d.log()
    assert "authentication failed user=alice client=127.0.0.1" in log
    assert "guess" not in log  # passwords are never logged
    assert "too many authentication failures client=127.0.0.1" in log


def test_relay_networks_are_dropped_but_not_locked_out(make_daemon: MakeDaemon,
                                                       tmp_path: Path) -> None:
    """A webmail on localhost (in relay_networks) that relays many users' typos must
    not lock out everyone behind it: its sessions are dropped at the limit, but it
    may connect again."""
    cert, key, ca = write_cert(tmp_path / "tls")
    users = write_users(tmp_path / "users", {"alice": "correct horse"})
    d = make_daemon(tls={"certificate": str(cert), "key": str(key)},
                    submission={"users_file": str(users)},
                    limits={"auth_failures": 2, "auth_failure_delay": 0.05})
    d.ca = ca  # type: ignore[attr-defined]

    async def go() -> None:
        c, _ = await tls_session(d, "webmail")
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'typo')}")
        assert (code, text[:5]) == (535, "5.7.8"), text
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'typo2')}")
        assert (code, text[:5]) == (421, "4.7.0"), text
        assert await c.at_eof()
        c, _ = await tls_session(d, "webmail-again")
        code, text = await c.cmd(f"AUTH PLAIN {plain_token('alice', 'correct horse')}")
        assert (code, text[:5]) == (235, "2.7.0"), text
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 3. STARTTLS: a pipelined plaintext AUTH never counts
# ---------------------------------------------------------------------------------


def test_auth_pipelined_in_plaintext_after_starttls_is_discarded(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = submission_daemon(make_daemon, tmp_path)

    async def go() -> None:
        c, _ = await plain_session(d, "starttls-inject-auth")
        # An attacker on the path appends its own commands to the client's STARTTLS.
        c.send(b"STARTTLS\r\n"
               + f"AUTH PLAIN {plain_token('alice', 'correct horse')}\r\n".encode()
               + f"MAIL FROM:<alice@test.example>\r\nRCPT TO:<{FOREIGN}>\r\n".encode())
        code, text = await c.reply()
        assert (code, text[:5]) == (220, "2.0.0"), text
        await c.writer.start_tls(client_context(d.ca), server_hostname=HOST)  # type: ignore[attr-defined]
        code, text = await c.cmd("NOOP")
        assert (code, text) == (250, "2.0.0 Ok"), "a plaintext command was answered over TLS"
        c.send(b"EHLO client.test\r\n")
        await c.lines()
        code, text = await c.cmd("MAIL FROM:<alice@test.example>")
        assert (code, text[:5]) == (530, "5.7.0"), text
        code, text = await c.cmd(f"RCPT TO:<{FOREIGN}>")
        assert (code, text[:5]) == (503, "5.5.1"), text
        await c.close()

    run(go())
    assert d.queued_ids() == set()


# ---------------------------------------------------------------------------------
# 4. senders a user may use
# ---------------------------------------------------------------------------------


def test_sender_login_match(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = submission_daemon(
        make_daemon, tmp_path,
        users={"alice": "a-pass", "bob@test.example": "b-pass"},
        senders={"alice": "alice@test.example,@corp.example"},
        start=False)
    d.config["submission"]["sender_login_match"] = True
    d.start()

    async def go() -> None:
        c, _ = await tls_session(d, "login-match")
        assert (await c.cmd(f"AUTH PLAIN {plain_token('alice', 'a-pass')}"))[0] == 235
        for sender, ok in (("alice@test.example", True), ("Alice@TEST.example", True),
                           ("anyone@corp.example", True), ("bob@test.example", False),
                           ("alice@test.example.evil", False), ("", True)):
            code, text = await c.cmd(f"MAIL FROM:<{sender}>")
            if ok:
                assert (code, text[:5]) == (250, "2.1.0"), (sender, text)
                assert (await c.cmd("RSET"))[0] == 250
            else:
                assert (code, text[:5]) == (553, "5.7.1"), (sender, text)
                assert "not owned by user alice" in text
        await c.close()
        # A login that is an address may send as itself (and only that, here).
        c, _ = await tls_session(d, "login-match-bob")
        assert (await c.cmd(f"AUTH PLAIN {plain_token('bob@test.example', 'b-pass')}"))[0] == 235
        code, text = await transaction(c, "BOB@test.example", [FOREIGN], BODY)
        assert code == 250, text
        code, text = await c.cmd("MAIL FROM:<alice@test.example>")
        assert (code, text[:5]) == (553, "5.7.1"), text
        await c.close()

    run(go())


# ---------------------------------------------------------------------------------
# 5. swaks end to end
# ---------------------------------------------------------------------------------


def test_swaks_auth_plain_over_starttls(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    swaks = require_tool("swaks")
    d = submission_daemon(make_daemon, tmp_path)
    base = [swaks, "--server", f"127.0.0.1:{d.submission_port}", "--tls",
            "--from", "alice@test.example", "--to", FOREIGN, "--auth", "PLAIN",
            "--auth-user", "alice", "--helo", "swaks.client.test"]
    proc = subprocess.run([*base, "--auth-password", "correct horse"],
                          capture_output=True, text=True, timeout=60)
    finals = record_swaks(proc.stdout, "swaks-auth")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(f.startswith("235 2.7.0") for f in finals), finals
    queued = [f for f in finals if "queued as" in f]
    assert len(queued) == 1, finals
    qid = queued_id(queued[0])
    assert envelope(d, qid)["authenticated"] == "alice"
    assert "with ESMTPSA" in d.message_bytes(qid).decode()
    # A wrong password: swaks reports the 535 and nothing is queued.
    proc = subprocess.run([*base, "--auth-password", "wrong"],
                          capture_output=True, text=True, timeout=60)
    record_swaks(proc.stdout, "swaks-auth-bad")
    assert proc.returncode != 0
    assert re.search(r"^<~\*\s+535 5\.7\.8 ", proc.stdout, re.M), proc.stdout  # swaks: <~* error
    assert d.queued_ids() == {qid}


# ---------------------------------------------------------------------------------
# 6. the users file: start, reload, permissions
# ---------------------------------------------------------------------------------


def test_users_file_is_reread_on_reload(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = submission_daemon(make_daemon, tmp_path)
    users_file: Path = d.users_file  # type: ignore[attr-defined]

    async def login(user: str, password: str) -> int:
        c, _ = await tls_session(d, "reload-users")
        code, _ = await c.cmd(f"AUTH PLAIN {plain_token(user, password)}")
        await c.close()
        return code

    p = passwd("--file", str(users_file), "--stdin", "carol", stdin="carol's secret\n")
    assert p.returncode == 0, p.stderr
    assert run(login("carol", "carol's secret")) == 535  # not before the reload
    p = ctl(d, "reload", "--wait")
    assert p.returncode == 0, p.stdout + p.stderr
    assert run(login("carol", "carol's secret")) == 235
    assert run(login("alice", "correct horse")) == 235  # kept by empath passwd

    # A users file others can read is refused at reload; the old one stays in force.
    users_file.chmod(0o644)
    p = ctl(d, "reload", "--wait")
    assert p.returncode != 0
    assert "submission.users_file" in p.stdout + p.stderr
    assert "readable or writable by others" in p.stdout + p.stderr
    assert run(login("carol", "carol's secret")) == 235
    # A broken line likewise.
    users_file.chmod(0o640)
    users_file.write_text(users_file.read_text() + "dave:not-a-hash\n")
    p = ctl(d, "reload", "--wait")
    assert p.returncode != 0
    assert "line 3: not a bcrypt hash" in p.stdout + p.stderr
    assert run(login("alice", "correct horse")) == 235


@pytest.mark.parametrize("problem", ["world-readable", "bad-line", "missing"])
def test_unusable_users_file_refuses_start(make_daemon: MakeDaemon, tmp_path: Path,
                                           problem: str) -> None:
    d = submission_daemon(make_daemon, tmp_path, start=False)
    users_file: Path = d.users_file  # type: ignore[attr-defined]
    expected = {"world-readable": "readable or writable by others (mode 0644)",
                "bad-line": "line 2: expected user:bcrypt-hash[:addresses]",
                "missing": "cannot open"}[problem]
    if problem == "world-readable":
        users_file.chmod(0o644)
    elif problem == "bad-line":
        users_file.write_text(users_file.read_text() + "just-a-name\n")
    else:
        users_file.unlink()
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == 2
    log = d.log()
    assert f"submission.users_file {users_file}" in log and expected in log, log
    assert "Traceback" not in log


def test_users_file_format() -> None:
    h = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode()
    users = parse_users(f"# comment\n\nalice:{h}\nbob@example.com:{h}:bob@example.com,"
                        f"@example.org\n", "users")
    assert list(users) == ["alice", "bob@example.com"]
    assert users["bob@example.com"].senders == ("bob@example.com", "@example.org")
    for text, message in ((f"alice:{h}\nalice:{h}\n", "line 2: user 'alice' is listed twice"),
                          ("alice:plaintext\n", "line 1: not a bcrypt hash"),
                          (f"al ice:{h}\n", "line 1: user name contains a space"),
                          (f"alice:{h}:not an address\n", "line 1: bad sender address")):
        with pytest.raises(UsersFileError, match=re.escape(message)):
            parse_users(text, "users")


def test_submission_config_keys() -> None:
    base = "state_dir: /var/lib/empath\n"
    cfg = load_config_text(base + "submission: {users_file: /etc/empath/users, "
                           "sender_login_match: true}\n")
    assert str(cfg.submission.users_file) == "/etc/empath/users"
    assert cfg.submission.sender_login_match is True
    assert load_config_text(base).submission.sender_login_match is False
    with pytest.raises(ConfigError) as info:
        load_config_text(base + "submission: {sender_login_match: 'yes', users_file: x}\n"
                         "limits: {auth_failures: 0, auth_failure_window: -1}\n")
    got = {i.key_path: i.message for i in info.value.issues}
    assert set(got) == {"submission.sender_login_match", "submission.users_file",
                        "limits.auth_failures", "limits.auth_failure_window"}
    assert not any("not supported yet" in m for m in got.values())


# ---------------------------------------------------------------------------------
# 7. empath passwd
# ---------------------------------------------------------------------------------


def test_passwd_sets_changes_and_deletes(tmp_path: Path) -> None:
    users_file = tmp_path / "etc" / "users"
    users_file.parent.mkdir()
    config = tmp_path / "empath.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"),
                                      "submission": {"users_file": str(users_file)}}))
    p = passwd("--config", str(config), "--stdin", "alice", stdin="first secret\n")
    assert p.returncode == 0, p.stderr
    assert "password for alice set in" in p.stdout
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640
    p = passwd("--file", str(users_file), "--stdin", "--senders",
               "bob@example.com,@example.org", "bob@example.com", stdin="bob's\n")
    assert p.returncode == 0, p.stderr
    users = parse_users(users_file.read_text(), "users")
    assert list(users) == ["alice", "bob@example.com"]
    assert bcrypt.checkpw(b"first secret", users["alice"].hash.encode())
    assert users["alice"].hash.startswith("$2b$12$")
    assert users["bob@example.com"].senders == ("bob@example.com", "@example.org")
    inode = users_file.stat().st_ino
    # A new password replaces the old one; others and the senders are kept.
    p = passwd("--file", str(users_file), "--stdin", "bob@example.com", stdin="new\r\n")
    assert p.returncode == 0, p.stderr
    assert "changed" in p.stdout
    users = parse_users(users_file.read_text(), "users")
    assert bcrypt.checkpw(b"new", users["bob@example.com"].hash.encode())
    assert users["bob@example.com"].senders == ("bob@example.com", "@example.org")
    assert bcrypt.checkpw(b"first secret", users["alice"].hash.encode())
    assert users_file.stat().st_ino != inode  # replaced by rename, never rewritten
    assert [f.name for f in users_file.parent.iterdir()] == ["users"]  # no temp left
    p = passwd("--file", str(users_file), "--delete", "alice")
    assert p.returncode == 0, p.stderr
    assert list(parse_users(users_file.read_text(), "users")) == ["bob@example.com"]
    p = passwd("--file", str(users_file), "--delete", "alice")
    assert p.returncode == 1 and "no user 'alice'" in p.stderr
    for args, stdin, message in (
        (["--stdin", "al:ice"], "x\n", "contains a space, a colon"),
        (["--stdin", "carol"], "\n", "empty password"),
        (["--stdin", "carol"], "x" * 73 + "\n", "longer than 72 bytes"),
        (["--stdin", "--senders", "not an address", "carol"], "x\n", "bad sender address"),
    ):
        p = passwd("--file", str(users_file), *args, stdin=stdin)
        assert p.returncode != 0 and message in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
    # A file it cannot read back whole is left alone.
    users_file.write_text(users_file.read_text() + "garbage\n")
    before = users_file.read_text()
    p = passwd("--file", str(users_file), "--stdin", "carol", stdin="x\n")
    assert p.returncode == 1 and "fix the file by hand" in p.stderr
    assert users_file.read_text() == before


def _pty_passwd(users_file: Path, answers: list[bytes]) -> tuple[int, bytes]:
    """Run ``empath passwd`` on a terminal, answering its prompts; (status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling tty, as for a person
        os.environ["PYTHONPATH"] = str(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "empath", "passwd", "--file",
                                  str(users_file), "carol"])
    out = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            # Answer each prompt once it is shown (typing ahead would echo: the
            # terminal is in its normal mode between the two prompts).
            if pending and out.endswith(b"password: "):
                os.write(fd, pending.pop(0))
    finally:
        done, status = os.waitpid(pid, os.WNOHANG)
        until = time.monotonic() + 20
        while done == 0 and time.monotonic() < until:  # it may be exiting just now
            time.sleep(0.05)
            done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:  # still waiting for input we did not give: never hang the suite
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_passwd_reads_a_terminal_without_echo(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    code, out = _pty_passwd(users_file, [b"tty secret\n", b"tty secret\n"])
    assert code == 0, out
    assert b"New password:" in out and b"Retype new password:" in out
    assert b"tty secret" not in out  # not echoed
    users = parse_users(users_file.read_text(), "users")
    assert bcrypt.checkpw(b"tty secret", users["carol"].hash.encode())
    code, out = _pty_passwd(users_file, [b"one\n", b"two\n"])
    assert code == 1 and b"do not match" in out
    assert bcrypt.checkpw(b"tty secret",
                          parse_users(users_file.read_text(), "users")["carol"].hash.encode())
