#!/usr/bin/env python3
"""End-to-end relay rate: empath vs Postfix, measured in the same run.

``smtp-source`` injects N messages (one new connection per message) into the server,
which relays every one of them to a Postfix ``smtp-sink`` on loopback. The clock runs
from the first injected message until the sink has received all N and the server's
queue is empty. Process-tree sampling and the Postfix/empath plumbing come from
``accept.py`` in this directory. See bench/README.md.

Usage::

    python3 bench/relay.py [--messages 10000] [--sessions 20] [--size 4096]
                           [--workers 2] [--rounds 3] [--json PATH]
                           [--empath-cmd "..."] [--skip-postfix] [--skip-empath]

Needs root (the private Postfix instance runs as user ``postfix``; smtp-sink drops to
``nobody``) and the Debian ``postfix`` package, which ships smtp-source and smtp-sink.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accept
from accept import (
    DOMAIN,
    HOST,
    MIB,
    SENDER,
    BenchError,
    Stored,
    TreeSampler,
    log,
    tree_cpu_seconds,
)

REPO = accept.REPO
SINK_PORT = 10027
SINK_BACKLOG = 1000
SINK_USER = "nobody"  # smtp-sink refuses to keep running as root without -u
RELAY_DOMAIN = "relay.example"
RECIPIENT = f"rcpt@{RELAY_DOMAIN}"

POLL_INTERVAL = 0.02  # seconds between "all delivered?" checks
SETTLE = 1.0  # seconds to wait after the last delivery for extra (duplicate) messages
PREFLIGHT_TIMEOUT = 30.0
_COUNTERS = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)")


# -------------------------------------------------------------------------------- sink


class Sink:
    """Postfix's ``smtp-sink`` on HOST:SINK_PORT, one fresh process (and counter) per round.

    ``smtp-sink -c`` writes ``sess=A quit=B mesg=C`` followed by ``\\r`` whenever a session
    ends, QUIT is received or a message's final ``.`` is received; a reader thread keeps
    the latest ``mesg`` value and the time it first reached the expected count. With
    ``dump`` the sink also appends every transaction to a file (``-D``) that is checked
    for distinct Message-Ids afterwards.
    """

    def __init__(self, base: Path, *, dump: bool) -> None:
        self.dir = base / "sink"
        self.dump = dump
        self.count = 0  # messages whose final "." the sink has received
        self.sessions = 0  # SMTP sessions (connections) that have ended
        self.expect = 0
        self.reached_at: float | None = None  # perf_counter() when count first >= expect
        self.last_change = 0.0
        self.dump_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._runs = 0
        self._lock = threading.Lock()

    def start(self, expect: int) -> None:
        if shutil.which("smtp-sink") is None:
            raise BenchError("smtp-sink not installed (apt-get install postfix)")
        if accept._port_in_use(SINK_PORT):
            raise BenchError(f"port {SINK_PORT} already in use before starting smtp-sink")
        if not self.dir.exists():
            self.dir.mkdir()
            os.chown(self.dir, pwd.getpwnam(SINK_USER).pw_uid, -1)
        self._runs += 1
        self.count, self.sessions, self.expect, self.reached_at = 0, 0, expect, None
        self.last_change = time.perf_counter()
        argv = ["smtp-sink", "-c", "-u", SINK_USER]
        if self.dump:
            self.dump_file = self.dir / f"dump-{self._runs}"
            argv += ["-D", str(self.dump_file)]
        argv += [f"{HOST}:{SINK_PORT}", str(SINK_BACKLOG)]
        with open(self.dir / "sink.log", "ab") as err:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        proc = self._proc
        assert proc.stdout is not None
        self._thread = threading.Thread(
            target=self._read, args=(proc.stdout,), name="sink-counter", daemon=True
        )
        self._thread.start()
        try:
            accept.wait_for_greeting(SINK_PORT, 10.0, alive=lambda: proc.poll() is None)
        except BenchError as exc:
            self.stop()
            raise BenchError(f"smtp-sink: {exc}\n{accept._tail(self.dir / 'sink.log')}") from exc

    def _read(self, stream: Any) -> None:
        buf = b""
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\r")
            for segment in reversed(done):
                m = _COUNTERS.search(segment)
                if m:
                    self.sessions = int(m.group(1))
                    self._update(int(m.group(2)))
                    break

    def _update(self, count: int) -> None:
        now = time.perf_counter()
        with self._lock:
            if count != self.count:
                self.count = count
                self.last_change = now
            if self.reached_at is None and self.expect and count >= self.expect:
                self.reached_at = now

    def connections(self) -> int:
        """Sessions the sink has finished plus those still open (e.g. cached by the client),
        minus the readiness probe's session."""
        total = self.sessions + _established(SINK_PORT)
        for _ in range(5):
            before = self.sessions
            open_now = _established(SINK_PORT)
            if self.sessions == before:
                total = before + open_now
                break
        return max(0, total - 1)

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if proc.stdout is not None:
            proc.stdout.close()

    def dump_check(self) -> dict[str, int] | None:
        """Transactions and distinct Message-Ids in this round's dump file."""
        if self.dump_file is None:
            return None
        transactions = 0
        ids: set[bytes] = set()
        try:
            with open(self.dump_file, "rb") as f:
                for line in f:
                    if line.startswith(b"X-Mail-Args:"):
                        transactions += 1
                    elif line[:11].lower() == b"message-id:":
                        ids.add(line[11:].strip())
        except OSError:
            pass
        return {"transactions": transactions, "distinct_message_ids": len(ids)}

    def discard_dump(self) -> None:
        if self.dump_file is not None:
            with contextlib.suppress(OSError):
                self.dump_file.unlink()


def _established(port: int) -> int:
    """ESTABLISHED TCP sockets on the server side of HOST:port (from /proc/net/tcp)."""
    local = "{:08X}:{:04X}".format(int.from_bytes(socket.inet_aton(HOST), "little"), port)
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for ln in lines if (f := ln.split())[1] == local and f[3] == "01")


# ------------------------------------------------------------------------------ targets


class RelayTarget(Protocol):
    label: str
    port: int

    def begin(self) -> int: ...

    def queued(self) -> int:
        """Messages still in the server's queue (cheap; polled)."""
        ...

    def confirm_empty(self) -> None:
        """Raise BenchError unless the server itself says its queue is empty."""
        ...

    def end(self) -> Stored: ...


class RelayPostfix(accept.PostfixInstance):
    """accept.py's private Postfix instance, reconfigured to relay to the sink."""

    def __init__(self, base: Path, sink: Sink) -> None:
        super().__init__(base)
        self.sink = sink

    def _write_config(self) -> None:
        super()._write_config()  # accept.py's main.cf / master.cf, then edit with postconf
        settings = [
            # No HOLD: accept for relay.example from mynetworks and deliver it.
            "smtpd_recipient_restrictions = permit_mynetworks, reject",
            f"relay_domains = {RELAY_DOMAIN}",
            f"relayhost = [{HOST}]:{SINK_PORT}",
        ]
        accept._run(self._cmd("postconf", "-e", *settings))
        # Delivery agents, as in Debian's master.cf but without chroot.
        services = [
            "smtp/unix=smtp unix - - n - - smtp",
            "relay/unix=relay unix - - n - - smtp -o syslog_name=postfix/$service_name",
        ]
        accept._run(self._cmd("postconf", "-Me", *services))

    def _preflight(self) -> None:
        """One message must reach the sink and leave the queue."""
        self._empty_queue()
        self.sink.start(expect=1)
        try:
            accept._run(
                ["smtp-source", "-m", "1", "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{self.port}"]
            )
            deadline = time.monotonic() + PREFLIGHT_TIMEOUT
            while not (self.sink.count >= 1 and self.queued() == 0):
                if time.monotonic() > deadline:
                    queue = accept._run(self._cmd("postqueue", "-p"), check=False).stdout
                    raise BenchError(
                        f"postfix preflight: sink got {self.sink.count} message(s) within "
                        f"{PREFLIGHT_TIMEOUT:.0f}s\n{queue.strip()}\n{accept._tail(self.maillog)}"
                    )
                time.sleep(POLL_INTERVAL)
            self.confirm_empty()
        finally:
            self.sink.stop()
            self.sink.discard_dump()
        log("postfix: preflight ok (1 message relayed to smtp-sink, postqueue -j empty)")

    def queued(self) -> int:
        return sum(self._queue_counts().values())

    def confirm_empty(self) -> None:
        out = accept._run(self._cmd("postqueue", "-j")).stdout.strip()
        if out:
            queues = [json.loads(line)["queue_name"] for line in out.splitlines()]
            raise BenchError(f"postfix queue not empty (postqueue -j): {len(queues)} message(s)")

    def end(self, expected: int = 0) -> Stored:
        counts = {k: v for k, v in self._queue_counts().items() if v}
        return Stored(0, sum(counts.values()), f"left: {counts}" if counts else "")


class RelayEmpath(accept.EmpathTarget):
    """accept.py's EmpathTarget with a relaying config (``delivery.mode: mx`` + routes)."""

    def __init__(self, base: Path, cmd: str, workers: int) -> None:
        super().__init__(base, cmd, workers, standin=False)

    def _write_config(self, run_dir: Path) -> Path:
        config = f"""\
hostname: {DOMAIN}
postmaster: postmaster@{DOMAIN}
listen: [{{address: "{HOST}:{self.port}", role: smtp}}]
state_dir: {run_dir / "state"}
local_domains: [{DOMAIN}]
relay_networks: [127.0.0.0/8]
delivery: {{mode: mx, routes: {{{RELAY_DOMAIN}: "smtp:{HOST}:{SINK_PORT}", \
{DOMAIN}: "smtp:{HOST}:{SINK_PORT}"}}}}
workers: {self.workers}
log: {{level: warning}}
"""
        path = run_dir / "empath.yaml"
        path.write_text(config)
        return path

    def _queue_dir(self) -> Path:
        return self._dir / "state" / "spool" / "queue"

    def queued(self) -> int:
        try:
            with os.scandir(self._queue_dir()) as it:
                return sum(1 for e in it if e.name.endswith(".msg"))
        except OSError:
            return 0

    def confirm_empty(self) -> None:
        left = self.queued()
        if left:
            raise BenchError(f"{self.label}: {left} message(s) left in {self._queue_dir()}")

    def end(self, expected: int = 0) -> Stored:
        return super().end(0)

    @property
    def log_file(self) -> Path:
        return self._log


# -------------------------------------------------------------------------------- round


@dataclass(slots=True)
class Params:
    messages: int
    sessions: int
    size: int
    workers: list[int]
    rounds: int
    stall_timeout: float
    dump: bool
    empath_cmd: str
    skip_postfix: bool
    skip_empath: bool
    tmpdir: str | None
    keep_tmp: bool


@dataclass(slots=True)
class RelayRound:
    target: str
    round: int
    messages: int
    seconds: float | None = None  # first injection -> all N at the sink and queue empty
    rate: float | None = None  # messages / seconds
    inject_seconds: float | None = None  # smtp-source run time
    inject_rate: float | None = None
    sink_all_seconds: float | None = None  # first injection -> sink count reached N
    drain_seconds: float | None = None  # smtp-source exit -> all delivered
    delivered: int | None = None  # sink count after the settle time
    sink_sessions: int | None = None  # connections the server made to the sink (ended + open)
    cpu_seconds: float | None = None  # server tree, whole timed interval
    sink_cpu_seconds: float | None = None
    source_cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_pss_bytes: int | None = None
    peak_processes: int | None = None
    dump: dict[str, int] | None = None
    stored: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rate is not None and self.delivered == self.messages


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    stat = accept._read_stat(pid)
    return stat.cpu_ticks / accept.CLOCK_TICKS if stat else 0.0


def wait_delivered(target: RelayTarget, sink: Sink, p: Params) -> float:
    """Block until the sink has N messages and the queue is empty; return perf_counter().

    The queue is only looked at once the sink count has reached N, so the poll costs
    the measured machine nothing while delivery is in progress.
    """
    show = sys.stderr.isatty()
    shown = -1
    while True:
        now = time.perf_counter()
        count = sink.count
        if count >= p.messages and target.queued() == 0:
            return now
        if show and count != shown:
            print(f"\r  sink: {count}/{p.messages}", end="", file=sys.stderr, flush=True)
            shown = count
        if now - sink.last_change > p.stall_timeout:
            raise BenchError(
                f"no delivery progress for {p.stall_timeout:.0f}s: sink has {count}/"
                f"{p.messages}, {target.queued()} message(s) still queued"
            )
        time.sleep(POLL_INTERVAL)


def relay_round(target: RelayTarget, sink: Sink, p: Params, rnd: int) -> RelayRound:
    res = RelayRound(target.label, rnd, p.messages)
    stored: Stored | None = None
    show = sys.stderr.isatty()
    try:
        sink.start(expect=p.messages)
        try:
            pid = target.begin()
            try:
                os.sync()  # don't charge the previous round's dirty pages to this one
                with TreeSampler(pid) as sampler:
                    cpu0, sink0 = tree_cpu_seconds(pid), _proc_cpu(sink.pid())
                    src0 = _children_cpu()
                    t0 = time.perf_counter()
                    sink.last_change = t0
                    proc = subprocess.run(
                        accept.smtp_source_argv(p, target.port, RECIPIENT),
                        stdout=sys.stderr if show else subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                        check=False,
                    )
                    t_inj = time.perf_counter()
                    res.source_cpu_seconds = _children_cpu() - src0
                    if show:
                        print("\r\033[K", end="", file=sys.stderr, flush=True)
                    if proc.returncode < 0:
                        name = signal.Signals(-proc.returncode).name
                        raise BenchError(f"smtp-source was killed by {name} (not by the bench)")
                    if proc.returncode != 0:
                        raise BenchError(
                            f"smtp-source exited {proc.returncode}: {proc.stderr.strip()}"
                        )
                    res.inject_seconds = t_inj - t0
                    res.inject_rate = p.messages / res.inject_seconds
                    sink.last_change = max(sink.last_change, t_inj)
                    t_end = wait_delivered(target, sink, p)
                    cpu1, sink1 = tree_cpu_seconds(pid), _proc_cpu(sink.pid())
                if show:
                    print("\r\033[K", end="", file=sys.stderr, flush=True)
                res.seconds = t_end - t0
                res.rate = p.messages / res.seconds
                res.drain_seconds = t_end - t_inj
                if sink.reached_at is not None:
                    res.sink_all_seconds = sink.reached_at - t0
                res.cpu_seconds = cpu1 - cpu0
                res.sink_cpu_seconds = sink1 - sink0
                res.peak_rss_bytes = sampler.peak_rss
                res.peak_pss_bytes = sampler.peak_pss
                res.peak_processes = sampler.peak_procs
                time.sleep(SETTLE)  # a duplicate delivery would show up here
                res.delivered = sink.count
                target.confirm_empty()
            finally:
                stored = target.end()
        finally:
            res.delivered = sink.count if res.delivered is None else res.delivered
            res.sink_sessions = sink.connections()
            sink.stop()
            res.dump = sink.dump_check()
            if not p.keep_tmp:
                sink.discard_dump()
        if res.delivered != p.messages:
            raise BenchError(
                f"SINK RECEIVED {res.delivered} MESSAGES, EXPECTED {p.messages}"
                + (" (duplicates?)" if res.delivered > p.messages else "")
            )
        if res.dump is not None and res.dump["distinct_message_ids"] != p.messages:
            raise BenchError(f"sink dump: {res.dump} for {p.messages} messages sent")
    except BenchError as exc:
        res.error = str(exc)
        log(f"{target.label} round {rnd}: FAILED: {exc}")
    if stored is not None:
        res.stored = accept._stored_dict(stored)
        if not stored.ok:
            log(
                f"!!! {target.label} round {rnd}: QUEUE NOT EMPTY AFTERWARDS: {stored.found} "
                f"message(s) left {stored.detail} !!!"
            )
    if res.ok:
        assert res.seconds is not None and res.rate is not None and res.inject_rate is not None
        log(
            f"{target.label:<12} round {rnd}: {p.messages} msgs delivered in {res.seconds:6.2f} s"
            f" = {res.rate:7.1f} msg/s (injected at {res.inject_rate:.1f} msg/s, "
            f"drain {res.drain_seconds:.2f} s, {res.sink_sessions} connections to the sink)"
        )
    return res


# ------------------------------------------------------------------------------- report


@dataclass(slots=True)
class Summary:
    target: str
    rounds_ok: int
    rounds: int
    median_rate: float | None = None
    min_rate: float | None = None
    max_rate: float | None = None
    ratio_vs_postfix: float | None = None
    median_inject_rate: float | None = None
    median_drain_seconds: float | None = None
    median_sink_sessions: float | None = None
    cpu_ms_per_msg: float | None = None
    sink_cpu_ms_per_msg: float | None = None
    source_cpu_ms_per_msg: float | None = None
    peak_rss_mib: float | None = None
    peak_pss_mib: float | None = None
    delivered_ok: bool = True


def summarise(label: str, rounds: list[RelayRound], messages: int) -> Summary:
    ok = [r for r in rounds if r.ok]
    s = Summary(label, len(ok), len(rounds))
    s.delivered_ok = all(r.delivered == messages for r in rounds) and all(
        r.stored is None or r.stored["ok"] for r in rounds
    )
    if not ok:
        return s

    def med(values: list[float | None]) -> float:
        return statistics.median(v or 0.0 for v in values)

    rates = [r.rate for r in ok if r.rate is not None]
    s.median_rate = statistics.median(rates)
    s.min_rate, s.max_rate = min(rates), max(rates)
    s.median_inject_rate = med([r.inject_rate for r in ok])
    s.median_drain_seconds = med([r.drain_seconds for r in ok])
    s.median_sink_sessions = med([r.sink_sessions for r in ok])
    s.cpu_ms_per_msg = med([r.cpu_seconds for r in ok]) * 1000 / messages
    s.sink_cpu_ms_per_msg = med([r.sink_cpu_seconds for r in ok]) * 1000 / messages
    s.source_cpu_ms_per_msg = med([r.source_cpu_seconds for r in ok]) * 1000 / messages
    s.peak_rss_mib = max(r.peak_rss_bytes or 0 for r in ok) / MIB
    s.peak_pss_mib = max(r.peak_pss_bytes or 0 for r in ok) / MIB
    return s


def render(meta: dict[str, Any], summaries: list[Summary]) -> str:
    m, v, p = meta["machine"], meta["versions"], meta["params"]
    fmt = accept._fmt
    lines = [
        f"empath relay benchmark  {meta['started']}",
        f"machine:  {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"spool fs {m['tmp_filesystem']}",
        f"versions: postfix {v['postfix']}, python {v['python']}",
        f"empath:   {meta['empath_cmd']}",
        *accept.busy_warning(m),
        f"load:     smtp-source, {p['messages']} msgs x {p['size']} B payload, "
        f"{p['sessions']} sessions, new connection per message, {p['rounds']} rounds",
        f"path:     smtp-source -> server -> smtp-sink {HOST}:{SINK_PORT}; clock: first "
        "message injected -> sink has all, queue empty",
        "",
        f"{'target':<12} {'rounds':>6} {'median msg/s':>12} {'min-max':>11} {'vs postfix':>10} "
        f"{'inject msg/s':>12} {'drain s':>7} {'out conns':>9} {'CPU ms/msg':>10} "
        f"{'peak RSS MiB':>12} {'peak PSS MiB':>12}  delivered",
    ]
    for s in summaries:
        spread = (
            f"{s.min_rate:.0f}-{s.max_rate:.0f}"
            if s.min_rate is not None and s.max_rate is not None
            else "-"
        )
        ratio = "-" if s.ratio_vs_postfix is None else f"{s.ratio_vs_postfix:.2f}x"
        lines.append(
            f"{s.target:<12} {s.rounds_ok:>3}/{s.rounds:<2} {fmt(s.median_rate):>12} "
            f"{spread:>11} {ratio:>10} {fmt(s.median_inject_rate):>12} "
            f"{fmt(s.median_drain_seconds, '.2f'):>7} {fmt(s.median_sink_sessions, '.0f'):>9} "
            f"{fmt(s.cpu_ms_per_msg, '.2f'):>10} "
            f"{fmt(s.peak_rss_mib):>12} {fmt(s.peak_pss_mib):>12}  "
            + ("ok" if s.delivered_ok else "MISMATCH")
        )
    load = [
        f"{s.target} sink {fmt(s.sink_cpu_ms_per_msg, '.2f')} / smtp-source "
        f"{fmt(s.source_cpu_ms_per_msg, '.2f')}"
        for s in summaries
        if s.rounds_ok
    ]
    if load:
        lines += ["", "load-side CPU ms/msg: " + "; ".join(load)]
    start, end = m.get("loadavg_at_start") or [0.0], meta.get("loadavg_at_end") or [0.0]
    lines.append(
        f"1-min load average: {start[0]:.2f} at start, {end[0]:.2f} at end "
        "(the bench itself keeps about 2-3 runnable; much more means other work interfered)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=10_000, help="messages per round")
    ap.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    ap.add_argument("--workers", default="2", help="empath worker counts, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="fail a round when the sink count does not move for this many seconds",
    )
    ap.add_argument(
        "--dump",
        action="store_true",
        help="also make smtp-sink write every message to a file (-D) and check that "
        "N distinct Message-Ids arrived (adds disk writes to the measurement)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="result file (default bench/results/relay-<timestamp>.json)",
    )
    ap.add_argument(
        "--empath-cmd",
        default=None,
        help="command to start empath; '{config}' is replaced by the config path, "
        "otherwise 'run --config FILE' is appended",
    )
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--skip-empath", action="store_true")
    ap.add_argument("--tmpdir", default=None, help="where queues go (default: $TMPDIR or /tmp)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep queues, configs and logs")
    a = ap.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",") if w.strip()]
    for name in ("messages", "sessions", "size", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.skip_postfix and a.skip_empath:
        ap.error("--skip-postfix and --skip-empath leave nothing to run")
    params = Params(
        a.messages,
        a.sessions,
        a.size,
        workers,
        a.rounds,
        a.stall_timeout,
        a.dump,
        a.empath_cmd or accept.default_empath_cmd(),
        a.skip_postfix,
        a.skip_empath,
        a.tmpdir,
        a.keep_tmp,
    )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = a.json or REPO / "bench" / "results" / f"relay-{stamp}.json"
    return params, out


def versions() -> dict[str, str]:
    v = accept.versions()
    if v["postfix"] == "?":  # accept.py asks 'postconf -h', which needs /etc/postfix/main.cf
        with contextlib.suppress(OSError, BenchError):
            v["postfix"] = accept._run(["postconf", "-d", "-h", "mail_version"]).stdout.strip()
    return v


def main(argv: Sequence[str] | None = None) -> int:
    p, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, accept._raise_interrupt)
    signal.signal(signal.SIGHUP, accept._raise_interrupt)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rounds: dict[str, list[RelayRound]] = {}
    interrupted = False
    fatal: str | None = None

    if os.geteuid() != 0:
        log("FATAL: relay.py needs root (private Postfix instance, smtp-sink -u nobody)")
        return 1
    with accept.scratch_dir(p, "empath-relay-") as tmp:
        meta: dict[str, Any] = {
            "benchmark": "relay",
            "started": started,
            "machine": accept.machine_info(tmp),
            "versions": versions(),
            "params": asdict(p),
            "empath_cmd": p.empath_cmd,
            "sink": f"smtp-sink -c -u {SINK_USER} {HOST}:{SINK_PORT} {SINK_BACKLOG}",
        }
        sink = Sink(tmp, dump=p.dump)
        postfix = RelayPostfix(tmp, sink)
        empaths = [] if p.skip_empath else [RelayEmpath(tmp, p.empath_cmd, w) for w in p.workers]
        targets: list[RelayTarget] = ([] if p.skip_postfix else [postfix]) + list(empaths)
        for t in targets:
            rounds[t.label] = []
        try:
            if not p.skip_postfix:
                postfix.start()
            for rnd in range(1, p.rounds + 1):
                for t in targets:
                    r = relay_round(t, sink, p, rnd)
                    rounds[t.label].append(r)
                    if r.error and isinstance(t, RelayEmpath):
                        log(f"{t.label} log tail:\n{accept._tail(t.log_file)}")
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted; cleaning up and reporting partial results")
        except BenchError as exc:
            fatal = str(exc)
            log(f"FATAL: {exc}")
        finally:
            for e in empaths:
                e.kill()
            sink.stop()
            postfix.stop()

    summaries = [summarise(label, rs, p.messages) for label, rs in rounds.items()]
    base = next((s.median_rate for s in summaries if s.target == "postfix"), None)
    for s in summaries:
        if base and s.median_rate is not None:
            s.ratio_vs_postfix = s.median_rate / base
    meta["loadavg_at_end"] = accept.loadavg()
    print(render(meta, summaries))

    delivered_ok = all(s.delivered_ok for s in summaries)
    all_ok = (
        not interrupted
        and fatal is None
        and delivered_ok
        and all(s.rounds_ok == s.rounds == p.rounds for s in summaries)
    )
    result = {
        **meta,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "fatal": fatal,
        "all_ok": all_ok,
        "summary": [asdict(s) for s in summaries],
        "rounds": [asdict(r) for rs in rounds.values() for r in rs],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {json_path}")
    if not delivered_ok:
        print("\n!!! SOME ROUNDS DID NOT DELIVER EXACTLY N MESSAGES -- see 'delivered' !!!")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
