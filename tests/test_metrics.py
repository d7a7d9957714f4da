"""Metrics and health endpoints against the real daemon, as numbered scenarios.

The daemon (2 SMTP worker processes) takes mail over real SMTP sockets and delivers
it to real aiosmtpd sinks; every figure is read from its ``/metrics`` over HTTP and
parsed with prometheus-client's own parser. Counters are checked to move by exactly
what the test did — accepted, rejected by each reason, delivered, deferred, bounced —
whichever worker served each session.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from empath.metrics.spec import METRICS
from empath.smtp.server import refusal_reason
from tests.conftest import IN_CI, require_tool
from tests.dnsmasq import DnsmasqServer, dnsmasq_fixture
from tests.harness import REPO, Daemon, RawClient, free_port, send_message
from tests.sinks import Script, SinkLoop, SMTPSink, make_tls

MakeDaemon = Callable[..., Daemon]
TOKEN = "scrape-me-3f9a"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

dns_server = dnsmasq_fixture(
    mx={"mx.test": [(10, "mx1.mx.test")]},
    hosts={"mx1.mx.test": ["127.0.0.1"]},
)


# ---- helpers ---------------------------------------------------------------------------


def token_file(d: Daemon, mode: int = 0o600) -> Path:
    path = d.workdir / "metrics.token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


def metrics_daemon(make_daemon: MakeDaemon, *, start: bool = True, auth: bool = True,
                   **overrides: Any) -> Daemon:
    d = make_daemon(start=False, **overrides)
    d.metrics_port = free_port()  # type: ignore[attr-defined]
    d.config["metrics"] = {"listen": f"127.0.0.1:{d.metrics_port}",  # type: ignore[attr-defined]
                           **({"bearer_token_file": str(token_file(d))} if auth else {})}
    if start:
        d.start()
    return d


def url(d: Daemon, path: str, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{d.metrics_port}{path}"  # type: ignore[attr-defined]


def get(target: str, headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(target, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scrape(d: Daemon) -> Samples:
    status, body, headers = get(url(d, "/metrics"), bearer())
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "empath.ctl", "--socket", str(d.state_dir / "control.sock"),
         *args], capture_output=True, text=True, env=env, timeout=60, check=False)


async def session(port: int, *commands: str) -> list[tuple[int, str]]:
    """One connection: EHLO, then ``commands``, then QUIT; the replies."""
    c = await RawClient.connect(port, "metrics")
    try:
        await c.greet()
        return [await c.cmd(line) for line in commands] + [await c.cmd("QUIT")]
    finally:
        await c.close()


# ---- 1. every counter moves by exactly what happened ----------------------------------


def test_01_counters_move_by_exactly_what_was_sent_rejected_and_delivered(
        make_daemon: MakeDaemon, sinks: SinkLoop) -> None:
    ok = sinks.start(SMTPSink())
    soft = sinks.start(SMTPSink(Script(data_reply="451 4.3.0 try again later")))
    hard = sinks.start(SMTPSink(Script(data_reply="550 5.7.1 we do not want it")))
    d = metrics_daemon(
        make_daemon, relay_networks=[], local_domains=["ok.test", "soft.test", "hard.test"],
        limits={"max_recipients": 3, "max_message_size": 20_000},
        delivery={"mode": "mx", "retry_schedule": [3600],
                  "routes": {"ok.test": f"smtp:{ok.host}:{ok.port}",
                             "soft.test": f"smtp:{soft.host}:{soft.port}",
                             "hard.test": f"smtp:{hard.host}:{hard.port}"}})
    before = scrape(d)
    body = b"Subject: metrics\r\n\r\nhello\r\n"

    async def traffic() -> int:
        connections = 0
        for i in range(4):
            code, _ = await send_message(d.smtp_port, "alice@ok.test", [f"u{i}@ok.test"], body)
            assert code == 250
        code, _ = await send_message(d.smtp_port, "alice@ok.test", ["b@soft.test"], body)
        assert code == 250
        code, _ = await send_message(d.smtp_port, "alice@ok.test", ["c@hard.test"], body)
        assert code == 250
        connections += 6
        # relay, size (SIZE=), syntax, policy (a 4th recipient), in one session
        replies = await session(
            d.smtp_port,
            "MAIL FROM:<x@ok.test> SIZE=999999",           # 552 size
            "MAIL FROM:<x@ok.test>",
            "RCPT TO:<someone@elsewhere.test>",             # 554 relay
            "RCPT TO:<no spaces allowed@ok.test>",          # 501 syntax
            "RCPT TO:<a@ok.test>", "RCPT TO:<b@ok.test>", "RCPT TO:<c@ok.test>",
            "RCPT TO:<d@ok.test>",                          # 452 policy
            "RSET")
        codes = [c for c, _ in replies]
        assert codes == [552, 250, 554, 501, 250, 250, 250, 452, 250, 221], replies
        connections += 1
        # smuggling: a bare LF in DATA; size: DATA over max_message_size
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 25 + b".\r\n"
        for payload, expect in ((b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n", 554),
                                (big, 552)):
            c = await RawClient.connect(d.smtp_port, "metrics")
            await c.greet()
            assert (await c.cmd("MAIL FROM:<x@ok.test>"))[0] == 250
            assert (await c.cmd("RCPT TO:<a@ok.test>"))[0] == 250
            assert (await c.cmd("DATA"))[0] == 354
            c.send(payload)
            code, text = await c.reply()
            assert code == expect, text
            await c.close()
            connections += 1
        return connections

    connections = run(traffic())
    # 4 to ok + 1 DSN (the bounce of c@hard.test goes to alice@ok.test)
    wait_for(lambda: len(ok.delivered) == 5 and len(hard.transactions) == 1
             and len(soft.transactions) == 1 and len(d.queued_ids()) == 1, "deliveries")
    wait_for(lambda: value(scrape(d), "empath_delivery_attempts_total",
                           result="delivered", nexthop="smtp") - value(
        before, "empath_delivery_attempts_total", result="delivered", nexthop="smtp") == 5,
        "the DSN's delivery to be recorded")
    after = scrape(d)

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert moved("empath_smtp_connections_total", listener="smtp") == connections
    assert moved("empath_messages_received_total", listener="smtp") == 6
    sizes = [int(x) for x in re.findall(r"queued id=\S+ from=<alice@ok.test> nrcpt=1 "
                                        r"size=(\d+)", d.log())]
    assert len(sizes) == 6
    assert moved("empath_messages_received_bytes_total", listener="smtp") == sum(sizes)
    for reason, n in {"relay": 1, "size": 2, "syntax": 1, "policy": 1, "smuggling": 1,
                      "storage": 0}.items():
        assert moved("empath_messages_rejected_total", reason=reason) == n, reason
    assert moved("empath_delivery_attempts_total", result="delivered", nexthop="smtp") == 5
    assert moved("empath_delivery_attempts_total", result="deferred", nexthop="smtp") == 1
    assert moved("empath_delivery_attempts_total", result="bounced", nexthop="smtp") == 1
    assert moved("empath_dsn_sent_total", action="failed") == 1
    # one transaction per message: 4 + DSN + soft + hard
    assert moved("empath_delivery_duration_seconds_count", nexthop="smtp") == 7
    assert moved("empath_queue_residence_seconds_count", result="delivered") == 5
    assert moved("empath_queue_residence_seconds_count", result="bounced") == 1
    assert value(after, "empath_queue_messages", state="deferred") == 1
    assert value(after, "empath_queue_messages", state="pending") == 0
    assert value(after, "empath_queue_oldest_message_age_seconds") > 0
    sink_connections = ok.connections + soft.connections + hard.connections
    assert moved("empath_delivery_tls_sessions_total", version="none") == sink_connections

    # A worker that exits takes nothing with it: its counts stay in the service's.
    def workers() -> list[dict[str, Any]]:
        return list(json.loads(ctl(d, "--json", "status").stdout)["workers"])

    gone = workers()[0]["pid"]
    os.kill(gone, signal.SIGTERM)
    wait_for(lambda: len([w for w in workers() if w["ready"] and w["pid"] != gone]) == 2,
             "the worker to be replaced")
    later = scrape(d)
    assert value(later, "empath_messages_received_total", listener="smtp") == value(
        after, "empath_messages_received_total", listener="smtp")
    assert value(later, "empath_smtp_connections_total", listener="smtp") == value(
        after, "empath_smtp_connections_total", listener="smtp")
    assert value(later, "empath_worker_processes") == 2


# ---- 2. the service's sessions, whichever worker holds them --------------------------


def test_02_active_sessions_are_summed_over_all_workers(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon)

    def per_worker() -> dict[int, int]:
        listing = json.loads(ctl(d, "--json", "connections").stdout)
        return {w["pid"]: w.get("connections", 0) for w in listing["workers"]}

    async def hold_open() -> None:
        clients: list[RawClient] = []
        try:
            # Whichever worker's loop wakes first accepts; connect one at a time until
            # both hold some, so the sum below really spans two processes.
            while len(clients) < 200:
                for _ in range(4):
                    c = await RawClient.connect(d.smtp_port, "metrics")
                    await c.greet()
                    clients.append(c)
                    await asyncio.sleep(0.02)
                counts = await asyncio.to_thread(per_worker)
                if len(counts) == 2 and min(counts.values()) > 0:
                    break
            assert min(counts.values()) > 0, counts
            samples = await asyncio.to_thread(scrape, d)
            assert value(samples, "empath_smtp_sessions_active", listener="smtp") == len(
                clients) == sum(counts.values())
        finally:
            for c in clients:
                await c.close()

    run(hold_open())
    wait_for(lambda: value(scrape(d), "empath_smtp_sessions_active", listener="smtp") == 0,
             "sessions to close")


# ---- 3. readiness follows the spool ----------------------------------------------------


def test_03_readyz_goes_503_when_the_spool_is_unwritable_and_back(
        make_daemon: MakeDaemon) -> None:
    chattr = shutil.which("chattr")
    if os.geteuid() != 0 or chattr is None:
        if IN_CI:
            pytest.fail("needs root and chattr under CI=true")
        pytest.skip("needs root and chattr (an immutable directory stops even root)")
    d = metrics_daemon(make_daemon)
    status, body, _ = get(url(d, "/readyz"), bearer())
    assert (status, json.loads(body)) == (200, {"ready": True, "reasons": []})
    tmp = d.state_dir / "spool" / "tmp"
    subprocess.run([chattr, "+i", str(tmp)], check=True)
    try:
        status, body, _ = get(url(d, "/readyz"), bearer())
        assert status == 503
        reply = json.loads(body)
        assert reply["ready"] is False
        assert any("not writable" in r and str(tmp) in r for r in reply["reasons"]), reply
        # liveness is not readiness: the process is fine
        assert get(url(d, "/healthz"))[0] == 200
    finally:
        subprocess.run([chattr, "-i", str(tmp)], check=True)
    status, body, _ = get(url(d, "/readyz"), bearer())
    assert (status, json.loads(body)["ready"]) == (200, True)


def test_04_readyz_reports_a_spool_below_min_free_space(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon, limits={"min_free_space": 2**62})
    status, body, _ = get(url(d, "/readyz"), bearer())
    assert status == 503
    assert any("min_free_space" in r for r in json.loads(body)["reasons"]), body


# ---- 5. authentication -----------------------------------------------------------------


def test_05_bearer_token_guards_metrics_and_readyz_not_healthz(
        make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon)
    for path in ("/metrics", "/readyz"):
        status, _, headers = get(url(d, path))
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert get(url(d, path), bearer("wrong"))[0] == 401
        assert get(url(d, path), {"Authorization": "Basic Zm9vOmJhcg=="})[0] == 401
        assert get(url(d, path), bearer())[0] == 200
    status, body, _ = get(url(d, "/healthz"))
    assert (status, body) == (200, "ok\n")
    assert get(url(d, "/nope"), bearer())[0] == 404


def test_06_a_world_readable_token_file_is_refused_at_start_and_at_reload(
        make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon, start=False)
    token = Path(d.config["metrics"]["bearer_token_file"])
    token.chmod(0o644)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 2
    assert "metrics.bearer_token_file" in d.log() and "readable or writable by others" in d.log()

    token.chmod(0o640)
    d.start()
    before = scrape(d)
    token.chmod(0o604)
    p = ctl(d, "reload", "--wait")
    assert p.returncode == 1
    assert "metrics.bearer_token_file" in p.stderr
    refused = scrape(d)
    assert delta(before, refused, "empath_config_reloads_total", result="failure") == 1
    assert value(refused, "empath_config_last_reload_success") == 0
    token.chmod(0o600)
    assert ctl(d, "reload", "--wait").returncode == 0
    applied = scrape(d)
    assert delta(before, applied, "empath_config_reloads_total", result="success") == 1
    assert value(applied, "empath_config_last_reload_success") == 1
    assert value(applied, "empath_config_last_reload_timestamp_seconds") >= value(
        refused, "empath_config_last_reload_timestamp_seconds")


def test_07_reload_changes_the_token(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon)
    Path(d.config["metrics"]["bearer_token_file"]).write_text("the-new-one\n")
    assert ctl(d, "reload", "--wait").returncode == 0
    assert get(url(d, "/metrics"), bearer())[0] == 401
    assert get(url(d, "/metrics"), bearer("the-new-one"))[0] == 200


def test_08_web_config_basic_auth_with_bcrypt_over_tls(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = metrics_daemon(make_daemon, start=False, auth=False)
    tls = make_tls(tmp_path / "tls", "127.0.0.1")
    cert, key = tmp_path / "metrics.crt", tmp_path / "metrics.key"
    leaf = tls.ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    hashed = bcrypt.hashpw(b"correct horse", bcrypt.gensalt(rounds=4)).decode()
    web = d.workdir / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed.replace('$2b$', '$2y$')}'\n"
                   f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    web.chmod(0o640)
    d.config["metrics"]["web_config"] = str(web)
    d.start()
    ctx = ssl.create_default_context(cafile=str(tls.ca_file))

    def basic(user: str, password: str) -> dict[str, str]:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    status, _, headers = get(url(d, "/metrics", "https"), context=ctx)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert get(url(d, "/metrics", "https"), basic("prometheus", "wrong"), ctx)[0] == 401
    assert get(url(d, "/metrics", "https"), basic("nobody", "correct horse"), ctx)[0] == 401
    for _ in range(2):  # the second time from the remembered good pair
        assert get(url(d, "/metrics", "https"), basic("prometheus", "correct horse"),
                   ctx)[0] == 200
    assert get(url(d, "/healthz", "https"), context=ctx)[0] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(url(d, "/healthz"))  # plain HTTP on a TLS port


def test_09_bad_web_config_names_the_key(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon, start=False, auth=False)
    web = d.workdir / "web.yml"
    web.write_text("basic_auth_users:\n  prometheus: plaintext\n")
    web.chmod(0o600)
    d.config["metrics"]["web_config"] = str(web)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 2
    assert "metrics.web_config" in d.log() and "basic_auth_users.prometheus" in d.log()


# ---- 10. the socket-activated metrics socket -------------------------------------------


def test_10_metrics_served_on_a_socket_activated_fd(make_daemon: MakeDaemon) -> None:
    activate = require_tool("systemd-socket-activate")
    d = metrics_daemon(make_daemon, start=False)
    del d.config["metrics"]["listen"]
    d.config["listen"] = []
    d.wrapper = [activate, "-l", f"127.0.0.1:{d.smtp_port}",
                 "-l", f"127.0.0.1:{d.metrics_port}",  # type: ignore[attr-defined]
                 "--fdname=smtp:metrics", "-E", "PYTHONPATH"]
    d.start(wait=False)
    # systemd-socket-activate starts the daemon at the first connection
    wait_for(lambda: get_or_none(url(d, "/healthz")) == 200, "the metrics socket")
    d.wait_ready()
    samples = scrape(d)
    assert value(samples, "empath_smtp_listeners_open", listener="smtp") == 1


def get_or_none(target: str) -> int | None:
    try:
        return get(target)[0]
    except (urllib.error.URLError, ConnectionError):
        return None


# ---- 11. queue states ------------------------------------------------------------------


def test_11_queue_gauges_follow_hold_and_delete(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon)  # delivery.mode hold: everything stays pending

    async def three() -> list[str]:
        out = []
        for i in range(3):
            code, text = await send_message(d.smtp_port, "a@test.example",
                                            [f"r{i}@test.example"], b"Subject: q\r\n\r\nq\r\n")
            assert code == 250
            out.append(text.rsplit(" ", 1)[-1])
        return out

    ids = run(three())
    s = scrape(d)
    assert [value(s, "empath_queue_messages", state=k) for k in
            ("pending", "deferred", "held", "active")] == [3, 0, 0, 0]
    assert ctl(d, "queue", "hold", ids[0]).returncode == 0
    s = scrape(d)
    assert value(s, "empath_queue_messages", state="held") == 1
    assert value(s, "empath_queue_messages", state="pending") == 2
    assert ctl(d, "queue", "delete", "--yes", ids[1]).returncode == 0
    s = scrape(d)
    assert value(s, "empath_queue_messages", state="pending") == 1
    assert value(s, "empath_queue_oldest_message_age_seconds") > 0
    # `queue stats` answers from the same in-memory index, without reading the spool
    stats = json.loads(ctl(d, "--json", "queue", "stats").stdout)
    assert stats["messages"] == 2
    assert stats["by_state"] == {"pending": 1, "deferred": 0, "held": 1, "active": 0}
    assert stats["recipients"]["pending"] == 2
    assert {x["domain"] for x in stats["by_domain"]} == {"test.example"}
    assert stats["oldest_id"] == ids[0]
    assert stats["size"] == sum(e["size"] for e in json.loads(
        ctl(d, "--json", "queue", "list").stdout))
    # and after a restart, from the spool
    d.stop()
    d.log_path.write_text("")  # wait for this start's "ready", not the last one's
    d.start()
    s = scrape(d)
    assert value(s, "empath_queue_messages", state="held") == 1
    assert value(s, "empath_queue_messages", state="pending") == 1
    assert json.loads(ctl(d, "--json", "queue", "stats").stdout)["by_state"] == {
        "pending": 1, "deferred": 0, "held": 1, "active": 0}


# ---- 12. DNS, breakers, TLS, refusals --------------------------------------------------


def test_12_dns_lookups_cache_hits_and_circuit_breakers(
        make_daemon: MakeDaemon, dns_server: DnsmasqServer, sinks: SinkLoop) -> None:
    sink = sinks.start(SMTPSink(host="127.0.0.1"))
    dead = free_port()
    d = metrics_daemon(make_daemon, local_domains=[], delivery={
        "mode": "mx", "nameservers": [dns_server.nameserver], "mx_port": sink.port,
        "retry_schedule": [3600], "breaker_failures": 1,
        "routes": {"down.test": f"smtp:127.0.0.1:{dead}"}})
    before = scrape(d)

    async def mail(rcpt: str) -> None:
        code, _ = await send_message(d.smtp_port, "a@mx.test", [rcpt], b"s: x\r\n\r\nx\r\n")
        assert code == 250

    run(mail("one@mx.test"))
    wait_for(lambda: len(sink.delivered) == 1, "the first delivery")
    run(mail("two@mx.test"))
    wait_for(lambda: len(sink.delivered) == 2, "the second delivery")
    run(mail("x@down.test"))
    wait_for(lambda: value(scrape(d), "empath_circuit_breakers_open") == 1, "the breaker")
    after = scrape(d)
    assert delta(before, after, "empath_dns_lookups_total", type="MX", result="ok") == 1
    assert delta(before, after, "empath_dns_cache_hits_total", type="MX") == 1
    assert delta(before, after, "empath_delivery_attempts_total",
                 result="delivered", nexthop="mx") == 2
    assert delta(before, after, "empath_delivery_attempts_total",
                 result="deferred", nexthop="smtp") == 1
    assert value(after, "empath_destination_circuit_breaker_open",
                 destination=f"127.0.0.1:{dead}") == 1


def test_13_inbound_tls_sessions_by_version(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls", "mx.test.example")
    leaf = tls.ca.issue_cert("mx.test.example")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    d = metrics_daemon(make_daemon, tls={"certificate": str(cert), "key": str(key)})
    before = scrape(d)

    async def starttls() -> str:
        import aiosmtplib

        ctx = ssl.create_default_context(cafile=str(tls.ca_file))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.smtp_port, tls_context=ctx,
                                 start_tls=False)
        await client.connect()
        await client.starttls(server_hostname="mx.test.example")
        info = client.get_transport_info("ssl_object")
        await client.quit()
        return str(info.version())

    version = run(starttls())
    after = scrape(d)
    assert delta(before, after, "empath_smtp_tls_sessions_total", listener="smtp",
                 version=version) == 1


def test_14_connections_refused_by_a_limit_are_counted(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon, relay_networks=[],
                       limits={"per_client_connections": 1})
    before = scrape(d)

    async def two() -> None:
        first = await RawClient.connect(d.smtp_port, "metrics")
        await first.greet()
        second = await RawClient.connect(d.smtp_port, "metrics")
        code, _ = await second.reply()
        assert code == 421
        await second.close()
        await first.close()

    run(two())
    after = scrape(d)
    assert delta(before, after, "empath_smtp_connections_refused_total",
                 listener="smtp", reason="per_client") == 1
    assert delta(before, after, "empath_smtp_connections_total", listener="smtp") == 2


def test_refusal_reasons_match_the_anvil_texts() -> None:
    from empath.config import load_config_text
    from empath.daemon.anvil import Anvil

    cfg = load_config_text("state_dir: /var/lib/empath\nlimits: {max_connections: 2, "
                           "per_client_connections: 1, per_client_rate: 1}\n")
    anvil = Anvil(cfg)
    assert anvil.admit("192.0.2.1", now=0.0) is None
    per_client = anvil.admit("192.0.2.1", now=0.0)
    anvil.release("192.0.2.1")
    rate = anvil.admit("192.0.2.1", now=1.0)
    assert anvil.admit("192.0.2.2", now=0.0) is None
    assert anvil.admit("192.0.2.3", now=0.0) is None
    total = anvil.admit("192.0.2.4", now=0.0)
    assert per_client and rate and total
    assert [refusal_reason(r) for r in (per_client, rate, total)] == [
        "per_client", "rate", "max_connections"]


def test_15_every_metric_is_exported_with_help_and_type(make_daemon: MakeDaemon) -> None:
    d = metrics_daemon(make_daemon)
    body = get(url(d, "/metrics"), bearer())[1]
    names = {f.name for f in text_string_to_metric_families(body)}
    for name, spec in METRICS.items():
        assert (name.removesuffix("_total") if spec.kind == "counter" else name) in names
        assert f"# HELP {name} " in body and f"# TYPE {name.removesuffix('_total')}" in body
        assert name.startswith("empath_")
    sample_labels = {k for f in text_string_to_metric_families(body) for s in f.samples
                     for k in s.labels}
    assert not sample_labels & {"id", "queue_id", "address", "client", "sender", "rcpt"}


# ---- 16. in flight, and over TLS ------------------------------------------------------


def test_16_deliveries_in_flight_per_destination_and_outbound_tls_versions(
        make_daemon: MakeDaemon, sinks: SinkLoop, tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls", "127.0.0.1")
    secure = sinks.start(SMTPSink(Script(starttls=True), tls=tls.server_context))
    slow = sinks.start(SMTPSink(Script(hang_at="dot")))
    d = metrics_daemon(make_daemon, local_domains=["tls.test", "slow.test"], delivery={
        "mode": "mx", "retry_schedule": [3600],
        "routes": {"tls.test": f"smtp:{secure.host}:{secure.port}",
                   "slow.test": f"smtp:{slow.host}:{slow.port}"}})
    before = scrape(d)

    async def mail(rcpt: str) -> None:
        code, _ = await send_message(d.smtp_port, "a@tls.test", [rcpt], b"s: x\r\n\r\nx\r\n")
        assert code == 250

    run(mail("one@tls.test"))
    wait_for(lambda: len(secure.delivered) == 1, "the delivery over TLS")
    run(mail("two@slow.test"))
    run(mail("three@slow.test"))
    # the sink never answers the final dot: both stay in flight
    wait_for(lambda: value(scrape(d), "empath_destination_active_deliveries",
                           destination="slow.test") == 2, "two deliveries in flight")
    # A delivery counts as active from the moment it has its slot; its session is
    # counted once the connection is set up (after EHLO), a moment later.
    wait_for(lambda: delta(before, scrape(d), "empath_delivery_tls_sessions_total",
                           version="none") >= 2, "both plaintext sessions counted")
    after = scrape(d)
    assert value(after, "empath_queue_messages", state="active") == 2
    assert secure.delivered[0].tls
    versions = {dict(labels).get("version"): v - value(before, name, **dict(labels))
                for (name, labels), v in after.items()
                if name == "empath_delivery_tls_sessions_total"}
    assert versions.get("TLSv1.3", 0) + versions.get("TLSv1.2", 0) == secure.connections == 1
    assert versions.get("none", 0) == slow.connections == 2
