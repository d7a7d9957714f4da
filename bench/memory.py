#!/usr/bin/env python3
"""Memory under load: what the service costs as messages get big, sessions many and
the queue long (issue 11's bounds). Three measurements on the real daemon:

a. **20 concurrent 25 MB messages**: growth of the summed RSS of the daemon's process
   tree (supervisor + workers) from idle to the peak while they are received (mode
   hold), and again while they are delivered to Postfix's smtp-sink after a reload to
   mode mx. Aim: growth < 100 MB.
b. **1,000 idle-but-open SMTP sessions** (greeted, EHLO answered, then silent): tree
   RSS with them open minus before, per session. Aim: < 100 KB per session.
c. **10,000 queued messages**: the supervisor's RSS (it runs the queue manager and
   scheduler) after start on a spool of N messages minus after start on an empty
   spool. Aim: < 100 MB.

MB and KB here are 10^6 and 10^3 bytes, as the aims are written. See bench/README.md.

Usage::

    python3 bench/memory.py [--big 20] [--big-size 25000000] [--sessions 1000]
                            [--queued 10000] [--workers 2] [--only big,sessions,queued]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accept
import common
import queue_ops
import relay
from accept import HOST, BenchError, log

MB = 1_000_000
KB = 1_000
SECTIONS = ("big", "sessions", "queued")
SETTLE = 1.5  # seconds of quiet before an "idle" sample
DELIVER_TIMEOUT = 600.0
SESSION_BATCH = 50  # sessions opened at once while building up the idle ones

AIMS = {
    "big": ("memory growth, 20 x 25 MB concurrent", 100 * MB, "< 100 MB"),
    "sessions": ("memory per idle session", 100 * KB, "< 100 KB"),
    "queued": ("scheduler memory, 10,000 queued", 100 * MB, "< 100 MB"),
}


# ---------------------------------------------------------------------------- sampling


def _label(pid: int, root: int) -> str:
    if pid == root:
        return "supervisor"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"pid {pid}"
    return "worker" if "empath.daemon.worker" in cmd else cmd.split(" ")[0]


def tree_rss(root: int) -> dict[int, int]:
    """RSS (bytes) of every process in the tree rooted at ``root``."""
    out: dict[int, int] = {}
    for pid in accept.process_tree(root):
        st = accept._read_stat(pid)
        if st is not None:
            out[pid] = st.rss_bytes
    return out


def settled_rss(root: int, samples: int = 10, interval: float = 0.1) -> dict[int, int]:
    """Per-process median RSS over ``samples`` samples (a quiet moment, not a peak)."""
    seen: dict[int, list[int]] = {}
    for _ in range(samples):
        for pid, rss in tree_rss(root).items():
            seen.setdefault(pid, []).append(rss)
        time.sleep(interval)
    return {pid: int(statistics.median(v)) for pid, v in seen.items()}


class ProcSampler(accept.TreeSampler):
    """accept.py's sampler (peak of the summed RSS every 100 ms), plus each process's
    own peak, so a growth can be put on the supervisor or on a worker."""

    def __init__(self, root: int) -> None:
        super().__init__(root)
        self.per_pid: dict[int, int] = {}

    def _sample(self, *, pss: bool = False) -> None:
        super()._sample(pss=pss)
        for pid, rss in tree_rss(self.root).items():
            self.per_pid[pid] = max(self.per_pid.get(pid, 0), rss)


def breakdown(root: int, before: dict[int, int], peak: dict[int, int]) -> list[dict[str, Any]]:
    return [{"pid": pid, "process": _label(pid, root), "before": before.get(pid, 0),
             "peak": rss, "growth": rss - before.get(pid, 0)}
            for pid, rss in sorted(peak.items())]


# ------------------------------------------------------------------------------ daemon


@dataclass
class Params:
    big: int
    big_size: int
    sessions: int
    queued: int
    workers: int
    deliver: bool
    only: list[str]
    empath_cmd: str
    tmpdir: str | None
    keep_tmp: bool


class MemDaemon(queue_ops.Daemon):
    """queue_ops.py's daemon (own NOTIFY_SOCKET, READY=1, control socket) with the
    limits and routes these loads need; ``mode`` hold or mx, changed by a reload."""

    def __init__(self, base: Path, state: Path, p: Params, *, sessions: int = 0) -> None:
        super().__init__(base, state, p)  # type: ignore[arg-type]
        self.state = state
        self.workers = p.workers
        self.sessions = sessions
        self.write_config("hold")

    def write_config(self, mode: str) -> None:
        room = max(self.sessions + 100, 1000)
        hop = f"smtp:{HOST}:{relay.SINK_PORT}"
        self.config.write_text(f"""\
hostname: {accept.DOMAIN}
postmaster: postmaster@{accept.DOMAIN}
listen: [{{address: "{HOST}:{self.port}", role: smtp}}]
state_dir: {self.state}
local_domains: [{accept.DOMAIN}]
relay_networks: [127.0.0.0/8]
limits: {{max_connections: {room}, per_client_connections: {room},
          per_client_rate: 1000000}}
delivery: {{mode: {mode}, routes: {{{relay.RELAY_DOMAIN}: "{hop}", {accept.DOMAIN}: "{hop}"}}}}
control: {{socket: {self.control}}}
workers: {self.workers}
log: {{level: warning}}
""")

    def reload(self, mode: str) -> None:
        self.write_config(mode)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def queued(self) -> int:
        with contextlib.suppress(OSError), os.scandir(self.state / "spool" / "queue") as it:
            return sum(1 for e in it if e.name.endswith(".msg"))
        return 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def new_daemon(base: Path, p: Params, *, sessions: int = 0,
               state: Path | None = None) -> MemDaemon:
    """A daemon under ``base`` (created), on ``state`` or a fresh base/state; not started."""
    base.mkdir(exist_ok=True)
    if state is None:
        state = base / "state"
        state.mkdir(mode=0o750)
    return MemDaemon(base, state, p, sessions=sessions)


def start_daemon(base: Path, p: Params, *, sessions: int = 0) -> MemDaemon:
    d = new_daemon(base, p, sessions=sessions)
    d.spawn()
    try:
        d.wait_ready()
    except BaseException:
        d.close()
        raise
    return d


# ------------------------------------------------------------------------------ clients


async def _expect(reader: asyncio.StreamReader, code: bytes) -> str:
    while True:
        line = await reader.readline()
        if not line:
            raise BenchError(f"connection closed waiting for {code.decode()}")
        if line[:3] != code:
            raise BenchError(f"expected {code.decode()}, got {line!r}")
        if line[3:4] != b"-":
            return line.decode(errors="replace").strip()


async def _send_big(port: int, payload: bytes, seq: int, chunk: int = 256 * 1024) -> str:
    """One connection, one message of ``payload``, written in chunks with drain (so this
    process holds one copy of the payload, not one per connection)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await _expect(reader, b"220")
        for cmd, code in ((b"EHLO memory.bench.example", b"250"),
                          (f"MAIL FROM:<{accept.SENDER}> SIZE={len(payload)}".encode(), b"250"),
                          (f"RCPT TO:<big{seq}@{relay.RELAY_DOMAIN}>".encode(), b"250"),
                          (b"DATA", b"354")):
            writer.write(cmd + b"\r\n")
            await _expect(reader, code)
        view = memoryview(payload)
        for off in range(0, len(view), chunk):
            writer.write(view[off:off + chunk])
            await writer.drain()
        writer.write(b".\r\n")
        reply = await _expect(reader, b"250")
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return reply
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def big_payload(size: int) -> bytes:
    head = (f"From: <{accept.SENDER}>\r\nTo: <big@{relay.RELAY_DOMAIN}>\r\n"
            f"Subject: memory bench\r\n\r\n").encode()
    return head + accept.make_payload(size - len(head))


async def _open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    """``n`` sessions that got their greeting and an EHLO reply, then say nothing."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
        await _expect(reader, b"220")
        writer.write(b"EHLO idle.bench.example\r\n")
        await _expect(reader, b"250")

    for start in range(0, n, SESSION_BATCH):
        await asyncio.gather(*(one() for _ in range(min(SESSION_BATCH, n - start))))
    return writers


async def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(ConnectionError, OSError):
            await w.wait_closed()


# ------------------------------------------------------------------------ measurements


@dataclass
class Outcome:
    name: str
    figure: float | None = None  # bytes: growth, per session, or scheduler cost
    aim: float = 0.0
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _judge(o: Outcome) -> Outcome:
    o.aim = AIMS[o.name][1]
    if o.figure is not None and o.error is None:
        o.met = o.figure < o.aim
    return o


def measure_big(p: Params, tmp: Path) -> Outcome:
    o = Outcome("big", detail={"messages": p.big, "size": p.big_size, "workers": p.workers})
    sink = relay.Sink(tmp, dump=False) if p.deliver else None
    d = start_daemon(tmp / "big", p)
    try:
        assert d.proc is not None
        root = d.proc.pid
        # A small message first: lazy imports and first-use allocations are not growth.
        asyncio.run(_send_big(d.port, big_payload(4096), 0))
        time.sleep(SETTLE)
        before = settled_rss(root)
        o.detail["idle_rss"] = sum(before.values())
        payload = big_payload(p.big_size)

        async def load() -> list[str | BaseException]:
            return await asyncio.gather(*(_send_big(d.port, payload, i + 1)
                                          for i in range(p.big)), return_exceptions=True)

        t0 = time.monotonic()
        with ProcSampler(root) as s:
            replies = asyncio.run(load())
        o.detail["receive_seconds"] = time.monotonic() - t0
        failed = [r for r in replies if isinstance(r, BaseException)]
        if failed:
            raise BenchError(f"{len(failed)} of {p.big} big messages failed: {failed[0]!r}")
        o.detail["receive_peak"] = s.peak_rss
        o.detail["receive_growth"] = s.peak_rss - sum(before.values())
        o.detail["receive_processes"] = breakdown(root, before, s.per_pid)
        if d.queued() != p.big + 1:
            raise BenchError(f"{d.queued()} messages queued after {p.big + 1} were accepted")
        growth = o.detail["receive_growth"]
        if sink is not None:
            sink.start(expect=p.big + 1)
            t0 = time.monotonic()
            with ProcSampler(root) as s:
                d.reload("mx")
                deadline = time.monotonic() + DELIVER_TIMEOUT
                while sink.count < p.big + 1 or d.queued():
                    if time.monotonic() > deadline:
                        raise BenchError(f"delivery: sink has {sink.count}/{p.big + 1}, "
                                         f"{d.queued()} still queued after "
                                         f"{DELIVER_TIMEOUT:.0f}s")
                    time.sleep(0.05)
            o.detail["deliver_seconds"] = time.monotonic() - t0
            o.detail["deliver_peak"] = s.peak_rss
            o.detail["deliver_growth"] = s.peak_rss - sum(before.values())
            o.detail["deliver_processes"] = breakdown(root, before, s.per_pid)
            growth = max(growth, o.detail["deliver_growth"])
        o.figure = growth
    except BenchError as exc:
        o.error = str(exc)
    finally:
        if sink is not None:
            sink.stop()
        d.close()
    return _judge(o)


def measure_sessions(p: Params, tmp: Path) -> Outcome:
    o = Outcome("sessions", detail={"sessions": p.sessions, "workers": p.workers})
    d = start_daemon(tmp / "sessions", p, sessions=p.sessions)
    try:
        assert d.proc is not None
        root = d.proc.pid

        async def run() -> None:
            warm = await _open_idle(d.port, min(40, p.sessions))
            await _close_all(warm)
            await asyncio.sleep(SETTLE)
            before = await asyncio.to_thread(settled_rss, root)
            t0 = time.monotonic()
            writers = await _open_idle(d.port, p.sessions)
            o.detail["open_seconds"] = time.monotonic() - t0
            await asyncio.sleep(SETTLE)
            during = await asyncio.to_thread(settled_rss, root)
            await _close_all(writers)
            growth = sum(during.values()) - sum(before.values())
            o.detail["idle_rss"] = sum(before.values())
            o.detail["rss_with_sessions"] = sum(during.values())
            o.detail["growth"] = growth
            o.detail["processes"] = breakdown(root, before, during)
            o.figure = growth / p.sessions

        asyncio.run(run())
    except (BenchError, OSError) as exc:
        o.error = f"{type(exc).__name__}: {exc}"
    finally:
        d.close()
    return _judge(o)


def measure_queued(p: Params, tmp: Path) -> Outcome:
    o = Outcome("queued", detail={"messages": p.queued, "workers": p.workers})
    try:
        empty = start_daemon(tmp / "empty", p)
        root = empty.pid
        try:
            time.sleep(SETTLE)
            base = settled_rss(root)
        finally:
            empty.close()
        o.detail["empty_supervisor_rss"] = base.get(root, 0)
        o.detail["empty_tree_rss"] = sum(base.values())
        state = tmp / "queued" / "state"
        state.mkdir(parents=True, mode=0o750)
        qp = queue_ops.Params(
            messages=p.queued, recipients=1, domains=1000, history=0, size=256,
            workers=p.workers, repeat=1, cold=False, ctl_timeout=600.0,
            empath_cmd=p.empath_cmd, ctl_cmd="", tmpdir=tmp, keep_tmp=p.keep_tmp)
        o.detail["built_seconds"] = queue_ops.build_spool(state / "spool", qp).seconds
        d = new_daemon(tmp / "queued", p, state=state)
        try:
            root = d.spawn()
            with ProcSampler(root) as start:
                o.detail["ready_seconds"] = d.wait_ready()
            time.sleep(SETTLE)
            after = settled_rss(root)
            queued = d.queued()
        finally:
            d.close()
        if queued != p.queued:
            raise BenchError(f"{queued} messages in the spool, {p.queued} built")
        o.detail["supervisor_rss"] = after.get(root, 0)
        o.detail["startup_peak_supervisor_rss"] = start.per_pid.get(root, 0)
        o.detail["tree_rss"] = sum(after.values())
        o.figure = o.detail["supervisor_rss"] - o.detail["empty_supervisor_rss"]
        o.detail["per_message"] = o.figure / p.queued
    except (BenchError, OSError) as exc:
        o.error = f"{type(exc).__name__}: {exc}"
    return _judge(o)


# ------------------------------------------------------------------------------ report


MEASURES = {"big": measure_big, "sessions": measure_sessions, "queued": measure_queued}


def run(p: Params, tmp: Path) -> list[Outcome]:
    """Every measurement in ``p.only``, one after the other (each with its own daemon)."""
    out = []
    for name in SECTIONS:
        if name in p.only:
            log(f"memory: {name} ...")
            o = MEASURES[name](p, tmp)
            log(f"memory: {name}: {describe(o)}")
            out.append(o)
    return out


def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def describe(o: Outcome) -> str:
    if o.error is not None:
        return f"FAILED: {o.error}"
    if o.figure is None:
        return "-"
    if o.name == "sessions":
        return f"{o.figure / KB:.1f} KB per session"
    return _mb(o.figure)


def verdict(o: Outcome) -> str:
    if o.met is None:
        return "FAILED" if o.error else "-"
    return "met" if o.met else "NOT MET"


def notes(o: Outcome) -> str:
    d = o.detail
    if o.error is not None:
        return ""
    if o.name == "big":
        parts = [f"idle {_mb(d['idle_rss'])}; receiving +{_mb(d['receive_growth'])} "
                 f"in {d['receive_seconds']:.1f}s"]
        if "deliver_growth" in d:
            parts.append(f"delivering +{_mb(d['deliver_growth'])} in {d['deliver_seconds']:.1f}s")
        else:
            parts.append("delivery not measured")
        return "; ".join(parts)
    if o.name == "sessions":
        procs = ", ".join(f"{x['process']} +{_mb(x['growth'])}" for x in d["processes"])
        return f"{d['sessions']} sessions: +{_mb(d['growth'])} ({procs})"
    return (f"supervisor {_mb(d['empty_supervisor_rss'])} empty -> {_mb(d['supervisor_rss'])} "
            f"({d['per_message']:.0f} B/message; start-up peak "
            f"{_mb(d['startup_peak_supervisor_rss'])}; ready in {d['ready_seconds']:.1f}s)")


def render(outcomes: Sequence[Outcome], meta: dict[str, Any]) -> str:
    rows = []
    for o in outcomes:
        label = AIMS[o.name][0]
        if o.name == "big":
            label = f"memory growth, {o.detail['messages']} x {o.detail['size'] / MB:g} MB"
        elif o.name == "sessions":
            label = f"memory per idle session ({o.detail['sessions']} open)"
        elif o.name == "queued":
            label = f"scheduler memory, {o.detail['messages']:,} queued"
        rows.append([label, describe(o), AIMS[o.name][2], verdict(o), notes(o)])
    return "\n".join([
        f"empath memory benchmark  {meta['started']}  (MB = 10^6 bytes, summed RSS)",
        f"empath:   {meta['empath_cmd']}, {meta['workers']} workers; 1-min load "
        f"{common.loadavg_text(meta['loadavg_at_start'])} at start",
        "",
        common.table(["measure", "figure", "aim", "", "notes"], rows),
    ])


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--big", type=int, default=20, help="concurrent big messages")
    ap.add_argument("--big-size", type=int, default=25_000_000, help="bytes per big message")
    ap.add_argument("--sessions", type=int, default=1000, help="idle sessions held open")
    ap.add_argument("--queued", type=int, default=10_000, help="messages in the queue")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-deliver", action="store_true",
                    help="measure (a) while receiving only (no smtp-sink, no root needed)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"measurements to run, comma separated ({', '.join(SECTIONS)})")
    common.add_common_arguments(ap, "memory")
    a = ap.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    if unknown := [x for x in only if x not in SECTIONS]:
        ap.error(f"--only: unknown {unknown}")
    deliver = not a.no_deliver
    if deliver and "big" in only and (os.geteuid() != 0 or shutil.which("smtp-sink") is None):
        log("memory: no root or no smtp-sink: (a) is measured while receiving only")
        deliver = False
    p = Params(a.big, a.big_size, a.sessions, a.queued, a.workers, deliver, only,
               a.empath_cmd or accept.default_empath_cmd(), a.tmpdir, a.keep_tmp)
    return p, a.json or common.default_json("memory")


def main(argv: Sequence[str] | None = None) -> int:
    p, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, accept._raise_interrupt)
    meta: dict[str, Any] = {"benchmark": "memory", "started": common.stamp(),
                            "empath_cmd": p.empath_cmd, "workers": p.workers,
                            "loadavg_at_start": accept.loadavg(), "params": asdict(p)}
    with accept.scratch_dir(p, "empath-memory-") as tmp:
        meta["machine"] = accept.machine_info(tmp)
        try:
            outcomes = run(p, tmp)
        except KeyboardInterrupt:
            log("interrupted")
            return 1
    meta["loadavg_at_end"] = accept.loadavg()
    print(render(outcomes, meta))
    print(f"1-min load average at end: {common.loadavg_text(meta['loadavg_at_end'])}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "outcomes": [asdict(o) for o in outcomes]},
                                    indent=2) + "\n")
    print(f"\nresults: {json_path}")
    return 0 if all(o.error is None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
