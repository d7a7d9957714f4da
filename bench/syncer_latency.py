"""Commit latency through a worker's spool syncer (empath/spool/syncer.py) when fsync is
slow, as on a disk without a write cache that survives power loss.

    python bench/syncer_latency.py [--delay-ms 0 --delay-ms 1 --delay-ms 5]
                                   [--messages 4000] [--sessions 20] [--dir DIR]

The syncer runs as a worker starts it, a process of its own on a socketpair, with
``store._fsync`` wrapped to sleep ``--delay-ms`` before each real fsync (files and
``queue/`` alike). SESSIONS threads stand in for SMTP sessions: each sends the id of a
4 KB file in ``tmp/`` (all written before the clock starts), waits for the answer (the
moment a worker may say 250), then pauses 2 ms for the rest of its transaction.
Printed per delay: commits per second and the latency from sending the id to its
answer. On this VM's disk fsync is fast; the delay rows are what a slower disk would
show. DIR must be on the filesystem to be measured (default: the
current directory). Everything written is removed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from empath.spool.ids import new_message_id  # noqa: E402

PAYLOAD = b"x" * 4096
PAUSE = 0.002  # seconds a session spends on the rest of its transaction


# The syncer as a worker starts it (its own process, on a socketpair), with every fsync
# made slower by the delay.
_SYNCER = """
import sys, time
from empath.spool import store, syncer
real, delay = store._fsync, float(sys.argv[3])
def slow(fd):
    time.sleep(delay)
    real(fd)
store._fsync = slow
sys.exit(syncer.main())
"""


def run(root: Path, delay: float, messages: int, sessions: int) -> tuple[float, list[float]]:
    (root / "tmp").mkdir()
    (root / "queue").mkdir()
    ours, theirs = socket.socketpair()
    # $PYTHONPATH ahead of this checkout: set it to another tree to measure that syncer.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*filter(None, [os.environ.get("PYTHONPATH")]), str(REPO)])}
    server = subprocess.Popen(
        [sys.executable, "-c", _SYNCER, str(theirs.fileno()), str(root), str(delay)],
        pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    waiting: dict[str, threading.Event] = {}
    lock, send_lock = threading.Lock(), threading.Lock()
    latencies: list[float] = []

    def answers() -> None:
        buf = b""
        while data := ours.recv(1 << 16):
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                with lock:
                    waiting.pop(line.split(b" ", 1)[0].decode()).set()

    ids = [new_message_id() for _ in range(messages // sessions * sessions)]
    for id in ids:  # written beforehand: the clock is for the syncer, not for us
        (root / "tmp" / f"{id}.msg").write_bytes(PAYLOAD)
    work = iter(ids)

    def session() -> None:
        for id in itertools.islice(work, messages // sessions):
            done = threading.Event()
            with lock:
                waiting[id] = done
            start = time.perf_counter()
            with send_lock:
                ours.sendall(f"{id}\n".encode())
            done.wait()
            latencies.append(time.perf_counter() - start)
            time.sleep(PAUSE)

    reader = threading.Thread(target=answers, daemon=True)
    reader.start()
    begin = time.perf_counter()
    threads = [threading.Thread(target=session) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    ours.shutdown(socket.SHUT_WR)  # the syncer sees EOF and exits
    server.wait(30)
    ours.close()
    return elapsed, sorted(latencies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, action="append", help="added to each fsync")
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--dir", default=".", help="where the scratch spool goes")
    a = ap.parse_args()
    print(f"{'fsync delay':>12} {'commits/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
          f" {'max ms':>8}")
    for delay_ms in a.delay_ms or [0.0, 1.0, 5.0]:
        scratch = Path(tempfile.mkdtemp(prefix="syncer-latency-", dir=a.dir))
        try:
            elapsed, lat = run(scratch, delay_ms / 1000, a.messages, a.sessions)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ms = [lat[int(p * (len(lat) - 1))] * 1000 for p in (0.5, 0.9, 0.99, 1.0)]
        print(f"{delay_ms:>9.1f} ms {len(lat) / elapsed:>10.0f} "
              + " ".join(f"{m:>8.1f}" for m in ms), flush=True)


if __name__ == "__main__":
    main()
