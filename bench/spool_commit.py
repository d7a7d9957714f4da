"""Measure durable spool commits per second.

    python bench/spool_commit.py [--dir DIR] [--seconds 3] [--rounds 3] [--size 4096]
                                 [-c 1 -c 50] [--threads 16] [--procs 1] [--baseline]

Each committer is a coroutine that loops: create, write SIZE bytes, commit (write the
envelope after the data, fsync, rename into queue/, group fsync of queue/). With
--procs N, N processes run the same load at once on one spool (as several daemon
workers would). --baseline adds a run per concurrency where every commit does its own
fsync of queue/ (no group commit), for comparison. Runs are interleaved over --rounds
and the median is printed, since a shared disk is noisy. DIR must be on the filesystem
to be measured (default: under the current directory; /tmp may be tmpfs where fsync
costs nothing). Everything written is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from empath.spool import Envelope, Recipient, Spool, store


class _NoGroupSpool(Spool):
    """Baseline: each commit fsyncs queue/ itself, in the worker pool."""

    def _queue_dir_synced(self) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._run(self._sync_dir, self.queue_dir))


async def _committer(spool: Spool, payload: bytes, deadline: float, lat: list[float]) -> int:
    n = 0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        w = spool.create()
        w.write(payload)
        env = Envelope(
            id=w.id,
            sender="bench@example.com",
            recipients=[Recipient("rcpt@example.net")],
            received_at=time.time(),
            client_addr="127.0.0.1",
            client_port=12345,
            helo="bench.example.com",
        )
        await spool.commit(w, env)
        lat.append(time.monotonic() - t0)
        n += 1
    return n


Job = tuple[Path, int, float, int, int, bool]
Result = tuple[int, list[float], int, float]  # commits, latencies, dir fsyncs, seconds


async def _run(
    root: Path, conc: int, seconds: float, size: int, threads: int, base: bool
) -> Result:
    spool = (_NoGroupSpool if base else Spool)(root, threads=threads)
    dir_syncs = 0
    real_sync_dir = store.Spool._sync_dir

    def counting_sync_dir(path: str | Path) -> None:
        nonlocal dir_syncs
        if path == spool.queue_dir:
            dir_syncs += 1
        real_sync_dir(path)

    spool._sync_dir = counting_sync_dir  # type: ignore[method-assign]
    payload = (b"x" * 76 + b"\r\n") * (size // 78) + b"y" * (size % 78)
    lat: list[float] = []
    t0 = time.monotonic()
    try:
        counts = await asyncio.gather(
            *(_committer(spool, payload, t0 + seconds, lat) for _ in range(conc))
        )
    finally:
        spool.close()
    # timed inside the worker so process start-up does not count
    return sum(counts), lat, dir_syncs, time.monotonic() - t0


def _proc(job: Job) -> Result:
    return asyncio.run(_run(*job))


def _once(job: Job, procs: int) -> tuple[float, list[float], int, int]:
    if procs == 1:
        results = [_proc(job)]
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            results = pool.map(_proc, [job] * procs)
    elapsed = max(r[3] for r in results)
    total = sum(r[0] for r in results)
    spool = Spool(job[0])
    for id in spool.ids():
        spool.remove(id)
    spool.close()
    return total / elapsed, [x for r in results for x in r[1]], total, sum(r[2] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("-c", "--concurrency", type=int, action="append")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=store.DEFAULT_THREADS)
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir or Path.cwd()))
    try:
        root = base / "spool"
        Spool(root).prepare()
        print(
            f"spool {root}: {args.size} B messages, {args.seconds:g} s runs, median of "
            f"{args.rounds}, {args.procs} process(es), {args.threads} threads",
            flush=True,
        )
        variants = [(c, False) for c in args.concurrency or [1, 50]]
        if args.baseline:
            variants += [(c, True) for c in args.concurrency or [1, 50] if c > 1]
        runs: dict[tuple[int, bool], list[tuple[float, list[float], int, int]]] = {}
        for _ in range(args.rounds):
            for c, b in variants:
                job = (root, c, args.seconds, args.size, args.threads, b)
                runs.setdefault((c, b), []).append(_once(job, args.procs))
        for (c, b), rs in runs.items():
            rate = statistics.median(r[0] for r in rs)
            lat = sorted(x for r in rs for x in r[1])
            msgs = sum(r[2] for r in rs)
            syncs = sum(r[3] for r in rs)
            p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
            p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
            name = "no group commit" if b else "group commit"
            print(
                f"  {name:16s} concurrency {c:3d} x {args.procs}: {rate:7.0f} commits/s "
                f"(runs: {', '.join(f'{r[0]:.0f}' for r in rs)})  p50 {p50:6.1f} ms "
                f"p99 {p99:6.1f} ms  {msgs / max(syncs, 1):5.1f} msgs/dir-fsync"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
