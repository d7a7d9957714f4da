#!/usr/bin/env python3
"""Durable accept throughput and latency: empath vs Postfix, measured in the same run.

Both servers are told to keep every accepted message in their queue (Postfix: HOLD,
empath: ``delivery.mode: hold``), so a ``250`` after DATA means "this message is on
disk". Load comes from Postfix's ``smtp-source`` (one new connection per message);
the latency pass uses a small asyncio client in this file. See bench/README.md.

Usage::

    python3 bench/accept.py [--messages 10000] [--sessions 20] [--size 4096]
                            [--workers 1,2,4] [--rounds 3] [--json PATH]
                            [--empath-cmd "..."] [--standin] [--skip-postfix]

Needs root (the private Postfix instance runs as user ``postfix``) and the Debian
``postfix`` package, which ships ``smtp-source``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import pwd
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, Self

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POSTFIX_PORT = 10025
EMPATH_PORT = 10026
DOMAIN = "bench.example"
SENDER = f"sender@{DOMAIN}"
RECIPIENT = f"rcpt@{DOMAIN}"
# Stand-in for the empath daemon while it is being written: accepts, stores nothing.
STANDIN_CMD = f"{sys.executable} -m aiosmtpd -n -l {HOST}:{EMPATH_PORT} -c aiosmtpd.handlers.Sink"

READY_TIMEOUT = 30.0  # seconds to wait for a 220 greeting after start
STOP_TIMEOUT = 60.0  # seconds to wait for exit after SIGTERM (empath shutdown_timeout is 30)
MESSAGE_TIMEOUT = 60.0  # seconds for one whole transaction in the latency pass
SAMPLE_INTERVAL = 0.1  # seconds between process-tree RSS samples
PSS_EVERY = 10  # PSS (smaps_rollup) costs the kernel a page-table walk: every 10th sample

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


class BenchError(Exception):
    """A target could not be started, loaded or verified."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- spent spools

# Spent queues are not deleted until the bench process ends: empath's stay in their
# run's own directory, Postfix's hold queue (the same one every round) is moved aside
# and an empty one put in its place. On ext4 without a journal (this machine's root
# filesystem) the inode allocator skips every inode freed in the last 60-360 s and
# pays a buffer lookup for each skip, at every file creation: deleting a round's
# 10,000 files taxes each message the *next* target writes (perf showed 13% of all
# CPU in recently_deleted() after such a delete). A rename frees nothing, so every
# target starts on the same footing.
_SCRATCH: list[Path] = []
_BURIED = itertools.count()


def bury(path: Path, scratch: Path) -> None:
    """Move directory ``path`` (a spent queue) under ``scratch``'s spent/ and leave an
    empty one with the same owner and mode in its place."""
    spent = scratch / "spent"
    spent.mkdir(exist_ok=True)
    st = path.stat()
    os.rename(path, spent / f"{next(_BURIED)}-{path.name}")
    path.mkdir()
    os.chown(path, st.st_uid, st.st_gid)
    path.chmod(stat.S_IMODE(st.st_mode))


def remove_at_exit(tmp: Path) -> None:
    """Delete scratch directory ``tmp`` when the bench process ends (see ``bury``)."""
    if not _SCRATCH:
        atexit.register(_remove_scratch)
    _SCRATCH.append(tmp)


def _remove_scratch() -> None:
    log(f"removing {len(_SCRATCH)} scratch director{'y' if len(_SCRATCH) == 1 else 'ies'}")
    for tmp in _SCRATCH:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- processes


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}: {out}")
    return proc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


def wait_for_greeting(port: int, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Poll until HOST:port accepts a connection and sends a ``220`` greeting."""
    deadline = time.monotonic() + timeout
    last = "no connection"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise BenchError(f"server on port {port} exited before greeting")
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as s:
                line = s.makefile("rb").readline()
                if line.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = f"greeting {line!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"no 220 greeting on {HOST}:{port} within {timeout:.0f}s ({last})")


# ------------------------------------------------------------------ process-tree sampling


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    rss_bytes: int


def _read_proc(path: str) -> bytes:
    """Read a small /proc file with plain syscalls (the sampler runs every 100 ms)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _read_stat(pid: int) -> ProcStat | None:
    try:
        data = _read_proc(f"/proc/{pid}/stat")
    except OSError:
        return None
    # Fields after "(comm)": state ppid pgrp ... utime(11) stime cutime cstime ... rss(21)
    rest = data.rsplit(b")", 1)[1].split()
    cpu = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ProcStat(pid, cpu, int(rest[21]) * PAGE_SIZE)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        with contextlib.suppress(OSError):
            kids.extend(int(c) for c in _read_proc(f"/proc/{pid}/task/{tid}/children").split())
    return kids


def process_tree(root: int) -> list[int]:
    pids: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def _pss_bytes(pid: int) -> int:
    try:
        data = _read_proc(f"/proc/{pid}/smaps_rollup")
    except OSError:
        return 0
    for line in data.splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_cpu_seconds(root: int) -> float:
    """CPU time of the live tree plus everything it has reaped (cutime/cstime)."""
    stats = [_read_stat(p) for p in process_tree(root)]
    return sum(s.cpu_ticks for s in stats if s is not None) / CLOCK_TICKS


class TreeSampler:
    """Samples summed RSS of a process and its descendants every 100 ms (PSS every 1 s).

    Summed RSS counts shared pages (libraries, copy-on-write after fork) once per process,
    so it overstates multi-process servers; summed PSS splits shared pages fairly.
    """

    def __init__(self, root: int, pss_every: int = PSS_EVERY) -> None:
        self.root = root
        self.pss_every = pss_every  # take PSS at every n-th sample
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(pss=True)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._sample()

    def _sample(self, *, pss: bool = False) -> None:
        pids = process_tree(self.root)
        stats = [s for s in (_read_stat(p) for p in pids) if s is not None]
        self.peak_rss = max(self.peak_rss, sum(s.rss_bytes for s in stats))
        self.peak_procs = max(self.peak_procs, len(stats))
        if pss or self._samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(_pss_bytes(s.pid) for s in stats))
        self._samples += 1


# ------------------------------------------------------------------------------ targets


@dataclass(slots=True)
class Stored:
    """How many of the accepted messages were found in the target's queue afterwards."""

    expected: int
    found: int | None  # None: not checkable (stand-in)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.found is None or self.found == self.expected

    def describe(self) -> str:
        if self.found is None:
            return "unchecked"
        mark = "ok" if self.ok else "MISMATCH"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.found}/{self.expected} {mark}{extra}"


class Target(Protocol):
    label: str
    port: int

    def begin(self) -> int:
        """Prepare an empty queue and a running server; return the PID to sample."""
        ...

    def end(self, expected: int) -> Stored:
        """Finish the round and count what is stored on disk."""
        ...


class PostfixInstance:
    """A private Postfix instance (own config, queue and data directories) that holds mail.

    Started once with ``postfix -c DIR start``; each round empties its queue (held
    messages moved aside, see ``bury``; ``postsuper -d ALL`` for the rest). Nothing
    under /etc/postfix is read for configuration or modified: as root, ``postfix -c``
    accepts any directory.
    """

    label = "postfix"
    port = POSTFIX_PORT

    def __init__(self, base: Path) -> None:
        self.base = base / "postfix"
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.maillog = self.base / "maillog"
        self._started = False

    # -- lifecycle

    def start(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("the Postfix side needs root (or use --skip-postfix)")
        if shutil.which("postfix") is None or shutil.which("smtp-source") is None:
            raise BenchError("postfix/smtp-source not installed (apt-get install postfix)")
        if _port_in_use(self.port):
            raise BenchError(f"port {self.port} already in use (a leftover Postfix instance?)")
        self._write_config()
        if _run(self._cmd("postfix", "check"), check=False).returncode != 0:
            raise BenchError(f"postfix check failed:\n{_tail(self.maillog)}")
        self._started = True
        proc = _run(self._cmd("postfix", "start"), check=False)
        if proc.returncode != 0:
            raise BenchError(f"postfix start failed:\n{_tail(self.maillog)}")
        try:
            wait_for_greeting(self.port, READY_TIMEOUT)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{_tail(self.maillog)}") from exc
        self._preflight()

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        pid = self.master_pid()
        _run(self._cmd("postfix", "stop"), check=False)
        if pid is not None:
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                log(f"postfix: master {pid} survived 'postfix stop'; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _cmd(self, prog: str, *args: str) -> list[str]:
        return [prog, "-c", str(self.config_dir), *args]

    def _write_config(self) -> None:
        postfix_uid = pwd.getpwnam("postfix").pw_uid
        self.config_dir.mkdir(parents=True)
        self.queue_dir.mkdir()  # root-owned; postfix creates its subdirectories
        self.data_dir.mkdir()
        os.chown(self.data_dir, postfix_uid, -1)
        main_cf = f"""\
# Private benchmark instance written by bench/accept.py. Not the system Postfix.
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.maillog}
maillog_file_prefixes = {self.base}
myhostname = {DOMAIN}
mydomain = {DOMAIN}
myorigin = $myhostname
mydestination = {DOMAIN}, localhost
inet_interfaces = {HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
biff = no
# Every recipient is accepted (no local user lookup) ...
local_recipient_maps =
alias_maps =
alias_database =
# ... and every message goes to the hold queue instead of being delivered.
smtpd_recipient_restrictions = check_recipient_access static:HOLD, permit_mynetworks, reject
"""
        # chroot off (column 5 = n) so no files need copying into the queue directory.
        master_cf = f"""\
{HOST}:{self.port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""
        (self.config_dir / "main.cf").write_text(main_cf)
        (self.config_dir / "master.cf").write_text(master_cf)

    def _preflight(self) -> None:
        """Send one message and check with postqueue that it sits in the hold queue."""
        self._empty_queue()
        _run(["smtp-source", "-m", "1", "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{self.port}"])
        out = _run(self._cmd("postqueue", "-j")).stdout
        queues = [json.loads(line)["queue_name"] for line in out.splitlines() if line.strip()]
        if queues != ["hold"]:
            raise BenchError(f"postfix preflight: expected one held message, postqueue: {queues}")
        log("postfix: preflight ok (postqueue -j: 1 message in the hold queue)")

    # -- rounds

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _queue_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
            d = self.queue_dir / name
            counts[name] = sum(len(files) for _, _, files in os.walk(d)) if d.is_dir() else 0
        return counts

    def _empty_queue(self) -> None:
        # The held messages are moved out (see bury), postsuper removes any others.
        hold = self.queue_dir / "hold"
        if hold.is_dir() and os.listdir(hold):
            bury(hold, self.base.parent)
        _run(self._cmd("postsuper", "-d", "ALL"))
        leftover = {k: v for k, v in self._queue_counts().items() if v}
        if leftover:
            raise BenchError(f"postfix queue not empty after postsuper -d ALL: {leftover}")

    def begin(self) -> int:
        pid = self.master_pid()
        if pid is None or not _pid_alive(pid):
            raise BenchError(f"postfix master is not running\n{_tail(self.maillog)}")
        self._empty_queue()
        return pid

    def end(self, expected: int) -> Stored:
        counts = self._queue_counts()
        others = {k: v for k, v in counts.items() if v and k != "hold"}
        detail = f"also queued: {others}" if others else ""
        return Stored(expected, counts["hold"], detail)


class EmpathTarget:
    """``empath run --config FILE`` with a fresh state directory every round."""

    port = EMPATH_PORT

    def __init__(self, base: Path, cmd: str, workers: int, *, standin: bool) -> None:
        self.base = base
        self.cmd = cmd
        self.workers = workers
        self.standin = standin
        self.label = f"empath w={workers}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._run = 0
        self._dir = base
        self._log = base / "empath.log"

    def _write_config(self, run_dir: Path) -> Path:
        state = run_dir / "state"
        config = f"""\
hostname: {DOMAIN}
postmaster: postmaster@{DOMAIN}
listen: [{{address: "{HOST}:{self.port}", role: smtp}}]
state_dir: {state}
local_domains: [{DOMAIN}]
relay_networks: [127.0.0.0/8]
delivery: {{mode: hold}}
workers: {self.workers}
log: {{level: warning}}
"""
        path = run_dir / "empath.yaml"
        path.write_text(config)
        return path

    def _argv(self, config: Path) -> list[str]:
        if self.standin:
            return shlex.split(self.cmd)  # listens where STANDIN_CMD says; ignores the config
        if "{config}" in self.cmd:
            return shlex.split(self.cmd.replace("{config}", shlex.quote(str(config))))
        return [*shlex.split(self.cmd), "run", "--config", str(config)]

    def begin(self) -> int:
        if _port_in_use(self.port):
            raise BenchError(f"port {self.port} already in use before starting empath")
        self._run += 1
        self._dir = self.base / f"empath-w{self.workers}-{self._run}"
        self._dir.mkdir()
        self._log = self._dir / "empath.log"
        config = self._write_config(self._dir)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self._log, "wb") as out:
            self._proc = subprocess.Popen(
                self._argv(config),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=env,
                start_new_session=True,  # own process group: cleanup can kill just this tree
            )
        proc = self._proc
        try:
            wait_for_greeting(self.port, READY_TIMEOUT, alive=lambda: proc.poll() is None)
        except BenchError as exc:
            self.kill()
            raise BenchError(f"{self.label}: {exc}\n{_tail(self._log)}") from exc
        return proc.pid

    def end(self, expected: int) -> Stored:
        code = self.stop()
        if code != 0 and not self.standin:  # the stand-in just dies of the SIGTERM
            log(f"{self.label}: exit status {code} after SIGTERM; log tail:\n{_tail(self._log)}")
        if self.standin:
            stored = Stored(expected, None)
        else:
            queue = self._dir / "state" / "spool" / "queue"
            found = len(list(queue.glob("*.msg"))) if queue.is_dir() else 0
            stored = Stored(expected, found, "" if code == 0 else f"exit status {code}")
        # The run's directory is its own and never reused: it stays, spool and log,
        # until the bench exits (see bury).
        return stored

    def stop(self) -> int | None:
        """SIGTERM, wait for exit; SIGKILL the process group if it does not go."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{self.label}: still running {STOP_TIMEOUT:.0f}s after SIGTERM; SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Workers that outlived the main process would hold the port for the next round.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            log(f"{self.label}: processes left in group {proc.pid} after exit; SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------------- load


@dataclass(slots=True)
class ThroughputRound:
    target: str
    round: int
    messages: int
    seconds: float | None = None
    rate: float | None = None
    cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_pss_bytes: int | None = None
    peak_processes: int | None = None
    stored: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rate is not None


@dataclass(slots=True)
class LatencyPass:
    target: str
    messages: int
    connections: int
    ok_messages: int = 0
    errors: int = 0
    first_error: str | None = None
    seconds: float | None = None
    rate: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    stored: dict[str, Any] | None = None
    error: str | None = None


def _stored_dict(stored: Stored) -> dict[str, Any]:
    return {
        "expected": stored.expected,
        "found": stored.found,
        "ok": stored.ok,
        "detail": stored.detail,
    }


def _check_stored(label: str, stored: Stored) -> None:
    if not stored.ok:
        log(f"!!! {label}: STORED MESSAGE COUNT MISMATCH: {stored.describe()} !!!")


class _LoadParams(Protocol):
    @property
    def sessions(self) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def size(self) -> int: ...


def smtp_source_argv(p: _LoadParams, port: int, recipient: str = RECIPIENT) -> list[str]:
    """The load every bench uses (relay.py with its own recipient)."""
    # No -d: smtp-source opens a new connection for every message by default.
    return [
        "smtp-source",
        "-c",
        "-s",
        str(p.sessions),
        "-m",
        str(p.messages),
        "-l",
        str(p.size),
        "-f",
        SENDER,
        "-t",
        recipient,
        f"{HOST}:{port}",
    ]


def throughput_round(target: Target, p: Params, rnd: int) -> ThroughputRound:
    res = ThroughputRound(target.label, rnd, p.messages)
    stored: Stored | None = None
    try:
        pid = target.begin()
        try:
            os.sync()  # don't charge the previous round's dirty pages to this one
            show = sys.stderr.isatty()
            with TreeSampler(pid) as sampler:
                cpu0 = tree_cpu_seconds(pid)
                t0 = time.perf_counter()
                proc = subprocess.run(
                    smtp_source_argv(p, target.port),
                    stdout=sys.stderr if show else subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    check=False,
                )
                elapsed = time.perf_counter() - t0
                cpu1 = tree_cpu_seconds(pid)
            if show:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            if proc.returncode < 0:
                name = signal.Signals(-proc.returncode).name
                raise BenchError(f"smtp-source was killed by {name} (not sent by the bench)")
            if proc.returncode != 0:
                raise BenchError(f"smtp-source exited {proc.returncode}: {proc.stderr.strip()}")
            res.seconds = elapsed
            res.rate = p.messages / elapsed
            res.cpu_seconds = cpu1 - cpu0
            res.peak_rss_bytes = sampler.peak_rss
            res.peak_pss_bytes = sampler.peak_pss
            res.peak_processes = sampler.peak_procs
        finally:
            stored = target.end(p.messages)
    except BenchError as exc:
        res.error = str(exc)
        log(f"{target.label} round {rnd}: FAILED: {exc}")
    if stored is not None:
        res.stored = _stored_dict(stored)
        _check_stored(f"{target.label} round {rnd}", stored)
    if res.ok:
        assert res.rate is not None and res.seconds is not None and stored is not None
        log(
            f"{target.label:<12} round {rnd}: {p.messages} msgs in {res.seconds:6.2f} s = "
            f"{res.rate:7.1f} msg/s, stored {stored.describe()}"
        )
    return res


class SMTPReplyError(Exception):
    pass


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPReplyError(f"connection closed waiting for {code.decode()}")
        if line[:3] != code:
            raise SMTPReplyError(f"expected {code.decode()}, got {line.decode(errors='replace')!r}")
        if line[3:4] != b"-":
            return


async def _send_one(port: int, payload: bytes, seq: int) -> int:
    """One connection, one message. Returns nanoseconds from writing '.' to reading 250."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _expect(reader, b"220")
        for command, code in (
            (b"EHLO latency.bench.example", b"250"),
            (f"MAIL FROM:<{SENDER}>".encode(), b"250"),
            (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(command + b"\r\n")
            await _expect(reader, code)
        header = (
            f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency {seq}\r\n"
            f"Message-ID: <{seq}.{time.time_ns()}@latency.{DOMAIN}>\r\n\r\n"
        ).encode()
        writer.write(header + payload)
        await writer.drain()
        t0 = time.perf_counter_ns()
        writer.write(b".\r\n")
        await _expect(reader, b"250")
        elapsed = time.perf_counter_ns() - t0
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(SMTPReplyError, ConnectionError):
            await _expect(reader, b"221")
        return elapsed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def make_payload(size: int) -> bytes:
    """``size`` bytes of body (CRLF included) in 78-character lines, none starting with '.'."""
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest >= 2:
        body += b"y" * (rest - 2) + b"\r\n"
    return body


async def _latency_load(
    port: int,
    total: int,
    connections: int,
    size: int,
) -> tuple[list[int], list[str], float]:
    payload = make_payload(size)
    samples: list[int] = []
    errors: list[str] = []
    next_seq = 0

    async def worker() -> None:
        nonlocal next_seq
        while next_seq < total:
            seq = next_seq
            next_seq += 1
            try:
                async with asyncio.timeout(MESSAGE_TIMEOUT):
                    samples.append(await _send_one(port, payload, seq))
            except (OSError, SMTPReplyError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return samples, errors, time.perf_counter() - t0


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_pass(target: Target, p: Params) -> LatencyPass:
    res = LatencyPass(target.label, p.latency_messages, p.latency_connections)
    stored: Stored | None = None
    try:
        target.begin()
        samples: list[int] = []
        errors: list[str] = []
        elapsed = 0.0
        try:
            os.sync()
            samples, errors, elapsed = asyncio.run(
                _latency_load(target.port, p.latency_messages, p.latency_connections, p.size)
            )
        finally:
            stored = target.end(len(samples))
        res.ok_messages = len(samples)
        res.errors = len(errors)
        res.first_error = errors[0] if errors else None
        res.seconds = elapsed
        res.rate = len(samples) / elapsed if elapsed > 0 else None
        if samples:
            ms = sorted(s / 1e6 for s in samples)
            res.p50_ms, res.p90_ms, res.p99_ms = (percentile(ms, q) for q in (50, 90, 99))
            res.max_ms = ms[-1]
            res.mean_ms = statistics.fmean(ms)
        if errors:
            log(f"{target.label} latency: {len(errors)} failed messages, first: {errors[0]}")
    except BenchError as exc:
        res.error = str(exc)
        log(f"{target.label} latency: FAILED: {exc}")
    if stored is not None:
        res.stored = _stored_dict(stored)
        _check_stored(f"{target.label} latency", stored)
    if res.p50_ms is not None and res.p99_ms is not None:
        log(
            f"{target.label:<12} latency: p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms "
            f"({res.ok_messages} msgs)"
        )
    return res


# ------------------------------------------------------------------------------- report


@dataclass(slots=True)
class Params:
    messages: int
    sessions: int
    size: int
    workers: list[int]
    rounds: int
    latency_messages: int
    latency_connections: int
    empath_cmd: str
    standin: bool
    skip_postfix: bool
    tmpdir: str | None
    keep_tmp: bool


@dataclass(slots=True)
class Summary:
    target: str
    rounds_ok: int
    rounds: int
    median_rate: float | None = None
    min_rate: float | None = None
    max_rate: float | None = None
    ratio_vs_postfix: float | None = None
    cpu_ms_per_msg: float | None = None
    peak_rss_mib: float | None = None
    peak_pss_mib: float | None = None
    stored_ok: bool = True


def summarise(label: str, rounds: list[ThroughputRound], messages: int) -> Summary:
    ok = [r for r in rounds if r.ok]
    s = Summary(label, len(ok), len(rounds))
    s.stored_ok = all(r.stored is None or r.stored["ok"] for r in rounds)
    if not ok:
        return s
    rates = [r.rate for r in ok if r.rate is not None]
    s.median_rate = statistics.median(rates)
    s.min_rate, s.max_rate = min(rates), max(rates)
    s.cpu_ms_per_msg = statistics.median((r.cpu_seconds or 0.0) * 1000 / messages for r in ok)
    s.peak_rss_mib = max(r.peak_rss_bytes or 0 for r in ok) / MIB
    s.peak_pss_mib = max(r.peak_pss_bytes or 0 for r in ok) / MIB
    return s


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, fstype = mount, f"{parts[2]} ({parts[0]} on {mount})"
    return fstype


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def machine_info(tmp: Path) -> dict[str, Any]:
    cpu_model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    sysctl: dict[str, str] = {}
    for name in ("net/ipv4/tcp_tw_reuse", "net/ipv4/ip_local_port_range", "net/core/somaxconn"):
        with contextlib.suppress(OSError):
            sysctl[name.replace("/", ".")] = " ".join(Path(f"/proc/sys/{name}").read_text().split())
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "hostname": platform.node(),
        "tmp_dir": str(tmp),
        "tmp_filesystem": _fs_type(tmp),
        "sysctl": sysctl,
        "loadavg_at_start": loadavg(),
    }


def versions() -> dict[str, str]:
    postfix = "?"
    with contextlib.suppress(OSError, BenchError):
        postfix = _run(["postconf", "-h", "mail_version"]).stdout.strip()
    return {
        "postfix": postfix,
        "python": platform.python_version(),
        "python_executable": sys.executable,
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def busy_warning(machine: dict[str, Any]) -> list[str]:
    """The bench wants an idle machine; say so when it was not."""
    load = machine.get("loadavg_at_start") or [0.0]
    if load[0] <= 0.5:
        return []
    return [
        f"WARNING:  1-min load average was {load[0]:.2f} before the bench started "
        f"({machine['nproc']} CPUs): other work competes with the servers, expect noise"
    ]


def render(meta: dict[str, Any], summaries: list[Summary], latency: list[LatencyPass]) -> str:
    m, v, p = meta["machine"], meta["versions"], meta["params"]
    lines = [
        f"empath accept benchmark  {meta['started']}",
        f"machine:  {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"spool fs {m['tmp_filesystem']}",
        f"versions: postfix {v['postfix']}, python {v['python']}",
        f"empath:   {meta['empath_cmd']}" + ("  [STAND-IN, not empath]" if p["standin"] else ""),
        *busy_warning(m),
        f"load:     smtp-source, {p['messages']} msgs x {p['size']} B payload, "
        f"{p['sessions']} sessions, new connection per message, {p['rounds']} rounds",
        "",
        f"{'target':<12} {'rounds':>6} {'median msg/s':>12} {'min-max':>15} {'vs postfix':>10} "
        f"{'CPU ms/msg':>10} {'peak RSS MiB':>12} {'peak PSS MiB':>12}  stored",
    ]
    for s in summaries:
        spread = (
            f"{s.min_rate:.0f}-{s.max_rate:.0f}"
            if s.min_rate is not None and s.max_rate is not None
            else "-"
        )
        ratio = "-" if s.ratio_vs_postfix is None else f"{s.ratio_vs_postfix:.2f}x"
        stored = "ok" if s.stored_ok else "MISMATCH"
        if p["standin"] and s.target.startswith("empath"):
            stored = "unchecked"
        lines.append(
            f"{s.target:<12} {s.rounds_ok:>3}/{s.rounds:<2} {_fmt(s.median_rate):>12} "
            f"{spread:>15} {ratio:>10} {_fmt(s.cpu_ms_per_msg, '.2f'):>10} "
            f"{_fmt(s.peak_rss_mib):>12} {_fmt(s.peak_pss_mib):>12}  {stored}"
        )
    if latency:
        lines += [
            "",
            f"latency: '.' -> 250, asyncio client, {p['latency_messages']} msgs over "
            f"{p['latency_connections']} concurrent connections, one message per connection",
            f"{'target':<12} {'msgs':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'msg/s':>8} {'errors':>6}",
        ]
        for lp in latency:
            lines.append(
                f"{lp.target:<12} {lp.ok_messages:>6} {_fmt(lp.p50_ms, '.2f'):>8} "
                f"{_fmt(lp.p90_ms, '.2f'):>8} {_fmt(lp.p99_ms, '.2f'):>8} "
                f"{_fmt(lp.max_ms, '.2f'):>8} {_fmt(lp.rate):>8} {lp.errors:>6}"
                + (f"  FAILED: {lp.error.splitlines()[0]}" if lp.error else "")
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main


def default_empath_cmd() -> str:
    venv = REPO / ".venv" / "bin" / "empath"
    if venv.exists():
        return shlex.quote(str(venv))
    return f"{shlex.quote(sys.executable)} -m empath.cli"


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=10_000, help="messages per round")
    ap.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    ap.add_argument("--workers", default="1,2,4", help="empath worker counts, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--latency-messages",
        type=int,
        default=2000,
        help="messages in the latency pass (0 skips it)",
    )
    ap.add_argument("--latency-connections", type=int, default=20)
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="result file (default bench/results/accept-<timestamp>.json)",
    )
    ap.add_argument(
        "--empath-cmd",
        default=None,
        help="command to start empath; '{config}' is replaced by the config path, "
        "otherwise 'run --config FILE' is appended",
    )
    ap.add_argument(
        "--standin",
        action="store_true",
        help=f"use '{STANDIN_CMD}' instead of empath (harness test; "
        "stores nothing, spool not checked)",
    )
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--tmpdir", default=None, help="where spools go (default: $TMPDIR or /tmp)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep queues, configs and logs")
    a = ap.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",") if w.strip()]
    for name in ("messages", "sessions", "size", "rounds", "latency_connections"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.standin and a.empath_cmd:
        ap.error("--standin and --empath-cmd are exclusive")
    cmd = STANDIN_CMD if a.standin else (a.empath_cmd or default_empath_cmd())
    params = Params(
        a.messages,
        a.sessions,
        a.size,
        workers,
        a.rounds,
        a.latency_messages,
        a.latency_connections,
        cmd,
        a.standin,
        a.skip_postfix,
        a.tmpdir,
        a.keep_tmp,
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = a.json or REPO / "bench" / "results" / f"accept-{stamp}.json"
    return params, out


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _ScratchParams(Protocol):
    @property
    def tmpdir(self) -> str | Path | None: ...
    @property
    def keep_tmp(self) -> bool: ...


@contextlib.contextmanager
def scratch_dir(p: _ScratchParams, prefix: str = "empath-accept-", *,
                postfix: bool = True) -> Iterator[Path]:
    """A temp directory for one bench run, removed afterwards unless ``keep_tmp``."""
    # Absolute (mkdtemp keeps a relative --tmpdir relative): the state_dir written into
    # empath's config must be, and the servers run in directories of their own.
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=p.tmpdir)).resolve()
    if postfix:
        tmp.chmod(0o755)  # Postfix daemons run as 'postfix' and must reach their queue
    try:
        yield tmp
    finally:
        if p.keep_tmp:
            log(f"kept {tmp}")
        else:
            remove_at_exit(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    p, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rounds: dict[str, list[ThroughputRound]] = {}
    latency: list[LatencyPass] = []
    interrupted = False
    fatal: str | None = None

    with scratch_dir(p) as tmp:
        meta: dict[str, Any] = {
            "benchmark": "accept",
            "started": started,
            "machine": machine_info(tmp),
            "versions": versions(),
            "params": asdict(p),
            "empath_cmd": p.empath_cmd,
        }
        postfix = PostfixInstance(tmp)
        targets: list[Target] = [] if p.skip_postfix else [postfix]
        targets += [EmpathTarget(tmp, p.empath_cmd, w, standin=p.standin) for w in p.workers]
        for t in targets:
            rounds[t.label] = []
        try:
            if not p.skip_postfix:
                postfix.start()
            for rnd in range(1, p.rounds + 1):
                for t in targets:
                    rounds[t.label].append(throughput_round(t, p, rnd))
            if p.latency_messages > 0:
                for t in targets:
                    latency.append(latency_pass(t, p))
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted; cleaning up and reporting partial results")
        except BenchError as exc:
            fatal = str(exc)
            log(f"FATAL: {exc}")
        finally:
            for t in targets:
                if isinstance(t, EmpathTarget):
                    t.kill()
            postfix.stop()

    summaries = [summarise(label, rs, p.messages) for label, rs in rounds.items()]
    base = next((s.median_rate for s in summaries if s.target == "postfix"), None)
    for s in summaries:
        if base and s.median_rate is not None:
            s.ratio_vs_postfix = s.median_rate / base
    print(render(meta, summaries, latency))

    stored_ok = all(s.stored_ok for s in summaries) and all(
        lp.stored is None or lp.stored["ok"] for lp in latency
    )
    all_ok = (
        not interrupted
        and fatal is None
        and stored_ok
        and all(s.rounds_ok == s.rounds for s in summaries)
        and all(lp.error is None and lp.errors == 0 for lp in latency)
    )
    result = {
        **meta,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_end": loadavg(),
        "interrupted": interrupted,
        "fatal": fatal,
        "all_ok": all_ok,
        "summary": [asdict(s) for s in summaries],
        "rounds": [asdict(r) for rs in rounds.values() for r in rs],
        "latency": [asdict(lp) for lp in latency],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {json_path}")
    if not stored_ok:
        print("\n!!! SOME ACCEPTED MESSAGES WERE NOT FOUND IN THE QUEUE -- see 'stored' !!!")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
