"""One function over the chunks of a list, the chunks in forked children.

Recovery at start reads every queued message (its data's size, its envelope) before
anything is served: with 100,000 messages that is seconds of CPU in one process,
while the machine's other cores wait. ``fork_map`` gives each core a chunk.

Forked, not spawned: a child has the code, the spool and the configuration already,
and starts in a millisecond. It only reads and computes; its result comes back
pickled over a pipe, and it leaves with ``os._exit`` (no atexit handlers, no buffers
of the parent flushed twice). The parent does the first chunk itself. A child that
fails — it raised, was killed, or could not be forked — costs time, never results:
its chunk is done again in the parent, whose errors are the caller's as usual.

Call it before any thread or event loop exists (the supervisor does, at start): a
child of a threaded process may inherit a lock that no thread will ever release.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

__all__ = ["fork_map", "split"]

log = logging.getLogger("empath.spool")

_T = TypeVar("_T")
_R = TypeVar("_R")


def split(items: Sequence[_T], parts: int, min_size: int) -> list[Sequence[_T]]:
    """``items`` in at most ``parts`` contiguous chunks of at least ``min_size`` each
    (one chunk when there are too few to share), in order."""
    n = max(1, min(parts, len(items) // max(1, min_size)))
    size, extra = divmod(len(items), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def fork_map(fn: Callable[[Sequence[_T]], _R], chunks: list[Sequence[_T]]) -> list[_R]:
    """``[fn(chunk) for chunk in chunks]``, every chunk but the first in a child."""
    started = [(chunk, _fork(fn, chunk)) for chunk in chunks[1:]]
    results = [fn(chunks[0])] if chunks else []
    for chunk, child in started:
        result = _collect(*child) if child is not None else None
        results.append(cast(_R, result[0]) if result is not None else fn(chunk))
    return results


def _fork(fn: Callable[[Sequence[_T]], object], chunk: Sequence[_T]) -> tuple[int, int] | None:
    """(pid, read end of its pipe) of a child computing ``fn(chunk)``, or None."""
    try:
        r, w = os.pipe()
    except OSError as exc:
        log.warning("spool: cannot make a pipe for a recovery process (%s); working alone",
                    exc.strerror)
        return None
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        log.warning("spool: cannot fork a recovery process (%s); working alone", exc.strerror)
        return None
    if pid == 0:  # the child: compute, write, leave without running anything else
        code = 1
        try:
            os.close(r)
            view = memoryview(pickle.dumps(fn(chunk), protocol=pickle.HIGHEST_PROTOCOL))
            while view:
                view = view[os.write(w, view):]
            code = 0
        except BaseException as exc:  # said on stderr (the journal); the parent redoes it
            with contextlib.suppress(OSError):
                os.write(2, f"empath: recovery process {os.getpid()}: {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, fd: int) -> tuple[object] | None:
    """The child's result (in a 1-tuple: it may be None), or None if it failed."""
    chunks = []
    try:
        while data := os.read(fd, 1 << 20):
            chunks.append(data)
    except OSError as exc:
        log.warning("spool: reading from recovery process %d: %s", pid, exc.strerror)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        try:
            return (pickle.loads(b"".join(chunks)),)
        except Exception as exc:  # a truncated or damaged result: redo the chunk
            log.warning("spool: recovery process %d sent an unreadable result: %s", pid, exc)
    else:
        log.warning("spool: recovery process %d exited with status %d; doing its part again",
                    pid, code)
    return None
