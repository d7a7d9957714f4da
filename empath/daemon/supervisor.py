"""The supervisor: the daemon's main process, and the one that talks to systemd.

Start-up order matters and is the durability story: config validated (exit 2), state
directory validated before anything is written (exit 2), spool recovered, listeners
taken from systemd or bound, then workers started. Only when every worker serves do we
call ourselves ready (``READY=1``).

systemd sees (empath/systemd/notify.py): ``READY=1`` then; ``STATUS=`` with the queue,
connections and the last reload, kept current; ``RELOADING=1`` + ``MONOTONIC_USEC=``
and ``READY=1`` around each reload; ``STOPPING=1`` when shutdown starts; and
``WATCHDOG=1`` every half ``WatchdogSec`` from a task on this event loop, so a stuck
loop stops the pings and systemd restarts us.

Reload (SIGHUP, or ``empathctl reload --wait`` through ``Supervisor.reload``) is all
or nothing for the config file: it is validated and its TLS files loaded first; an
error changes nothing. Then the supervisor applies it and every worker confirms it
(``applied`` with the config generation) before the reload counts as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

import empath
from empath import metrics
from empath.config import Config, ConfigError, load_config_text
from empath.config.nexthop import split_host_port
from empath.control import control_socket_path
from empath.control.commands import ControlHandlers
from empath.control.server import ControlError, ControlServer
from empath.daemon import heap
from empath.daemon.anvil import Anvil
from empath.daemon.ipc import Channel, open_channel
from empath.daemon.listeners import (
    ListenerError,
    ListenSocket,
    bind_listeners,
    from_systemd,
    is_listening,
)
from empath.delivery.dkim import DkimError
from empath.delivery.dkim import load_keys as load_dkim_keys
from empath.log import setup_logging
from empath.metrics.auth import MetricsAuthError, load_auth
from empath.metrics.http import MetricsServer
from empath.metrics.service import LiveGauge, ServiceMetrics, top_n
from empath.queue import QueueManager, Recovered, recovered
from empath.smtp.server import make_tls_context, users_file_error
from empath.spool import Spool
from empath.statedir import StateDirError, validate_state_dir
from empath.systemd import events
from empath.systemd.notify import NOTIFY_ENV, Notifier, monotonic_usec, watchdog_interval

__all__ = ["ReloadResult", "Supervisor", "config_changes", "run"]

log = logging.getLogger("empath.supervisor")

EXIT_CONFIG = 2
READY_TIMEOUT = 30.0
# Processes that check the spool at start (each a chunk of at least
# empath.spool.store.RECOVERY_CHUNK entries). 100,000 queued on 2 vCPUs: 4.0 s warm,
# 9.7 s from a cold page cache, against 8.3 s and 30 s in one process (bench/README.md).
RECOVERY_PROCESSES = 8
# Seconds a reload waits for every worker to confirm the new config.
RELOAD_ACK_TIMEOUT = 10.0
# Seconds between STATUS= checks; a changed text is sent, an unchanged one is not.
STATUS_INTERVAL = 2.0
# Keys read only at start: a reload logs that they changed and keeps the old values.
RESTART_KEYS = ("listen", "state_dir", "workers", "control.socket", "metrics.listen")
# Sent instead of a worker's answer when it exits before confirming a reload.
_EXITED = object()
# Seconds ``empathctl connections`` waits for each worker's list of sessions.
CONNECTIONS_TIMEOUT = 2.0
# Seconds a scrape waits for each worker's counts; a slow worker's previous ones are used.
METRICS_TIMEOUT = 1.0
# Destinations and next hops named in per-destination gauges; the rest are "other".
TOP_DESTINATIONS = 20


@dataclass(slots=True)
class ReloadResult:
    """The outcome of one reload, for SIGHUP's log line and ``empathctl reload --wait``.

    ``ok``: the new configuration is in force in the supervisor and in every worker.
    ``applied``: it is in force in the supervisor (False: refused, nothing changed).
    ``errors``: why not ok — config errors with their key paths, or a worker that
    could not apply it (that worker is restarted with the new config).
    ``changed``: key paths that differ from the previous config (``limits.max_recipients``).
    ``restart_needed``: changed keys that only a restart applies (listen, state_dir,
    workers); until then the old values stay in force.
    ``generation``: the config generation in force afterwards (1 at start).
    """

    ok: bool
    applied: bool
    errors: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    generation: int = 0
    at: float = field(default_factory=time.time)  # when it finished, Unix time

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Key paths whose values differ between two configs (or parts of one)."""
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        out: list[str] = []
        for f in dataclasses.fields(old):
            if f.name != "source":  # where it came from, not what it says
                sub = f"{path}.{f.name}" if path else f.name
                out += config_changes(getattr(old, f.name), getattr(new, f.name), sub)
        return out
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}"
            if key not in old or key not in new:
                out.append(sub)
            else:
                out += config_changes(old[key], new[key], sub)
        return out
    return [] if old == new else [path or "<config>"]


@dataclass(eq=False)
class WorkerProc:
    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Clients this worker holds, so a crashed worker's slots are given back.
    clients: dict[str, int] = field(default_factory=dict)
    # Reloads waiting for this worker's ``applied``: generation → its error or None.
    acks: dict[int, asyncio.Future[object]] = field(default_factory=dict)
    # ``request``s waiting for their ``response``: id → the response message.
    requests: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)


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
        notifier: Notifier | None = None,
        watchdog: float | None = None,
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
        self._tasks: set[asyncio.Task[Any]] = set()
        self.queue = QueueManager(config, spool, listening=self._listening_pairs())
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.watchdog = watchdog  # seconds between WATCHDOG=1, None: no watchdog
        self.generation = 1  # of the config in force; workers confirm reloads by it
        self.last_reload: ReloadResult | None = None
        self._reload_lock = asyncio.Lock()
        self._status_sent: str | None = None
        self._starting = False  # run() holds the reload lock until ready
        self._watchdog_task: asyncio.Task[Any] | None = None
        self.control: ControlServer | None = None
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._request_ids = itertools.count(1)
        self.metrics = ServiceMetrics(metrics.LOCAL)
        self.metrics_server: MetricsServer | None = None
        self.serving = False  # READY=1 sent and not stopping: what /readyz reports

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
        for key in NOTIFY_ENV:  # only the main process may notify systemd
            env.pop(key, None)
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
        channel.send(self._config_message())
        self.workers[index] = worker
        self._background(self._serve_worker(worker))
        return worker

    def _background(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _config_message(self) -> dict[str, Any]:
        return {"t": "config", "text": self.config_text, "source": self._source(),
                "gen": self.generation, "spool": str(self.spool.root)}

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
            elif kind == "auth-failed":
                channel.send({"t": "auth-failed", "n": msg.get("n"),
                              "count": anvil.auth_failed(str(msg.get("ip")))})
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
                at, size, domains = msg.get("at"), msg.get("size"), msg.get("domains")
                self.queued += self.queue.add(str(msg.get("id")),
                               received_at=float(at) if isinstance(at, int | float) else None,
                               size=size if isinstance(size, int) else 0,
                               domains=tuple(str(d) for d in domains)
                               if isinstance(domains, list) else ())
            elif kind == "ready":
                worker.ready.set()
            elif kind == "applied":
                fut = worker.acks.get(_int(msg.get("gen")))
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("error"))
            elif kind == "response":
                answer = worker.requests.pop(_int(msg.get("id")), None)
                if answer is not None and not answer.done():
                    answer.set_result(msg)
            elif kind == "metrics" and isinstance(msg.get("snapshot"), dict):
                self.metrics.worker_snapshot(worker.proc.pid, msg["snapshot"])
        code = await worker.proc.wait()
        self.metrics.worker_exited(worker.proc.pid)
        channel.close()
        for fut in worker.acks.values():
            if not fut.done():
                fut.set_result(_EXITED)
        for answer in worker.requests.values():
            if not answer.done():
                answer.set_result({"error": f"exited with status {code}"})
        worker.requests.clear()
        for ip, count in worker.clients.items():
            for _ in range(count):
                anvil.release(ip)
        worker.clients.clear()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.stopping.is_set():
            log.error("worker %d (pid %d) exited with status %s; restarting it",
                      worker.index, worker.proc.pid, code,
                      extra={"EMPATH_EVENT": events.WORKER_EXITED})
            await self._adopt_unreported(worker.proc.pid)
            await asyncio.sleep(1.0)
            if not self.stopping.is_set():
                await self._spawn(worker.index)

    async def _adopt_unreported(self, pid: int) -> None:
        """After a worker died: queue what it acknowledged but never reported. Its
        ``queued`` notices leave in batches (empath/daemon/ipc.py), so a kill can take
        the last few with it; the messages are safe in the spool, and without this
        nobody would try them, or count them in ``queue stats``, until a restart."""
        try:
            ids = await asyncio.to_thread(self.spool.ids)
        except OSError as exc:
            log.error("queue: cannot list %s after worker %d exited: %s",
                      self.spool.queue_dir, pid, exc)
            return
        adopted = self.queue.adopt(ids)
        self.queued += len(adopted)
        if adopted:
            log.warning("queue: %d message(s) accepted by worker %d were never reported by "
                        "it; queued now: %s", len(adopted), pid, " ".join(adopted[:10]))

    # ---- reload ------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Re-read the config file; apply it everywhere, or refuse it and change nothing.

        Returns when the outcome is known: on success the supervisor (per-client
        limits, queue manager, log level) and every worker (new sessions; open ones
        keep the config they started with) run the new config. Concurrent calls run
        one after the other. Public: SIGHUP calls it, and so does the control
        socket's ``reload --wait``. The result is logged here and kept in
        ``last_reload`` (shown in STATUS=).
        """
        async with self._reload_lock:
            if self.stopping.is_set():
                return ReloadResult(ok=False, applied=False, errors=["shutting down"],
                                    generation=self.generation)
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
            try:
                result = await self._reload()
            except Exception as exc:  # a bug must not leave systemd in "reloading"
                log.exception("reload failed unexpectedly")
                result = ReloadResult(ok=False, applied=False, errors=[f"internal error: {exc}"],
                                      generation=self.generation)
            self.last_reload = result
            metrics.inc("empath_config_reloads_total",
                        ("success" if result.applied else "failure",))
            self._log_reload(result)
            if not self.stopping.is_set():  # after STOPPING=1, READY=1 would be a lie
                self.notifier.notify("READY=1", f"STATUS={self._status_now()}")
            return result

    async def _reload(self) -> ReloadResult:
        path = self.config_path
        if path is None:
            return self._refused(["no configuration file to re-read"])
        try:
            text = path.read_text(encoding="utf-8")
            new = load_config_text(text, path)
        except (OSError, UnicodeDecodeError) as exc:
            return self._refused([f"cannot read {path}: {exc}"])
        except ConfigError as exc:
            return self._refused([str(issue) for issue in exc.issues] or [str(exc)])
        try:
            # Loads the certificate and key now: a bad pair refuses the reload here
            # rather than failing in the workers after we switched.
            make_tls_context(new)
        except (OSError, ssl.SSLError, ValueError) as exc:
            return self._refused([f"{path}: tls: cannot load certificate and key: {exc}"])
        users_error = users_file_error(new)  # the SMTP AUTH passwords, also re-read
        if users_error is not None:
            return self._refused([f"{path}: {users_error}"])
        try:
            metrics_auth = load_auth(new.metrics)
        except MetricsAuthError as exc:
            return self._refused([f"{path}: {exc}"])
        try:
            dkim_keys = load_dkim_keys(new)
        except DkimError as exc:
            return self._refused([f"{path}: {p}" for p in exc.problems])
        if self.control is not None:
            try:
                # Read and checked now, kept only if the reload goes ahead.
                self.control.set_token_file(new.control.token_file)
            except ControlError as exc:
                return self._refused([f"{path}: control.token_file: {exc}"])
        old = self.config
        changed = config_changes(old, new)
        restart = [k for k in RESTART_KEYS if any(c == k or c.startswith(k + ".")
                                                  for c in changed)]
        if self.socket_activated and "listen" in restart:
            restart.remove("listen")  # ignored entirely: systemd's sockets are used
        # Start-time keys keep their old values until a restart.
        new = dataclasses.replace(new, listen=old.listen, state_dir=old.state_dir,
                                  workers=old.workers,
                                  control=dataclasses.replace(new.control,
                                                              socket=old.control.socket),
                                  metrics=dataclasses.replace(new.metrics,
                                                              listen=old.metrics.listen))
        if self.metrics_server is not None:
            self.metrics_server.set_auth(metrics_auth)
        self.config, self.config_text = new, text
        self.generation += 1
        self.anvil.config = new
        self.queue.apply_config(new)
        self.queue.dkim.use(dkim_keys)
        setup_logging(new.log.level)
        errors = await self._push_config(self.generation)
        heap.refreeze()  # the old configuration's objects go
        return ReloadResult(ok=not errors, applied=True, errors=errors, changed=changed,
                            restart_needed=restart, generation=self.generation)

    def _refused(self, errors: list[str]) -> ReloadResult:
        return ReloadResult(ok=False, applied=False, errors=errors, generation=self.generation)

    async def _push_config(self, gen: int) -> list[str]:
        """Send the config to every worker and wait until each confirms; errors."""
        loop = asyncio.get_running_loop()
        waiting: dict[WorkerProc, asyncio.Future[object]] = {}
        message = self._config_message()
        for worker in list(self.workers.values()):
            fut: asyncio.Future[object] = loop.create_future()
            worker.acks[gen] = fut
            worker.channel.send(message)
            waiting[worker] = fut
        if waiting:
            await asyncio.wait(list(waiting.values()), timeout=RELOAD_ACK_TIMEOUT)
        errors = []
        for worker, fut in waiting.items():
            worker.acks.pop(gen, None)
            who = f"worker {worker.index} (pid {worker.proc.pid})"
            if not fut.done():
                errors.append(f"{who} did not confirm the new configuration "
                              f"within {RELOAD_ACK_TIMEOUT:.0f} s")
            elif fut.result() is _EXITED:
                continue  # its replacement starts with the new config
            elif fut.result() is not None:
                errors.append(f"{who} could not apply the new configuration: {fut.result()}")
            else:
                continue
            # Every process must run one config: the replacement starts with the new one.
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        return errors

    def _log_reload(self, r: ReloadResult) -> None:
        if not r.applied:
            log.error("reload refused, configuration unchanged:\n%s", "\n".join(r.errors),
                      extra={"EMPATH_EVENT": events.RELOAD_REFUSED})
            return
        for key in r.restart_needed:
            log.warning("reload: %s changed; it takes effect only after a restart", key,
                        extra={"EMPATH_EVENT": events.RELOAD})
        if r.ok:
            log.info("reload: configuration applied from %s (generation %d); changed: %s",
                     self.config_path, r.generation, ", ".join(r.changed) or "nothing",
                     extra={"EMPATH_EVENT": events.RELOAD})
        else:
            log.error("reload: configuration applied from %s (generation %d), but %s; "
                      "restarting those workers", self.config_path, r.generation,
                      "; ".join(r.errors), extra={"EMPATH_EVENT": events.RELOAD})

    def _on_sighup(self) -> None:
        self._background(self.reload())

    # ---- systemd -------------------------------------------------------------------

    def status_text(self) -> str:
        """The one-line STATUS= that ``systemctl status empath`` shows."""
        q = self.queue
        text = (f"queue: {q.size} messages ({q.active} in delivery), "
                f"{self.anvil.connections} connections")
        r = self.last_reload
        if r is None:
            return text
        when = time.strftime("%H:%M:%S", time.localtime(r.at))
        if r.ok:
            return f"{text}, last reload: ok at {when}"
        word = "FAILED" if r.applied else "REFUSED"
        return f"{text}, last reload {word} at {when}: {r.errors[0] if r.errors else '?'}"

    def _status_now(self) -> str:
        self._status_sent = text = self.status_text()
        return text

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if self.stopping.is_set():
                return  # "shutting down" stays
            text = self.status_text()
            if text != self._status_sent:
                self._status_sent = text
                self.notifier.notify(f"STATUS={text}")

    async def _watchdog_loop(self, interval: float) -> None:
        # On our own event loop on purpose: if the loop is stuck, the pings stop.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # ---- main --------------------------------------------------------------------

    async def run(self, ids: list[str] | None = None,
                  found: dict[str, Recovered] | None = None) -> int:
        loop = asyncio.get_running_loop()
        if self.watchdog is not None:
            self._watchdog_task = self._background(self._watchdog_loop(self.watchdog))
        # A SIGHUP during start-up waits until we are ready (or stopped).
        await self._reload_lock.acquire()
        self._starting = True
        try:
            return await self._run(loop, ids or [], found)
        finally:
            self._started()

    def _started(self) -> None:
        if self._starting:
            self._starting = False
            self._reload_lock.release()

    async def _run(self, loop: asyncio.AbstractEventLoop, ids: list[str],
                   found: dict[str, Recovered] | None = None) -> int:
        self.queue.load(ids, found)
        self.notifier.notify(f"STATUS=starting: {self.queue.size} messages in the queue")
        if not await self._start_control():
            return EXIT_CONFIG
        started = await self._start_metrics()
        if started is not None:
            if self.control is not None:
                await self.control.close()
            return started
        queue_task = asyncio.create_task(self.queue.run(self.stopping))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for i in range(self.config.workers):
            await self._spawn(i)
        # A task, not a gather(): a gather cancelled by a stop during start-up ends
        # with an exception nobody retrieves, which asyncio logs as an error.
        all_ready: asyncio.Future[Any] = asyncio.ensure_future(
            _all_set([w.ready for w in self.workers.values()])
        )
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait(
            [all_ready, stop_wait], timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        all_ready.cancel()
        if not all(w.ready.is_set() for w in self.workers.values()) and not self.stopping.is_set():
            log.error("workers did not become ready within %.0f s", READY_TIMEOUT)
            self.notifier.notify("STATUS=workers did not become ready; stopping")
            self.stopping.set()
            await self._stop_workers()
            await queue_task
            return 1
        if not self.stopping.is_set():
            log.info(
                "ready: empath %s, %d workers, listening on %s",
                empath.__version__, len(self.workers),
                ", ".join(f"{ls.label} ({ls.role})" for ls in self._smtp_sockets()),
                extra={"EMPATH_EVENT": events.READY},
            )
            heap.freeze()  # the recovered queue and start-up's objects (heap.py)
            self.notifier.notify("READY=1", f"STATUS={self._status_now()}")
            self.serving = True
            self._background(self._status_loop())
        self._started()
        await stop_wait
        self.serving = False
        # Before anything else, so systemd knows the stop is ours (and a reload
        # arriving now is refused rather than started).
        self.notifier.notify("STOPPING=1", "STATUS=shutting down")
        log.info("shutting down", extra={"EMPATH_EVENT": events.STOPPING})
        if self.control is not None:
            await self.control.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        self._stop_listening()
        await self._stop_workers()
        await queue_task
        await self.queue.drain(self.config.shutdown_timeout)
        self.spool.close()
        log.info("stopped", extra={"EMPATH_EVENT": events.STOPPED})
        for task in list(self._tasks):
            task.cancel()
        return 0

    # ---- metrics -------------------------------------------------------------------

    async def _start_metrics(self) -> int | None:
        """The metrics endpoint, on the socket-activated ``metrics`` socket or on
        ``metrics.listen``; None when serving (or not configured), else the exit status:
        2 for unusable credentials (a config problem), 1 when it cannot listen."""
        sock = next((ls.sock for ls in self.listeners if ls.role == "metrics"), None)
        listen = self.config.metrics.listen
        if sock is None and listen is None:
            return None
        try:
            auth = load_auth(self.config.metrics)
        except MetricsAuthError as exc:
            log.error("%s", exc, extra={"EMPATH_EVENT": events.CONFIG_ERROR})
            self.notifier.notify(f"STATUS={exc}")
            return EXIT_CONFIG
        if sock is None and listen is not None:
            try:
                sock = _bind_tcp(listen)
            except OSError as exc:
                log.error("metrics.listen %s: cannot listen: %s", listen, exc.strerror,
                          extra={"EMPATH_EVENT": events.CONFIG_ERROR})
                self.notifier.notify(f"STATUS=metrics.listen {listen}: {exc.strerror}")
                return 1
        assert sock is not None
        if not auth.required and not _is_loopback(sock):
            log.warning("metrics: %s is reachable from other hosts and has no "
                        "bearer_token_file or web_config; anyone who can connect can read "
                        "it", listen or "the metrics socket")
        server = MetricsServer(auth, self._scrape, self._not_ready)
        await server.start(sock)
        self.metrics_server = server
        log.info("metrics: serving %s (/metrics, /healthz, /readyz)%s", server.label,
                 "" if auth.required else " without authentication")
        return None

    async def _scrape(self) -> bytes:
        """The exposition for one scrape: workers' latest counts, asked at once."""
        workers = list(self.workers.values())
        answers = await asyncio.gather(
            *(self._ask(w, "metrics", METRICS_TIMEOUT) for w in workers))
        for worker, (result, _error) in zip(workers, answers, strict=True):
            if isinstance(result, dict):
                self.metrics.worker_snapshot(worker.proc.pid, result)
        self.metrics.set_live(self._live_gauges())
        return generate_latest(self.metrics.registry)

    def _live_gauges(self) -> list[LiveGauge]:
        q = self.queue
        now = time.time()
        out: list[LiveGauge] = [
            ("empath_build_info", (empath.__version__, sys.version.split()[0]), 1.0),
            ("empath_start_time_seconds", (), self.started_at),
            ("empath_worker_processes", (),
             float(sum(1 for w in self.workers.values() if w.ready.is_set()))),
        ]
        out += [("empath_queue_messages", (state,), float(n))
                for state, n in q.state_counts().items()]
        oldest = q.oldest_received()
        out.append(("empath_queue_oldest_message_age_seconds", (),
                    max(0.0, now - oldest) if oldest is not None else 0.0))
        active = {d: float(s["active"]) for d, s in q.limiter_state().items() if s["active"]}
        out += [("empath_destination_active_deliveries", (d,), n)
                for d, n in top_n(active, TOP_DESTINATIONS).items()]
        open_hops = {k: 1.0 for k in q.breakers.snapshot()}
        out += [("empath_destination_circuit_breaker_open", (k,), 1.0)
                for k in top_n(open_hops, TOP_DESTINATIONS)]
        out.append(("empath_circuit_breakers_open", (), float(len(open_hops))))
        roles: dict[str, float] = {}
        for ls in self._smtp_sockets():
            roles.setdefault(ls.role, 0.0)
            if is_listening(ls.sock):
                roles[ls.role] += 1.0
        out += [("empath_smtp_listeners_open", (role,), n) for role, n in roles.items()]
        r = self.last_reload
        out.append(("empath_config_last_reload_success", (),
                    1.0 if r is None or r.applied else 0.0))
        out.append(("empath_config_last_reload_timestamp_seconds", (),
                    r.at if r is not None else self.started_at))
        with contextlib.suppress(OSError):
            st = os.statvfs(self.spool.root)
            out.append(("empath_spool_filesystem_free_bytes", (),
                        float(st.f_bavail * st.f_frsize)))
            out.append(("empath_spool_filesystem_size_bytes", (),
                        float(st.f_blocks * st.f_frsize)))
        return out

    async def _not_ready(self) -> list[str]:
        """Why /readyz says 503: [] when the service takes and delivers mail."""
        reasons: list[str] = []
        if not self.serving:
            reasons.append("starting" if not self.stopping.is_set() else "stopping")
        smtp = self._smtp_sockets()
        if not any(is_listening(ls.sock) for ls in smtp):
            reasons.append("no SMTP listener is open")
        if not any(w.ready.is_set() for w in self.workers.values()):
            reasons.append("no SMTP worker is serving")
        problem = await asyncio.to_thread(self.spool.probe_writable,
                                          self.config.limits.min_free_space)
        if problem is not None:
            reasons.append(problem)
        return reasons

    # ---- control socket ------------------------------------------------------------

    async def _start_control(self) -> bool:
        """The control socket (``empathctl``); a failure to create it is fatal at start,
        like a listener that cannot be bound."""
        path = control_socket_path(self.config)
        handlers = ControlHandlers(
            self.queue, self.spool, status=self._control_status, reload=self.reload,
            connections=self._control_connections, set_log_level=self._set_log_level,
        )
        self.control = ControlServer(path, handlers, token_file=self.config.control.token_file)
        try:
            await self.control.start()
        except ControlError as exc:
            log.error("control socket: %s", exc, extra={"EMPATH_EVENT": events.CONFIG_ERROR})
            self.notifier.notify(f"STATUS=control socket: {exc}")
            self.control = None
            return False
        return True

    def _control_status(self) -> dict[str, Any]:
        r = self.last_reload
        return {
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self._started_mono, 1),
            "started_at": self.started_at,
            "hostname": self.config.hostname,
            "config": str(self.config_path) if self.config_path else None,
            "generation": self.generation,
            "workers": [{"index": w.index, "pid": w.proc.pid, "ready": w.ready.is_set()}
                        for w in self.workers.values()],
            "listeners": [{"address": ls.label, "role": ls.role} for ls in self.listeners],
            "socket_activated": self.socket_activated,
            "connections": self.anvil.total,
            "mode": self.config.delivery.mode,
            "last_reload": r.to_dict() if r is not None else None,
            "status": self._status_now(),
        }

    async def _ask(self, worker: WorkerProc, question: str,
                   timeout: float) -> tuple[Any, str | None]:
        """Send ``request`` ``question`` to a worker: (its result, None) or (None, why
        not) when it answers with an error, exits or does not answer in time."""
        n = next(self._request_ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.requests[n] = answer
        worker.channel.send({"t": "request", "id": n, "q": question})
        try:
            msg = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            return None, f"did not answer within {timeout:g} s"
        finally:
            worker.requests.pop(n, None)
        if msg.get("error"):
            return None, str(msg["error"])
        return msg.get("result"), None

    async def _control_connections(self) -> dict[str, Any]:
        """``empathctl connections``: every worker's open SMTP sessions, asked over IPC
        at once; a worker that does not answer within ``CONNECTIONS_TIMEOUT`` is
        reported as such (``ok`` false, ``error``) and the others are still listed."""
        workers = sorted(self.workers.values(), key=lambda w: w.index)
        answers = await asyncio.gather(
            *(self._ask(w, "sessions", CONNECTIONS_TIMEOUT) for w in workers))
        rows: list[dict[str, Any]] = []
        status: list[dict[str, Any]] = []
        for worker, (result, error) in zip(workers, answers, strict=True):
            entry: dict[str, Any] = {"index": worker.index, "pid": worker.proc.pid,
                                     "ok": error is None}
            if error is not None:
                entry["error"] = error
            else:
                sessions = [r for r in result if isinstance(r, dict)] if isinstance(
                    result, list) else []
                entry["connections"] = len(sessions)
                rows += [{**r, "worker": worker.index, "pid": worker.proc.pid}
                         for r in sessions]
            status.append(entry)
        rows.sort(key=lambda r: float(r.get("connected_at") or 0.0))
        return {"connections": rows, "workers": status}

    def _set_log_level(self, level: str) -> None:
        """``empathctl log-level``: until the next reload or restart, which go back to
        ``log.level`` from the file. Workers are told too."""
        setup_logging(level)
        for worker in self.workers.values():
            worker.channel.send({"t": "log-level", "level": level})

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
            if task is not self._watchdog_task:  # systemd watches the stop too
                task.cancel()


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()


def _is_loopback(sock: socket.socket) -> bool:
    with contextlib.suppress(OSError, ValueError):
        addr = sock.getsockname()
        if isinstance(addr, tuple):
            return ipaddress.ip_address(str(addr[0])).is_loopback
        return True  # a Unix socket
    return False


def _bind_tcp(listen: str) -> socket.socket:
    host, _, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port or 0), family=family)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


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
    # Taken (and removed from the environment, so no child inherits them) first thing.
    watchdog = watchdog_interval(os.environ)
    notifier = Notifier.from_environ()
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read configuration %s: %s", config_path, exc,
                  extra={"EMPATH_EVENT": events.CONFIG_ERROR})
        notifier.notify(f"STATUS=cannot read configuration {config_path}: {exc}")
        return EXIT_CONFIG
    try:
        config = load_config_text(text, config_path)
    except ConfigError as exc:
        log.error("configuration error:\n%s", exc, extra={"EMPATH_EVENT": events.CONFIG_ERROR})
        first = str(exc.issues[0]) if exc.issues else str(exc)
        notifier.notify(f"STATUS=configuration error: {first}")
        return EXIT_CONFIG
    setup_logging(config.log.level)
    try:
        # The certificate and key are loaded now, as at reload: unreadable files are a
        # configuration error (exit 2), not workers failing one after another.
        make_tls_context(config)
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.error("%s: tls: cannot load certificate and key: %s", config_path, exc,
                  extra={"EMPATH_EVENT": events.CONFIG_ERROR})
        notifier.notify(f"STATUS=tls: cannot load certificate and key: {exc}")
        return EXIT_CONFIG
    users_error = users_file_error(config)
    if users_error is not None:
        log.error("%s: %s", config_path, users_error, extra={"EMPATH_EVENT": events.CONFIG_ERROR})
        notifier.notify(f"STATUS={users_error}")
        return EXIT_CONFIG
    try:
        dkim_keys = load_dkim_keys(config)
    except DkimError as exc:
        log.error("%s: %s", config_path, exc, extra={"EMPATH_EVENT": events.CONFIG_ERROR})
        notifier.notify(f"STATUS={exc.problems[0]}")
        return EXIT_CONFIG
    try:
        validate_state_dir(config.state_dir)
    except StateDirError as exc:
        log.error("state_dir: %s", exc, extra={"EMPATH_EVENT": events.CONFIG_ERROR})
        notifier.notify(f"STATUS=state_dir: {exc}")
        return EXIT_CONFIG
    lock = _lock_state_dir(config.state_dir)
    if lock is None:
        return 1
    spool = Spool(config.spool_dir)
    notifier.notify("STATUS=recovering the spool")
    if watchdog is not None:
        notifier.notify("WATCHDOG=1")  # the loop that pings starts after recovery
    try:
        spool.prepare()
        # Processes read their share of the spool each: nothing else runs yet (no
        # thread, no event loop), and with a big backlog this is most of the time to
        # READY=1. More of them than cores: from a cold page cache each one mostly waits
        # for its reads, and the disk serves several at once.
        report = spool.recover(processes=RECOVERY_PROCESSES, digest=recovered)
    except OSError as exc:
        log.error("spool %s unusable: %s", config.spool_dir, exc)
        notifier.notify(f"STATUS=spool {config.spool_dir} unusable: {exc}")
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
                log.error("listen: no listeners configured and not socket-activated",
                          extra={"EMPATH_EVENT": events.CONFIG_ERROR})
                return EXIT_CONFIG
            listeners = bind_listeners(config.listen)
        elif config.listen:
            log.info("socket-activated: ignoring listen: from the configuration")
    except ListenerError as exc:
        log.error("%s", exc)
        notifier.notify(f"STATUS={exc}")
        return 1
    supervisor = Supervisor(config, text, listeners, spool, config_path=config_path,
                            socket_activated=activated, notifier=notifier, watchdog=watchdog)
    supervisor.queue.dkim.use(dkim_keys)
    try:
        found, report.envelopes = report.envelopes, {}
        return asyncio.run(supervisor.run(report.ids, found))
    finally:
        notifier.close()
