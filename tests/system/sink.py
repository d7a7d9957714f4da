"""An SMTP sink on the host for the package scenarios, served from its own thread.

The scenarios drive the container with blocking commands (``apt install``,
``sendmail`` under ``runuser``) while empath delivers to the sink, so the sink cannot
share the test's thread the way ``async with SMTPSink()`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from tests.sinks import SMTPSink, Transaction


class ThreadedSink:
    """tests.sinks.SMTPSink on ``host:port`` (port 0: any), in a thread of its own."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._sink: SMTPSink | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        assert self._sink is not None
        return self._sink.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def delivered(self) -> list[Transaction]:
        assert self._sink is not None
        return list(self._sink.delivered)

    def wait(self, predicate: Callable[[list[Transaction]], bool], timeout: float,
             what: str, diagnostics: Callable[[], str] = lambda: "") -> list[Transaction]:
        """The delivered transactions once ``predicate`` holds for them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered()
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"sink {self.address}: {what} not seen in {timeout:.0f} s "
                                     f"(got {len(got)} transactions)\n{diagnostics()}")
            time.sleep(0.2)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._sink = SMTPSink(host=self.host, port=self._port)
            self._loop.run_until_complete(self._sink.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._sink.stop())
        self._loop.close()

    def start(self) -> ThreadedSink:
        self._thread.start()
        self._ready.wait(15)
        if self._error is not None:
            raise self._error
        assert self._sink is not None, "the sink did not start in 15 s"
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)


@contextlib.contextmanager
def sink(host: str, port: int = 0) -> Iterator[ThreadedSink]:
    s = ThreadedSink(host, port).start()
    try:
        yield s
    finally:
        s.stop()
