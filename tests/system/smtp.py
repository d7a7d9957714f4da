"""SMTP from the host to the container's port 25: single sessions and a background load.

Built on tests/harness.py's RawClient, so every reply is recorded for the suite's
enhanced-status-code audit. Unlike ``harness.send_message`` a session here never
asserts: it reports how far it got, because a stop or a reload in the middle is what
the system tests are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.harness import RawClient, queued_id

HOST4 = "127.0.0.1"
HOST6 = "::1"
PORT = 25


@dataclass
class Outcome:
    """One session: the last reply it got (``stage`` names the command it answered)."""

    stage: str
    code: int | None
    text: str = ""
    queue_id: str | None = None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.stage == "data" and self.code == 250


def message(subject: str, body: str = "hello from the system tests") -> bytes:
    return (f"From: <sender@client.test>\r\nTo: <user@system.test>\r\n"
            f"Subject: {subject}\r\n\r\n{body}\r\n").encode()


async def session(rcpt: str, subject: str, *, host: str = HOST4, port: int = PORT,
                  sender: str = "sender@client.test", context: str = "system",
                  during_data: Callable[[], Awaitable[None]] | None = None,
                  timeout: float = 30.0) -> Outcome:
    """EHLO, MAIL, RCPT, DATA, QUIT; stops at the first refusal or broken connection.

    ``during_data`` is awaited after half of the message has been sent.
    """
    stage = "connect"
    try:
        c = await asyncio.wait_for(RawClient.connect(port, context, host=host), timeout)
    except (OSError, TimeoutError) as exc:
        return Outcome(stage, None, error=f"{type(exc).__name__}: {exc}")
    try:
        stage = "banner"
        code, text = await c.reply(timeout, record=False)
        if code != 220:
            return Outcome(stage, code, text)
        stage = "ehlo"
        c.send(b"EHLO client.test\r\n")
        lines = await c.lines(timeout)
        if not lines[-1].startswith("250"):
            return Outcome(stage, int(lines[-1][:3]), lines[-1])
        for stage, line in (("mail", f"MAIL FROM:<{sender}>"), ("rcpt", f"RCPT TO:<{rcpt}>"),
                            ("data-start", "DATA")):
            code, text = await c.cmd(line)
            if code != (354 if stage == "data-start" else 250):
                return Outcome(stage, code, text)
        body = message(subject)
        half = len(body) // 2
        c.send(body[:half])
        await c.writer.drain()
        if during_data is not None:
            await during_data()
        c.send(body[half:] + b".\r\n")
        stage = "data"
        code, text = await c.reply(timeout)
        qid = queued_id(text) if code == 250 else None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.cmd("QUIT"), 5)
        return Outcome(stage, code, text, qid)
    except (OSError, ConnectionError, TimeoutError, AssertionError) as exc:
        return Outcome(stage, None, error=f"{type(exc).__name__}: {exc}")
    finally:
        await c.close()


def run(coro: Awaitable[Outcome]) -> Outcome:
    return asyncio.run(coro)  # type: ignore[arg-type]


def banner(host: str = HOST4, port: int = PORT, timeout: float = 30.0) -> str:
    """Connect, read the greeting, QUIT; returns the greeting line."""

    async def go() -> str:
        c = await asyncio.wait_for(RawClient.connect(port, "banner", host=host), timeout)
        try:
            code, text = await c.reply(timeout, record=False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.cmd("QUIT"), 5)
            return f"{code} {text}"
        finally:
            await c.close()

    return asyncio.run(go())


@dataclass
class Load:
    """Sessions back to back from ``concurrency`` clients in a background thread,
    until ``count`` sessions are done or ``stop()``."""

    rcpt: str = "user@system.test"
    count: int | None = None
    concurrency: int = 2
    host: str = HOST4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120.0) -> list[Outcome]:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the SMTP load did not finish"
        return self.outcomes

    def done(self) -> int:
        return len(self.outcomes)

    def wait_done(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < n:
            assert time.monotonic() < deadline, f"only {self.done()} of {n} sessions done"
            time.sleep(0.05)

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.count is not None and self._started >= self.count):
                return None
            self._started += 1
            return self._started

    async def _client(self) -> None:
        while (n := self._next()) is not None:
            out = await session(self.rcpt, f"load {n}", host=self.host, context="system-load")
            self.outcomes.append(out)

    async def _main(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.concurrency)))
