"""Abuse limits on port 25 and STARTTLS done right (issue 9, parts 2 and 3).

Slow-loris clients (a byte every so often inside a command line, inside DATA, or a
NOOP now and then for ever) are cut off by per-command, per-DATA-progress and
per-session limits while other clients are served at the same time; 500 idle
connections from one address leave the daemon serving everybody else; an oversized
header is refused; TLS is 1.2 or later, its certificate and key are re-read on
reload, and a key others can read is refused at start and at reload.

All against the real daemon (supervisor + 2 workers) on loopback; 127.0.0.2 stands
for "another client" (Linux routes all of 127.0.0.0/8 to lo).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from empath.config import load_config_text
from empath.smtp.server import make_tls_context
from tests.harness import Daemon, RawClient, free_port, queued_id
from tests.test_submission import HOST, client_context, ctl, open_client, scrape, write_cert

MakeDaemon = Callable[..., Daemon]
BODY = b"Subject: normal\r\nFrom: a@remote.example\r\n\r\nServed while others dawdle.\r\n"


def outside_daemon(make_daemon: MakeDaemon, *, limits: dict[str, Any] | None = None,
                   **overrides: Any) -> Daemon:
    """127.0.0.1 is an outside client (no relay_networks) with room for many sessions."""
    return make_daemon(relay_networks=[],
                       limits={"per_client_rate": 100_000, "per_client_connections": 1000,
                               **(limits or {})},
                       **overrides)


async def greeted(port: int, context: str, source: str = "127.0.0.1") -> RawClient:
    c = await open_client(port, context, source)
    code, text = await c.reply(record=False)
    assert code == 220, text
    return c


async def normal_transaction(port: int, source: str = "127.0.0.1") -> str:
    """A well-behaved client's whole session; returns the queue id."""
    c = await greeted(port, "normal", source)
    c.send(b"EHLO normal.client.test\r\n")
    await c.lines()
    for line, want in (("MAIL FROM:<a@remote.example>", 250),
                       ("RCPT TO:<postmaster@test.example>", 250), ("DATA", 354)):
        code, text = await c.cmd(line)
        assert code == want, (line, text)
    c.send(BODY + b".\r\n")
    code, text = await c.reply()
    assert (code, text[:5]) == (250, "2.0.0"), text
    assert (await c.cmd("QUIT"))[0] == 221
    await c.close()
    return queued_id(text)


async def trickle(c: RawClient, data: bytes, interval: float, sent: list[int]) -> None:
    """Send ``data`` one byte every ``interval`` seconds, counting in ``sent[0]``."""
    for i in range(len(data)):
        try:
            c.writer.write(data[i:i + 1])
            await c.writer.drain()
        except (ConnectionError, RuntimeError):
            return
        sent[0] += 1
        await asyncio.sleep(interval)


async def cut_off(c: RawClient, data: bytes, interval: float,
                  port: int) -> tuple[int, str, int, str]:
    """Trickle ``data`` on ``c`` while a normal client is served; (code, text of the
    reply that ended the slow session, bytes it got out, the normal client's id)."""
    sent = [0]
    sending = asyncio.create_task(trickle(c, data, interval, sent))
    qid = await normal_transaction(port)  # served while the slow one holds its slot
    code, text = await c.reply(timeout=60)
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    assert await c.at_eof()
    return code, text, sent[0], qid


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---------------------------------------------------------------------------------
# 1. slow-loris
# ---------------------------------------------------------------------------------


def test_slow_command_line_is_cut_while_others_are_served(make_daemon: MakeDaemon) -> None:
    metrics_port = free_port()
    d = outside_daemon(make_daemon, limits={"command_timeout": 1.5},
                       metrics={"listen": f"127.0.0.1:{metrics_port}"})
    line = b"EHLO a-very-slow-client.example.test\r\n"

    async def go() -> tuple[int, str, int, str]:
        slow = await greeted(d.smtp_port, "slowloris-command")
        return await cut_off(slow, line, 0.3, d.smtp_port)

    code, text, sent, qid = asyncio.run(go())
    # Cut before the line was whole: bytes trickling in did not extend the timeout.
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert "timeout exceeded" in text
    assert sent < len(line), f"the whole line went out ({sent} bytes) before the 421"
    assert qid in d.queued_ids()
    assert value(scrape(metrics_port), "empath_smtp_timeouts_total", listener="smtp",
                 phase="command") == 1


def test_slow_data_is_cut_while_others_are_served(make_daemon: MakeDaemon) -> None:
    d = outside_daemon(make_daemon, limits={"command_timeout": 60, "data_timeout": 1.5})
    body = b"Subject: slow\r\n\r\n" + b"x" * 200 + b"\r\n.\r\n"

    async def go() -> tuple[int, str, int, str]:
        slow = await greeted(d.smtp_port, "slowloris-data")
        slow.send(b"EHLO slow.example\r\n")
        await slow.lines()
        assert (await slow.cmd("MAIL FROM:<s@remote.example>"))[0] == 250
        assert (await slow.cmd("RCPT TO:<postmaster@test.example>"))[0] == 250
        assert (await slow.cmd("DATA"))[0] == 354
        return await cut_off(slow, body, 0.2, d.smtp_port)

    code, text, sent, qid = asyncio.run(go())
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert "during DATA" in text
    assert sent < len(body)
    assert d.queued_ids() == {qid}  # the slow message was never queued


def test_slow_but_steady_big_message_gets_through(make_daemon: MakeDaemon) -> None:
    """The DATA deadline moves on with each 64 KiB: a big message on a slow link is
    not cut although the whole DATA phase lasts longer than data_timeout."""
    d = outside_daemon(make_daemon, limits={"data_timeout": 2.0})
    piece = (b"y" * 998 + b"\r\n") * 66  # just over 64 KiB

    async def go() -> str:
        c = await greeted(d.smtp_port, "slow-steady")
        c.send(b"EHLO steady.example\r\n")
        await c.lines()
        assert (await c.cmd("MAIL FROM:<s@remote.example>"))[0] == 250
        assert (await c.cmd("RCPT TO:<postmaster@test.example>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        c.send(b"Subject: steady\r\n\r\n")
        for _ in range(4):
            c.send(piece)
            await c.writer.drain()
            await asyncio.sleep(1.2)
        c.send(b".\r\n")
        code, text = await c.reply()
        assert (code, text[:5]) == (250, "2.0.0"), text
        await c.close()
        return queued_id(text)

    qid = asyncio.run(go())
    assert len(d.message_bytes(qid)) > 4 * len(piece)


def test_session_time_limit_ends_a_busy_idler(make_daemon: MakeDaemon) -> None:
    """A client that answers every timeout with a NOOP still cannot keep its slot."""
    d = outside_daemon(make_daemon, limits={"command_timeout": 60, "max_session_time": 2})

    async def go() -> tuple[int, str, int]:
        c = await greeted(d.smtp_port, "session-cap")
        for noops in range(200):
            code, text = await c.cmd("NOOP")
            if code != 250:
                assert await c.at_eof()
                return code, text, noops
            await asyncio.sleep(0.1)
        raise AssertionError("the session was never ended")

    code, text, noops = asyncio.run(go())
    assert (code, text[:5]) == (421, "4.7.0"), text
    assert "session time limit exceeded" in text
    assert noops > 3  # it was busy, not idle, when it was cut


# ---------------------------------------------------------------------------------
# 2. many idle connections from one address
# ---------------------------------------------------------------------------------


def test_500_idle_connections_do_not_stop_a_legitimate_client(make_daemon: MakeDaemon) -> None:
    d = make_daemon(relay_networks=[], limits={"per_client_connections": 20,
                                               "per_client_rate": 100_000})

    async def go() -> None:
        async def one() -> tuple[RawClient, int, str]:
            c = await open_client(d.smtp_port, "idle-flood")
            code, text = await c.reply(timeout=60, record=False)
            return c, code, text

        results = await asyncio.gather(*(one() for _ in range(500)))
        held = [c for c, code, _ in results if code == 220]
        refused = [(code, text) for _, code, text in results if code != 220]
        assert len(held) == 20
        assert len(refused) == 480
        assert all((code, text[:5]) == (421, "4.7.0")
                   and "too many connections from 127.0.0.1" in text
                   for code, text in refused), refused[:3]
        for c, code, _ in results:
            if code != 220:
                assert await c.at_eof()
                await c.close()
        # Somebody else is served at once, and can send mail.
        qid = await normal_transaction(d.smtp_port, source="127.0.0.2")
        assert qid in d.queued_ids()
        # The 20 admitted idlers are still there (until their timeouts).
        code, text = await held[0].cmd("NOOP")
        assert (code, text) == (250, "2.0.0 Ok")
        for c in held:
            await c.close()

    asyncio.run(go())


# ---------------------------------------------------------------------------------
# 3. header size
# ---------------------------------------------------------------------------------


def test_header_larger_than_max_header_size_is_refused(make_daemon: MakeDaemon) -> None:
    d = outside_daemon(make_daemon, limits={"max_header_size": 4096})
    big_header = b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"z" * 80) for i in range(60))
    folded = b"Subject: one long folded field\r\n" + b"".join(
        b"\t" + b"w" * 90 + b"\r\n" for _ in range(60))
    small_header_big_body = b"Subject: big body\r\n\r\n" + (b"b" * 900 + b"\r\n") * 100

    async def go() -> list[tuple[int, str]]:
        c = await greeted(d.smtp_port, "header-size")
        c.send(b"EHLO client.test\r\n")
        await c.lines()
        out = []
        for message in (big_header + b"\r\nbody\r\n", folded + b"\r\nbody\r\n",
                        big_header, small_header_big_body):
            assert (await c.cmd("MAIL FROM:<a@remote.example>"))[0] == 250
            assert (await c.cmd("RCPT TO:<postmaster@test.example>"))[0] == 250
            assert (await c.cmd("DATA"))[0] == 354
            c.send(message + b".\r\n")
            out.append(await c.reply())
        await c.close()
        return out

    replies = asyncio.run(go())
    for code, text in replies[:3]:
        assert (code, text[:5]) == (552, "5.3.4"), text
        assert "header" in text
    code, text = replies[3]
    assert (code, text[:5]) == (250, "2.0.0"), text  # the body does not count
    assert d.queued_ids() == {queued_id(text)}


# ---------------------------------------------------------------------------------
# 4. TLS: 1.2 minimum, reloaded certificate, key permissions
# ---------------------------------------------------------------------------------


def _tls11_possible(cert: Path, key: Path) -> bool:
    """Whether this OpenSSL can speak TLS 1.1 at all (both ends in memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server.minimum_version = ssl.TLSVersion.TLSv1_1
            server.set_ciphers("DEFAULT:@SECLEVEL=0")
            server.load_cert_chain(str(cert), str(key))
            client = _tls11_client()
        except (ssl.SSLError, ValueError):
            return False
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cs = client.wrap_bio(c_in, c_out)
    ss = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (cs, ss):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    try:
        return cs.version() == "TLSv1.1"
    except ssl.SSLError:
        return False


def _tls11_client() -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.set_ciphers("DEFAULT:@SECLEVEL=0")
        client.minimum_version = ssl.TLSVersion.TLSv1_1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    return client


async def starttls(port: int, ctx: ssl.SSLContext, context: str) -> tuple[RawClient, str]:
    """STARTTLS on a new session; (client, the TLS version negotiated)."""
    c = await greeted(port, context)
    c.send(b"EHLO client.test\r\n")
    await c.lines()
    code, text = await c.cmd("STARTTLS")
    assert (code, text[:5]) == (220, "2.0.0"), text
    await c.writer.start_tls(ctx, server_hostname=HOST)
    ssl_object = c.writer.get_extra_info("ssl_object")
    return c, ssl_object.version()


def test_tls_1_2_is_the_minimum(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    cert, key, ca = write_cert(tmp_path / "tls")
    d = make_daemon(tls={"certificate": str(cert), "key": str(key)})
    cfg = load_config_text(f"state_dir: /var/lib/empath\ntls: {{certificate: {cert}, "
                           f"key: {key}}}\n")
    ctx = make_tls_context(cfg)
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2

    async def go(offer_11: bool) -> None:
        if offer_11:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                c, _ = await starttls(d.smtp_port, _tls11_client(), "tls11")
        twelve = client_context(ca)
        twelve.maximum_version = ssl.TLSVersion.TLSv1_2
        c, version = await starttls(d.smtp_port, twelve, "tls12")
        assert version == "TLSv1.2"
        c.send(b"EHLO client.test\r\n")
        assert (await c.lines())[-1].startswith("250 ")
        await c.close()

    offer_11 = _tls11_possible(cert, key)
    asyncio.run(go(offer_11))
    if offer_11:
        assert "TLS handshake failed client=127.0.0.1" in d.log()
    else:  # this OpenSSL cannot offer 1.1 at all; minimum_version above is the check
        pytest.skip("the local OpenSSL cannot speak TLS 1.1; minimum_version checked only")


def test_certificate_and_key_are_reloaded(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    cert, key, old_ca = write_cert(tmp_path / "tls")
    d = make_daemon(tls={"certificate": str(cert), "key": str(key)})

    async def handshake(ca: trustme.CA) -> bool:
        try:
            c, _ = await starttls(d.smtp_port, client_context(ca), "tls-reload")
        except ssl.SSLCertVerificationError:
            return False
        await c.close()
        return True

    assert asyncio.run(handshake(old_ca))
    new_ca = trustme.CA()
    write_cert(tmp_path / "tls", new_ca)  # renewed in place: same paths, new files
    p = ctl(d, "reload", "--wait")
    assert p.returncode == 0, p.stdout + p.stderr
    # Every new session (on either worker) now presents the new certificate.
    assert [asyncio.run(handshake(new_ca)) for _ in range(4)] == [True] * 4
    assert not asyncio.run(handshake(old_ca))

    # A key others may read is refused at reload; the certificate in use stays.
    key.chmod(0o644)
    p = ctl(d, "reload", "--wait")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "tls.key" in out and "readable or writable by others" in out, out
    assert "reload refused" in d.log()
    assert asyncio.run(handshake(new_ca))


def test_world_readable_key_refuses_start(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    cert, key, _ = write_cert(tmp_path / "tls")
    key.chmod(0o644)
    d = make_daemon(start=False, tls={"certificate": str(cert), "key": str(key)})
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == 2
    log = d.log()
    assert f"tls.key {key}: readable or writable by others (mode 0644)" in log, log
    assert "Traceback" not in log


def test_limit_keys_load_and_are_checked() -> None:
    from empath.config import ConfigError

    base = "state_dir: /var/lib/empath\n"
    limits = load_config_text(base + "limits: {max_session_time: 600, max_header_size: 65536, "
                              "auth_failure_delay: 0.5}\n").limits
    assert (limits.max_session_time, limits.max_header_size, limits.auth_failure_delay) == (
        600.0, 65536, 0.5)
    defaults = load_config_text(base).limits
    assert (defaults.max_session_time, defaults.max_header_size, defaults.auth_failures,
            defaults.auth_failure_window, defaults.auth_failure_delay) == (
        3600.0, 1_048_576, 5, 600.0, 1.0)
    with pytest.raises(ConfigError) as info:
        load_config_text(base + "limits: {max_session_time: 0, max_header_size: '1M', "
                         "auth_failure_delay: -1}\n")
    assert {i.key_path for i in info.value.issues} == {
        "limits.max_session_time", "limits.max_header_size", "limits.auth_failure_delay"}
