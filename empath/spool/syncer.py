"""The spool's fsyncs, in a process of their own (one per SMTP worker).

Why a process: a worker's event loop serves every session of that worker, and in
CPython each blocking call made on a pool thread (open, write, fsync, close, rename)
gives the GIL up and must take it back from that busy loop. Under load that is a
hand-off per syscall — dozens of futex calls and context switches per message, and an
event loop that waits on its own threads. The syncer has no event loop to starve: the
worker writes the file into ``tmp/`` itself (page cache only, on the loop), and sends
its id here; this process fsyncs it, renames it into ``queue/``, fsyncs ``queue/`` once
for every id it took in the same read, and answers each id. The order of the durability
contract is unchanged (empath/spool/store.py): fsync(file) < rename < fsync(queue/) <
answer, and only the answer lets the worker say 250.

Protocol over a Unix stream socket, one line per id, in both directions:
  worker → syncer   ``<id>\\n``: ``tmp/<id>.msg`` is written and closed; make it durable
  syncer → worker   ``<id> 0\\n`` (durable in ``queue/``) or ``<id> <errno> <text>\\n``
                    (failed, and nothing of it is left in ``tmp/`` or ``queue/``)

The syncer exits when the worker's end of the socket closes (the worker stopped or
died); SIGTERM, SIGINT and SIGHUP are ignored so that a stop signal sent to the whole
process group cannot fail the commits the worker is still draining.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from empath.spool import store
from empath.spool.ids import is_message_id

__all__ = ["serve"]

# fsyncs of different files run at once: the filesystem's journal commits them together
# (ext4's jbd2 joins concurrent fsyncs into one transaction), where one after the other
# each waits for a commit of its own and the last of a batch waits for all of them.
# Threads, not more processes: this process has no event loop whose GIL they could
# starve; the main thread only waits for them.
SYNC_THREADS = 8


def _sync_one(tmp: str, queue: str, id: str) -> tuple[str | None, int, str]:
    """fsync and rename one message; returns (queue path or None, errno, text)."""
    src, dst = f"{tmp}/{id}.msg", f"{queue}/{id}.msg"
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            store._fsync(fd)  # a name must never become durable before its bytes
        finally:
            os.close(fd)
        store._rename(src, dst)
    except OSError as exc:
        store._unlink_quietly(src)
        return None, exc.errno or errno.EIO, exc.strerror or str(exc)
    return dst, 0, ""


def _batch(tmp: str, queue: str, ids: list[str], pool: ThreadPoolExecutor) -> bytes:
    results: list[tuple[str, int, str]] = []
    renamed: list[tuple[str, str]] = []
    valid = [id for id in ids if is_message_id(id)]
    # A lone id (most batches under light load) is synced here: a thread hop buys nothing.
    run = map if len(valid) < 2 else pool.map
    done = dict(zip(valid, run(functools.partial(_sync_one, tmp, queue), valid), strict=True))
    for id in ids:
        if id not in done:
            results.append((id, errno.EINVAL, "not a message id"))
            continue
        path, err, text = done[id]
        results.append((id, err, text))
        if path is not None:
            renamed.append((id, path))
    if renamed:
        try:
            store.Spool._sync_dir(queue)
        except OSError as exc:
            # The names may or may not be durable: take the messages back out (their
            # clients get a 4xx and send again) rather than deliver them twice.
            for _, path in renamed:
                store._unlink_quietly(path)
            with contextlib.suppress(OSError):
                store.Spool._sync_dir(queue)
            failed = {id for id, _ in renamed}
            err = exc.errno or errno.EIO
            text = f"cannot sync {queue}: {exc.strerror or exc}"
            results = [(id, err, text) if id in failed else (id, e, t)
                       for id, e, t in results]
    return b"".join(
        f"{id} {err} {text}\n".encode() if err else f"{id} 0\n".encode()
        for id, err, text in results)


def serve(sock: socket.socket, root: str) -> None:
    """Answer the worker on ``sock`` until it closes its end."""
    tmp, queue = f"{root}/tmp", f"{root}/queue"
    pending = b""
    with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fsync") as pool:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return
            # Every id that arrived in this read shares one fsync of queue/: the ids a
            # worker sends while the previous batch syncs are the next batch.
            *lines, pending = (pending + data).split(b"\n")
            ids = [line.decode("ascii", "replace") for line in lines if line]
            if ids:
                sock.sendall(_batch(tmp, queue, ids, pool))


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    fd, root = int(sys.argv[1]), sys.argv[2]
    # A ConnectionError: the worker is gone, as at EOF.
    with socket.socket(fileno=fd) as sock, contextlib.suppress(ConnectionError):
        serve(sock, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
