#!/usr/bin/env python3
"""Queue operations on a large spool: recovery at start, ``queue list``, ``queue stats``.

Builds a spool of N queued messages (default 100,000, small bodies) by writing the
files straight into ``spool/queue/`` (envelopes made by ``Envelope.to_bytes``, so
they are exactly what the daemon writes), starts the real daemon on it
(``delivery.mode: hold``, nothing is delivered) and measures:

- time from exec to ``READY=1`` (read on our own ``$NOTIFY_SOCKET``): recovery of N
  messages, scheduling them, starting the workers;
- ``empathctl --json queue list``: wall time, output size, messages in the output;
- ``empathctl queue stats``: wall time;
- peak RSS of the daemon's process tree (``accept.py``'s sampler), per step and
  overall, and the peak RSS of each ``empathctl`` process.

Afterwards the daemon is stopped and the spool must still hold N messages with
nothing quarantined. See bench/README.md.

Usage::

    python3 bench/queue_ops.py [--messages 100000] [--recipients 1] [--history 0]
                               [--repeat 3] [--workers 2] [--json PATH] [--cold]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accept
from accept import MIB, BenchError, TreeSampler, log

REPO = accept.REPO
sys.path.insert(0, str(REPO))

from empath.spool import Envelope, Recipient, Spool  # noqa: E402
from empath.spool.envelope import ENVELOPE_VERSION, HISTORY_LIMIT, Attempt  # noqa: E402
from empath.spool.ids import new_message_id  # noqa: E402
from empath.spool.store import ENVELOPE_TRAILER  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "bench.example"
READY_TIMEOUT = 1800.0  # seconds from exec to READY=1 (recovery of a huge spool)
STOP_TIMEOUT = 120.0
CONTROL_FILES = ("empath/control/commands.py", "empath/control/protocol.py",
                 "empath/control/queueops.py", "empath/control/server.py", "empath/ctl.py")


# ------------------------------------------------------------------------------ spool


def _body(i: int, size: int) -> bytes:
    head = (f"Received: from client.bench.example (client.bench.example [127.0.0.1])\r\n"
            f"\tby {DOMAIN} with ESMTP id bench{i}\r\n"
            f"From: <sender@{DOMAIN}>\r\nTo: <rcpt{i}@example.net>\r\n"
            f"Subject: queue bench {i}\r\nMessage-ID: <{i}@{DOMAIN}>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + (line * (size // len(line) + 1))[:size]


def _recipients(i: int, p: Params, now: float) -> list[Recipient]:
    out = []
    for k in range(p.recipients):
        domain = f"d{(i * p.recipients + k) % p.domains}.example"
        address = f"rcpt{i}.{k}@{domain}"
        if p.history == 0:
            out.append(Recipient(address))
            continue
        # A stuck recipient: greylisted on every attempt, over TLS, by the domain's MX.
        diag = (f"smtp; 451 4.7.1 <{address}>: Recipient address rejected: Greylisted, "
                f"see https://postgrey.example/help/{domain}.html")
        r = Recipient(address, state="deferred", attempts=p.history,
                      next_attempt=now + 3600, last_error=diag)
        for n in range(p.history):
            r.record(Attempt.make(now - 600 * (p.history - n), "deferred", "4.7.1", diag,
                                  f"mx1.{domain}", "TLSv1.3 TLS_AES_256_GCM_SHA384"))
        out.append(r)
    return out


@dataclass
class Built:
    messages: int
    seconds: float
    env_bytes: int
    msg_bytes: int


def build_spool(root: Path, p: Params) -> Built:
    """Write N committed messages into root/queue/ (then one sync for the lot).

    Not the commit path (no per-message fsync, no rename): this is set-up, and the
    result is what recovery sees after a clean shutdown. Ids come from
    new_message_id (time-ordered), so the oldest message is listed first."""
    spool = Spool(root)
    spool.prepare()
    spool.close()
    queue = spool.queue_dir
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    start = time.monotonic()
    now = time.time()
    env_bytes = msg_bytes = 0
    for i in range(p.messages):
        id = new_message_id()
        data = _body(i, p.size)
        env = Envelope(
            id=id, sender=f"sender@{DOMAIN}", recipients=_recipients(i, p, now),
            received_at=now - (p.messages - i), client_addr="127.0.0.1",
            client_port=40000 + i % 20000, helo="client.bench.example", size=len(data),
        )
        raw = env.to_bytes()
        # What commit writes: one file, the data then the envelope line and its length.
        # A message with history has been tried: its changed envelope is beside it.
        files = [(f"{id}.msg", data + raw + ENVELOPE_TRAILER % len(raw))]
        if p.history:
            files.append((f"{id}.env", raw))
        for name, content in files:
            fd = os.open(queue / name, flags, 0o600)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
        env_bytes += len(raw)
        msg_bytes += len(data)
        if (i + 1) % 20_000 == 0:
            log(f"built {i + 1}/{p.messages} messages ({time.monotonic() - start:.1f}s)")
    os.sync()
    return Built(p.messages, time.monotonic() - start, env_bytes, msg_bytes)


# ----------------------------------------------------------------------------- daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Daemon:
    """``empath run`` on the prepared state directory, with our own NOTIFY_SOCKET."""

    def __init__(self, base: Path, state: Path, p: Params) -> None:
        self.base = base
        self.port = free_port()
        self.control = base / "run" / "control.sock"
        self.log_file = base / "empath.log"
        self.config = base / "empath.yaml"
        self.config.write_text(f"""\
hostname: {DOMAIN}
postmaster: postmaster@{DOMAIN}
listen: [{{address: "{HOST}:{self.port}", role: smtp}}]
state_dir: {state}
local_domains: [{DOMAIN}]
relay_networks: [127.0.0.0/8]
delivery: {{mode: hold}}
control: {{socket: {self.control}}}
workers: {p.workers}
log: {{level: warning}}
""")
        (base / "run").mkdir(mode=0o755)
        self.cmd = p.empath_cmd
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = base / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(self.notify_path))
        self.events: list[tuple[float, str]] = []  # (seconds since exec, datagram)
        self.t0 = 0.0

    def argv(self) -> list[str]:
        if "{config}" in self.cmd:
            return shlex.split(self.cmd.replace("{config}", shlex.quote(str(self.config))))
        return [*shlex.split(self.cmd), "run", "--config", str(self.config)]

    def spawn(self) -> int:
        """Exec the daemon with NOTIFY_SOCKET pointing at our datagram socket."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env.pop("EMPATH_LOG", None)
        self.t0 = time.monotonic()
        with open(self.log_file, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.base, env=env, start_new_session=True,
            )
        return self.proc.pid

    def wait_ready(self) -> float:
        """Seconds from exec until the daemon sent READY=1."""
        assert self.proc is not None
        self.notify.settimeout(0.5)
        while time.monotonic() - self.t0 < READY_TIMEOUT:
            if self.proc.poll() is not None:
                raise BenchError(f"empath exited with {self.proc.returncode} before READY=1\n"
                                 f"{accept._tail(self.log_file)}")
            try:
                data = self.notify.recv(65536).decode("utf-8", "replace")
            except TimeoutError:
                continue
            self.events.append((time.monotonic() - self.t0, data))
            if "READY=1" in data.split("\n"):
                return self.events[-1][0]
        raise BenchError(f"no READY=1 within {READY_TIMEOUT:.0f}s\n{accept._tail(self.log_file)}")

    def stop(self) -> tuple[int | None, float]:
        proc, self.proc = self.proc, None
        if proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"empath still running {STOP_TIMEOUT:.0f}s after SIGTERM; SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
        return proc.returncode, time.monotonic() - t0

    def close(self) -> None:
        self.stop()
        self.notify.close()


# ---------------------------------------------------------------------------- control


@dataclass
class CtlRun:
    argv: list[str]
    seconds: float
    exit_status: int
    output_bytes: int
    client_peak_rss_mib: float
    daemon_peak_rss_mib: float
    stderr: str = ""
    messages: int | None = None  # ``queue list`` only: messages found in the output
    output_format: str | None = None  # json | json-lines | ?


def _vm_hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, bytes); 0 once it has exited."""
    try:
        data = accept._read_proc(f"/proc/{pid}/status")
    except OSError:
        return 0
    for line in data.splitlines():
        if line.startswith(b"VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def ctl_run(daemon: Daemon, p: Params, args: Sequence[str], out_path: Path) -> CtlRun:
    """Run empathctl with stdout to a file: wall time, and the client's own peak RSS.

    The client's peak is its VmHWM polled every 10 ms (the last poll before exit is
    the figure). Not wait4's ru_maxrss: exec carries the forking parent's high-water
    mark into it, and this bench is a large process after building the spool."""
    argv = [*shlex.split(p.ctl_cmd), "--socket", str(daemon.control),
            "--timeout", str(p.ctl_timeout), *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    assert daemon.proc is not None
    err_path = out_path.with_suffix(".err")
    client_hwm = 0
    with TreeSampler(daemon.proc.pid) as sampler, open(out_path, "wb") as out, \
            open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        while True:
            client_hwm = max(client_hwm, _vm_hwm(proc.pid))
            try:
                code = proc.wait(0.01)
                break
            except subprocess.TimeoutExpired:
                continue
        seconds = time.monotonic() - t0
    return CtlRun(
        argv=argv, seconds=seconds, exit_status=code,
        output_bytes=out_path.stat().st_size,
        client_peak_rss_mib=client_hwm / MIB,
        daemon_peak_rss_mib=sampler.peak_rss / MIB,
        stderr=err_path.read_text(errors="replace").strip()[-2000:],
    )


def count_listed(path: Path) -> tuple[int | None, str]:
    """Messages in ``empathctl --json queue list`` output, whatever its framing."""
    text = path.read_text(errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(value, list):
            return len(value), "json"
        if isinstance(value, dict):
            for key in ("messages", "items", "results"):
                if isinstance(value.get(key), list):
                    return len(value[key]), f"json object ({key})"
        return None, "json (unrecognised shape)"
    n = 0
    for line in text.splitlines():  # one JSON value per line (streamed output)
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            return None, "?"
        n += len(item) if isinstance(item, list) else 1
    return n, "json-lines"


def control_plane_version() -> dict[str, Any]:
    """Which control plane was measured: HEAD, local changes, and file digests."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=False)
        return proc.stdout.strip()

    digests = {}
    for name in CONTROL_FILES:
        with contextlib.suppress(OSError):
            digests[name] = hashlib.sha256((REPO / name).read_bytes()).hexdigest()[:12]
    changed = git("status", "--porcelain", "--", *CONTROL_FILES).splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "locally_modified": changed,
            "sha256": digests}


# ------------------------------------------------------------------------------- main


@dataclass
class Params:
    messages: int
    recipients: int
    domains: int
    history: int
    size: int
    workers: int
    repeat: int
    cold: bool
    ctl_timeout: float
    empath_cmd: str
    ctl_cmd: str
    tmpdir: Path
    keep_tmp: bool


@dataclass
class Result:
    built: Built | None = None
    ready_seconds: float | None = None
    recovering_at: float | None = None  # STATUS=recovering the spool, seconds after exec
    startup_peak_rss_mib: float | None = None
    idle_rss_mib: float | None = None  # after READY=1, before any request
    list_runs: list[CtlRun] = field(default_factory=list)
    stats_runs: list[CtlRun] = field(default_factory=list)
    overall_peak_rss_mib: float | None = None
    overall_peak_pss_mib: float | None = None
    peak_procs: int | None = None
    stop_seconds: float | None = None
    exit_status: int | None = None
    queued_after: int | None = None
    quarantined_after: int | None = None
    errors: list[str] = field(default_factory=list)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def render(meta: dict[str, Any], r: Result) -> str:
    p, m, cp = meta["params"], meta["machine"], meta["control_plane"]
    fmt = accept._fmt
    b = r.built
    lines = [
        f"empath queue-ops benchmark  {meta['started']}",
        f"machine:  {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"spool fs {m['tmp_filesystem']}",
        f"empath:   {meta['empath_cmd']}  (workers {p['workers']}, delivery.mode hold)",
        f"control:  HEAD {cp['head']}"
        + (f" + local changes in {len(cp['locally_modified'])} control-plane file(s)"
           if cp["locally_modified"] else " (no local changes)")
        + f"; queueops {cp['sha256'].get('empath/control/queueops.py', '?')}",
        *accept.busy_warning(m),
    ]
    if b is not None:
        lines.append(
            f"spool:    {b.messages} messages x {p['recipients']} rcpt, history {p['history']} "
            f"per rcpt, envelope v{meta['envelope_version']} avg {b.env_bytes / b.messages:.0f} B "
            f"({b.env_bytes / MIB:.1f} MiB), data avg {b.msg_bytes / b.messages:.0f} B; "
            f"built in {b.seconds:.1f}s" + ("; page cache dropped before start" if p["cold"]
                                            else "; page cache warm"))
    lines += [
        "",
        f"{'step':<34} {'wall s':>8} {'min-max':>12} {'output':>12} {'daemon RSS MiB':>15} "
        f"{'client RSS MiB':>15}  notes",
        f"{'start -> READY=1':<34} {fmt(r.ready_seconds, '.2f'):>8} {'':>12} {'':>12} "
        f"{fmt(r.startup_peak_rss_mib):>15} {'':>15}  "
        + (f"recovery began {r.recovering_at:.2f}s after exec; " if r.recovering_at else "")
        + f"idle after ready {fmt(r.idle_rss_mib)} MiB",
    ]
    for label, runs in ((f"empathctl --json queue list x{len(r.list_runs)}", r.list_runs),
                        (f"empathctl queue stats x{len(r.stats_runs)}", r.stats_runs)):
        ok = [c for c in runs if c.exit_status == 0]
        secs = [c.seconds for c in ok]
        out = _median([float(c.output_bytes) for c in ok])
        note = ""
        if runs and runs[0].messages is not None:
            note = f"{runs[0].messages} messages listed ({runs[0].output_format})"
        failed = [c for c in runs if c.exit_status != 0]
        if failed:
            note += f" FAILED x{len(failed)} (exit {failed[0].exit_status}: " \
                    f"{failed[0].stderr.splitlines()[-1] if failed[0].stderr else ''})"
        lines.append(
            f"{label:<34} {fmt(_median(secs), '.2f'):>8} {_spread(secs):>12} "
            f"{_size(out):>12} "
            f"{fmt(max((c.daemon_peak_rss_mib for c in runs), default=None)):>15} "
            f"{fmt(max((c.client_peak_rss_mib for c in runs), default=None)):>15}  {note}")
    lines += [
        f"{'whole run (daemon process tree)':<34} {'':>8} {'':>12} {'':>12} "
        f"{fmt(r.overall_peak_rss_mib):>15} {'':>15}  peak PSS "
        f"{fmt(r.overall_peak_pss_mib)} MiB, {r.peak_procs} processes",
        "",
        f"after SIGTERM: exit {r.exit_status} in {fmt(r.stop_seconds, '.2f')}s; "
        f"{r.queued_after} messages queued, {r.quarantined_after} quarantined",
    ]
    lines += [f"ERROR: {e}" for e in r.errors]
    return "\n".join(lines)


def default_ctl_cmd() -> str:
    venv = REPO / ".venv" / "bin" / "empathctl"
    if venv.exists():
        return shlex.quote(str(venv))
    return f"{shlex.quote(sys.executable)} -m empath.ctl"


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=100_000, help="messages in the spool")
    ap.add_argument("--recipients", type=int, default=1, help="recipients per message")
    ap.add_argument("--domains", type=int, default=1000, help="distinct recipient domains")
    ap.add_argument("--history", type=int, default=0,
                    help=f"attempts in each recipient's history (0: pending, never tried; "
                         f"1-{HISTORY_LIMIT}: deferred, greylisted that many times)")
    ap.add_argument("--size", type=int, default=256, help="body bytes per message")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each empathctl command")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before starting the daemon (root)")
    ap.add_argument("--ctl-timeout", type=float, default=600.0,
                    help="empathctl --timeout for each request")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file (default bench/results/queue-<timestamp>.json)")
    ap.add_argument("--empath-cmd", default=None, help="how to start empath (as accept.py)")
    ap.add_argument("--ctl-cmd", default=None, help="how to run empathctl")
    ap.add_argument("--tmpdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--keep-tmp", action="store_true")
    a = ap.parse_args(argv)
    if a.messages < 1 or a.recipients < 1 or a.domains < 1 or a.repeat < 1:
        ap.error("--messages, --recipients, --domains and --repeat must be positive")
    if not 0 <= a.history <= HISTORY_LIMIT:
        ap.error(f"--history must be 0-{HISTORY_LIMIT}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = a.json or REPO / "bench" / "results" / f"queue-{stamp}.json"
    return Params(
        messages=a.messages, recipients=a.recipients, domains=a.domains, history=a.history,
        size=a.size, workers=a.workers, repeat=a.repeat, cold=a.cold,
        ctl_timeout=a.ctl_timeout, empath_cmd=a.empath_cmd or accept.default_empath_cmd(),
        ctl_cmd=a.ctl_cmd or default_ctl_cmd(), tmpdir=a.tmpdir, keep_tmp=a.keep_tmp,
    ), json_path


def run(p: Params, tmp: Path, r: Result) -> None:
    state = tmp / "state"
    state.mkdir(mode=0o750)
    log(f"building a spool of {p.messages} messages under {state} ...")
    r.built = build_spool(state / "spool", p)
    log(f"built in {r.built.seconds:.1f}s")
    if p.cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    daemon = Daemon(tmp, state, p)
    try:
        pid = daemon.spawn()
        with TreeSampler(pid) as startup:  # from exec (the sampler's first sample) on
            r.ready_seconds = daemon.wait_ready()
        r.startup_peak_rss_mib = startup.peak_rss / MIB
        r.recovering_at = next((t for t, d in daemon.events if "recovering" in d), None)
        assert daemon.proc is not None
        with TreeSampler(daemon.proc.pid) as whole:
            time.sleep(1.0)
            r.idle_rss_mib = whole.peak_rss / MIB
            for i in range(p.repeat):
                c = ctl_run(daemon, p, ["--json", "queue", "list"], tmp / f"list-{i}.out")
                if i == 0 and c.exit_status == 0:
                    c.messages, c.output_format = count_listed(tmp / f"list-{i}.out")
                r.list_runs.append(c)
                log(f"queue list #{i + 1}: {c.seconds:.2f}s, {c.output_bytes} bytes, "
                    f"exit {c.exit_status}")
            for i in range(p.repeat):
                c = ctl_run(daemon, p, ["queue", "stats"], tmp / f"stats-{i}.out")
                r.stats_runs.append(c)
                log(f"queue stats #{i + 1}: {c.seconds:.2f}s, exit {c.exit_status}")
        r.overall_peak_rss_mib = max(startup.peak_rss, whole.peak_rss) / MIB
        r.overall_peak_pss_mib = max(startup.peak_pss, whole.peak_pss) / MIB
        r.peak_procs = max(startup.peak_procs, whole.peak_procs)
        r.exit_status, r.stop_seconds = daemon.stop()
    finally:
        daemon.close()
    queue = state / "spool" / "queue"
    r.queued_after = sum(1 for _ in queue.glob("*.msg"))
    r.quarantined_after = sum(1 for _ in (state / "spool" / "quarantine").iterdir())
    for c in r.list_runs + r.stats_runs:
        if c.exit_status != 0:
            r.errors.append(f"{shlex.join(c.argv[-3:])} exited {c.exit_status}: {c.stderr}")
    listed = r.list_runs[0].messages if r.list_runs else None
    if listed is not None and listed != p.messages:
        r.errors.append(f"queue list showed {listed} messages, expected {p.messages}")
    if r.queued_after != p.messages or r.quarantined_after:
        r.errors.append(f"after the run {r.queued_after} messages queued (expected "
                        f"{p.messages}), {r.quarantined_after} quarantined")
    if r.exit_status != 0:
        r.errors.append(f"empath exit status {r.exit_status}\n{accept._tail(daemon.log_file)}")


def main(argv: Sequence[str] | None = None) -> int:
    p, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, accept._raise_interrupt)
    signal.signal(signal.SIGHUP, accept._raise_interrupt)
    r = Result()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with accept.scratch_dir(p, "empath-queue-", postfix=False) as tmp:
        meta: dict[str, Any] = {
            "started": started,
            "machine": accept.machine_info(tmp),
            "versions": accept.versions(),
            "empath_cmd": p.empath_cmd,
            "ctl_cmd": p.ctl_cmd,
            "envelope_version": ENVELOPE_VERSION,
            "control_plane": control_plane_version(),
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(p).items()},
        }
        try:
            run(p, tmp, r)
        except (BenchError, OSError) as exc:
            r.errors.append(str(exc))
        except KeyboardInterrupt:
            r.errors.append("interrupted")
        meta["loadavg_at_end"] = accept.loadavg()
    print(render(meta, r))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "result": asdict(r)}, indent=2) + "\n")
    log(f"results written to {json_path}")
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
