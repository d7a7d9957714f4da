"""The durable spool: the on-disk queue of accepted messages.

Layout under ``root`` (normally ``<state_dir>/spool``)::

    tmp/<id>.msg, tmp/<id>.env*   being written; never acknowledged; wiped at recovery
    queue/<id>.msg                one file per message: the data exactly as it will be
                                  delivered, then the envelope as received (one JSON
                                  line), then a trailer giving that line's length
    queue/<id>.env                the envelope as it is now (JSON), once delivery has
                                  changed it; it takes precedence over the trailer
    quarantine/                   damaged entries moved aside by recovery

A message exists while ``queue/<id>.msg`` does; its data is the first
``envelope.size`` octets of it. One file per message is one inode, one fsync and one
rename at commit (the work Postfix does per message too); the envelope changes only
when delivery tries recipients, and then ``<id>.env`` is written beside it.
Spools written before this layout (``.msg`` with data only, beside an ``.env``) are
read as they are: no trailer, and the ``.env`` says everything.

Durability contract of ``commit``: when it returns, the file has been written,
fsync'ed, renamed into ``queue/`` and ``queue/`` itself fsync'ed, in that order. Only
then may the SMTP layer answer 250. Removal unlinks ``.msg`` first (the message stops
existing), then ``.env``: the other order could bring the message back with its
original envelope, all recipients pending, after a crash in between.

Performance: in an SMTP worker (``Spool(syncer=True)``) the fsyncs and renames run
in a process of its own, the syncer (empath/spool/syncer.py): the event loop writes and
closes the file in ``tmp/`` (page cache only), sends the id, and the syncer fsyncs the
file, renames it, fsyncs ``queue/`` once for every id it read in one go, and answers.
On a thread pool instead, each of those blocking calls would give the GIL up and take
it back from the busy event loop — a futex hand-off per syscall — and under load that
costs more CPU than the calls themselves (bench/README.md, ``floor.py``). Elsewhere
(the supervisor, tools, tests) the file work runs on a thread pool owned by the
spool, so fsyncs never block the event loop and concurrent fsyncs overlap. A message
that fits the writer's buffer is not even created before commit: its whole file life
(create, write, fsync, rename) is the commit job. The fsync of ``queue/`` is shared by
group commit, kept by the event loop: every commit whose rename is done waits for one
directory sync that *started after* its rename; syncs run one at a time (a job on the
pool), and the next one covers everybody who renamed while the current one ran.
Bookkeeping on the loop costs a future per message; the same on the pool's threads cost
a lock convoy — every thread woken in turn to find its rename already covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

from empath.spool.envelope import CorruptEnvelope, Envelope
from empath.spool.fanout import fork_map, split
from empath.spool.ids import is_message_id, new_message_id

__all__ = [
    "ENVELOPE_TRAILER", "RecoveryReport", "Spool", "SpoolError", "SpoolWriter", "open_message",
]

log = logging.getLogger("empath.spool")

_T = TypeVar("_T")

DIR_MODE = 0o700
FILE_MODE = 0o600
# Data is buffered in memory up to this size before an os.write: few syscalls for
# the many small chunks a DATA phase arrives in, bounded memory per session.
WRITE_BUFFER = 64 * 1024
DEFAULT_THREADS = 16
# Recovery gives a process of its own only to this many queue entries or more: below,
# a fork costs more than it saves.
RECOVERY_CHUNK = 2000

# After the data and the envelope line in a queue file: that line's length
# (``ENVELOPE_TRAILER % len(line)``).
ENVELOPE_TRAILER = b"empath-envelope %010d\n"
_TRAILER_SIZE = len(ENVELOPE_TRAILER % 0)
_TRAILER_RE = re.compile(rb"empath-envelope (\d{10})\n")
_TAIL_READ = 4096  # octets read from the end of a queue file to find its envelope

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class SpoolError(OSError):
    """The spool could not do what was asked; nothing partial was left behind.

    An OSError, so ``errno`` (ENOSPC, EIO, …) tells the SMTP layer which 4xx to send.
    """


@dataclass
class RecoveryReport:
    ids: list[str]  # committed messages, sorted (oldest first)
    removed_tmp: int  # entries removed from tmp/
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (id or name, reason)
    # The envelopes read while checking (or what recover's ``digest`` made of them), by
    # id: the queue takes them from here rather than reading every file a second time
    # (and empties this as it goes).
    envelopes: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# The syscalls whose order is the durability contract go through these wrappers, so
# tests can record (or fail) them without patching the os module for everybody.
def _fsync(fd: int) -> None:
    os.fsync(fd)


def _rename(src: str | Path, dst: str | Path) -> None:
    os.rename(src, dst)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # cannot happen for regular files; don't spin if it does
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def _finish_file(writer: SpoolWriter, env_bytes: bytes) -> None:
    """Write what is buffered, then the envelope line and its trailer (no fsync)."""
    writer._open()
    buf = writer._buf
    buf += env_bytes
    buf += ENVELOPE_TRAILER % len(env_bytes)
    _write_all(writer._fd, buf)
    buf.clear()


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _spool_error(exc: BaseException, what: str) -> SpoolError:
    if isinstance(exc, OSError) and exc.errno is not None:
        return SpoolError(exc.errno, f"{what}: {exc.strerror}", exc.filename)
    return SpoolError(errno.EIO, f"{what}: {exc}")


def _read_trailer(fd: int, file_size: int) -> tuple[int, bytes] | None:
    """(data size, envelope line) of a queue file that ends in a trailer, else None
    (a file of the older layout: data only)."""
    if file_size < _TRAILER_SIZE:
        return None
    # One read for the trailer and, nearly always, the envelope line before it: at
    # recovery this runs for every message in the spool.
    tail_size = min(file_size, _TAIL_READ)
    tail = os.pread(fd, tail_size, file_size - tail_size)
    if len(tail) != tail_size:
        return None
    m = _TRAILER_RE.fullmatch(tail, tail_size - _TRAILER_SIZE)
    if m is None:
        return None
    length = int(m.group(1))
    start = file_size - _TRAILER_SIZE - length
    if start < 0:
        return None
    if length <= tail_size - _TRAILER_SIZE:
        end = tail_size - _TRAILER_SIZE
        return start, tail[end - length: end]
    line = os.pread(fd, length, start)
    return (start, line) if len(line) == length else None


class _Limited(io.RawIOBase):
    """The first ``size`` octets of an open file: a message's data, not what follows."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.pread(self._fd, n, self._pos)
        buffer[: len(got)] = got
        self._pos += len(got)
        return len(got)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        super().close()


def open_message(path: str | Path, size: int | None = None) -> BinaryIO:
    """Open a queued message's data for reading: the first ``size`` octets of the file
    (the envelope's ``size``), or all of it when ``size`` is None (a plain file)."""
    fd = os.open(path, _READ_FLAGS)
    if size is None:
        return os.fdopen(fd, "rb")
    try:
        raw = _Limited(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(raw, 64 * 1024)  # type: ignore[return-value]


class SpoolWriter:
    """A message being received: append with ``write``, then ``Spool.commit`` or ``abort``.

    Usable as a context manager that aborts unless the message was committed.
    """

    def __init__(self, spool: Spool, id: str) -> None:
        self.id = id
        self.size = 0
        self._spool = spool
        # The tmp file is created by the first flush: a message that fits the buffer
        # (most do) touches the disk only in the commit job, off the event loop —
        # creating a file can wait on the directory's lock for as long as another
        # commit's rename and directory fsync hold it.
        self._fd = -1
        self._created = False  # tmp/<id>.msg is ours to unlink
        self._buf = bytearray()
        self._state = "open"  # open | failed | committing | committed | aborted
        self.path = spool.tmp_dir / f"{id}.msg"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. Raises OSError (ENOSPC, EIO, …); then only abort() is useful."""
        if self._state != "open":
            raise ValueError(f"spool writer {self.id} is {self._state}")
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        """Write the buffer out, creating the tmp file first if need be."""
        try:
            self._open()
            _write_all(self._fd, self._buf)
        except BaseException:
            self._state = "failed"
            raise
        self._buf.clear()

    def _open(self) -> None:
        if self._fd >= 0:
            return
        # O_EXCL|O_NOFOLLOW: never write through anything already at that name,
        # not even a symlink planted there (and then it is not ours to unlink).
        self._fd = os.open(self.path, _CREATE_FLAGS, FILE_MODE)
        self._created = True

    def abort(self) -> None:
        """Close and unlink the temporary file. Idempotent; never raises.

        A no-op once ``commit`` has started: the commit then owns the files and either
        completes or unwinds them itself, even if its caller was cancelled.
        """
        if self._state in ("committing", "committed", "aborted"):
            return
        self._state = "aborted"
        self._buf = bytearray()
        self._close()
        self._unlink()

    def _unlink(self) -> None:
        if self._created:
            self._created = False
            _unlink_quietly(self.path)

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class _SyncerGone(SpoolError):
    """The syncer exited with ids outstanding: what became of their files is unknown."""


class _Syncer:
    """The event loop's side of empath/spool/syncer.py: ids go out in one write per
    loop turn, answers come back through a reader callback, a future per id. Started on
    first use; a syncer that died is started again by the next commit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._out = bytearray()
        self._in = b""
        self._writing = False

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "empath.spool.syncer", str(theirs.fileno()),
                 str(self.root)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock, self._loop = ours, loop
        loop.add_reader(ours.fileno(), self._readable)

    def ensure_started(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._stop()  # left by a loop that has closed (tests run several)
        if self._sock is None:
            self._start(loop)
        return loop

    def sync(self, id: str) -> asyncio.Future[None]:
        """Done once ``tmp/<id>.msg`` is fsync'ed, renamed into ``queue/`` and ``queue/``
        fsync'ed; fails with SpoolError (nothing left of the message) or _SyncerGone."""
        loop = self.ensure_started()
        fut = loop.create_future()
        self._waiting[id] = fut
        if not self._out:
            loop.call_soon(self._flush)
        self._out += id.encode("ascii") + b"\n"
        return fut

    def _flush(self) -> None:
        sock = self._sock
        if sock is None or not self._out:
            return
        try:
            n = sock.send(self._out)
        except BlockingIOError:
            n = 0
        except OSError:
            self._gone()
            return
        del self._out[:n]
        if self._out and not self._writing and self._loop is not None:
            self._writing = True  # the socket is full: go on when it takes more
            self._loop.add_writer(sock.fileno(), self._writable)

    def _writable(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_writer(self._sock.fileno())
        self._writing = False
        self._flush()

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._gone()
            return
        *lines, self._in = (self._in + data).split(b"\n")
        for line in lines:
            id, _, rest = line.decode("ascii", "replace").partition(" ")
            err, _, text = rest.partition(" ")
            fut = self._waiting.pop(id, None)
            if fut is None or fut.done():
                continue
            if err == "0":
                fut.set_result(None)
            else:
                fut.set_exception(SpoolError(int(err) if err.isdigit() else errno.EIO, text))

    def _gone(self) -> None:
        self._stop()
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(_SyncerGone(errno.EIO, "the spool syncer exited"))

    def _stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
                if self._writing:
                    self._loop.remove_writer(sock.fileno())
            self._writing = False
            sock.close()  # the syncer sees EOF and exits
        self._out.clear()
        self._in = b""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # stuck in an fsync of a dead disk
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self._stop()


class Spool:
    def __init__(self, root: Path, *, threads: int = DEFAULT_THREADS,
                 syncer: bool = False) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.queue_dir = self.root / "queue"
        self.quarantine_dir = self.root / "quarantine"
        # File work (write, fsync, rename) of concurrent commits runs here in
        # parallel. Threads are only started on first use.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="empath-spool")
        # Group commit of queue/ (event loop side): who waits for the next fsync of
        # the directory, and the one running, if any.
        self._dir_waiters: list[asyncio.Future[None]] = []
        self._dir_sync: asyncio.Future[None] | None = None
        # Ids renamed into queue/ whose commit has not returned: not yet promised to
        # anyone, and possibly undone, so ids() does not list them.
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._free, self._free_at = 0, float("-inf")
        # syncer=True (the SMTP workers): commits are made durable by a process of
        # their own (empath/spool/syncer.py) instead of the pool.
        self._syncer = _Syncer(self.root) if syncer else None

    # -- setup ---------------------------------------------------------------

    def start_syncer(self) -> None:
        """Start the syncer process now (``syncer=True``; on the running loop), so that
        the first messages do not wait for an interpreter to start: every session
        committing meanwhile would (about 0.1 s here; 1% of a latency run's messages).
        A syncer that cannot start is started again by the next commit."""
        if self._syncer is not None:
            try:
                self._syncer.ensure_started()
            except OSError as exc:
                log.error("spool: cannot start the syncer: %s", exc)

    def prepare(self) -> None:
        """Create root, tmp/, queue/ and quarantine/ (0700) if missing; check they are dirs."""
        created = False
        for d in (self.root, self.tmp_dir, self.queue_dir, self.quarantine_dir):
            try:
                os.mkdir(d, DIR_MODE)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise _spool_error(exc, f"cannot create {d}") from exc
            try:
                st = os.lstat(d)
                if not stat.S_ISDIR(st.st_mode):  # a symlink or file where a dir belongs
                    raise SpoolError(errno.ENOTDIR, f"{d} is not a directory", str(d))
                if stat.S_IMODE(st.st_mode) != DIR_MODE:  # mkdir's mode is cut by umask
                    os.chmod(d, DIR_MODE)
            except SpoolError:
                raise
            except OSError as exc:
                raise _spool_error(exc, f"cannot use {d}") from exc
        if created:
            # Make the new directory entries themselves durable.
            try:
                for d in (self.root.parent, self.root):
                    self._sync_dir(d)
            except OSError as exc:
                raise _spool_error(exc, f"cannot sync {self.root}") from exc

    def close(self) -> None:
        """Stop the worker threads (waits for running file work) and the syncer."""
        if self._syncer is not None:
            self._syncer.close()
        self._pool.shutdown(wait=True)

    # -- writing -------------------------------------------------------------

    def create(self) -> SpoolWriter:
        """Start a new message with a fresh id. No syscall: its exclusive, 0600
        tmp/<id>.msg is made when the data outgrows the buffer, or at commit."""
        return SpoolWriter(self, new_message_id())

    async def commit(self, writer: SpoolWriter, envelope: Envelope) -> None:
        """Make the message durable; see the module docstring for the exact contract.

        Sets ``envelope.size``. Raises SpoolError if anything fails, and then no file
        of the message is left. If the awaiting task is cancelled, the commit still
        runs to completion (or unwinds) in the background, so the message may end up
        queued without the caller knowing — like a 250 lost on the wire.
        """
        if writer._spool is not self:
            raise ValueError("writer belongs to another spool")
        if writer._state != "open":
            writer.abort()
            raise SpoolError(errno.EIO, f"message {writer.id} cannot be committed: {writer._state}")
        if envelope.id != writer.id:
            writer.abort()
            raise ValueError(f"envelope id {envelope.id!r} is not the writer's {writer.id!r}")
        envelope.size = writer.size
        try:
            env_bytes = envelope.to_bytes()
        except ValueError as exc:
            writer.abort()
            raise SpoolError(errno.EINVAL, f"message {writer.id}: {exc}") from exc
        writer._state = "committing"
        task = asyncio.ensure_future(self._commit(writer, env_bytes))
        # Keep a reference (the loop only holds weak ones) and collect the outcome
        # if nobody is left to await it.
        self._tasks.add(task)
        task.add_done_callback(self._commit_done)
        await asyncio.shield(task)

    def _commit_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Reported to the caller if it still awaits; logged for the cancelled case.
            log.debug("spool commit failed: %s", task.exception())

    async def _commit(self, writer: SpoolWriter, env_bytes: bytes) -> None:
        id = writer.id
        self._inflight.add(id)
        try:
            if self._syncer is not None:
                await self._commit_by_syncer(self._syncer, writer, env_bytes)
            else:
                await self._commit_by_pool(writer, env_bytes)
        finally:
            self._inflight.discard(id)

    async def _commit_by_pool(self, writer: SpoolWriter, env_bytes: bytes) -> None:
        """The file work as one job on the pool, then the group fsync of queue/."""
        id = writer.id
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._write_entry, writer, env_bytes)
        except Exception as exc:
            # _write_entry undid its own work; this also covers it never having run
            # (pool shut down).
            writer._state = "aborted"
            writer._close()
            writer._unlink()
            raise _spool_error(exc, f"cannot commit message {id}") from exc
        try:
            await self._queue_dir_synced()
        except Exception as exc:
            # The name may or may not be durable; the client will get a 4xx and
            # retry, so take the message back out rather than deliver it twice.
            writer._state = "aborted"
            await loop.run_in_executor(self._pool, self._unlink_committed, id)
            raise _spool_error(exc, f"cannot sync queue for message {id}") from exc
        writer._state = "committed"

    async def _commit_by_syncer(self, syncer: _Syncer, writer: SpoolWriter,
                                env_bytes: bytes) -> None:
        """Write the rest of the file here (page cache only), then let the syncer do
        fsync, rename and the directory fsync."""
        id = writer.id
        try:
            _finish_file(writer, env_bytes)
            writer._close()
        except OSError as exc:
            writer._state = "aborted"
            writer._close()
            writer._unlink()
            raise _spool_error(exc, f"cannot commit message {id}") from exc
        writer._created = False  # the syncer's now: it renames or removes it
        try:
            await syncer.sync(id)
        except _SyncerGone as exc:
            # It may have renamed the file, and queue/ may or may not have been synced:
            # take the message back out, as when a directory sync fails.
            writer._state = "aborted"
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self._unlink_uncommitted, id)
            raise _spool_error(exc, f"cannot commit message {id}") from exc
        except Exception as exc:
            writer._state = "aborted"
            raise _spool_error(exc, f"cannot commit message {id}") from exc
        writer._state = "committed"

    def _unlink_uncommitted(self, id: str) -> None:
        _unlink_quietly(self.tmp_dir / f"{id}.msg")
        self._unlink_committed(id)

    def _write_entry(self, writer: SpoolWriter, env_bytes: bytes) -> None:
        """Thread: finish the data, append envelope and trailer, fsync, rename. Undo
        on error."""
        tmp_msg = writer.path
        q_msg = self.queue_dir / f"{writer.id}.msg"
        renamed = False
        try:
            _finish_file(writer, env_bytes)
            # fsync before rename: a name must never become durable before the bytes
            # it names.
            _fsync(writer._fd)
            writer._close()
            _rename(tmp_msg, q_msg)
            renamed = True
            writer._created = False
        except BaseException:
            writer._close()
            if renamed:
                _unlink_quietly(q_msg)
            else:
                writer._unlink()
            raise

    def _unlink_committed(self, id: str) -> None:
        _unlink_quietly(self.queue_dir / f"{id}.msg")
        _unlink_quietly(self.queue_dir / f"{id}.env")
        with contextlib.suppress(OSError):
            self._sync_dir(self.queue_dir)

    # -- group commit of the queue directory (event loop) --------------------

    def _queue_dir_synced(self) -> asyncio.Future[None]:
        """Done once an fsync of queue/ that started after this call has succeeded;
        call it when the change to queue/ (rename, unlink) has been made.

        A failed sync fails everybody it was to cover: the next one may well succeed
        (the kernel reports a writeback error once) without the lost change being on
        disk."""
        loop = asyncio.get_running_loop()
        if self._dir_sync is not None and self._dir_sync.get_loop() is not loop:
            # Left running by a loop that has since closed: it never calls back.
            self._dir_sync, self._dir_waiters = None, []
        waiter = loop.create_future()
        self._dir_waiters.append(waiter)
        if self._dir_sync is None:
            self._start_dir_sync(loop)
        return waiter

    def _start_dir_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._dir_waiters = self._dir_waiters, []
        sync = self._dir_sync = loop.run_in_executor(self._pool, self._sync_dir, self.queue_dir)

        def synced(sync: asyncio.Future[None]) -> None:
            self._dir_sync = None
            exc: BaseException | None = (
                SpoolError(errno.EIO, "directory sync cancelled") if sync.cancelled()
                else sync.exception())
            for waiter in batch:
                if waiter.done():  # its commit was cancelled (loop shutting down)
                    continue
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
            if self._dir_waiters:
                self._start_dir_sync(loop)

        sync.add_done_callback(synced)

    @staticmethod
    def _sync_dir(path: str | Path) -> None:
        fd = os.open(path, _DIR_FLAGS)
        try:
            _fsync(fd)
        finally:
            os.close(fd)

    # -- reading and changing committed messages ----------------------------

    def _paths(self, id: str) -> tuple[str, str]:
        if not is_message_id(id):
            raise ValueError(f"not a message id: {id!r}")
        # Plain strings: these are made for every load, delivery and removal, and a
        # Path object costs more than the os call it is for.
        base = f"{self.queue_dir}/{id}"
        return base + ".msg", base + ".env"

    def ids(self) -> list[str]:
        """Committed message ids, oldest first."""
        ids = []
        with os.scandir(self.queue_dir) as it:
            for entry in it:
                stem, dot, ext = entry.name.partition(".")
                if dot and ext == "msg" and is_message_id(stem) and stem not in self._inflight:
                    ids.append(stem)
        ids.sort()
        return ids

    def load(self, id: str) -> Envelope:
        """Read an envelope. FileNotFoundError if absent, CorruptEnvelope if damaged."""
        msg_path, env_path = self._paths(id)
        try:
            raw = _read_file(env_path)  # changed since it was received
            where = env_path
        except FileNotFoundError:
            _, found = _layout(msg_path)  # FileNotFoundError: no such message
            if found is None:
                raise CorruptEnvelope(f"{msg_path} has no envelope") from None
            raw, where = found[1], msg_path
        env = Envelope.from_bytes(raw)
        if env.id != id:
            raise CorruptEnvelope(f"envelope in {where} holds id {env.id}")
        return env

    def data_path(self, id: str) -> Path:
        """The file a message's data is the first ``envelope.size`` octets of (see
        ``open_message``)."""
        return Path(self._paths(id)[0])

    def open_data(self, id: str, size: int | None = None) -> BinaryIO:
        """Open a message's data for reading, ``size`` octets (the envelope's; read
        from it when not given)."""
        if size is None:
            size = self.load(id).size
        return open_message(self._paths(id)[0], size)

    def update(self, envelope: Envelope) -> None:
        """Atomically replace a committed message's envelope (blocking: fsyncs)."""
        env_path = self._prepare_update(envelope)
        self._replace_env(envelope.id, envelope.to_bytes(), env_path)
        self._sync_dir(self.queue_dir)

    async def update_async(self, envelope: Envelope) -> None:
        """``update`` for event-loop callers: file work in the pool, shared dir sync."""
        env_path = self._prepare_update(envelope)
        data = envelope.to_bytes()
        await self._run(self._replace_env, envelope.id, data, env_path)
        await self._queue_dir_synced()

    def _prepare_update(self, envelope: Envelope) -> str:
        msg_path, env_path = self._paths(envelope.id)
        # Refuse what recovery would quarantine, and never resurrect a removed message.
        if not os.path.lexists(msg_path):
            raise FileNotFoundError(errno.ENOENT, "no such message", str(msg_path))
        size, _ = _layout(msg_path)
        if envelope.size != size:
            raise ValueError(f"envelope size {envelope.size} != data size {size}")
        return env_path

    def _replace_env(self, id: str, data: bytes, env_path: str) -> None:
        tmp = self.tmp_dir / f"{id}.env.{secrets.token_hex(8)}"
        fd = os.open(tmp, _CREATE_FLAGS, FILE_MODE)
        try:
            try:
                _write_all(fd, data)
                _fsync(fd)
            finally:
                os.close(fd)
            _rename(tmp, env_path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def remove(self, id: str) -> None:
        """Delete a message: its file first (it stops existing), then a changed
        envelope if there is one, then sync."""
        self._remove_files(id)
        self._sync_dir(self.queue_dir)

    async def remove_async(self, id: str) -> None:
        """``remove`` for event-loop callers: file work in the pool, shared dir sync."""
        self._paths(id)
        await self._run(self._remove_files, id)
        await self._queue_dir_synced()

    def _remove_files(self, id: str) -> None:
        msg_path, env_path = self._paths(id)
        os.unlink(msg_path)  # FileNotFoundError: no such message
        with contextlib.suppress(FileNotFoundError):
            os.unlink(env_path)

    def free_space(self, max_age: float = 0.0) -> int:
        """Bytes available to an unprivileged writer on the spool's filesystem, as
        measured at most ``max_age`` seconds ago (0: now)."""
        now = time.monotonic()
        if max_age <= 0 or now - self._free_at > max_age:
            st = os.statvfs(self.root)
            self._free, self._free_at = st.f_bavail * st.f_frsize, now
        return self._free

    def probe_writable(self, min_free: int = 0) -> str | None:
        """None if a message could be spooled now, else why not (for ``/readyz``).

        Really creates, writes and removes a file in tmp/ — the way a message starts —
        so a read-only remount, an immutable directory, lost permissions or a full
        disk all show; a leftover probe is removed by the next recovery.
        """
        path = self.tmp_dir / f".probe-{secrets.token_hex(6)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, b"probe\n")
            finally:
                os.close(fd)
            os.unlink(path)
        except OSError as exc:
            _unlink_quietly(path)
            return f"spool {self.tmp_dir} is not writable: {exc.strerror}"
        try:
            free = self.free_space()
        except OSError as exc:
            return f"spool {self.root}: cannot read free space: {exc.strerror}"
        if free < min_free:
            return (f"spool {self.root} has {free} bytes free, below "
                    f"limits.min_free_space ({min_free}); MAIL is refused with 452")
        return None

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- recovery ------------------------------------------------------------

    def recover(self, processes: int = 1,
                digest: Callable[[Envelope], object] | None = None) -> RecoveryReport:
        """Clean up after a crash; run once at start before anything accepts mail.

        Empties tmp/, moves every incomplete or damaged queue entry to quarantine/
        (logging a warning for each), and returns the committed ids. Bad entries never
        raise; SpoolError is raised only when the directories themselves fail.

        The entries are checked by up to ``processes`` processes (forked, see
        empath.spool.fanout; only before any thread exists), a chunk of at least
        RECOVERY_CHUNK ids each. ``digest`` turns each good envelope into what the
        report keeps of it (``report.envelopes``): what the caller needs, small to pass
        back from a child and to hold for a whole spool at once.
        """
        try:
            return self._recover(processes, digest)
        except SpoolError:
            raise
        except OSError as exc:
            raise _spool_error(exc, f"cannot recover spool {self.root}") from exc

    def _recover(self, processes: int,
                 digest: Callable[[Envelope], object] | None) -> RecoveryReport:
        quarantined: list[tuple[str, str]] = []
        removed_tmp = 0
        with os.scandir(self.tmp_dir) as it:
            tmp_entries = list(it)
        for entry in tmp_entries:
            if entry.is_dir(follow_symlinks=False):
                # Nothing we write is a directory; don't rmtree what we don't know.
                reason = "unexpected directory in tmp/"
                self._quarantine(self.tmp_dir, entry.name)
                quarantined.append((entry.name, reason))
                log.warning("spool: quarantined %s: %s", entry.name, reason)
            else:
                os.unlink(entry.path)
                removed_tmp += 1
        if tmp_entries:
            self._sync_dir(self.tmp_dir)

        with os.scandir(self.queue_dir) as it:
            names = {e.name: e.is_file(follow_symlinks=False) for e in it}
        pairs: dict[str, set[str]] = {}
        for name, regular in names.items():
            stem, dot, ext = name.partition(".")
            if dot and ext in ("msg", "env") and is_message_id(stem) and regular:
                pairs.setdefault(stem, set()).add(ext)
            else:
                reason = "unexpected file name" if regular else "not a regular file"
                self._quarantine(self.queue_dir, name)
                quarantined.append((name, reason))
                extra = {"QUEUE_ID": stem} if is_message_id(stem) else None
                log.warning("spool: quarantined %s: %s", name, reason, extra=extra)

        leftovers = False
        candidates: list[str] = []
        for id in sorted(pairs):
            if pairs[id] == {"env"}:
                # The changed envelope of a message whose file is gone: a removal
                # interrupted between its two unlinks (or a file deleted by hand).
                os.unlink(self.queue_dir / f"{id}.env")
                leftovers = True
                log.info("spool: removed the envelope of removed message %s", id,
                         extra={"QUEUE_ID": id})
            else:
                candidates.append(id)

        def check(chunk: Sequence[str]) -> tuple[dict[str, str], dict[str, object]]:
            problems: dict[str, str] = {}
            good: dict[str, object] = {}
            for id in chunk:
                problem = self._check_entry(id, pairs[id], good, digest)
                if problem is not None:
                    problems[id] = problem
            return problems, good

        problems: dict[str, str] = {}
        envelopes: dict[str, object] = {}
        for found_problems, found_good in fork_map(
                check, split(candidates, processes, RECOVERY_CHUNK)):
            problems.update(found_problems)
            envelopes.update(found_good)
        ids: list[str] = []
        for id in candidates:
            problem = problems.get(id)
            if problem is None:
                ids.append(id)
                continue
            for ext in sorted(pairs[id]):
                self._quarantine(self.queue_dir, f"{id}.{ext}")
            quarantined.append((id, problem))
            log.warning("spool: quarantined message %s: %s", id, problem, extra={"QUEUE_ID": id})

        if quarantined:
            self._sync_dir(self.quarantine_dir)
        if quarantined or leftovers:
            self._sync_dir(self.queue_dir)
        return RecoveryReport(ids=ids, removed_tmp=removed_tmp, quarantined=quarantined,
                              envelopes=envelopes)

    def _check_entry(self, id: str, exts: set[str], good: dict[str, object],
                     digest: Callable[[Envelope], object] | None) -> str | None:
        """Why the queue entry ``id`` is not a complete message, or None if it is (and
        then its envelope, or what ``digest`` makes of it, is in ``good``)."""
        msg_path, env_path = self._paths(id)
        try:
            size, found = _layout(msg_path)
        except OSError as exc:
            return f"unreadable data: {exc.strerror}"
        try:
            if "env" in exts:
                env = Envelope.from_bytes(_read_file(env_path))
            elif found is None:
                return "data without envelope"
            else:
                env = Envelope.from_bytes(found[1])
        except CorruptEnvelope as exc:
            return f"corrupt envelope: {exc}"
        except OSError as exc:
            return f"unreadable envelope: {exc.strerror}"
        if env.id != id:
            return f"envelope holds id {env.id}"
        if size != env.size:
            return f"size mismatch: envelope says {env.size}, data is {size}"
        good[id] = env if digest is None else digest(env)
        return None

    def _quarantine(self, src_dir: Path, name: str) -> None:
        """Move src_dir/name into quarantine/, keeping the name (plus .N if taken)."""
        dst = self.quarantine_dir / name
        n = 0
        while os.path.lexists(dst):
            n += 1
            dst = self.quarantine_dir / f"{name}.{n}"
        _rename(src_dir / name, dst)


def _layout(msg_path: str | Path) -> tuple[int, tuple[int, bytes] | None]:
    """(data size, trailer's (data size, envelope line) or None) of a queue file."""
    fd = os.open(msg_path, _READ_FLAGS)
    try:
        file_size = os.fstat(fd).st_size
        found = _read_trailer(fd, file_size)
    finally:
        os.close(fd)
    return (file_size if found is None else found[0]), found


def _read_file(path: str | Path) -> bytes:
    fd = os.open(path, _READ_FLAGS)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
