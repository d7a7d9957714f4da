"""The control plane against the real daemon (``make_daemon``): a misbehaving control
client must not disturb SMTP or other control clients, and every queue command works
on real mail that the real queue manager delivers to real SMTP sinks.

The control socket is the default ``<state_dir>/control.sock``. empathctl runs as a
subprocess, as an admin would run it; the sinks (tests/sinks.py) run on a background
event loop (``SinkLoop`` from tests/test_delivery.py) while the test body waits for
what the daemon did, polling the queue through empathctl and the sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import empath
from tests.harness import REPO, Daemon, send_message, wait_until
from tests.sinks import SinkLoop, SMTPSink, loopback, unused_port

MakeDaemon = Callable[..., Daemon]
# Deliveries on a retry schedule: these waits had a minute each.
wait_for = functools.partial(wait_until, timeout=60.0)


# ---- helpers --------------------------------------------------------------------------


def sock_path(d: Daemon) -> Path:
    return d.state_dir / "control.sock"


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("EMPATH_CONTROL_SOCKET", "EMPATH_CONFIG", "EMPATH_CONTROL_TOKEN")}
    environ["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "empath.ctl", "--socket", str(sock_path(d)), *args],
        capture_output=True, text=True, env=environ, timeout=60, check=False,
        stdin=subprocess.DEVNULL)


def ok(d: Daemon, *args: str) -> str:
    p = ctl(d, *args)
    assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p.stdout


def js(d: Daemon, *args: str) -> Any:
    return json.loads(ok(d, "--json", *args))


def send(d: Daemon, rcpts: list[str], subject: str = "ctl") -> str:
    code, text = asyncio.run(send_message(
        d.smtp_port, "alice@test.example", rcpts,
        f"Subject: {subject}\r\n\r\nbody\r\n".encode(), "ctl-daemon"))
    assert code == 250, text
    return text.rsplit(" ", 1)[-1]


def daemon_is_fine(d: Daemon) -> None:
    """SMTP still answers 250 and `empathctl status` works."""
    send(d, ["postmaster@test.example"], "still serving")
    out = ok(d, "status")
    assert "version" in out and empath.__version__ in out


def raw(d: Daemon, data: bytes, responses: int = 1) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock_path(d)))
        s.sendall(data)
        f = s.makefile("rb")
        out = []
        for _ in range(responses):
            line = f.readline()
            assert line, f"connection closed after {out}"
            out.append(json.loads(line))
        return out


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in rows}


def start_sink(sinks: SinkLoop, host: str, port: int) -> SMTPSink:
    return sinks.start(SMTPSink(host=host, port=port))


def delivered_to(sink: SMTPSink) -> list[str]:
    return [rcpt for t in list(sink.delivered) for rcpt in t.accepted]


# ---- robustness -----------------------------------------------------------------------


def test_misbehaving_control_clients_do_not_disturb_the_daemon(
    make_daemon: MakeDaemon,
) -> None:
    d = make_daemon(start=False)
    d.extra_env["EMPATH_CONTROL_TIMEOUT"] = "2"  # test-only: a slow client is cut off soon
    d.start()
    daemon_is_fine(d)

    # Garbage: answered, and the connection serves the next request.
    junk = bytes(b for b in os.urandom(4096) if b != 0x0A)
    got = raw(d, junk + b'\n\x00\x01\x02\n{"v":1,"cmd":"status"}\n', responses=3)
    assert [g["ok"] for g in got] == [False, False, True]
    assert {g["code"] for g in got[:2]} == {"bad-request"}
    for data in (os.urandom(100_000), b"\xff" * 10, b"{" * 1000):  # then hung up on
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path(d)))
            with contextlib.suppress(OSError):
                s.sendall(data)
    daemon_is_fine(d)

    # Wrong protocol versions: refused with the version spoken, connection kept.
    got = raw(d, b'{"v":2,"cmd":"status"}\n{"v":0,"cmd":"status"}\n{"v":"1","cmd":"status"}\n'
                 b'{"v":1,"cmd":"status"}\n', responses=4)
    assert [g["code"] for g in got[:3]] == ["unsupported-version"] * 3
    assert "speaks version 1" in got[0]["error"]
    assert got[3]["ok"] is True and got[3]["result"]["version"] == empath.__version__
    daemon_is_fine(d)

    # A 100 MB request line, streamed in 1 MiB chunks from a thread. The daemon says
    # "too-large" long before the line ends, and while that client is still in the
    # middle of its line, SMTP and another control client are served.
    paused, resume = threading.Event(), threading.Event()
    flood: dict[str, Any] = {}

    def flooder() -> None:
        chunk = b"x" * (1 << 20)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(sock_path(d)))
            f = s.makefile("rb")
            sent = 0
            try:
                for i in range(100):
                    if i == 4:
                        flood["reply"] = json.loads(f.readline())
                        paused.set()
                        resume.wait(60)
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError as exc:  # the daemon gave up on this connection
                flood["send_error"] = type(exc).__name__
            finally:
                paused.set()
            flood["sent"] = sent
            with contextlib.suppress(OSError):
                flood["rest"] = f.read()

    thread = threading.Thread(target=flooder, daemon=True)
    thread.start()
    try:
        assert paused.wait(60)
        assert flood["reply"]["code"] == "too-large"
        daemon_is_fine(d)
        assert raw(d, b'{"v":1,"cmd":"queue.stats"}\n')[0]["ok"] is True
    finally:
        resume.set()
        thread.join(120)
    assert not thread.is_alive()
    # It discarded a bounded amount and then hung up, rather than read 100 MB.
    assert "send_error" in flood and flood["sent"] < 100 << 20
    assert flood.get("rest", b"") == b""
    daemon_is_fine(d)

    # Slow loris: one byte a second. Cut off with "timeout" (EMPATH_CONTROL_TIMEOUT),
    # long before its request is complete; meanwhile everyone else is served.
    request = b'{"v":1,"cmd":"status"}\n'
    loris: dict[str, Any] = {}

    def slow() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path(d)))
            f = s.makefile("rb")
            for i, byte in enumerate(request):
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                readable, _, _ = select.select([s], [], [], 1.0)
                if readable:
                    loris["sent"] = i + 1
                    loris["reply"] = json.loads(f.readline())
                    loris["eof"] = f.readline() == b""
                    return

    thread = threading.Thread(target=slow, daemon=True)
    thread.start()
    daemon_is_fine(d)
    thread.join(120)
    assert not thread.is_alive()
    assert loris["reply"]["code"] == "timeout", loris
    assert loris["eof"] is True
    assert loris["sent"] < len(request)
    daemon_is_fine(d)
    assert "Traceback" not in d.log()
    assert d.stop() == 0


# ---- end to end with real mail ----------------------------------------------------------


def test_queue_commands_on_real_mail(make_daemon: MakeDaemon, sinks: SinkLoop,
                                     tmp_path: Path) -> None:
    a, b, c, dead = loopback(), loopback(), loopback(), loopback()
    pa, pb, pc, pdead = unused_port(a), unused_port(b), unused_port(c), unused_port(dead)
    live = start_sink(sinks, c, pc)  # live.test: delivered at once
    d = make_daemon(local_domains=["test.example"], delivery={
        "mode": "mx",
        "retry_schedule": [3600],
        "mx_port": pa,
        "breaker_failures": 1000,  # every attempt really connects
        "routes": {
            "sink.test": f"smtp:{a}:{pa}",  # nothing listens there at first
            "sink2.test": f"smtp:{dead}:{pdead}",  # nothing ever listens there
            "nowhere.test": f"smtp:{dead}:{pdead}",
            "live.test": f"smtp:{c}:{pc}",
            "test.example": f"maildir:{tmp_path / 'mail'}",
        },
    })
    now = time.time()
    m1 = send(d, ["a@sink.test", "x@live.test"])
    m2 = send(d, ["b@sink.test"])
    m3 = send(d, ["c@sink.test"])
    m4 = send(d, ["d@sink2.test"])
    m5 = send(d, ["e@nowhere.test"])
    ids = [m1, m2, m3, m4, m5]

    def all_deferred() -> list[dict[str, Any]] | None:
        rows = js(d, "queue", "list")
        states = {r["id"]: r["state"] for r in rows}
        return rows if states == dict.fromkeys(ids, "deferred") else None

    wait_for(all_deferred, "every message deferred after its first attempt")
    assert delivered_to(live) == ["x@live.test"]
    assert ok(d, "queue", "hold", m3).strip() == f"{m3}: held"

    # queue list: JSON and table show each message's and recipient's state.
    rows = js(d, "queue", "list")
    assert [r["id"] for r in rows] == ids  # oldest first
    got = by_id(rows)
    assert {i: got[i]["state"] for i in ids} == {m1: "deferred", m2: "deferred", m3: "held",
                                                 m4: "deferred", m5: "deferred"}
    r1 = {r["address"]: r for r in got[m1]["recipients"]}
    assert r1["x@live.test"]["state"] == "delivered"
    assert r1["a@sink.test"]["state"] == "deferred"
    assert r1["a@sink.test"]["attempts"] == 1
    assert r1["a@sink.test"]["last_error"]
    assert r1["a@sink.test"]["next_attempt"] > now + 3000  # retry_schedule: [3600]
    assert got[m1]["sender"] == "alice@test.example"
    assert got[m3]["held"] is True and got[m3]["next_attempt"] is None
    table = ok(d, "queue", "list")
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["ID", "STATE", "AGE", "SIZE", "NEXT"]
    row = next(line for line in lines if line.startswith(m1))
    assert row.split()[1] == "deferred" and "<alice@test.example>" in row
    assert "in 59m" in row or "in 1h00m" in row
    assert any(line.split()[:2] == ["x@live.test", "delivered"] for line in lines)
    rcpt = next(line for line in lines if line.split()[:1] == ["a@sink.test"])
    assert rcpt.split()[1:4] == ["deferred", "attempts", "1"]
    held_row = next(line for line in lines if line.startswith(m3))
    assert held_row.split()[1] == "held" and held_row.split()[4] == "held"
    assert lines[-1].startswith("-- 5 message(s)")
    assert [r["id"] for r in js(d, "queue", "list", "--status", "held")] == [m3]
    assert [r["id"] for r in js(d, "queue", "list", "--status", "deferred", "--limit", "2")
            ] == [m1, m2]
    assert [r["id"] for r in js(d, "queue", "list", "--domain", "sink2.test")] == [m4]

    # The sink comes up: `queue retry ID` delivers that message (and only that one).
    sink = start_sink(sinks, a, pa)
    assert "due now" in ok(d, "queue", "retry", m1)
    wait_for(lambda: m1 not in {r["id"] for r in js(d, "queue", "list")}, "m1 delivered")
    assert delivered_to(sink) == ["a@sink.test"]
    assert by_id(js(d, "queue", "list"))[m2]["state"] == "deferred"

    # `queue flush`: every deferred message now; the held one stays held.
    assert "message(s) due now" in ok(d, "queue", "flush")
    wait_for(lambda: "b@sink.test" in delivered_to(sink), "m2 delivered by the flush")
    wait_for(lambda: m2 not in {r["id"] for r in js(d, "queue", "list")}, "m2 removed")

    def attempts(id: str) -> int:
        return int(by_id(js(d, "queue", "list"))[id]["recipients"][0]["attempts"])

    wait_for(lambda: attempts(m4) == 2 and attempts(m5) == 2,
             "m4 and m5 tried again (still nothing at their next hop)")
    left = by_id(js(d, "queue", "list"))
    assert left[m3]["state"] == "held" and "c@sink.test" not in delivered_to(sink)

    # `log-level debug`: the daemon logs at DEBUG from now on.
    mark = len(d.log())
    assert "log level is now debug" in ok(d, "log-level", "debug")

    # `route set` redirects the next attempt for that domain to the other sink.
    other = start_sink(sinks, b, pb)
    out = ok(d, "route", "set", "sink2.test", f"smtp:{b}:{pb}")
    assert f"sink2.test: next hop smtp:{b}:{pb}" in out
    assert {"domain": "sink2.test", "nexthop": f"smtp:{b}:{pb}", "source": "override",
            "config_nexthop": f"smtp:{dead}:{pdead}"} in js(d, "route", "list")["routes"]
    ok(d, "queue", "retry", m4)
    wait_for(lambda: "d@sink2.test" in delivered_to(other), "m4 delivered to the override")
    wait_for(lambda: m4 not in {r["id"] for r in js(d, "queue", "list")}, "m4 removed")
    assert "d@sink2.test" not in delivered_to(sink)
    wait_for(lambda: " DEBUG " in d.log()[mark:], "debug lines in the daemon log")

    # `log-level info`: no more DEBUG lines, through another delivery.
    assert "log level is now info" in ok(d, "log-level", "info")
    mark = len(d.log())

    # `queue release`: back on the schedule (its own retry time), `retry` sends it now.
    assert ok(d, "queue", "release", m3).strip() == f"{m3}: released"
    assert by_id(js(d, "queue", "list"))[m3]["state"] == "deferred"
    ok(d, "queue", "retry", m3)
    wait_for(lambda: "c@sink.test" in delivered_to(sink), "m3 delivered after release")
    wait_for(lambda: m3 not in {r["id"] for r in js(d, "queue", "list")}, "m3 removed")
    assert " DEBUG " not in d.log()[mark:]

    # `connections`: an SMTP session held open here, with its port and duration.
    with socket.create_connection(("127.0.0.1", d.smtp_port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO probe.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        port = s.getsockname()[1]
        result = js(d, "connections")
        assert [w["ok"] for w in result["workers"]] == [True, True]
        mine = [c for c in result["connections"] if c["port"] == port]
        assert len(mine) == 1, result
        conn = mine[0]
        assert conn["client"] == "127.0.0.1" and conn["peer"] == f"127.0.0.1:{port}"
        assert conn["role"] == "smtp" and conn["listener"] == f"127.0.0.1:{d.smtp_port}"
        assert conn["state"] == "command" and conn["helo"] == "probe.test"
        assert conn["tls"] is False and conn["duration"] >= 0
        assert conn["worker"] in (0, 1)
        table = ok(d, "connections")
        line = next(x for x in table.splitlines() if x.startswith(f"127.0.0.1:{port} "))
        assert line.split()[1:5] == ["smtp", "command", "probe.test", "no"]
        s.sendall(b"MAIL FROM:<alice@test.example>\r\n")
        assert f.readline().startswith(b"250 ")
        mine = [c for c in js(d, "connections")["connections"] if c["port"] == port]
        assert mine[0]["state"] == "mail"
        s.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221 ")

    # A worker that does not answer is reported as such; the other one still is listed.
    workers = js(d, "status")["workers"]
    stopped = workers[0]["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        p = ctl(d, "--json", "connections")
        assert p.returncode == 0, p.stderr
        status = {w["pid"]: w for w in json.loads(p.stdout)["workers"]}
        assert status[stopped]["ok"] is False
        assert "did not answer" in status[stopped]["error"]
        assert status[workers[1]["pid"]]["ok"] is True
        p = ctl(d, "connections")
        assert p.returncode == 0 and f"(pid {stopped}) did not answer" in p.stderr
    finally:
        os.kill(stopped, signal.SIGCONT)

    # `queue delete`: not without confirmation when nobody can be asked; with --yes.
    p = ctl(d, "queue", "delete", m5)
    assert p.returncode == 2 and "--yes" in p.stderr
    assert m5 in {r["id"] for r in js(d, "queue", "list")}
    out = ok(d, "queue", "delete", "--yes", m5)
    assert f"{m5}: deleted" in out and "no bounce" in out
    assert js(d, "queue", "list") == []
    assert not (d.queue_dir / f"{m5}.msg").exists()

    # `status`: version, uptime, listeners, queue counts, last reload, config path.
    st = js(d, "status")
    assert st["version"] == empath.__version__
    assert isinstance(st["uptime"], int | float) and st["uptime"] >= 0
    assert st["config"] == str(d.config_path)
    assert {(x["address"], x["role"]) for x in st["listeners"]} >= {
        (f"127.0.0.1:{d.smtp_port}", "smtp"), (f"127.0.0.1:{d.submission_port}", "submission")}
    assert st["queue"]["mode"] == "mx" and st["queue"]["scheduled"] == 0
    assert st["queue"]["since_start"]["delivered"] >= 5
    assert st["last_reload"] is None
    assert "reloaded" in ok(d, "reload", "--wait")
    st = js(d, "status")
    assert st["last_reload"]["ok"] is True and st["generation"] == 2
    text = ok(d, "status")
    for key in ("version", "uptime", "listeners", "config", "last_reload", "queue.scheduled"):
        assert any(line.split()[:1] == [key] for line in text.splitlines()), (key, text)
    assert f"127.0.0.1:{d.smtp_port} (smtp)" in text
    assert "Traceback" not in d.log()
    assert d.stop() == 0
