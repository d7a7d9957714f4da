"""The control plane: ``ControlServer`` on a real Unix socket, driven by the real
``empathctl`` (a subprocess) and by raw protocol requests.

The server runs in-process on its own event loop thread, with a fake supervisor
(status, reload, connections, log level) and a real QueueManager over a real spool
holding committed messages. Peer-credential tests run the client as ``nobody``
(needs root; they skip without it, and fail under CI=true).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import grp
import json
import logging
import os
import pty
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from empath.config import load_config_text
from empath.config.model import Config
from empath.control import control_socket_path, queueops
from empath.control.auth import ControlError
from empath.control.commands import ControlHandlers
from empath.control.protocol import MAX_LIST, MAX_REQUEST
from empath.control.server import ControlServer
from empath.delivery.dns import _Entry
from empath.queue import QueueManager
from empath.spool import Envelope, Recipient, Spool
from empath.spool.ids import new_message_id
from tests.harness import REPO

T = TypeVar("T")
IN_CI = os.environ.get("CI") == "true"

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@a.example\r\n"
           b"Subject: quarterly\r\n report\r\nMessage-ID: <m1@example.com>\r\n\r\n"
           b"SECRET BODY TEXT\r\n")


def require_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the control plane's credential tests need root under CI=true")
        pytest.skip("needs root")


# ------------------------------------------------------------------ fixtures


class LoopThread:
    """An event loop in a thread: the daemon side, while the test blocks on clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class FakeDaemon:
    """What the supervisor would provide."""

    reload_result: Any = field(default_factory=lambda: {"ok": True, "changed": ["limits"]})
    reload_raises: Exception | None = None
    reloads: int = 0
    levels: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return {"pid": 4242, "uptime": 12.5, "workers": 2, "config": "/etc/empath/empath.yaml"}

    async def reload(self) -> Any:
        self.reloads += 1
        if self.reload_raises is not None:
            raise self.reload_raises
        return self.reload_result

    async def connections(self) -> dict[str, Any]:
        return {
            "connections": [{"client": "192.0.2.7", "port": 40007, "peer": "192.0.2.7:40007",
                             "role": "smtp", "listener": "127.0.0.1:25", "state": "data",
                             "helo": "client.example\x1b[2J", "tls": True,
                             "tls_version": "TLSv1.3", "authenticated": None, "messages": 1,
                             "connected_at": time.time() - 75, "duration": 75.0,
                             "worker": 0, "pid": 101}],
            "workers": [{"index": 0, "pid": 101, "ok": True, "connections": 1},
                        {"index": 1, "pid": 102, "ok": False,
                         "error": "did not answer within 2 s"}],
        }

    def set_log_level(self, level: str) -> None:
        self.levels.append(level)


def make_config(state_dir: Path) -> Config:
    return load_config_text(
        f"hostname: mx.test.example\npostmaster: postmaster@test.example\n"
        f"state_dir: {state_dir}\n"
        "delivery: {mode: hold, routes: {a.example: 'smtp:127.0.0.1:2626'}}\n"
    )


class Ctl:
    """One control-plane setup: spool with messages, queue manager, server, clients."""

    def __init__(self, tmp_path: Path, loop: LoopThread) -> None:
        self.tmp_path = tmp_path
        self.loop = loop
        # A directory nobody can traverse (tmp_path's parents are 0700).
        self.sockdir = Path(tempfile.mkdtemp(prefix="empath-ctl-"))
        os.chmod(self.sockdir, 0o711)
        self.path = self.sockdir / "control.sock"
        self.spool = Spool(tmp_path / "spool")
        self.spool.prepare()
        self.config = make_config(tmp_path / "state")
        self.qm: QueueManager = loop.call(lambda: QueueManager(self.config, self.spool))
        self.fake = FakeDaemon()
        self.handlers: ControlHandlers = loop.call(lambda: ControlHandlers(
            self.qm, self.spool, status=self.fake.status, reload=self.fake.reload,
            connections=self.fake.connections, set_log_level=self.fake.set_log_level))
        self.servers: list[ControlServer] = []
        self.ids: dict[str, str] = {}

    # -- daemon side

    def start(self, **kwargs: Any) -> ControlServer:
        kwargs.setdefault("admin_group", "empath-admin")
        server = ControlServer(kwargs.pop("path", self.path), self.handlers, **kwargs)
        self.loop.run(server.start())
        self.servers.append(server)
        return server

    def stop(self, server: ControlServer) -> None:
        self.loop.run(server.close())

    def add(self, name: str, rcpts: list[Recipient], *, held: bool = False,
            sender: str = "alice@example.com", age: float = 100.0) -> str:
        async def commit() -> str:
            w = self.spool.create()
            w.write(MESSAGE)
            env = Envelope(id=w.id, sender=sender, recipients=rcpts,
                           received_at=time.time() - age, client_addr="192.0.2.1",
                           client_port=4000, helo="client.example", held=held)
            await self.spool.commit(w, env)
            return w.id
        id = self.loop.run(commit())
        self.ids[name] = id
        # Ids sort by the millisecond they were minted (within one, arbitrarily), and
        # "oldest first" is checked against the order of add(): one per millisecond.
        time.sleep(0.002)
        return id

    def add_standard(self) -> None:
        later = time.time() + 3000
        self.add("pending", [Recipient("bob@a.example")], age=300)
        self.add("deferred", [Recipient("carol@b.example", state="deferred", attempts=3,
                                        next_attempt=later,
                                        last_error="4.4.1 connection refused by b.example")],
                 age=200)
        self.add("multi", [Recipient("dan@a.example", state="delivered", attempts=1),
                           Recipient("eve@b.example", state="deferred", attempts=1,
                                     next_attempt=later, last_error="4.7.1 greylisted")],
                 age=150)
        self.add("held", [Recipient("fay@c.example")], held=True, age=50)
        self.loop.call(lambda: self.qm.load(self.spool.ids()))

    def env(self, name: str) -> Envelope:
        return self.spool.load(self.ids[name])

    # -- client side

    def ctl(self, *args: str, user: list[str] | None = None, env: dict[str, str] | None = None,
            socket_arg: bool = True) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("EMPATH_CONTROL_SOCKET", "EMPATH_CONFIG", "EMPATH_CONTROL_TOKEN",
                                "RUNTIME_DIRECTORY")}
        environ["PYTHONPATH"] = str(REPO)
        environ.update(env or {})
        cmd = [*(user or []), sys.executable, "-m", "empath.ctl"]
        if socket_arg:
            cmd += ["--socket", str(self.path)]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, env=environ,
                              cwd="/", timeout=60, check=False, stdin=subprocess.DEVNULL)

    def ok(self, *args: str, **kwargs: Any) -> str:
        p = self.ctl(*args, **kwargs)
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
        return p.stdout

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.ok("--json", *args, **kwargs))

    def raw(self, data: bytes, *, responses: int = 1, path: Path | None = None,
            shut: bool = False) -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(path or self.path))
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            f = s.makefile("rb")
            out: list[dict[str, Any]] = []
            for _ in range(responses):
                line = f.readline()
                assert line, f"connection closed after {out}"
                out.append(json.loads(line))
            return out

    def request(self, cmd: str, args: dict[str, Any] | None = None, **extra: Any
                ) -> dict[str, Any]:
        obj = {"v": 1, "cmd": cmd, "args": args or {}, **extra}
        return self.raw(json.dumps(obj).encode() + b"\n")[0]

    def close(self) -> None:
        for s in self.servers:
            with contextlib.suppress(Exception):
                self.loop.run(s.close())
        self.spool.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def ctl(tmp_path: Path, loop: LoopThread) -> Iterator[Ctl]:
    c = Ctl(tmp_path, loop)
    yield c
    c.close()


@pytest.fixture
def served(ctl: Ctl) -> Ctl:
    ctl.add_standard()
    ctl.start()
    return ctl


@pytest.fixture
def nobody() -> None:
    """Running the client as ``nobody`` needs root and setpriv."""
    require_root()
    for tool in ("groupadd", "gpasswd", "groupdel", "setpriv"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"{tool} is required under CI=true")
            pytest.skip(f"{tool} not installed")


@pytest.fixture
def admin_group(nobody: None) -> Iterator[str]:
    """A throw-away admin group with ``nobody`` in it (created with groupadd)."""
    name = "empctl" + secrets.token_hex(4)
    subprocess.run(["groupadd", name], check=True)
    try:
        subprocess.run(["gpasswd", "-a", "nobody", name], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


def as_nobody(*, init_groups: bool = False) -> list[str]:
    groups = ["--init-groups"] if init_groups else ["--clear-groups"]
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", *groups]


def control_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "empath.control" and getattr(r, "EMPATH_EVENT", None) == "control"]


# ------------------------------------------------------------------ the socket file


def test_socket_mode_group_and_cleanup(ctl: Ctl, admin_group: str) -> None:
    server = ctl.start(admin_group=admin_group)
    st = os.lstat(ctl.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam(admin_group).gr_gid
    # The private directory it was bound in is gone; nothing else was left behind.
    assert sorted(p.name for p in ctl.sockdir.iterdir()) == ["control.sock"]
    ctl.stop(server)
    assert not ctl.path.exists()


def test_missing_admin_group_keeps_daemon_group(
    ctl: Ctl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    ctl.start(admin_group="no-such-group-empath")
    st = os.lstat(ctl.path)
    assert st.st_gid == os.getegid()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert any("group no-such-group-empath does not exist" in r.getMessage()
               for r in caplog.records)


def test_stale_socket_is_replaced_live_one_refused(ctl: Ctl) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ctl.path))
    stale.close()  # a socket file nobody listens on: what a crash leaves
    server = ctl.start()
    assert ctl.request("status")["ok"] is True
    with pytest.raises(ControlError, match="another process is serving"):
        ctl.start()
    assert ctl.request("status")["ok"] is True  # the refused second start changed nothing
    ctl.stop(server)


def test_a_file_in_the_way_is_not_replaced(ctl: Ctl) -> None:
    ctl.path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ctl.start()
    assert ctl.path.read_text() == "precious"


def test_world_writable_directory_refused(ctl: Ctl) -> None:
    d = ctl.sockdir / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(ControlError, match="writable by everybody"):
        ctl.start(path=d / "control.sock")


def test_socket_path_too_long(ctl: Ctl) -> None:
    with pytest.raises(ControlError, match="longer than 107"):
        ctl.start(path=ctl.sockdir / ("x" * 120))


# ------------------------------------------------------------------ status, queue


def test_status(served: Ctl) -> None:
    out = served.ok("status")
    assert "pid" in out and "4242" in out
    assert "queue.mode" in out and "hold" in out
    j = served.json("status")
    assert j["pid"] == 4242
    assert j["queue"]["mode"] == "hold"
    assert j["queue"]["scheduled"] == 3  # held mail is not scheduled
    assert "version" in j


def test_queue_list(served: Ctl) -> None:
    ids = served.ids
    rows = served.json("queue", "list")
    assert [r["id"] for r in rows] == [ids["pending"], ids["deferred"], ids["multi"],
                                       ids["held"]]  # oldest first
    by_id = {r["id"]: r for r in rows}
    d = by_id[ids["deferred"]]
    assert d["state"] == "deferred"
    assert d["sender"] == "alice@example.com"
    assert d["size"] == len(MESSAGE)
    assert d["last_error"] == "4.4.1 connection refused by b.example"
    assert d["next_attempt"] > time.time() + 1000
    assert 150 < d["age"] < 10_000
    assert d["recipients"] == [{"address": "carol@b.example", "state": "deferred",
                                "attempts": 3, "next_attempt": d["recipients"][0]["next_attempt"],
                                "last_error": "4.4.1 connection refused by b.example"}]
    assert by_id[ids["held"]]["state"] == "held"
    assert by_id[ids["pending"]]["state"] == "pending"

    out = served.ok("queue", "list")
    assert ids["deferred"] in out and "carol@b.example" in out
    assert "4.4.1 connection refused by b.example" in out
    assert "<alice@example.com>" in out
    assert "4 message(s)" in out
    assert "ID" in out.splitlines()[0] and "STATE" in out.splitlines()[0]


def test_queue_list_filters(served: Ctl) -> None:
    ids = served.ids
    assert [r["id"] for r in served.json("queue", "list", "--status", "deferred")] == [
        ids["deferred"], ids["multi"]]
    assert [r["id"] for r in served.json("queue", "list", "--status", "held")] == [ids["held"]]
    # Domain: only recipients still to deliver count (dan@a.example is delivered).
    assert [r["id"] for r in served.json("queue", "list", "--domain", "A.Example.")] == [
        ids["pending"]]
    assert [r["id"] for r in served.json("queue", "list", "--domain", "b.example")] == [
        ids["deferred"], ids["multi"]]
    assert served.ok("queue", "list", "--domain", "none.example").strip() == "queue is empty"
    p = served.ctl("queue", "list", "--status", "bogus")
    assert p.returncode == 2
    p = served.ctl("queue", "list", "--domain", "not a domain")
    assert p.returncode == 1 and "invalid domain" in p.stderr


def test_queue_list_limit_offset_and_stream(served: Ctl) -> None:
    ids = served.ids
    order = [ids["pending"], ids["deferred"], ids["multi"], ids["held"]]
    assert [r["id"] for r in served.json("queue", "list", "--limit", "2")] == order[:2]
    assert [r["id"] for r in served.json("queue", "list", "--limit", "2", "--offset", "3")
            ] == order[3:]
    assert [r["id"] for r in served.json("queue", "list", "--status", "deferred",
                                         "--offset", "1")] == [ids["multi"]]
    out = served.ok("queue", "list", "--limit", "1")
    assert "-- 1 message(s)" in out and "--offset 1 shows the next" in out
    assert served.ok("queue", "list", "--offset", "9").strip() == "no messages after the first 9"
    assert served.request("queue.list", {"limit": 0})["result"] == []
    for bad in ("0", "-1", "x"):
        assert served.ctl("queue", "list", "--limit", bad).returncode == 2
    assert served.ctl("queue", "list", "--offset", "-1").returncode == 2
    # The protocol: one answer, or pages marked "more" and a last line.
    got = served.request("queue.list", {"limit": 3})
    assert [r["id"] for r in got["result"]] == order[:3]
    lines = served.raw(b'{"v":1,"cmd":"queue.list","args":{"stream":true}}\n', responses=2)
    assert lines[0]["more"] is True and [r["id"] for r in lines[0]["result"]] == order
    assert lines[1] == {"v": 1, "ok": True, "result": None}
    empty = served.raw(b'{"v":1,"cmd":"queue.list","args":{"stream":true,'
                       b'"domain":"none.example"}}\n')
    assert empty[0] == {"v": 1, "ok": True, "result": None}
    bad = served.request("queue.list", {"limit": "ten"})
    assert bad["code"] == "bad-request" and "whole number" in bad["error"]
    bad = served.request("queue.list", {"stream": True, "status": "bogus"})
    assert bad["code"] == "bad-request" and "unknown state" in bad["error"]


def test_queue_list_stream_sends_empty_pages_while_nothing_matches(
    served: Ctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queueops, "LOAD_CHUNK", 1)
    monkeypatch.setattr(queueops, "LIST_KEEPALIVE", 0.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(served.path))
        s.sendall(b'{"v":1,"cmd":"queue.list","args":{"stream":true,"status":"held"}}\n')
        f = s.makefile("rb")
        pages = []
        while (msg := json.loads(f.readline())).get("more"):
            pages.append(msg["result"])
    assert [] in pages
    assert [m["id"] for page in pages for m in page] == [served.ids["held"]]
    assert [r["id"] for r in served.json("queue", "list", "--status", "held")] == [
        served.ids["held"]]
    assert served.ok("queue", "list", "--domain", "none.example").strip() == "queue is empty"


def _fill_queue(ctl: Ctl, n: int) -> None:
    """``n`` more committed messages, written straight into queue/ (no fsync: fast)."""
    template = ctl.env("pending")
    data = (ctl.spool.queue_dir / f"{template.id}.msg").read_bytes()
    for i in range(n):
        env = dataclasses.replace(template, id=new_message_id(),
                                  recipients=[Recipient(f"r{i}@big.example")])
        (ctl.spool.queue_dir / f"{env.id}.msg").write_bytes(data)
        (ctl.spool.queue_dir / f"{env.id}.env").write_bytes(env.to_bytes())


def test_queue_list_of_a_big_queue_is_streamed_in_pages(served: Ctl) -> None:
    """More messages than one answer may carry (MAX_LIST): a plain queue.list is
    refused as too large, a streamed one comes in small pages, and empathctl (which
    streams) prints them all, as a table or as one JSON array."""
    n = MAX_LIST + 1500
    _fill_queue(served, n - 4)
    got = served.request("queue.list")
    assert got["ok"] is False and got["code"] == "too-large"
    assert f"more than {MAX_LIST} messages" in got["error"]
    assert len(served.request("queue.list", {"limit": 50, "offset": n - 60})["result"]) == 50
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(served.path))
        s.sendall(b'{"v":1,"cmd":"queue.list","args":{"stream":true}}\n')
        f = s.makefile("rb")
        count, longest = 0, 0
        while True:
            line = f.readline()
            longest = max(longest, len(line))
            msg = json.loads(line)
            assert msg["ok"] is True
            if not msg.get("more"):
                break
            assert 0 < len(msg["result"]) <= queueops.LIST_PAGE
            count += len(msg["result"])
    assert count == n
    assert longest < 1024 * 1024
    rows = served.json("queue", "list")
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    out = served.ok("queue", "list", "--domain", "big.example")
    assert out.splitlines()[0].split()[:2] == ["ID", "STATE"]
    assert out.splitlines()[-1].startswith(f"-- {n - 4} message(s)")


def test_output_into_a_closed_pipe_is_quiet(served: Ctl) -> None:
    """`empathctl queue list | head -1`: no BrokenPipeError traceback."""
    _fill_queue(served, 2000)
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    ctl = f"{shlex.quote(sys.executable)} -m empath.ctl --socket {shlex.quote(str(served.path))}"
    for args in ("queue list", "--json queue list", "queue stats --watch --interval 0.1"):
        p = subprocess.run(f"{ctl} {args} | head -1", shell=True, capture_output=True,
                           text=True, env=environ, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0
        assert len(p.stdout.splitlines()) == 1
        assert p.stderr == "", (args, p.stderr)
    # Deterministically: the reading end is closed before empathctl writes anything.
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([*ctl.split(), "status"], stdout=w, stderr=subprocess.PIPE,
                           text=True, env=environ, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
    finally:
        os.close(w)
    assert p.returncode == 0 and p.stderr == ""


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


def test_every_help_has_an_example() -> None:
    from empath.ctl import build_parser

    seen = []
    for path, parser in _subcommands(build_parser()):
        text = parser.format_help()
        assert "examples:" in text, path
        example = text.split("examples:", 1)[1]
        assert "empathctl " + " ".join(path) in example, (path, example)
        seen.append(" ".join(path))
    assert {"status", "queue list", "queue delete", "queue stats", "dns cache", "route set",
            "reload", "log-level", "connections"} <= set(seen)
    p = subprocess.run([sys.executable, "-m", "empath.ctl", "queue", "list", "--help"],
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and "empathctl queue list --limit 50 --offset 100" in p.stdout


def test_queue_show(served: Ctl) -> None:
    id = served.ids["deferred"]
    out = served.ok("queue", "show", id.lower())  # ids are case-insensitive
    assert id in out
    assert "Subject: quarterly report" in out  # unfolded
    assert "Message-ID: <m1@example.com>" in out
    assert "carol@b.example" in out and "4.4.1 connection refused" in out
    assert "SECRET BODY TEXT" not in out
    j = served.json("queue", "show", id)
    assert j["envelope"]["id"] == id
    assert j["envelope"]["client_addr"] == "192.0.2.1"
    assert j["message"]["state"] == "deferred"
    assert ["Subject", "quarterly report"] in j["headers"]
    assert j["headers_truncated"] is False
    assert "SECRET BODY TEXT" not in json.dumps(j)


def test_queue_show_errors(served: Ctl) -> None:
    p = served.ctl("queue", "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert p.returncode == 1
    assert "no message 01ARZ3NDEKTSV4RRFFQ69G5FAV" in p.stderr
    p = served.ctl("queue", "show", "../../etc/passwd")
    assert p.returncode == 1 and "not a queue id" in p.stderr
    p = served.ctl("--json", "queue", "show", "nope")
    assert p.returncode == 1
    assert json.loads(p.stdout)["code"] == "bad-request"


def test_queue_retry_one(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    id = served.ids["deferred"]
    before = time.time()
    out = served.ok("queue", "retry", id)
    assert "due now" in out
    r = served.env("deferred").recipients[0]
    # Nothing is rewritten on disk: the scheduler is told to try it now, deferred
    # recipients included, once.
    assert r.state == "deferred" and r.attempts == 3
    assert r.next_attempt is not None and r.next_attempt > time.time() + 1000
    due = served.loop.call(lambda: served.qm.next_due(id))
    assert due is not None and before - 1 <= due <= time.time()
    assert served.loop.call(lambda: id in served.qm._forced)
    rec = [x for x in control_records(caplog) if "retry" in x.getMessage()]
    assert rec and rec[-1].__dict__["QUEUE_ID"] == id
    # A held message is not retried: release it first.
    p = served.ctl("queue", "retry", served.ids["held"])
    assert p.returncode == 1 and "on hold" in p.stderr


def test_queue_retry_all_and_flush(served: Ctl) -> None:
    j = served.json("queue", "retry", "--all")
    assert j["messages"] == 3  # all scheduled ones; the held message is not scheduled
    now = time.time()
    for name in ("deferred", "multi", "pending"):
        id = served.ids[name]
        due = served.loop.call(lambda id=id: served.qm.next_due(id))
        assert due is not None and due <= now
    assert served.loop.call(lambda: served.qm.next_due(served.ids["held"])) is None
    assert served.env("held").held is True
    out = served.ok("queue", "flush")
    assert "message(s) due now" in out
    assert "delivery.mode is hold" in out
    p = served.ctl("queue", "retry")
    assert p.returncode == 2  # an id or --all
    p = served.ctl("queue", "retry", "--all", served.ids["pending"])
    assert p.returncode == 2


def test_hold_and_release(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    id = served.ids["deferred"]
    assert served.ok("queue", "hold", id).strip() == f"{id}: held"
    assert served.env("deferred").held is True
    assert [r["id"] for r in served.json("queue", "list", "--status", "held")] == [
        id, served.ids["held"]]
    assert "already held" in served.ok("queue", "hold", id)
    assert served.ok("queue", "release", id).strip() == f"{id}: released"
    assert served.env("deferred").held is False
    # Released mail is scheduled again (at its own retry time, not now).
    hid = served.ids["held"]
    assert served.loop.call(lambda: served.qm.next_due(hid)) is None
    assert served.json("queue", "release", hid) == {"id": hid, "held": False, "changed": True}
    assert served.loop.call(lambda: served.qm.next_due(hid)) is not None
    assert "was not held" in served.ok("queue", "release", hid)
    msgs = [r.getMessage() for r in control_records(caplog)]
    assert any(f"hold id={id}" in m for m in msgs)
    assert any(f"release id={id}" in m for m in msgs)


def test_delete(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    id = served.ids["multi"]
    out = served.ok("queue", "delete", "--yes", id)
    assert "deleted" in out and "no bounce" in out
    assert not (served.spool.queue_dir / f"{id}.env").exists()
    assert not (served.spool.queue_dir / f"{id}.msg").exists()
    assert id not in [r["id"] for r in served.json("queue", "list")]
    p = served.ctl("queue", "delete", "-y", id)
    assert p.returncode == 1 and "no message" in p.stderr
    rec = [r for r in control_records(caplog) if "delete id=" in r.getMessage()]
    assert len(rec) == 1
    assert "<eve@b.example>" in rec[0].getMessage()  # undelivered recipients only
    assert "dan@a.example" not in rec[0].getMessage()


def _ctl_on_a_terminal(served: Ctl, *args: str, answer: bytes
                       ) -> tuple[int, str, str]:
    """empathctl with stdin on a pseudo-terminal (as typed by a person): its exit
    status, stdout and what it wrote to the terminal side (stderr)."""
    master, slave = pty.openpty()
    try:
        environ = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "empath.ctl", "--socket", str(served.path), *args],
            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ,
            cwd="/")
        os.close(slave)
        slave = -1
        os.write(master, answer)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out.decode(), err.decode()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_delete_asks_first_on_a_terminal(served: Ctl) -> None:
    id = served.ids["multi"]
    env_file = served.spool.queue_dir / f"{id}.msg"  # the message exists while it does
    # Not a terminal and no --yes: refused before anything is sent (usage, exit 2).
    p = served.ctl("queue", "delete", id)
    assert p.returncode == 2
    assert "stdin is not a terminal" in p.stderr and "--yes" in p.stderr
    assert env_file.exists()
    # On a terminal: asked, with what would be lost; anything but y/yes keeps it.
    code, out, err = _ctl_on_a_terminal(served, "queue", "delete", id, answer=b"n\n")
    assert code == 1, err
    assert f"delete {id} (deferred) from <alice@example.com>" in err
    assert "1 undelivered recipient(s): eve@b.example" in err
    assert "No bounce is sent. [y/N]" in err and "not deleted" in err
    assert out == ""
    assert env_file.exists()
    code, out, err = _ctl_on_a_terminal(served, "queue", "delete", id.lower(), answer=b"yes\n")
    assert code == 0, err
    assert f"{id}: deleted" in out
    assert not env_file.exists()
    # A message that is not there: said so, nothing asked.
    code, _, err = _ctl_on_a_terminal(served, "queue", "delete", id, answer=b"y\n")
    assert code == 1 and f"no message {id}" in err and "[y/N]" not in err
    assert "--yes" in served.ok("queue", "delete", "--help")


def test_changes_refused_while_delivering(
    served: Ctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queueops, "ACTIVE_WAIT", 0.3)
    id = served.ids["pending"]
    served.loop.call(lambda: served.qm._active.add(id))
    for verb in ("delete", "hold", "retry"):
        p = served.ctl("queue", verb, id, *(["--yes"] if verb == "delete" else []))
        assert p.returncode == 1, (verb, p.stderr)
        assert "being delivered right now" in p.stderr
    assert (served.spool.queue_dir / f"{id}.msg").exists()
    assert served.env("pending").held is False
    assert served.json("queue", "list", "--status", "active")[0]["id"] == id
    j = served.json("queue", "retry", "--all")
    assert j["active"] == [id]
    served.loop.call(lambda: served.qm._active.discard(id))
    served.ok("queue", "delete", "--yes", id)


def test_queue_stats(served: Ctl) -> None:
    j = served.json("queue", "stats")
    assert j["messages"] == 4
    assert j["by_state"] == {"pending": 1, "deferred": 2, "held": 1, "active": 0}
    assert j["recipients"] == {"pending": 2, "deferred": 2, "delivered": 1, "bounced": 0}
    assert j["oldest_id"] == served.ids["pending"]
    assert j["oldest_age"] >= 300
    assert j["size"] == 4 * len(MESSAGE)
    domains = {d["domain"]: d for d in j["by_domain"]}
    assert domains["b.example"] == {"domain": "b.example", "messages": 2, "pending": 0,
                                    "deferred": 2}
    assert domains["a.example"]["pending"] == 1
    out = served.ok("queue", "stats")
    assert "messages" in out and "b.example" in out and "DOMAIN" in out


def test_queue_stats_watch(served: Ctl) -> None:
    p = served.ctl("--json", "queue", "stats", "--watch", "--interval", "0.1", "--count", "3")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["messages"] == 4 for line in lines)
    out = served.ok("queue", "stats", "--watch", "--interval", "0.1", "--count", "2")
    assert out.count("by state") == 2
    # Raw: items carry "more", a final line without it ends the stream.
    got = served.raw(b'{"v":1,"cmd":"queue.stats","args":{"watch":true,"count":2,'
                     b'"interval":0.1}}\n', responses=3)
    assert [g.get("more") for g in got] == [True, True, None]
    assert got[2]["result"] is None


# ------------------------------------------------------------------ dns, routes


def test_dns_cache(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    dns = served.qm.dns
    served.loop.call(lambda: dns._cache_put(
        ("b.example", "MX"), _Entry("ok", ((10, "mx.b.example"),), dns._clock() + 300)))
    served.loop.call(lambda: dns._cache_put(
        ("mx.b.example", "A"), _Entry("ok", ("192.0.2.25",), dns._clock() + 300)))
    out = served.ok("dns", "cache")
    assert "b.example" in out and "10 mx.b.example" in out and "192.0.2.25" in out
    j = served.json("dns", "cache")
    assert {(e["name"], e["type"]) for e in j["entries"]} == {("b.example", "MX"),
                                                              ("mx.b.example", "A")}
    assert "cleared (2 entries)" in served.ok("dns", "cache", "--clear")
    assert served.json("dns", "cache") == {"entries": []}
    assert served.ok("dns", "cache").strip() == "DNS cache is empty"
    assert any("dns cache cleared: 2" in r.getMessage() for r in control_records(caplog))


def test_routes(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    j = served.json("route", "list")
    assert j["routes"] == [{"domain": "a.example", "nexthop": "smtp:127.0.0.1:2626",
                            "source": "config"}]
    out = served.ok("route", "set", "A.EXAMPLE", "LMTP:/run/dovecot/lmtp")
    assert "a.example: next hop lmtp:/run/dovecot/lmtp" in out
    assert "smtp:127.0.0.1:2626" in out
    served.ok("route", "set", "b.example", "smtp:[::1]:2525")
    assert served.loop.call(lambda: dict(served.qm.overrides)) == {
        "a.example": "lmtp:/run/dovecot/lmtp", "b.example": "smtp:[::1]:2525"}
    j = served.json("route", "list")
    assert j["routes"] == [
        {"domain": "a.example", "nexthop": "lmtp:/run/dovecot/lmtp", "source": "override",
         "config_nexthop": "smtp:127.0.0.1:2626"},
        {"domain": "b.example", "nexthop": "smtp:[::1]:2525", "source": "override"},
    ]
    out = served.ok("route", "list")
    assert "override (config: smtp:127.0.0.1:2626)" in out
    assert "other domains: none (mode hold" in out
    p = served.ctl("route", "set", "c.example", "smtp:")
    assert p.returncode == 1 and "next hop 'smtp:': empty address" in p.stderr
    p = served.ctl("route", "set", "c.example", "ftp:host")
    assert p.returncode == 1 and "unknown transport" in p.stderr
    p = served.ctl("route", "set", "not_a domain", "smtp:host")
    assert p.returncode == 1
    assert "now smtp:127.0.0.1:2626" in served.ok("route", "unset", "a.example")
    p = served.ctl("route", "unset", "a.example")
    assert p.returncode == 1 and "no runtime route override for a.example" in p.stderr
    assert served.loop.call(lambda: dict(served.qm.overrides)) == {"b.example": "smtp:[::1]:2525"}
    msgs = [r.getMessage() for r in control_records(caplog)]
    assert any("route set a.example lmtp:/run/dovecot/lmtp" in m for m in msgs)
    assert any("route unset a.example" in m for m in msgs)


# ------------------------------------------------------------------ supervisor commands


def test_log_level_and_connections(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    assert "log level is now debug" in served.ok("log-level", "debug")
    assert served.json("log-level", "warning") == {"level": "warning"}
    assert served.fake.levels == ["debug", "warning"]
    assert served.ctl("log-level", "loud").returncode == 2
    r = served.request("log.level", {"level": "loud"})
    assert r["ok"] is False and r["code"] == "bad-request"
    assert any("log level set to debug" in rec.getMessage() for rec in control_records(caplog))
    p = served.ctl("connections")
    assert p.returncode == 0, p.stderr
    header, row, footer = p.stdout.splitlines()
    assert header.split() == ["CLIENT", "ROLE", "STATE", "HELO", "TLS", "DURATION", "WORKER"]
    assert row.split() == ["192.0.2.7:40007", "smtp", "data", "client.example?[2J", "TLSv1.3",
                           "1m", "0"]  # the client's control characters are not printed
    assert footer == "-- 1 connection(s), from 1 worker(s)"
    assert "worker 1 (pid 102) did not answer within 2 s" in p.stderr
    j = served.json("connections")
    assert j["connections"][0]["peer"] == "192.0.2.7:40007"
    assert j["workers"][1] == {"index": 1, "pid": 102, "ok": False,
                               "error": "did not answer within 2 s"}


def test_unavailable_handlers(ctl: Ctl) -> None:
    ctl.handlers.connections = None
    ctl.start()
    p = ctl.ctl("connections")
    assert p.returncode == 1 and "not available" in p.stderr


def test_reload(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    out = served.ok("reload", "--wait")
    assert "configuration reloaded" in out and "changed: limits" in out
    assert served.fake.reloads == 1
    served.fake.reload_result = {"ok": True, "restart_needed": ["workers"], "changed": []}
    assert "workers changed; it takes effect only after a restart" in served.ok(
        "reload", "--wait")
    assert "reload started" in served.ok("reload")
    deadline = time.monotonic() + 30
    while served.fake.reloads < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.fake.reloads == 3
    assert any("reload applied" in r.getMessage() for r in control_records(caplog))


def test_reload_wait_refused_exits_nonzero(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    served.fake.reload_result = {"ok": False, "errors": [
        "/etc/empath/empath.yaml: limits.max_recipients: expected a positive integer, got 0",
        "/etc/empath/empath.yaml: hostname: required key is missing"]}
    p = served.ctl("reload", "--wait")
    assert p.returncode == 1
    assert "configuration refused" in p.stderr
    assert "limits.max_recipients" in p.stderr and "hostname" in p.stderr
    p = served.ctl("--json", "reload", "--wait")
    assert p.returncode == 1
    j = json.loads(p.stdout)
    assert j["code"] == "refused" and j["detail"]["ok"] is False
    assert len(j["detail"]["errors"]) == 2
    # An object result (what Supervisor.reload may return) and a raising reload.
    @dataclass
    class Result:
        ok: bool
        errors: list[str]
    served.fake.reload_result = Result(False, ["bad"])
    assert served.ctl("reload", "--wait").returncode == 1
    served.fake.reload_result = {"ok": False, "applied": True, "generation": 3,
                                 "errors": ["worker 1 did not confirm generation 3"]}
    p = served.ctl("reload", "--wait")
    assert p.returncode == 1
    assert "applied, but not everywhere: worker 1 did not confirm" in p.stderr
    served.fake.reload_raises = RuntimeError("cannot read /etc/empath/empath.yaml")
    p = served.ctl("reload", "--wait")
    assert p.returncode == 1 and "cannot read /etc/empath/empath.yaml" in p.stderr
    assert any("refused" in r.getMessage() for r in control_records(caplog))


# ------------------------------------------------------------------ the protocol


def test_oversized_request_then_next_request(served: Ctl) -> None:
    big = b'{"v":1,"cmd":"status","args":{"x":"' + b"a" * (MAX_REQUEST + 10_000) + b'"}}\n'
    got = served.raw(big + b'{"v":1,"cmd":"status"}\n', responses=2)
    assert got[0]["ok"] is False and got[0]["code"] == "too-large"
    assert got[1]["ok"] is True and got[1]["result"]["pid"] == 4242
    # Far too large, never ending: answered, connection closed, server unharmed.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(served.path))
        with contextlib.suppress(OSError):
            s.sendall(b"x" * (4 * MAX_REQUEST))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        line = s.makefile("rb").readline()
        assert json.loads(line)["code"] == "too-large"
    assert served.request("status")["ok"] is True
    assert served.ok("status")


def test_too_large_is_answered_while_the_line_is_still_coming(served: Ctl) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(served.path))
        s.sendall(b"y" * (MAX_REQUEST + 1))  # no newline yet
        f = s.makefile("rb")
        assert json.loads(f.readline())["code"] == "too-large"
        s.sendall(b"y" * 300_000 + b'\n{"v":1,"cmd":"status"}\n')  # the rest, then more
        assert json.loads(f.readline())["result"]["pid"] == 4242


def test_request_timeout_from_the_environment(
    served: Ctl, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EMPATH_CONTROL_TIMEOUT", "2.5")
    assert ControlServer(served.path, served.handlers).request_timeout == 2.5
    assert ControlServer(served.path, served.handlers, request_timeout=7).request_timeout == 7
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("EMPATH_CONTROL_TIMEOUT", bad)
        assert ControlServer(served.path, served.handlers).request_timeout == 30.0
    assert any("ignoring EMPATH_CONTROL_TIMEOUT" in r.getMessage() for r in caplog.records)
    monkeypatch.delenv("EMPATH_CONTROL_TIMEOUT")
    assert ControlServer(served.path, served.handlers).request_timeout == 30.0
    # A client that sends too slowly is told so and disconnected.
    server = served.start(path=served.sockdir / "slow.sock", request_timeout=0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(server.path))
        s.sendall(b'{"v":1,')
        f = s.makefile("rb")
        assert json.loads(f.readline())["code"] == "timeout"
        assert f.readline() == b""


def test_exactly_max_request_is_accepted(served: Ctl) -> None:
    head = b'{"v":1,"cmd":"status","token":"'
    pad = MAX_REQUEST - len(head) - 2
    line = head + b"t" * pad + b'"}'
    assert len(line) == MAX_REQUEST
    assert served.raw(line + b"\n")[0]["ok"] is True


@pytest.mark.parametrize(
    ("data", "code", "text"),
    [
        (b"this is not json\n", "bad-request", "not valid JSON"),
        (b"[1, 2]\n", "bad-request", "JSON object"),
        (b'{"cmd": "status"}\n', "bad-request", '"v"'),
        (b'{"v": 2, "cmd": "status"}\n', "unsupported-version", "version 2"),
        (b'{"v": "1", "cmd": "status"}\n', "unsupported-version", "not supported"),
        (b'{"v": 1}\n', "bad-request", "command"),
        (b'{"v": 1, "cmd": "status", "extra": 1}\n', "bad-request", "extra"),
        (b'{"v": 1, "cmd": "status", "args": []}\n', "bad-request", "args"),
        (b'{"v": 1, "cmd": "rm -rf"}\n', "unknown-command", "unknown command"),
        (b'{"v": 1, "cmd": "status", "args": {"x": 1}}\n', "bad-request", "unknown argument"),
        (b'{"v": 1, "cmd": "queue.stats", "args": {"watch": "yes"}}\n', "bad-request",
         "true or false"),
        (b'{"v": 1, "cmd": "queue.retry", "args": {}}\n', "bad-request", "all=true"),
        (b'{"v": 1, "cmd": "status", "args": {"x": NaN}}\n', "bad-request", "JSON"),
        (b"\xff\xfe\n", "bad-request", "JSON"),
        (b"[" * 100_000 + b"\n", "too-large", "longer"),
        (b"[" * 50_000 + b"\n", "bad-request", "JSON"),
    ],
)
def test_bad_requests(served: Ctl, data: bytes, code: str, text: str) -> None:
    got = served.raw(data + b'{"v": 1, "cmd": "status"}\n', responses=2)
    assert got[0]["ok"] is False
    assert got[0]["code"] == code
    assert text in got[0]["error"]
    assert got[0]["v"] == 1
    assert got[1]["ok"] is True  # and the connection still serves


def test_last_request_without_newline(served: Ctl) -> None:
    got = served.raw(b'{"v":1,"cmd":"status"}', shut=True)
    assert got[0]["ok"] is True


def test_connection_cap(ctl: Ctl) -> None:
    ctl.start(max_connections=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(ctl.path))
        # Make sure the server has taken the first connection before the second.
        idle.sendall(b'{"v":1,"cmd":"status"}\n')
        assert json.loads(idle.makefile("rb").readline())["ok"] is True
        got = ctl.raw(b'{"v":1,"cmd":"status"}\n')
        assert got[0]["code"] == "busy"
        p = ctl.ctl("status")
        assert p.returncode == 1 and "too many control connections" in p.stderr
    # Once the first connection is gone, there is room again. (Each closed connection
    # is noticed by the server a moment later: poll, do not race it.)
    served_again = False
    deadline = time.monotonic() + 30
    while not served_again and time.monotonic() < deadline:
        served_again = ctl.request("status")["ok"] is True
        time.sleep(0.05)
    assert served_again


def test_server_survives_abrupt_clients(served: Ctl) -> None:
    for data in (b"", b'{"v":1,', b'{"v":1,"cmd":"queue.list"}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(served.path))
            s.sendall(data)
    assert served.request("status")["ok"] is True


# ------------------------------------------------------------------ token


def test_token(ctl: Ctl, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    os.chmod(token_file, 0o640)
    ctl.add_standard()
    ctl.start(token_file=token_file)
    p = ctl.ctl("status")
    assert p.returncode == 1 and "token is required" in p.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("guess")
    p = ctl.ctl("--token-file", str(wrong), "status")
    assert p.returncode == 1 and "wrong token" in p.stderr
    assert "4242" in ctl.ok("--token-file", str(token_file), "status")
    assert "4242" in ctl.ok("status", env={"EMPATH_CONTROL_TOKEN": "s3cret-token"})
    # From the config's control.token_file.
    cfg = tmp_path / "empath.yaml"
    cfg.write_text(f"control: {{socket: {ctl.path}, token_file: {token_file}}}\n")
    assert "4242" in ctl.ok("--config", str(cfg), "status", socket_arg=False)
    r = ctl.request("status", token="guess")
    assert r["code"] == "unauthorized"
    assert ctl.request("status", token="s3cret-token")["ok"] is True


def test_token_file_must_not_be_world_readable(ctl: Ctl, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    os.chmod(token_file, 0o644)
    with pytest.raises(ControlError, match="readable or writable by others"):
        ctl.start(token_file=token_file)
    assert not ctl.path.exists()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    with pytest.raises(ControlError, match="empty"):
        ctl.start(token_file=empty)
    with pytest.raises(ControlError, match="cannot open"):
        ctl.start(token_file=tmp_path / "missing")


# ------------------------------------------------------------------ peer credentials


def test_nobody_is_kept_out_by_the_socket_mode(ctl: Ctl, nobody: None) -> None:
    ctl.start()  # group empath-admin does not exist here: root's group, 0660
    p = ctl.ctl("status", user=as_nobody())
    assert p.returncode == 3
    assert "permission denied" in p.stderr
    assert "you need to be root or in group empath-admin" in p.stderr


def test_nobody_refused_by_peer_credentials(
    ctl: Ctl, nobody: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    ctl.start(admin_group="empath-admin")
    os.chmod(ctl.path, 0o666)  # a socket opened too widely: the daemon still refuses
    p = ctl.ctl("status", user=as_nobody())
    assert p.returncode == 1
    assert "permission denied for nobody" in p.stderr
    assert "root or in group empath-admin" in p.stderr
    p = ctl.ctl("--json", "queue", "delete", "--yes", "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                user=as_nobody())
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == "forbidden"
    assert any(getattr(r, "EMPATH_EVENT", None) == "control-refused" for r in caplog.records)
    assert ctl.ok("status")  # root still gets in


def test_admin_group_member_allowed(ctl: Ctl, admin_group: str) -> None:
    ctl.add_standard()
    ctl.start(admin_group=admin_group)
    # With its supplementary groups from the group database, nobody passes the
    # socket's mode (0660, group admin_group) and the daemon's membership check.
    out = ctl.ok("status", user=as_nobody(init_groups=True))
    assert "4242" in out
    id = ctl.ids["pending"]
    assert ctl.ok("queue", "hold", id, user=as_nobody(init_groups=True)).strip() == f"{id}: held"
    # Membership is looked up in the group database, not only the process's groups.
    os.chmod(ctl.path, 0o666)
    assert "4242" in ctl.ok("status", user=as_nobody())


def test_audit_log_names_the_peer(served: Ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="empath.control")
    id = served.ids["pending"]
    assert served.request("queue.hold", {"id": id})["ok"] is True
    assert served.request("queue.list")["ok"] is True  # reading is not audit-logged
    recs = control_records(caplog)
    assert len(recs) == 1
    rec = recs[0]
    assert rec.levelno == logging.INFO
    assert rec.__dict__["CONTROL_UID"] == os.getuid()
    assert rec.__dict__["CONTROL_PID"] == os.getpid()
    assert rec.__dict__["CONTROL_COMMAND"] == "queue.hold"
    assert rec.__dict__["QUEUE_ID"] == id
    msg = rec.getMessage()
    assert f"uid={os.getuid()}" in msg and f"pid={os.getpid()}" in msg
    assert f"hold id={id}" in msg
    # Refusals of changing commands are logged too.
    served.request("queue.delete", {"id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    assert any("cmd=queue.delete refused" in r.getMessage() for r in control_records(caplog))


# ------------------------------------------------------------------ finding the socket


def test_client_without_daemon(ctl: Ctl) -> None:
    p = ctl.ctl("status")
    assert p.returncode == 3
    assert f"is empath running? no socket at {ctl.path}" in p.stderr
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ctl.path))
    stale.close()
    p = ctl.ctl("status")
    assert p.returncode == 3 and "nothing is listening" in p.stderr


def test_client_usage_errors(ctl: Ctl) -> None:
    assert ctl.ctl().returncode == 2
    assert ctl.ctl("frobnicate").returncode == 2
    assert ctl.ctl("queue").returncode == 2
    assert ctl.ctl("route", "set", "a.example").returncode == 2
    assert "reload" in ctl.ok("--help")


def test_client_finds_the_socket(served: Ctl, tmp_path: Path) -> None:
    assert "4242" in served.ok("status", socket_arg=False,
                               env={"EMPATH_CONTROL_SOCKET": str(served.path)})
    cfg = tmp_path / "empath.yaml"
    cfg.write_text(f"control: {{socket: {served.path}}}\n")
    assert "4242" in served.ok("--config", str(cfg), "status", socket_arg=False)
    assert "4242" in served.ok("status", socket_arg=False, env={"EMPATH_CONFIG": str(cfg)})
    # Even when the rest of the file is broken: reload --wait must reach the daemon.
    cfg.write_text(f"control: {{socket: {served.path}}}\nlimits: {{max_recipients: 0}}\n"
                   "hostname: [\n")
    p = served.ctl("--config", str(cfg), "status", socket_arg=False)
    assert p.returncode == 3  # YAML broken: the default socket is tried (and absent here)
    cfg.write_text(f"control: {{socket: {served.path}}}\nlimits: {{max_recipients: 0}}\n")
    assert "4242" in served.ok("--config", str(cfg), "status", socket_arg=False)
    # control.socket null: <state_dir>/control.sock (the development setup).
    state = served.sockdir
    cfg.write_text(f"state_dir: {state}\ncontrol: {{socket: null}}\n")
    assert "4242" in served.ok("--config", str(cfg), "status", socket_arg=False)
    # systemd's RUNTIME_DIRECTORY (ExecReload= gets it too).
    assert "4242" in served.ok("status", socket_arg=False,
                               env={"RUNTIME_DIRECTORY": str(served.sockdir),
                                    "EMPATH_CONFIG": str(tmp_path / "missing.yaml")})


def test_control_socket_path(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "state")
    assert control_socket_path(cfg, {}) == tmp_path / "state" / "control.sock"
    assert control_socket_path(cfg, {"RUNTIME_DIRECTORY": "/run/empath"}) == Path(
        "/run/empath/control.sock")
    assert control_socket_path(cfg, {"RUNTIME_DIRECTORY": "/run/a:/run/b"}) == Path(
        "/run/a/control.sock")
    explicit = load_config_text(
        f"hostname: mx.test.example\npostmaster: postmaster@test.example\n"
        f"state_dir: {tmp_path}\ncontrol: {{socket: /run/x/ctl.sock}}\n")
    assert control_socket_path(explicit, {"RUNTIME_DIRECTORY": "/run/empath"}) == Path(
        "/run/x/ctl.sock")


def test_control_config_keys_are_built(tmp_path: Path) -> None:
    cfg = load_config_text(
        f"hostname: mx.test.example\npostmaster: postmaster@test.example\n"
        f"state_dir: {tmp_path}\n"
        "control: {socket: /run/empath/control.sock, token_file: /etc/empath/control.token}\n")
    assert cfg.control.socket == Path("/run/empath/control.sock")
    assert cfg.control.token_file == Path("/etc/empath/control.token")
    from empath.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config_text(
            f"hostname: mx.test.example\npostmaster: postmaster@test.example\n"
            f"state_dir: {tmp_path}\ncontrol: {{socket: /{'x' * 120}}}\n")
    assert [i.key_path for i in info.value.issues] == ["control.socket"]
    assert "107 bytes" in info.value.issues[0].message


def test_close_ends_streams_and_removes_the_socket(served: Ctl) -> None:
    server = served.servers[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(served.path))
        s.sendall(b'{"v":1,"cmd":"queue.stats","args":{"watch":true,"interval":0.1}}\n')
        f = s.makefile("rb")
        assert json.loads(f.readline())["more"] is True
        served.stop(server)
        while line := f.readline():  # updates already sent, then end of stream
            assert json.loads(line)["ok"] is True
    assert not served.path.exists()
    assert served.ctl("status").returncode == 3


def test_token_file_changed_at_reload(served: Ctl, tmp_path: Path) -> None:
    server = served.servers[0]
    token_file = tmp_path / "token"
    token_file.write_text("new-token\n")
    os.chmod(token_file, 0o600)
    server.set_token_file(token_file)
    assert served.request("status")["code"] == "unauthorized"
    assert served.request("status", token="new-token")["ok"] is True
    os.chmod(token_file, 0o604)
    with pytest.raises(ControlError):
        server.set_token_file(token_file)
    assert served.request("status", token="new-token")["ok"] is True  # kept the old one
    server.set_token_file(None)
    assert served.request("status")["ok"] is True


# ---------------------------------------------------------------- the real daemon


def test_daemon_serves_empathctl(make_daemon: Any) -> None:
    """The supervisor runs the control socket: status, queue, routes and
    ``reload --wait`` (systemd's ExecReload) against the real daemon."""
    from tests.harness import send_message

    d = make_daemon()
    sock = d.state_dir / "control.sock"  # the default without control.socket
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660

    def ctl_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "empath.ctl", "--socket", str(sock), *args],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    st = json.loads(ctl_run("--json", "status").stdout)
    assert st["hostname"] == "mx.test.example" and len(st["workers"]) == 2
    code, _ = asyncio.run(send_message(d.smtp_port, "a@test.example", ["b@test.example"],
                                          b"Subject: held\r\n\r\nx\r\n", "ctl-daemon"))
    assert code == 250
    listed = json.loads(ctl_run("--json", "queue", "list").stdout)
    assert [m["sender"] for m in listed] == ["a@test.example"]
    p = ctl_run("route", "set", "example.org", "smtp:127.0.0.1:2626")
    assert p.returncode == 0, p.stderr
    routes = json.loads(ctl_run("--json", "route", "list").stdout)["routes"]
    assert {"domain": "example.org", "nexthop": "smtp:127.0.0.1:2626",
            "source": "override"} in routes
    # reload --wait: 0 when applied, non-zero when the file is refused (and the old
    # config keeps serving).
    d.config["local_domains"] = ["test.example", "new.example"]
    d.write_config()
    p = ctl_run("reload", "--wait")
    assert p.returncode == 0, p.stdout + p.stderr
    d.config_path.write_text("hostname: [unclosed\n")
    p = ctl_run("reload", "--wait")
    assert p.returncode == 1
    assert "hostname" in p.stdout + p.stderr or "YAML" in p.stdout + p.stderr
    code, _ = asyncio.run(send_message(d.smtp_port, "a@test.example", ["c@new.example"],
                                       b"Subject: still\r\n\r\nx\r\n", "ctl-daemon"))
    assert code == 250
    assert d.stop() == 0
    assert not sock.exists()
