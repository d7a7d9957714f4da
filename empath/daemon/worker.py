"""An SMTP worker process: serves inherited listening sockets, spools mail.

Started by the supervisor as ``python -m empath.daemon.worker`` with the listening
sockets and one end of a socketpair passed as file descriptors (named in
``EMPATH_WORKER_FDS`` / ``EMPATH_IPC_FD``). It receives its configuration from the
supervisor, never from the file, so every process runs the same validated config.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from empath.config import ConfigError, load_config_text
from empath.daemon import heap
from empath.daemon.ipc import Channel, open_channel
from empath.daemon.listeners import is_listening
from empath.log import setup_logging
from empath.smtp.server import Front
from empath.spool import Envelope, Spool
from empath.systemd.notify import NOTIFY_ENV

log = logging.getLogger("empath.worker")


class Worker:
    def __init__(self, channel: Channel, sockets: list[tuple[socket.socket, str]]) -> None:
        self.channel = channel
        self.sockets = sockets
        self.pending: dict[int, asyncio.Future[str | None]] = {}
        self.auth_pending: dict[int, asyncio.Future[int]] = {}
        self.ids = itertools.count(1)
        self.front: Front | None = None
        self.stop = asyncio.Event()

    async def admit(self, ip: str) -> str | None:
        n = next(self.ids)
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.pending[n] = fut
        self.channel.send({"t": "admit", "n": n, "ip": ip})
        return await fut

    def release(self, ip: str) -> None:
        self.channel.send({"t": "release", "ip": ip}, later=True)

    async def auth_failed(self, ip: str) -> int:
        """A failed AUTH, counted by the supervisor's anvil across workers."""
        n = next(self.ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.auth_pending[n] = fut
        self.channel.send({"t": "auth-failed", "n": n, "ip": ip})
        return await fut

    def queued(self, envelope: Envelope) -> None:
        # What the queue's index needs, so `queue stats` never reads the spool.
        self.channel.send({"t": "queued", "id": envelope.id, "at": envelope.received_at,
                           "size": envelope.size,
                           "domains": [r.address.rpartition("@")[2].lower()
                                       for r in envelope.recipients]}, later=True)

    async def run(self) -> int:
        first = await self.channel.recv()
        if first is None or first.get("t") != "config":
            log.error("worker: no configuration from the supervisor")
            return 1
        try:
            cfg = load_config_text(first["text"], _source(first))
        except ConfigError as exc:
            log.error("worker: configuration refused: %s", exc)
            return 2
        setup_logging(cfg.log.level)
        # The supervisor's spool, not the config's: a reloaded state_dir takes effect
        # only at restart, and a worker restarted meanwhile must not follow it early.
        spool = Spool(Path(first["spool"]) if first.get("spool") else cfg.spool_dir,
                      syncer=True)
        self.front = front = Front(
            cfg, spool, admit=self.admit, release=self.release, on_queued=self.queued,
            auth_failed=self.auth_failed,
        )
        spool.start_syncer()
        for sock, role in self.sockets:
            await front.serve(sock, role)
        heap.freeze()  # before the first session: a collection then stalls nobody
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        # The supervisor coordinates shutdown; a terminal's Ctrl-C reaches us too.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.channel.send({"t": "ready", "pid": os.getpid(), "gen": first.get("gen", 0)})
        reader = asyncio.create_task(self._read_loop())
        await self.stop.wait()
        reader.cancel()
        await front.shutdown(front.config.shutdown_timeout)
        # The last counts, so the service's counters lose nothing when we go.
        self.channel.send({"t": "metrics", "snapshot": front.metrics_snapshot()})
        with contextlib.suppress(ConnectionError):
            await self.channel.drain()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result("421 4.3.2 Service shutting down")
        for failed in self.auth_pending.values():
            if not failed.done():
                failed.set_result(0)
        spool.close()
        return 0

    async def _read_loop(self) -> None:
        while True:
            msg = await self.channel.recv()
            if msg is None:
                # The supervisor is gone: stop rather than serve unsupervised.
                log.error("worker: supervisor went away, shutting down")
                self.stop.set()
                return
            kind = msg.get("t")
            if kind == "admit":
                fut = self.pending.pop(int(msg["n"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("refuse"))
            elif kind == "auth-failed":
                failed = self.auth_pending.pop(int(msg["n"]), None)
                count = msg.get("count")
                if failed is not None and not failed.done():
                    failed.set_result(count if isinstance(count, int) else 0)
            elif kind == "config" and self.front is not None:
                self.channel.send({"t": "applied", "gen": msg.get("gen"),
                                   "error": self._apply(msg)})
            elif kind == "log-level":
                setup_logging(str(msg.get("level")))
            elif kind == "request":
                self.channel.send(self._answer(msg))
            elif kind == "stop":
                self.stop.set()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """At a stop without socket activation the supervisor shuts the listening
        sockets down (SHUT_RD) before our SIGTERM is handled; the event loop then sees
        them readable and its ``accept()`` fails with EINVAL — again on every turn, as
        the reader stays registered. That is the stop, not an error: stop accepting
        now instead of logging a traceback per turn until the signal is read."""
        exc = context.get("exception")
        front = self.front
        if (isinstance(exc, OSError) and exc.errno == errno.EINVAL and front is not None
                and not all(is_listening(sock) for sock, _ in self.sockets)):
            if not front.shutting_down:
                log.debug("worker: listening sockets shut down by the supervisor")
                front.stop_accepting()
            return
        loop.default_exception_handler(context)

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The ``response`` to a supervisor's ``request`` (see empath/daemon/ipc.py)."""
        out: dict[str, Any] = {"t": "response", "id": msg.get("id"), "result": None,
                               "error": None}
        question = msg.get("q")
        answers = {"sessions": "describe_sessions", "metrics": "metrics_snapshot"}
        if question in answers and self.front is not None:
            try:
                out["result"] = getattr(self.front, answers[str(question)])()
            except Exception as exc:  # a bug must not end the read loop
                log.exception("worker: cannot answer %s", question)
                out["error"] = f"internal error: {exc or type(exc).__name__}"
        else:
            out["error"] = f"unknown request {question!r}"
        return out

    def _apply(self, msg: dict[str, Any]) -> str | None:
        """A reload: use the new config for new sessions. Returns an error or None.

        The supervisor validated the text and loaded the TLS files already, so a
        failure here means something changed under us (a certificate replaced
        mid-reload); we keep the old config and say why.
        """
        assert self.front is not None
        try:
            cfg = load_config_text(msg["text"], _source(msg))
            self.front.apply_config(cfg)  # re-reads the TLS certificate and key
        except Exception as exc:
            log.error("worker: cannot apply new configuration: %s", exc)
            return str(exc) or type(exc).__name__
        setup_logging(cfg.log.level)
        heap.refreeze()
        return None


def _source(msg: dict[str, Any]) -> Path | None:
    src = msg.get("source")
    return Path(str(src)) if src else None


def main() -> int:
    # Only the supervisor talks to systemd; the supervisor removes these already.
    for key in NOTIFY_ENV:
        os.environ.pop(key, None)
    setup_logging("info")
    fds = os.environ.pop("EMPATH_WORKER_FDS", "")
    ipc_fd = int(os.environ.pop("EMPATH_IPC_FD"))
    sockets: list[tuple[socket.socket, str]] = []
    for item in filter(None, fds.split(",")):
        fd, role = item.split(":", 1)
        sockets.append((socket.socket(fileno=int(fd)), role))
    ipc_sock = socket.socket(fileno=ipc_fd)

    async def amain() -> int:
        channel = await open_channel(ipc_sock)
        return await Worker(channel, sockets).run()

    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
