#!/usr/bin/env python3
"""How fast could a Python server accept mail durably on this machine? A reference
for accept.py's figures: the *floor* server below does only what every durable
server must — answer each command with a canned reply and commit each DATA section
the way empath's spool does (write a file in ``tmp/``, fsync, rename into ``queue/``,
fsync ``queue/``, on a pool of 16 threads) — and nothing an MTA needs: no parsing,
no policy, no envelope, no Received header, no logging, no metrics, no supervisor.

It runs under the same load as accept.py (smtp-source, a new connection per message)
in alternating rounds with empath and, as root, Postfix. The gap between the floor
and empath is what empath's own work costs per message; the floor against Postfix
bounds what an asyncio server with this commit discipline can reach here.

    sudo .venv/bin/python bench/floor.py [--processes 2] [--rounds 3] [--messages 10000]

``floor.py serve --processes N --port P --dir D`` runs the floor server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept import (  # bench scripts import their sibling
    HOST,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    EmpathTarget,
    Params,
    PostfixInstance,
    Stored,
    Target,
    ThroughputRound,
    scratch_dir,
    throughput_round,
    wait_for_greeting,
)
from common import alternate_rounds

FLOOR_PORT = 10031
_REPLIES = {
    b"EHLO": b"250-floor.bench.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    b"HELO": b"250 floor.bench.example\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}


# ---------------------------------------------------------------------------- server


def _commit(spool: Path, name: str, data: bytes, durable: bool = True) -> None:
    """empath's commit discipline (empath/spool/store.py), without its checks.
    ``durable=False`` is the same file work with no fsync: what the fsyncs cost."""
    tmp = spool / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, spool / "queue" / name)
    if not durable:
        return
    dfd = os.open(spool / "queue", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


Done = Callable[["asyncio.Future[None]"], None]


class _GroupSync:
    """Group commit: one sync call runs at a time on its own thread, and the next one
    covers every commit registered while it ran."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.waiting: list[Done] = []
        self.syncing = False

    def wait(self, done: Done) -> None:
        self.waiting.append(done)
        if not self.syncing:
            self._sync()

    def _sync(self) -> None:
        batch, self.waiting = self.waiting, []
        self.syncing = True
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self.sync)

        def synced(fut: asyncio.Future[None]) -> None:
            self.syncing = False
            for done in batch:
                done(fut)
            if self.waiting:
                self._sync()

        fut.add_done_callback(synced)


class _Journal:
    """The other discipline: one append-only file per process, every DATA section a
    length-prefixed record, and a group fdatasync. A message costs one write() on the
    event loop and a share of one fdatasync; no inode, no rename, no directory sync.
    (A spool built this way also needs records for removal and a checkpoint that moves
    long-lived messages out; neither is on the accept path.)"""

    def __init__(self, spool: Path) -> None:
        self.fd = os.open(spool / "queue" / f"journal-{os.getpid()}",
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.group = _GroupSync(lambda: os.fdatasync(self.fd))

    def commit(self, data: bytes, done: Done) -> None:
        os.write(self.fd, len(data).to_bytes(4, "big") + data)
        self.group.wait(done)


class _Files:
    """empath's files (``_commit``) on a pool of 16 threads: fsync'ed each (``files``),
    not at all (``none``), or made durable by ``then``, a group sync run after the
    rename (``syncfs``)."""

    def __init__(self, spool: Path, durable: bool, then: _GroupSync | None = None) -> None:
        self.spool, self.durable, self.then = spool, durable, then
        self.pool = concurrent.futures.ThreadPoolExecutor(16)
        self.names = itertools.count()

    def commit(self, data: bytes, done: Done) -> None:
        name = f"{os.getpid()}-{next(self.names)}.msg"
        fut = asyncio.get_running_loop().run_in_executor(
            self.pool, _commit, self.spool, name, data, self.durable)
        then = self.then
        if then is None:
            fut.add_done_callback(done)
        else:
            fut.add_done_callback(lambda f: done(f) if f.exception() else then.wait(done))


def _syncfs(spool: Path) -> _GroupSync:
    """The third durable discipline's group sync: one syncfs() of the spool's filesystem
    for every batch of renamed files — a file per message, the flush count of a
    journal. (syncfs flushes the whole filesystem, so anything else writing to it makes
    each batch slower.)"""
    fd = os.open(spool / "queue", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)  # os has no syncfs

    def sync() -> None:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return _GroupSync(sync)


class _Syncer:
    """empath's files, with the blocking part in a process of its own: the event loop
    writes and closes each file in ``tmp/`` (page cache only), and a single-threaded
    syncer child, forked per process, fsyncs each file of the batch it reads from a
    socketpair, renames it into ``queue/``, fsyncs ``queue/`` once for the batch and
    writes the names back. Same files and fsyncs as ``files``; no thread in the server,
    so no GIL hand-off between a pool and the event loop."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.names = itertools.count()
        self.waiting: dict[bytes, Done] = {}
        self.out: list[bytes] = []
        ours, theirs = socket.socketpair()
        if os.fork() == 0:
            ours.close()
            _syncer_main(theirs, spool)
            os._exit(0)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(ours.fileno(), self._read)
        self.rbuf = b""

    def commit(self, data: bytes, done: Done) -> None:
        name = f"{os.getpid()}-{next(self.names)}.msg"
        fd = os.open(self.spool / "tmp" / name,
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        key = name.encode()
        self.waiting[key] = done
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(key)

    def _flush(self) -> None:
        self.out.append(b"")
        self.sock.sendall(b"\n".join(self.out))  # names are short; the buffer takes them
        self.out = []

    def _read(self) -> None:
        self.rbuf += self.sock.recv(1 << 16)
        *names, self.rbuf = self.rbuf.split(b"\n")
        ok = self.loop.create_future()
        ok.set_result(None)
        for n in names:
            self.waiting.pop(n)(ok)


def _syncer_main(sock: socket.socket, spool: Path) -> None:
    tmp, queue = str(spool / "tmp"), str(spool / "queue")
    buf = b""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        *names, buf = (buf + data).split(b"\n")
        for n in names:
            name = n.decode()
            fd = os.open(f"{tmp}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(f"{tmp}/{name}", f"{queue}/{name}")
        dfd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        sock.sendall(b"".join(n + b"\n" for n in names))


def _committer(discipline: str, spool: Path) -> Callable[[bytes, Done], None]:
    if discipline == "syncer":
        return _Syncer(spool).commit
    if discipline == "journal":
        return _Journal(spool).commit
    if discipline == "syncfs":
        return _Files(spool, durable=False, then=_syncfs(spool)).commit
    return _Files(spool, durable=discipline == "files").commit


def journal_records(path: Path) -> int:
    data, count, at = path.read_bytes(), 0, 0
    while at + 4 <= len(data):
        at += 4 + int.from_bytes(data[at:at + 4], "big")
        count += at <= len(data)
    return count


class _Session(asyncio.Protocol):
    def __init__(self, commit: Callable[[bytes, Done], None]) -> None:
        self.commit = commit
        self.buf = b""
        self.state = "command"  # command | data | committing
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.write(b"220 floor.bench.example ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._step()

    def _step(self) -> None:
        assert self.transport is not None
        while self.state != "committing":
            if self.state == "data":
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                message, self.buf = self.buf[2:end + 2], self.buf[end + 5:]
                self.state = "committing"
                self.commit(message, self._committed)
                return
            nl = self.buf.find(b"\n")
            if nl < 0:
                return
            verb, self.buf = self.buf[:4].upper(), self.buf[nl + 1:]
            self.transport.write(_REPLIES.get(verb, b"502 5.5.2 Error\r\n"))
            if verb == b"DATA":
                self.state = "data"
                self.buf = b"\r\n" + self.buf  # the data starts after a CRLF
            elif verb == b"QUIT":
                self.transport.close()
                return

    def _committed(self, fut: asyncio.Future[None]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if fut.exception() is not None:
            self.transport.write(b"451 4.3.0 Error\r\n")
        else:
            self.transport.write(b"250 2.0.0 Ok: queued\r\n")
        self.state = "command"
        self._step()


DISCIPLINES = ("files", "journal", "syncfs", "none", "syncer")


def serve(processes: int, port: int, spool: Path, discipline: str = "files") -> None:
    for sub in ("tmp", "queue"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(1024)
    sock.setblocking(False)
    for _ in range(processes - 1):  # the others share the listening socket, as workers do
        if os.fork() == 0:
            break
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    async def main() -> None:
        commit = _committer(discipline, spool)
        server = await asyncio.get_running_loop().create_server(
            lambda: _Session(commit), sock=sock)
        await server.serve_forever()

    asyncio.run(main())


# ----------------------------------------------------------------------------- bench


class FloorTarget:
    """The floor server as one of accept.py's targets: a fresh spool every round."""

    port = FLOOR_PORT

    def __init__(self, base: Path, processes: int, discipline: str = "files") -> None:
        self.base = base
        self.processes = processes
        self.discipline = discipline
        self.label = f"floor p={processes}" + ("" if discipline == "files" else f" {discipline}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._run = 0
        self._spool = base

    def begin(self) -> int:
        self._run += 1
        self._spool = self.base / f"floor-{self.discipline}-{self._run}"  # one per target
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "serve", "--processes", str(self.processes),
             "--port", str(self.port), "--dir", str(self._spool),
             "--discipline", self.discipline],
            stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self._proc
        wait_for_greeting(self.port, READY_TIMEOUT, alive=lambda: proc.poll() is None)
        return proc.pid

    def end(self, expected: int) -> Stored:
        proc, self._proc = self._proc, None
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # The forked servers got the signal too: wait until the whole group is
            # gone, or one of them would still hold the port when the next round starts.
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        queue = self._spool / "queue"
        names = os.listdir(queue) if queue.is_dir() else []
        if self.discipline == "journal":
            return Stored(expected, sum(journal_records(queue / n) for n in names))
        return Stored(expected, len(names))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sp = argparse.ArgumentParser(prog="floor.py serve")
        sp.add_argument("serve")
        sp.add_argument("--processes", type=int, default=2)
        sp.add_argument("--port", type=int, default=FLOOR_PORT)
        sp.add_argument("--dir", type=Path, required=True)
        sp.add_argument("--discipline", choices=DISCIPLINES, default="files")
        s = sp.parse_args()
        serve(s.processes, s.port, s.dir, s.discipline)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2,
                    help="floor processes and empath workers")
    ap.add_argument("--discipline", choices=DISCIPLINES, action="append",
                    help="floor commit discipline, repeatable (default: files): files = "
                    "empath's; journal = one append-only file per process with group "
                    "fdatasync; syncfs = empath's files with no fsync and a group syncfs of "
                    "the file system; none = the files without any fsync (not durable)")
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--empath-cmd", default=f"{sys.executable} -m empath")
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--json", default=None, help="write every round here")
    a = ap.parse_args()
    p = Params(messages=a.messages, sessions=a.sessions, size=a.size,
               workers=[a.processes], rounds=a.rounds, latency_messages=0,
               latency_connections=0, empath_cmd=a.empath_cmd, standin=False,
               skip_postfix=a.skip_postfix, tmpdir=None, keep_tmp=False)
    rounds: list[ThroughputRound] = []
    with scratch_dir(p, "empath-floor-", postfix=not a.skip_postfix) as tmp:
        postfix = None if a.skip_postfix else PostfixInstance(tmp)
        targets: list[Target] = [FloorTarget(tmp, a.processes, d)
                                 for d in a.discipline or ["files"]]
        targets.append(EmpathTarget(tmp, a.empath_cmd, a.processes, standin=False))
        targets += [] if postfix is None else [postfix]
        if not alternate_rounds(targets, a.rounds, postfix,
                                lambda t, rnd: rounds.append(throughput_round(t, p, rnd))):
            return 1
    labels = [t.label for t in targets]
    rate = {lb: [r.rate for r in rounds if r.target == lb and r.rate] for lb in labels}
    cpu = {lb: [1000 * r.cpu_seconds / a.messages for r in rounds
                if r.target == lb and r.cpu_seconds is not None] for lb in labels}
    base = statistics.median(rate["postfix"]) if rate.get("postfix") else None
    print(f"\ndurable accept, {a.messages} msgs x {a.size} B, {a.sessions} sessions, new "
          f"connection per message, {a.rounds} rounds; 1-min load {os.getloadavg()[0]:.2f} "
          "at the end")
    print(f"{'target':<22} {'median msg/s':>12} {'min-max':>13} {'vs postfix':>10} "
          f"{'CPU ms/msg':>10}")
    for lb in labels:
        if not rate[lb]:
            print(f"{lb:<22} {'failed':>12}")
            continue
        med = statistics.median(rate[lb])
        ratio = f"{med / base:.2f}x" if base else "-"
        c = f"{statistics.median(cpu[lb]):.2f}" if cpu[lb] else "-"
        print(f"{lb:<22} {med:12.1f} {min(rate[lb]):6.0f}-{max(rate[lb]):<6.0f} {ratio:>10} "
              f"{c:>10}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rates": rate, "cpu_ms_per_msg": cpu}, indent=2))
    ok = all(r.ok and (r.stored or {}).get("ok", True) for r in rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
