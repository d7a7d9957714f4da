"""The daemon as a systemd service, with real parts and no PID 1.

- socket activation through ``systemd-socket-activate`` (real LISTEN_FDS);
- sd_notify to a datagram socket the test binds as ``NOTIFY_SOCKET``: READY=1 once
  serving, STATUS=, RELOADING=1 + MONOTONIC_USEC then READY=1 around a reload,
  STOPPING=1; WATCHDOG=1 pings that stop while the daemon is SIGSTOPped;
- reload: a new local domain applies to new sessions in every worker, an open session
  keeps working, a broken file changes nothing, a rotated TLS certificate is used;
- journald's native protocol to a socket the test binds (``EMPATH_JOURNAL_SOCKET``):
  one message's life in structured fields, and never a byte of its body;
- the journald catalog against the event table in empath/systemd/events.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from empath.config import load_config_text
from empath.daemon.supervisor import config_changes
from empath.log import FieldsFormatter
from empath.systemd.events import CATALOG, message_id
from empath.systemd.journal import JournalHandler, JournalWriter, encode_fields
from empath.systemd.notify import Notifier, monotonic_usec, watchdog_interval
from tests.conftest import require_tool
from tests.harness import (
    REPO,
    Daemon,
    RawClient,
    children_of,
    free_port,
    queued_id,
    send_message,
)

MakeDaemon = Callable[..., Daemon]

CATALOG_FILE = REPO / "systemd" / "empath.catalog"
SENDER = "someone@client.example"


# ---- a datagram socket the test owns (NOTIFY_SOCKET, the journal) -----------------------


class DatagramSink:
    """A bound AF_UNIX datagram socket, read by a thread into ``items``.

    Each item is (sender pid, payload). A payload passed as a memfd (journald's form
    for large entries) is read from the descriptor.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.items: list[tuple[int, bytes]] = []
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def env_value(self) -> str:
        """The address as $NOTIFY_SOCKET spells it (``@`` for an abstract socket)."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def _run(self) -> None:
        anc = socket.CMSG_SPACE(struct.calcsize("iII")) + socket.CMSG_SPACE(4 * 4)
        while not self._stop:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(1 << 20, anc)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = struct.unpack("i", payload[:4])[0]
                    try:
                        data = os.pread(fd, os.fstat(fd).st_size, 0)
                    finally:
                        os.close(fd)
            with self.cond:
                self.items.append((pid, data))
                self.cond.notify_all()

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [data for _, data in self.items]

    def wait_for(self, pred: Callable[[bytes], bool], what: str, *, start: int = 0,
                 timeout: float = 30.0) -> int:
        """Index of the first payload from ``start`` on that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.items)):
                    if pred(self.items[i][1]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got "
                                         f"{[d[:200] for _, d in self.items[-20:]]}")
                self.cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()
        if not self.address.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


def notify_fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)


def has(key: str, value: str | None = None) -> Callable[[bytes], bool]:
    def pred(data: bytes) -> bool:
        fields = notify_fields(data)
        return key in fields and (value is None or fields[key] == value)
    return pred


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: ``K=v\\n``, or ``K\\n<u64 le length><bytes>\\n``."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n", "binary field not terminated"
            fields[line.decode()] = value.decode()
            i = nl + 10 + size
    return fields


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="empath-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def notify_sink() -> Iterator[DatagramSink]:
    sink = DatagramSink(f"\0empath-test-notify-{uuid.uuid4().hex}")  # abstract: "@..."
    yield sink
    sink.close()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").split("=", 1)
                for item in raw.split(b"\0") if b"=" in item)


async def rcpt_reply(port: int, rcpt: str, context: str) -> tuple[int, str]:
    c = await RawClient.connect(port, context)
    try:
        await c.greet()
        code, text = await c.cmd(f"MAIL FROM:<{SENDER}>")
        assert code == 250, text
        result = await c.cmd(f"RCPT TO:<{rcpt}>")
        await c.cmd("QUIT")
        return result
    finally:
        await c.close()


# ---- units: the protocols ----------------------------------------------------------------


def test_notifier_sends_to_path_and_abstract_sockets(short_dir: Path) -> None:
    for address in (str(short_dir / "notify"), f"\0empath-unit-{uuid.uuid4().hex}"):
        sink = DatagramSink(address)
        try:
            env = {"NOTIFY_SOCKET": sink.env_value, "WATCHDOG_USEC": "1000",
                   "WATCHDOG_PID": "1", "OTHER": "kept"}
            n = Notifier.from_environ(env)
            assert env == {"OTHER": "kept"}, "the notify variables must leave the environment"
            assert n.enabled
            assert n.notify("RELOADING=1", "MONOTONIC_USEC=42")
            assert n.notify("STATUS=queue: 1 message for bücher.example")
            sink.wait_for(has("STATUS"), "STATUS")
            first, second = sink.payloads()
            assert notify_fields(first) == {"RELOADING": "1", "MONOTONIC_USEC": "42"}
            assert notify_fields(second)["STATUS"] == "queue: 1 message for bücher.example"
            n.close()
        finally:
            sink.close()
    # Not under systemd: nothing is sent, nothing fails.
    assert not Notifier.from_environ({}).notify("READY=1")


def test_watchdog_interval_is_half_and_ours_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == pytest.approx(0.1)
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) \
        == pytest.approx(0.1)
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
    assert monotonic_usec() == pytest.approx(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6,
                                             abs=5e6)


def test_journal_native_protocol_text_binary_and_memfd(short_dir: Path) -> None:
    assert encode_fields({"A": "x", "B": "two\nlines"}) == (
        b"A=x\nB\n" + struct.pack("<Q", 9) + b"two\nlines\n")
    sink = DatagramSink(str(short_dir / "journal"))
    writer = JournalWriter(sink.address)
    try:
        writer.send({"MESSAGE": "hello", "QUEUE_ID": "ABC"})
        writer.send({"MESSAGE": "traceback:\n  line 1\n  line 2", "PRIORITY": "3"})
        big = "x" * (4 << 20)  # above any datagram size: goes as a sealed memfd
        writer.send({"MESSAGE": big, "EMPATH_EVENT": "big"})
        sink.wait_for(lambda d: b"EMPATH_EVENT=big" in d, "the large entry")
        entries = [parse_native(d) for d in sink.payloads()]
        assert entries[0] == {"MESSAGE": "hello", "QUEUE_ID": "ABC"}
        assert entries[1] == {"MESSAGE": "traceback:\n  line 1\n  line 2", "PRIORITY": "3"}
        assert entries[2]["MESSAGE"] == big
    finally:
        writer.close()
        sink.close()


def test_journal_handler_fields_and_message_ids() -> None:
    sent: list[dict[str, str]] = []
    handler = JournalHandler(send=lambda f: sent.append(dict(f)))
    logger = logging.getLogger("empath.test.journal")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("queued id=%s", "Q1", extra={"QUEUE_ID": "Q1", "EMPATH_EVENT": "received",
                                                   "CLIENT_ADDR": "192.0.2.1"})
        logger.warning("connect", extra={"EMPATH_EVENT": "connect", "MESSAGE": "not mine"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    received, connect, failed = sent
    assert received["MESSAGE"] == "queued id=Q1"
    assert received["PRIORITY"] == "6"
    assert received["SYSLOG_IDENTIFIER"] == "empath"
    assert received["QUEUE_ID"] == "Q1" and received["CLIENT_ADDR"] == "192.0.2.1"
    assert received["MESSAGE_ID"] == CATALOG["received"]
    assert received["CODE_FUNC"] == "test_journal_handler_fields_and_message_ids"
    assert received["CODE_FILE"].endswith("test_systemd_glue.py") and received["CODE_LINE"]
    assert connect["MESSAGE"] == "connect", "extra= must not replace MESSAGE"
    assert connect["PRIORITY"] == "4" and "MESSAGE_ID" not in connect  # not catalogued
    assert failed["PRIORITY"] == "3" and "ValueError: boom" in failed["MESSAGE"]


def test_stderr_lines_show_the_fields() -> None:
    record = logging.LogRecord("empath.smtp", logging.INFO, __file__, 1,
                               "queued id=%s", ("Q1",), None)
    record.QUEUE_ID = "Q1"
    record.EMPATH_EVENT = "received"
    record.RCPT_DOMAIN = "example.com"
    record.DSN_STATUS = "4.4.1 x"
    line = FieldsFormatter().format(record)
    assert line.endswith(
        "queued id=Q1  EMPATH_EVENT=received QUEUE_ID=Q1 RCPT_DOMAIN=example.com "
        'DSN_STATUS="4.4.1 x"'), line


def test_config_changes_name_key_paths(tmp_path: Path) -> None:
    def cfg(extra: str) -> Any:
        return load_config_text(
            f"hostname: mx.example\npostmaster: pm@example.com\nstate_dir: {tmp_path}\n"
            f"local_domains: [example.com]\n{extra}")
    a = cfg("limits: {max_recipients: 10}\n")
    b = cfg("limits: {max_recipients: 20}\nworkers: 3\n"
            "delivery: {routes: {example.com: 'smtp:127.0.0.1:2626'}}\n")
    assert config_changes(a, a) == []
    assert config_changes(a, b) == ["limits.max_recipients", "delivery.routes.example.com",
                                    "workers"]


# ---- the catalog ---------------------------------------------------------------------------


def parse_catalog(text: str) -> dict[str, dict[str, str]]:
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("-- "):
            mid = line[3:].split()[0]
            assert re.fullmatch(r"[0-9a-f]{32}", mid), line
            assert mid not in entries, f"duplicate catalog id {mid}"
            current = entries[mid] = {"text": ""}
        elif current is None or (line.startswith("#") and not current["text"]):
            continue
        elif not current["text"] and (m := re.match(r"([A-Za-z-]+): (.*)$", line)):
            current[m.group(1)] = m.group(2)
        else:
            current["text"] += line + "\n"
    return entries


def test_catalog_and_event_ids_agree(tmp_path: Path) -> None:
    entries = parse_catalog(CATALOG_FILE.read_text())
    assert set(entries) == set(CATALOG.values()), (
        f"in code only: {set(CATALOG.values()) - set(entries)}; "
        f"in catalog only: {set(entries) - set(CATALOG.values())}")
    assert len(set(CATALOG.values())) == len(CATALOG), "two events share one MESSAGE_ID"
    for mid, entry in entries.items():
        assert entry.get("Subject"), mid
        assert entry.get("Defined-By") == "empath", mid
        assert entry.get("Support"), mid
        assert len(entry["text"].strip()) > 40, f"{mid}: say what happened and what to do"
    assert message_id("received") == CATALOG["received"] and message_id("connect") is None
    # And systemd's own parser takes the file.
    journalctl = require_tool("journalctl")
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    (catalog_dir / "empath.catalog").write_bytes(CATALOG_FILE.read_bytes())
    subprocess.run([journalctl, f"--root={tmp_path}", "--update-catalog"], check=True)
    listed = subprocess.run([journalctl, f"--root={tmp_path}", "--list-catalog"],
                            check=True, capture_output=True, text=True).stdout
    assert {line.split()[0] for line in listed.splitlines() if line.strip()} == set(entries)


# ---- the real daemon: socket activation --------------------------------------------------


def activate(d: Daemon, port: int, *env_names: str) -> None:
    """Run ``d`` under systemd-socket-activate on 127.0.0.1:``port`` (FileDescriptorName=smtp).

    systemd-socket-activate passes on only the variables it is told to (``-E``).
    """
    tool = require_tool("systemd-socket-activate")
    names = ["PYTHONPATH", *env_names]
    d.wrapper = [tool, "-l", f"127.0.0.1:{port}", "--fdname=smtp",
                 *(arg for n in names for arg in ("-E", n))]


def test_socket_activation_serves_the_handed_over_socket(make_daemon: MakeDaemon) -> None:
    d = make_daemon(start=False)
    port = free_port()
    activate(d, port)
    d.start(wait=False)
    deadline = time.monotonic() + 30
    while f"Listening on 127.0.0.1:{port}" not in d.log():  # systemd-socket-activate bound it
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)

    async def main() -> None:
        # This connection is what makes systemd-socket-activate start the daemon:
        # it waits in the socket's backlog and must be greeted.
        first = await RawClient.connect(port, "activation")
        code, text = await first.reply(timeout=30, record=False)
        assert code == 220, text
        await first.cmd("QUIT")
        await first.close()
        d.wait_ready()
        code, text = await send_message(port, SENDER, ["user@test.example"],
                                        b"Subject: activated\r\n\r\nhi\r\n", "activation")
        assert code == 250, text
        # listen: in the config is ignored: those ports were never bound.
        for unused in (d.smtp_port, d.submission_port):
            with pytest.raises(OSError):
                await RawClient.connect(unused, "activation")

    asyncio.run(main())
    assert "socket-activated: ignoring listen" in d.log()
    assert re.search(r"EMPATH_EVENT=received QUEUE_ID=[0-9A-Z]+ CLIENT_ADDR=127\.0\.0\.1",
                     d.log()), d.log()
    assert d.stop() == 0


# ---- sd_notify ---------------------------------------------------------------------------


def test_notify_ready_status_reload_stopping(make_daemon: MakeDaemon,
                                             notify_sink: DatagramSink) -> None:
    d = make_daemon(start=False)
    d.extra_env["NOTIFY_SOCKET"] = notify_sink.env_value
    d.start(wait=False)
    assert d.proc is not None
    i_ready = notify_sink.wait_for(has("READY", "1"), "READY=1")

    async def greeted() -> None:
        c = await RawClient.connect(d.smtp_port, "notify")
        code, _ = await c.reply(record=False)
        assert code == 220
        await c.cmd("QUIT")
        await c.close()

    # READY=1 came after the daemon serves: a connection now is greeted at once.
    asyncio.run(greeted())
    ready = notify_fields(notify_sink.payloads()[i_ready])
    assert re.match(r"queue: 0 messages \(0 in delivery\), \d+ connections$",
                    ready["STATUS"]), ready

    # Workers must never notify: the variables are not in their environment.
    workers = children_of(d.proc.pid)
    assert len(workers) == 2
    for pid in workers:
        env = environ_of(pid)
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(env), env

    # The queue shows in STATUS= (refreshed every few seconds and on change).
    code, text = asyncio.run(send_message(d.smtp_port, SENDER, ["user@test.example"],
                                          b"Subject: status\r\n\r\nhi\r\n", "notify"))
    assert code == 250, text
    notify_sink.wait_for(lambda p: notify_fields(p).get("STATUS", "").startswith(
        "queue: 1 messages"), "STATUS= with the queued message", start=i_ready)

    # Reload: RELOADING=1 with MONOTONIC_USEC in one datagram, then READY=1.
    before = monotonic_usec()
    start = len(notify_sink.payloads())
    d.proc.send_signal(signal.SIGHUP)
    i_reloading = notify_sink.wait_for(has("RELOADING", "1"), "RELOADING=1", start=start)
    i_ready2 = notify_sink.wait_for(has("READY", "1"), "READY=1 after the reload",
                                    start=i_reloading)
    reloading = notify_fields(notify_sink.payloads()[i_reloading])
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert "last reload: ok at" in notify_fields(notify_sink.payloads()[i_ready2])["STATUS"]

    # Reloads in a burst are serialised: RELOADING/READY strictly alternate.
    start = len(notify_sink.payloads())
    for _ in range(3):
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    notify_sink.wait_for(has("READY", "1"), "READY=1 after the burst", start=start)
    time.sleep(0.5)  # signals may merge: however many reloads run, none overlaps another
    marks = [("RELOADING" if has("RELOADING")(p) else "READY")
             for p in notify_sink.payloads()[start:] if has("RELOADING")(p) or has("READY")(p)]
    assert marks and marks[0] == "RELOADING"
    assert all(a != b for a, b in itertools.pairwise(marks)), marks

    start = len(notify_sink.payloads())
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    i_stopping = notify_sink.wait_for(has("STOPPING", "1"), "STOPPING=1", start=start)
    assert i_ready < i_reloading < i_ready2 < i_stopping
    assert not any(has("READY")(p) for p in notify_sink.payloads()[i_stopping:])


def test_watchdog_pings_stop_while_the_loop_is_stopped(make_daemon: MakeDaemon,
                                                       notify_sink: DatagramSink) -> None:
    d = make_daemon(start=False)
    d.extra_env.update({"NOTIFY_SOCKET": notify_sink.env_value, "WATCHDOG_USEC": "200000"})
    d.start()
    assert d.proc is not None

    def pings() -> int:
        return sum(1 for p in notify_sink.payloads() if has("WATCHDOG", "1")(p))

    def wait_pings(n: int) -> None:
        deadline = time.monotonic() + 30
        while pings() < n:
            assert time.monotonic() < deadline, f"only {pings()} WATCHDOG=1 pings"
            time.sleep(0.05)

    wait_pings(pings() + 5)  # repeatedly
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # pings already sent are read
        frozen = pings()
        time.sleep(1.5)  # several intervals: a live loop would have pinged
        assert pings() == frozen, "WATCHDOG=1 sent while the supervisor was stopped"
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_pings(frozen + 3)
    assert d.stop() == 0


# ---- reload ------------------------------------------------------------------------------


def reload_and_wait(d: Daemon, sink: DatagramSink) -> dict[str, str]:
    """SIGHUP; the READY=1 datagram that ends the reload (its STATUS= included)."""
    assert d.proc is not None
    start = len(sink.payloads())
    d.proc.send_signal(signal.SIGHUP)
    i = sink.wait_for(has("RELOADING", "1"), "RELOADING=1", start=start)
    i = sink.wait_for(has("READY", "1"), "READY=1 after RELOADING=1", start=i)
    return notify_fields(sink.payloads()[i])


def test_reload_applies_a_new_local_domain_or_refuses_a_broken_file(
        make_daemon: MakeDaemon, notify_sink: DatagramSink) -> None:
    d = make_daemon(start=False, relay_networks=[], local_domains=["test.example"])
    d.extra_env["NOTIFY_SOCKET"] = notify_sink.env_value
    d.start()
    port = d.smtp_port

    async def main() -> None:
        code, text = await rcpt_reply(port, "user@new.example", "reload-domain")
        assert (code, text[:5]) == (554, "5.7.1"), text
        old = await RawClient.connect(port, "reload-open")
        await old.greet()
        assert (await old.cmd(f"MAIL FROM:<{SENDER}>"))[0] == 250

        d.config["local_domains"] = ["test.example", "new.example"]
        d.write_config()
        status = reload_and_wait(d, notify_sink)
        assert "last reload: ok" in status["STATUS"], status
        # Every worker confirmed before READY=1: every new session has the domain.
        for _ in range(6):
            code, text = await rcpt_reply(port, "user@new.example", "reload-domain")
            assert code == 250, text
        # The session opened before the reload goes on (with the config it began with).
        assert (await old.cmd("RCPT TO:<user@test.example>"))[0] == 250
        assert (await old.cmd("DATA"))[0] == 354
        old.send(b"Subject: across a reload\r\n\r\nok\r\n.\r\n")
        code, text = await old.reply()
        assert code == 250, text

        d.config["limits"] = {"max_recipients": "many"}
        d.write_config()
        status = reload_and_wait(d, notify_sink)
        assert "last reload REFUSED" in status["STATUS"], status
        assert "limits.max_recipients" in status["STATUS"], status
        for _ in range(6):
            code, text = await rcpt_reply(port, "user@new.example", "reload-domain")
            assert code == 250, text
        assert (await old.cmd("NOOP"))[0] == 250
        await old.cmd("QUIT")
        await old.close()

    asyncio.run(main())
    log = d.log()
    assert "reload: configuration applied" in log and "local_domains" in log
    assert re.search(r"reload refused, configuration unchanged:.*\n.*limits\.max_recipients", log)
    assert d.stop() == 0


def test_reload_that_drops_relay_networks_stops_relaying_for_new_sessions(
        make_daemon: MakeDaemon, notify_sink: DatagramSink) -> None:
    # The relay decision is memoised per address; a reload must not be answered from
    # before it, on any worker.
    d = make_daemon(start=False, relay_networks=["127.0.0.0/8"], local_domains=["test.example"])
    d.extra_env["NOTIFY_SOCKET"] = notify_sink.env_value
    d.start()
    port = d.smtp_port

    async def main() -> None:
        for _ in range(6):
            code, text = await rcpt_reply(port, "user@elsewhere.example", "reload-relay")
            assert code == 250, text
        d.config["relay_networks"] = []
        d.write_config()
        assert "last reload: ok" in reload_and_wait(d, notify_sink)["STATUS"]
        for _ in range(6):
            code, text = await rcpt_reply(port, "user@elsewhere.example", "reload-relay")
            assert (code, text[:5]) == (554, "5.7.1"), text

    asyncio.run(main())
    assert d.stop() == 0


def test_reload_warns_about_keys_that_need_a_restart(make_daemon: MakeDaemon,
                                                     notify_sink: DatagramSink) -> None:
    d = make_daemon(start=False)
    d.extra_env["NOTIFY_SOCKET"] = notify_sink.env_value
    d.start()
    d.config["workers"] = 3
    d.write_config()
    status = reload_and_wait(d, notify_sink)
    assert "last reload: ok" in status["STATUS"]
    assert "reload: workers changed; it takes effect only after a restart" in d.log()
    assert d.proc is not None and len(children_of(d.proc.pid)) == 2
    assert d.stop() == 0


def write_cert(ca: trustme.CA, cert_path: Path, key_path: Path) -> None:
    cert = ca.issue_cert("mx.test.example")
    cert_path.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    key_path.chmod(0o600)  # a key readable by others is refused


async def starttls_ok(port: int, ca: trustme.CA) -> bool:
    """STARTTLS, verifying the server against ``ca`` only."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    c = await RawClient.connect(port, "reload-tls")
    try:
        assert any(line[4:] == "STARTTLS" for line in await c.greet())
        code, text = await c.cmd("STARTTLS")
        assert code == 220, text
        try:
            await c.writer.start_tls(ctx, server_hostname="mx.test.example")
        except ssl.SSLCertVerificationError:
            return False
        c.send(b"EHLO client.test\r\n")
        await c.lines()
        assert (await c.cmd("QUIT"))[0] == 221
        return True
    finally:
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await c.close()


def test_reload_uses_a_rotated_tls_certificate(make_daemon: MakeDaemon, tmp_path: Path,
                                               notify_sink: DatagramSink) -> None:
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    old_ca, new_ca = trustme.CA(), trustme.CA()
    write_cert(old_ca, cert_path, key_path)
    d = make_daemon(start=False, tls={"certificate": str(cert_path), "key": str(key_path)})
    d.extra_env["NOTIFY_SOCKET"] = notify_sink.env_value
    d.start()
    port = d.smtp_port

    async def main() -> None:
        assert await starttls_ok(port, old_ca)
        assert not await starttls_ok(port, new_ca)
        # Same paths, new files (as certbot renews): a reload must read them again.
        write_cert(new_ca, cert_path, key_path)
        assert "last reload: ok" in reload_and_wait(d, notify_sink)["STATUS"]
        for _ in range(4):  # both workers
            assert await starttls_ok(port, new_ca)
        # A key that does not match the certificate refuses the reload; TLS goes on.
        key_path.write_bytes(new_ca.issue_cert("other.example").private_key_pem.bytes())
        status = reload_and_wait(d, notify_sink)["STATUS"]
        assert "last reload REFUSED" in status and "tls" in status, status
        for _ in range(4):
            assert await starttls_ok(port, new_ca)

    asyncio.run(main())
    assert d.stop() == 0


# ---- journald ----------------------------------------------------------------------------


def test_journal_fields_follow_one_message_and_never_its_body(
        make_daemon: MakeDaemon, short_dir: Path, tmp_path: Path) -> None:
    journal = DatagramSink(str(short_dir / "journal.sock"))
    closed = free_port()  # nothing listens there: delivery is deferred
    (tmp_path / "mail").mkdir()
    d = make_daemon(
        start=False,
        local_domains=["test.example", "later.example"],
        relay_networks=[],
        delivery={"mode": "mx", "routes": {"test.example": f"maildir:{tmp_path / 'mail'}",
                                           "later.example": f"smtp:127.0.0.1:{closed}"}},
        log={"level": "debug"},
    )
    d.extra_env.update({"EMPATH_LOG": "journal", "EMPATH_JOURNAL_SOCKET": journal.address})
    marker = f"BODY-{uuid.uuid4().hex}"
    body = (f"Subject: journal\r\n\r\n{marker} the body, never logged\r\n"
            f"password={marker}\r\n").encode()
    try:
        d.start(wait=False)
        journal.wait_for(lambda p: b"EMPATH_EVENT=ready\n" in p, "the ready entry")

        async def send_and_get_id() -> str:
            code, text = await send_message(d.smtp_port, SENDER,
                                            ["user@test.example", "user@later.example"],
                                            body, "journal")
            assert code == 250, text
            return queued_id(text)

        async def refusals() -> None:
            code, text = await rcpt_reply(d.smtp_port, "user@elsewhere.example", "journal")
            assert (code, text[:5]) == (554, "5.7.1"), text
            c = await RawClient.connect(d.smtp_port, "journal")
            try:
                await c.greet()
                assert (await c.cmd(f"MAIL FROM:<{SENDER}>"))[0] == 250
                assert (await c.cmd("RCPT TO:<user@test.example>"))[0] == 250
                assert (await c.cmd("DATA"))[0] == 354
                c.send(f"Subject: bare\r\n\r\n{marker}\nbare LF\r\n.\r\n".encode())
                code, text = await c.reply()
                assert (code, text[:5]) == (554, "5.6.0"), text
            finally:
                await c.close()

        qid = asyncio.run(send_and_get_id())
        asyncio.run(refusals())

        def entry(event: str, **match: str) -> Callable[[bytes], bool]:
            def pred(p: bytes) -> bool:
                f = parse_native(p)
                return f.get("EMPATH_EVENT") == event and all(f.get(k) == v
                                                              for k, v in match.items())
            return pred

        journal.wait_for(entry("delivered", QUEUE_ID=qid), "delivered")
        journal.wait_for(entry("deferred", QUEUE_ID=qid), "deferred")
        journal.wait_for(entry("rejected", RCPT_DOMAIN="elsewhere.example"), "relay refusal")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        journal.wait_for(entry("reload"), "the reload entry")
        assert d.stop() == 0
        journal.wait_for(entry("stopped"), "the stopped entry")
    finally:
        journal.close()

    with journal.cond:
        items = [(pid, parse_native(data), data) for pid, data in journal.items]
    supervisor = d.proc.pid
    for _, fields, _ in items:
        assert fields["SYSLOG_IDENTIFIER"] == "empath"
        assert fields["PRIORITY"] in "01234567" and fields["MESSAGE"]
    this = [(pid, f) for pid, f, _ in items if f.get("QUEUE_ID") == qid]
    events = [f["EMPATH_EVENT"] for _, f in this if "EMPATH_EVENT" in f]
    assert events[0] == "received", events
    assert {"delivered", "deferred"} <= set(events), events
    received_pid, received = next((p, f) for p, f in this if f.get("EMPATH_EVENT") == "received")
    assert received["CLIENT_ADDR"] == "127.0.0.1"
    assert received["MESSAGE_ID"] == CATALOG["received"]
    # Workers log the same way as the supervisor: "received" comes from a worker.
    assert received_pid not in (0, supervisor)
    delivered = next(f for _, f in this if f.get("EMPATH_EVENT") == "delivered")
    assert (delivered["RCPT_DOMAIN"], delivered["DSN_STATUS"]) == ("test.example", "2.0.0")
    assert delivered["MESSAGE_ID"] == CATALOG["delivered"]
    deferred = next(f for _, f in this if f.get("EMPATH_EVENT") == "deferred")
    assert deferred["RCPT_DOMAIN"] == "later.example" and deferred["DSN_STATUS"][:2] == "4."
    by_event = {f.get("EMPATH_EVENT") for _, f, _ in items}
    assert {"ready", "connect", "rejected", "reload", "stopping", "stopped"} <= by_event
    connect = next(f for _, f, _ in items if f.get("EMPATH_EVENT") == "connect")
    assert connect["CLIENT_ADDR"] == "127.0.0.1"
    assert any(f.get("EMPATH_EVENT") == "rejected" and "bare" in f["MESSAGE"]
               for _, f, _ in items)
    assert any(f["PRIORITY"] == "7" for _, f, _ in items), "log.level debug was not in force"
    # Not one byte of any body, at debug level, in the journal or on stderr.
    for _, _, raw in items:
        assert marker.encode() not in raw, raw[:300]
    assert marker not in d.log()
