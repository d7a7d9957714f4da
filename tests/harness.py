"""Test harness: run the real daemon on loopback and talk SMTP to it over real sockets.

Every reply any test reads through this module (raw client, aiosmtplib wrapper, swaks
transcript) is recorded in ``REPLIES`` and checked at the end of the session for an
enhanced status code (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

# (context, reply line) for every final reply line seen in the suite.
REPLIES: list[tuple[str, str]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_config(state_dir: Path, smtp_port: int, submission_port: int) -> dict[str, Any]:
    return {
        "hostname": "mx.test.example",
        "postmaster": "postmaster@test.example",
        "listen": [
            {"address": f"127.0.0.1:{smtp_port}", "role": "smtp"},
            {"address": f"127.0.0.1:{submission_port}", "role": "submission"},
        ],
        "state_dir": str(state_dir),
        "local_domains": ["test.example", "bücher.example"],
        "relay_networks": ["127.0.0.0/8", "::1/128"],
        "delivery": {"mode": "hold"},
        "log": {"level": "info"},
        "workers": 2,
        "shutdown_timeout": 5,
    }


@dataclass
class Daemon:
    """A running ``empath run`` process with its config, ports and spool."""

    workdir: Path
    config: dict[str, Any]
    smtp_port: int
    submission_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    extra_env: dict[str, str] = field(default_factory=dict)
    wrapper: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "daemon.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "empath.yaml"

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    @property
    def queue_dir(self) -> Path:
        return self.state_dir / "spool" / "queue"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, allow_unicode=True))

    def command(self) -> list[str]:
        return [*self.wrapper, sys.executable, "-m", "empath", "run", "--config",
                str(self.config_path)]

    def start(self, *, wait: bool = True) -> None:
        self.write_config()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)
        env.update(self.extra_env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if "ready: empath" in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group: supervisor and workers die at once."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def queued_ids(self) -> set[str]:
        return spool_ids(self.queue_dir)

    def message_bytes(self, queue_id: str) -> bytes:
        return spool_data(self.queue_dir, queue_id)

    def envelope(self, queue_id: str) -> dict[str, Any]:
        return spool_record(self.queue_dir, queue_id)


# The spool's file layout, read independently of empath.spool (what a test checks
# the daemon against): queue/<id>.msg is the data, then the envelope as received (one
# JSON line), then "empath-envelope <10-digit length of that line>\n"; queue/<id>.env,
# once delivery has changed the envelope, is the envelope as it is now.
_TRAILER = re.compile(rb"empath-envelope (\d{10})\n\Z")


def _split_entry(raw: bytes) -> tuple[bytes, bytes | None]:
    """(data, envelope line) of a queue file; (raw, None) for data only."""
    m = _TRAILER.search(raw[-27:])
    if m is None:
        return raw, None
    start = len(raw) - 27 - int(m.group(1))
    return raw[:start], raw[start:len(raw) - 27]


def children_of(pid: int) -> set[int]:
    """The pids of ``pid``'s child processes (a daemon's workers, say)."""
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True,
                         text=True, check=False).stdout
    return {int(x) for x in out.split()}


def commit_unreported(state_dir: Path, data: bytes, sender: str, recipient: str) -> str:
    """Commit a message into a daemon's spool the way a worker commits, without telling
    the supervisor (as when a killed worker's last ``queued`` notice went with it).
    Returns its queue id; the envelope's HELO is ``client.test``."""
    # Imported here: the rest of the harness drives empath from outside, as a process.
    from empath.spool import Envelope, Recipient, Spool

    spool = Spool(state_dir / "spool")
    try:
        writer = spool.create()
        writer.write(data)
        asyncio.run(spool.commit(writer, Envelope(
            id=writer.id, sender=sender, recipients=[Recipient(recipient)],
            received_at=time.time(), client_addr="127.0.0.1", client_port=1,
            helo="client.test")))
    finally:
        spool.close()
    return writer.id


def spool_ids(queue_dir: Path) -> set[str]:
    """The messages in a spool's queue/ (one .msg file each)."""
    return {p.stem for p in queue_dir.glob("*.msg")}


def spool_data(queue_dir: Path, queue_id: str) -> bytes:
    return _split_entry((queue_dir / f"{queue_id}.msg").read_bytes())[0]


def spool_record_bytes(queue_dir: Path, queue_id: str) -> bytes:
    """The envelope record's bytes (for Envelope.from_bytes)."""
    changed = queue_dir / f"{queue_id}.env"
    if changed.exists():
        return changed.read_bytes()
    line = _split_entry((queue_dir / f"{queue_id}.msg").read_bytes())[1]
    assert line is not None, f"{queue_id}.msg carries no envelope"
    return line


def spool_record(queue_dir: Path, queue_id: str) -> dict[str, Any]:
    """A queued message's envelope, as the JSON object the daemon has now."""
    return dict(json.loads(spool_record_bytes(queue_dir, queue_id)))


def strip_received(data: bytes) -> bytes:
    """Drop the leading Received: header (with its folded lines) that we prepend."""
    assert data.startswith(b"Received: "), data[:80]
    lines = data.split(b"\r\n")
    i = 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


_CODE = re.compile(rb"^(\d{3})([ -])(.*)$")


class RawClient:
    """A byte-exact SMTP client on a real socket; records every reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: str) -> None:
        self.reader = reader
        self.writer = writer
        self.context = context

    @classmethod
    async def connect(cls, port: int, context: str = "raw",
                      host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, context)

    async def reply(self, timeout: float = 10.0, *, record: bool = True) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text of the last line).

        ``record=False`` only for the greeting and HELO, which RFC 2034 exempts.
        """
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError("connection closed; lines so far: " + repr(lines))
            m = _CODE.match(raw.rstrip(b"\r\n"))
            assert m, f"malformed reply line {raw!r}"
            lines.append(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
            if m.group(2) == b" ":
                break
        if record:
            REPLIES.append((self.context, lines[-1]))
        return int(lines[-1][:3]), lines[-1][4:]

    async def lines(self, timeout: float = 10.0) -> list[str]:
        """Read a multi-line reply and return all its lines (for EHLO)."""
        out: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError("connection closed")
            line = raw.rstrip(b"\r\n").decode()
            out.append(line)
            if line[3:4] == " ":
                return out

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        raw = line if isinstance(line, bytes) else line.encode("utf-8")
        self.writer.write(raw + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def greet(self, ehlo: str = "client.test") -> list[str]:
        code, _ = await self.reply(record=False)
        assert code == 220
        self.writer.write(f"EHLO {ehlo}\r\n".encode())
        return await self.lines()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def at_eof(self, timeout: float = 10.0) -> bool:
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""


async def send_message(port: int, sender: str, rcpts: list[str], body: bytes,
                       context: str = "send") -> tuple[int, str]:
    """One full transaction; returns the reply to the final dot."""
    c = await RawClient.connect(port, context)
    try:
        await c.greet()
        code, text = await c.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        for r in rcpts:
            code, text = await c.cmd(f"RCPT TO:<{r}>")
            assert code == 250, text
        code, text = await c.cmd("DATA")
        assert code == 354, text
        c.send(body + b".\r\n")
        result = await c.reply()
        await c.cmd("QUIT")
        return result
    finally:
        await c.close()


def record_swaks(output: str, context: str = "swaks") -> list[str]:
    """Record the server's final reply lines from a swaks transcript."""
    finals = []
    last_verb = ""  # the greeting comes before any command
    for line in output.splitlines():
        c = re.match(r"^\s*(?:->|~>)\s+(\S+)", line)
        if c:
            last_verb = c.group(1).upper()
            continue
        m = re.match(r"^(?:<-|<~|<\*\*)\s+(\d{3} .*)$", line)
        if m:
            finals.append(m.group(1))
            # RFC 2034 exempts the greeting and replies to HELO/EHLO.
            if last_verb not in ("", "EHLO", "HELO"):
                REPLIES.append((context, m.group(1)))
    return finals


def queued_id(reply_text: str) -> str:
    m = re.search(r"queued as ([0-9A-Z]+)", reply_text)
    assert m, reply_text
    return m.group(1)


def wait_until(pred: Callable[[], Any], what: str, d: Daemon | None = None,
               timeout: float = 30.0) -> Any:
    """Poll ``pred`` until it returns something true (returned); fail naming ``what``,
    with the daemon's log when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{d.log()}" if d else ""))


async def transaction(c: RawClient, sender: str, rcpts: list[str], body: bytes,
                      mail_params: str = "") -> tuple[int, str]:
    """MAIL/RCPT/DATA on an open session, each reply checked; returns the final reply."""
    code, text = await c.cmd(f"MAIL FROM:<{sender}>{mail_params}")
    assert (code, text[:5]) == (250, "2.1.0"), text
    for r in rcpts:
        code, text = await c.cmd(f"RCPT TO:<{r}>")
        assert (code, text[:5]) == (250, "2.1.5"), (r, text)
    code, text = await c.cmd("DATA")
    assert code == 354, text
    c.send(body + b".\r\n")
    return await c.reply()
