#!/usr/bin/env python3
"""Per-message latency on a reused connection for a client that leaves Nagle's
algorithm on and writes the terminating ``.<CRLF>`` on its own: empath vs Postfix,
in the same run.

Such a client's last small write waits until what it sent before is acknowledged;
once a connection has carried a few exchanges the receiving kernel delays its ACKs
(up to 40 ms on Linux), so every message waits that long for its ``250`` unless the
server acknowledges at once. The same pass with TCP_NODELAY on the client is the
control: there neither server should wait. Each session sends ``--messages`` messages
over one connection; ``--connections`` sessions run at once. Every message is checked
on disk afterwards, as in accept.py.

    sudo python3 bench/nagle.py [--connections 4] [--messages 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept import (  # bench scripts import their sibling
    HOST,
    RECIPIENT,
    SENDER,
    EmpathTarget,
    Params,
    PostfixInstance,
    SMTPReplyError,
    Target,
    _expect,
    log,
    make_payload,
    percentile,
    scratch_dir,
)
from common import alternate_rounds

SESSION_TIMEOUT = 120.0


@dataclass(slots=True)
class Pass:
    target: str
    client: str  # "nagle" | "nodelay"
    round: int
    messages: int = 0
    stored: int | None = None
    samples_ms: list[float] = field(default_factory=list, repr=False)
    error: str | None = None


async def _session(port: int, count: int, payload: bytes, nodelay: bool) -> list[float]:
    """One connection, ``count`` messages; the '.' -> 250 time of each, in ms."""
    reader, writer = await asyncio.open_connection(HOST, port)
    out: list[float] = []
    try:
        # asyncio turns Nagle off on every TCP connection it makes: turn it back on for
        # the client under test.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                                   1 if nodelay else 0)
        await _expect(reader, b"220")
        writer.write(b"EHLO nagle.bench.example\r\n")
        await _expect(reader, b"250")
        for _ in range(count):
            for command, code in ((f"MAIL FROM:<{SENDER}>", b"250"),
                                  (f"RCPT TO:<{RECIPIENT}>", b"250"), ("DATA", b"354")):
                writer.write(command.encode() + b"\r\n")
                await _expect(reader, code)
            writer.write(payload)  # header and body: one write ...
            await writer.drain()
            t0 = time.perf_counter()
            writer.write(b".\r\n")  # ... and the end of data in a second one
            await _expect(reader, b"250")
            out.append((time.perf_counter() - t0) * 1000)
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(SMTPReplyError, ConnectionError):
            await _expect(reader, b"221")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return out


async def _load(port: int, connections: int, count: int, payload: bytes,
                nodelay: bool) -> list[float]:
    async with asyncio.timeout(SESSION_TIMEOUT):
        results = await asyncio.gather(
            *(_session(port, count, payload, nodelay) for _ in range(connections)))
    return [ms for r in results for ms in r]


def one_pass(target: Target, client: str, rnd: int, a: argparse.Namespace) -> Pass:
    res = Pass(target.label, client, rnd)
    header = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: nagle\r\n\r\n".encode()
    payload = header + make_payload(a.size)
    target.begin()
    try:
        try:
            res.samples_ms = asyncio.run(
                _load(target.port, a.connections, a.messages, payload, client == "nodelay"))
        except (OSError, SMTPReplyError, TimeoutError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
    finally:
        stored = target.end(len(res.samples_ms))
    res.messages = len(res.samples_ms)
    res.stored = stored.found
    if not stored.ok:
        res.error = res.error or f"stored {stored.describe()}"
    return res


def _row(label: str, samples: list[float]) -> str:
    if not samples:
        return f"{label:<24} {'-':>8}"
    ms = sorted(samples)
    return (f"{label:<24} {len(ms):>6} {percentile(ms, 50):>9.2f} {percentile(ms, 90):>9.2f} "
            f"{percentile(ms, 99):>9.2f} {statistics.fmean(ms):>9.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=4, help="sessions at once")
    ap.add_argument("--messages", type=int, default=200, help="messages per session")
    ap.add_argument("--size", type=int, default=4096, help="body bytes per message")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--empath-cmd", default=f"{sys.executable} -m empath")
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--json", default=None, help="write every pass here")
    a = ap.parse_args()
    p = Params(messages=0, sessions=0, size=a.size, workers=[a.workers], rounds=a.rounds,
               latency_messages=0, latency_connections=0, empath_cmd=a.empath_cmd,
               standin=False, skip_postfix=a.skip_postfix, tmpdir=None, keep_tmp=False)
    passes: list[Pass] = []
    def both_clients(target: Target, rnd: int) -> None:
        for client in ("nagle", "nodelay"):
            r = one_pass(target, client, rnd, a)
            passes.append(r)
            med = statistics.median(r.samples_ms) if r.samples_ms else math.nan
            log(f"{target.label:<12} {client:<7} round {rnd}: {r.messages} msgs, "
                f"p50 {med:.2f} ms" + (f"  FAILED: {r.error}" if r.error else ""))

    with scratch_dir(p, "empath-nagle-", postfix=not a.skip_postfix) as tmp:
        postfix = None if a.skip_postfix else PostfixInstance(tmp)
        targets: list[Target] = [EmpathTarget(tmp, a.empath_cmd, a.workers, standin=False)]
        targets += [] if postfix is None else [postfix]
        if not alternate_rounds(targets, a.rounds, postfix, both_clients):
            return 1
    print(f"\n'.' -> 250 on reused connections: {a.connections} sessions x {a.messages} msgs "
          f"x {a.rounds} rounds, {a.size} B body, the '.' written separately; "
          f"1-min load {os.getloadavg()[0]:.2f} at the end")
    print(f"{'target, client':<24} {'msgs':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
          f"{'mean ms':>9}")
    for target in targets:
        for client in ("nagle", "nodelay"):
            samples = [ms for r in passes if r.target == target.label and r.client == client
                       for ms in r.samples_ms]
            print(_row(f"{target.label}, {client}", samples))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in passes], indent=2))
    return 0 if all(r.error is None for r in passes) else 1


if __name__ == "__main__":
    sys.exit(main())
