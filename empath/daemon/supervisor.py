"""The supervisor: the daemon's main process.

Start-up order matters and is the durability story: config validated (exit 2), state
directory validated before anything is written (exit 2), spool recovered, listeners
taken from systemd or bound, then workers started. Only when every worker serves do we
call ourselves ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import empath
from empath.config import Config, ConfigError, load_config_text
from empath.daemon.anvil import Anvil
from empath.daemon.ipc import Channel, open_channel
from empath.daemon.listeners import (
    ListenerError,
    ListenSocket,
    bind_listeners,
    from_systemd,
)
from empath.log import setup_logging
from empath.queue import QueueManager
from empath.spool import Spool
from empath.statedir import StateDirError, validate_state_dir

__all__ = ["Supervisor", "run"]

log = logging.getLogger("empath.supervisor")

EXIT_CONFIG = 2
READY_TIMEOUT = 30.0


@dataclass(eq=False)
class WorkerProc:
    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Clients this worker holds, so a crashed worker's slots are given back.
    clients: dict[str, int] = field(default_factory=dict)


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_text: str,
        listeners: list[ListenSocket],
        spool: Spool,
        *,
        config_path: Path | None,
        socket_activated: bool = False,
    ) -> None:
        self.config = config
        self.socket_activated = socket_activated
        self.config_text = config_text
        self.config_path = config_path
        self.listeners = listeners
        self.spool = spool
        self.anvil = Anvil(config)
        self.workers: dict[int, WorkerProc] = {}
        self.stopping = asyncio.Event()
        self.queued = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.queue = QueueManager(config, spool, listening=self._listening_pairs())

    def _listening_pairs(self) -> list[tuple[str, int]]:
        """Our own (address, port) pairs: a next hop equal to one of them is ourselves."""
        pairs = []
        for ls in self.listeners:
            with contextlib.suppress(OSError):
                addr = ls.sock.getsockname()
                if isinstance(addr, tuple):
                    pairs.append((str(addr[0]), int(addr[1])))
        return pairs

    # ---- workers -----------------------------------------------------------------

    def _smtp_sockets(self) -> list[ListenSocket]:
        return [ls for ls in self.listeners if ls.role in ("smtp", "submission")]

    async def _spawn(self, index: int) -> WorkerProc:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        smtp = self._smtp_sockets()
        env = dict(os.environ)
        env["EMPATH_WORKER_FDS"] = ",".join(f"{ls.fileno()}:{ls.role}" for ls in smtp)
        env["EMPATH_IPC_FD"] = str(child.fileno())
        # Run the same code as we do, installed or from a checkout.
        pkg_root = str(Path(empath.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "empath.daemon.worker",
            pass_fds=[ls.fileno() for ls in smtp] + [child.fileno()],
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
        child.close()
        channel = await open_channel(parent)
        worker = WorkerProc(index, proc, channel)
        channel.send({"t": "config", "text": self.config_text, "source": self._source()})
        self.workers[index] = worker
        task = asyncio.create_task(self._serve_worker(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    def _source(self) -> str | None:
        return str(self.config_path) if self.config_path is not None else None

    async def _serve_worker(self, worker: WorkerProc) -> None:
        channel = worker.channel
        anvil = self.anvil
        while True:
            try:
                msg = await channel.recv()
            except ValueError as exc:
                log.error("worker %d sent a bad message: %s", worker.proc.pid, exc)
                msg = None
            if msg is None:
                break
            kind = msg.get("t")
            if kind == "admit":
                ip = str(msg.get("ip"))
                refusal = anvil.admit(ip)
                if refusal is None:
                    worker.clients[ip] = worker.clients.get(ip, 0) + 1
                channel.send({"t": "admit", "n": msg.get("n"), "refuse": refusal})
            elif kind == "release":
                ip = str(msg.get("ip"))
                held = worker.clients.get(ip, 0)
                if held > 0:
                    if held == 1:
                        del worker.clients[ip]
                    else:
                        worker.clients[ip] = held - 1
                    anvil.release(ip)
            elif kind == "queued":
                self.queued += 1
                self.queue.add(str(msg.get("id")))
            elif kind == "ready":
                worker.ready.set()
        code = await worker.proc.wait()
        channel.close()
        for ip, count in worker.clients.items():
            for _ in range(count):
                anvil.release(ip)
        worker.clients.clear()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.stopping.is_set():
            log.error("worker %d (pid %d) exited with status %s; restarting it",
                      worker.index, worker.proc.pid, code)
            await asyncio.sleep(1.0)
            if not self.stopping.is_set():
                await self._spawn(worker.index)

    # ---- signals -----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read and validate; apply what can change live; keep sessions."""
        if self.config_path is None:
            log.warning("reload: no configuration file to re-read")
            return
        try:
            text = self.config_path.read_text(encoding="utf-8")
            new = load_config_text(text, self.config_path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("reload refused: cannot read %s: %s", self.config_path, exc)
            return
        except ConfigError as exc:
            log.error("reload refused, configuration unchanged:\n%s", exc)
            return
        old = self.config
        for key in ("listen", "state_dir", "workers"):
            if getattr(old, key) != getattr(new, key):
                log.warning("reload: %s changed; it takes effect only after a restart", key)
        self.config, self.config_text = new, text
        self.anvil.config = new
        self.queue.apply_config(new)
        setup_logging(new.log.level)
        for worker in self.workers.values():
            worker.channel.send({"t": "config", "text": text, "source": self._source()})
        log.info("reload: configuration applied from %s", self.config_path)

    # ---- main --------------------------------------------------------------------

    async def run(self, recovered: list[str] | None = None) -> int:
        loop = asyncio.get_running_loop()
        self.queue.load(recovered or [])
        queue_task = asyncio.create_task(self.queue.run(self.stopping))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for ls in self.listeners:
            if ls.role == "metrics":
                log.warning("a metrics socket was passed but metrics are not built yet; "
                            "it is kept open and not served")
        for i in range(self.config.workers):
            await self._spawn(i)
        all_ready: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(w.ready.wait() for w in self.workers.values()))
        )
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait(
            [all_ready, stop_wait], timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        all_ready.cancel()
        if not all(w.ready.is_set() for w in self.workers.values()) and not self.stopping.is_set():
            log.error("workers did not become ready within %.0f s", READY_TIMEOUT)
            self.stopping.set()
            await self._stop_workers()
            await queue_task
            return 1
        if not self.stopping.is_set():
            log.info(
                "ready: empath %s, %d workers, listening on %s",
                empath.__version__, len(self.workers),
                ", ".join(f"{ls.label} ({ls.role})" for ls in self._smtp_sockets()),
            )
        await stop_wait
        log.info("shutting down")
        self._stop_listening()
        await self._stop_workers()
        await queue_task
        await self.queue.drain(self.config.shutdown_timeout)
        self.spool.close()
        log.info("stopped")
        return 0

    def _stop_listening(self) -> None:
        """Refuse new connections at once, in every process, when the sockets are ours.

        Closing our descriptors is not enough: a worker finishing a DATA phase still
        holds the listening socket, so the kernel would go on completing handshakes
        into a backlog nobody accepts from. ``shutdown(SHUT_RD)`` acts on the socket
        itself, for all its holders: pending and new clients get a reset. Sockets
        handed over by systemd are left alone — they belong to the socket unit, and
        connections waiting in them during a restart are served by the next start.
        """
        if self.socket_activated:
            return
        for ls in self.listeners:
            with contextlib.suppress(OSError):
                ls.sock.shutdown(socket.SHUT_RD)

    async def _stop_workers(self) -> None:
        workers = list(self.workers.values())
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        grace = self.config.shutdown_timeout + 5.0
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.proc.wait() for w in workers)), timeout=grace
            )
        except TimeoutError:
            for w in workers:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            await asyncio.gather(*(w.proc.wait() for w in workers))
        for task in list(self._tasks):
            task.cancel()


def _lock_state_dir(state_dir: Path) -> int | None:
    """Hold an exclusive lock on ``state_dir/empath.lock`` for the process's life.

    Two daemons on one spool would delete each other's files in flight at recovery.
    The descriptor is inherited by nobody (O_CLOEXEC) and released by the kernel at exit.
    """
    path = state_dir / "empath.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        log.error("cannot open lock file %s: %s", path, exc.strerror)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        log.error("another empath is already running on state_dir %s (%s is locked)",
                  state_dir, path)
        return None
    return fd


def run(config_path: Path) -> int:
    """``empath run``: returns the process exit status."""
    setup_logging("info")
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read configuration %s: %s", config_path, exc)
        return EXIT_CONFIG
    try:
        config = load_config_text(text, config_path)
    except ConfigError as exc:
        log.error("configuration error:\n%s", exc)
        return EXIT_CONFIG
    setup_logging(config.log.level)
    try:
        validate_state_dir(config.state_dir)
    except StateDirError as exc:
        log.error("state_dir: %s", exc)
        return EXIT_CONFIG
    lock = _lock_state_dir(config.state_dir)
    if lock is None:
        return 1
    spool = Spool(config.spool_dir)
    try:
        spool.prepare()
        report = spool.recover()
    except OSError as exc:
        log.error("spool %s unusable: %s", config.spool_dir, exc)
        return 1
    log.info(
        "spool recovered: %d messages queued, %d temporary files removed, %d quarantined",
        len(report.ids), report.removed_tmp, len(report.quarantined),
    )
    try:
        listeners = from_systemd()
        activated = listeners is not None
        if listeners is None:
            if not config.listen:
                log.error("listen: no listeners configured and not socket-activated")
                return EXIT_CONFIG
            listeners = bind_listeners(config.listen)
        elif config.listen:
            log.info("socket-activated: ignoring listen: from the configuration")
    except ListenerError as exc:
        log.error("%s", exc)
        return 1
    supervisor = Supervisor(config, text, listeners, spool, config_path=config_path,
                            socket_activated=activated)
    return asyncio.run(supervisor.run(report.ids))
