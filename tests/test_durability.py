"""Durability of the spool: what got a 250 survives kill -9; nothing partial is left.

* the crash test: thousands of messages from concurrent clients, ``kill -9`` of the
  whole daemon mid-stream, restart, and every acknowledged message is back byte-exact;
* the system-call order under ``strace -f``: fsync(data), rename, fsync(queue dir)
  happen before the ``250`` is written to the socket, for every message — the proof
  that even a power cut (which, unlike kill -9, loses the page cache) cannot lose it;
* ENOSPC during DATA on a tiny tmpfs: ``451 4.3.0``, nothing partial, the next
  message is fine; below ``min_free_space`` MAIL gets ``452 4.3.1``;
* recovery of a damaged spool: the daemon starts, keeps the good, quarantines the bad
  with a log line naming each id and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from empath.spool.ids import new_message_id
from tests.conftest import IN_CI, require_tool
from tests.harness import (
    Daemon,
    RawClient,
    children_of,
    queued_id,
    send_message,
    spool_record,
    strip_received,
)

MakeDaemon = Callable[..., Daemon]

RECOVERED = re.compile(
    r"spool recovered: (\d+) messages queued, (\d+) temporary files removed, (\d+) quarantined"
)


# ---- helpers -----------------------------------------------------------------------


def make_body(rng: random.Random, token: str, size: int) -> bytes:
    """A message of about ``size`` bytes (CRLF lines, some starting with dots)."""
    lines = [
        f"Message-ID: <{token}@client.test>".encode(),
        f"Subject: crash test {token}".encode(),
        b"",
        f"token {token}".encode(),
    ]
    total = sum(len(line) + 2 for line in lines)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_"
    while total < size:
        r = rng.random()
        if r < 0.05:
            line = "."
        elif r < 0.10:
            line = ".." + "".join(rng.choices(alphabet, k=rng.randint(0, 60)))
        elif r < 0.15:
            line = "." + "".join(rng.choices(alphabet, k=rng.randint(1, 60)))
        elif r < 0.18:
            line = ""
        else:
            line = "".join(rng.choices(alphabet, k=rng.randint(1, 120)))
        lines.append(line.encode())
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


def dot_stuff(body: bytes) -> bytes:
    """The DATA payload for ``body`` (which ends in CRLF), terminator included."""
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines[:-1]]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


def restart(d: Daemon) -> None:
    """Start ``d`` again with a fresh log: wait_ready looks for "ready" in the log,
    which the previous run already wrote."""
    if d.log_path.exists():
        n = len(list(d.workdir.glob("daemon.log.*")))
        d.log_path.rename(d.workdir / f"daemon.log.{n + 1}")
    d.start()


def read_envelope(queue_dir: Path, qid: str) -> dict[str, object]:
    return spool_record(queue_dir, qid)


def recovery_line(log: str) -> tuple[int, int, int]:
    """(queued, tmp removed, quarantined) from the last ``spool recovered`` log line."""
    found = RECOVERED.findall(log)
    assert found, "no 'spool recovered' line in the daemon log:\n" + log
    queued, removed, quarantined = found[-1]
    return int(queued), int(removed), int(quarantined)


def assert_spool_consistent(d: Daemon) -> list[str]:
    """tmp/ is empty; every queue entry is a complete message file whose envelope
    parses and matches its data. Returns ids."""
    spool = d.state_dir / "spool"
    leftovers = sorted(p.name for p in (spool / "tmp").iterdir())
    assert leftovers == [], f"files left in spool/tmp: {leftovers[:10]}"
    names = [p.name for p in d.queue_dir.iterdir()]
    msgs = {n[:-4] for n in names if n.endswith(".msg")}
    envs = {n[:-4] for n in names if n.endswith(".env")}
    assert len(msgs) + len(envs) == len(names), f"unexpected files in queue/: {names}"
    assert envs <= msgs, f"envelope without data: {sorted(envs - msgs)[:5]}"
    for qid in msgs:
        env = read_envelope(d.queue_dir, qid)  # fails for data without envelope
        assert env["id"] == qid
        assert env["size"] == len(d.message_bytes(qid)), qid
    return sorted(msgs)


# ---- 1. the crash test -------------------------------------------------------------


@dataclass
class Sent:
    token: str
    sender: str
    rcpts: list[str]
    body: bytes
    qid: str | None = None  # set once the whole 250 line was read


CLIENTS = 10
TOTAL = 3000
KILL_AFTER = 1500


def test_kill_9_mid_stream_loses_no_acknowledged_message(make_daemon: MakeDaemon) -> None:
    d = make_daemon(workers=2)
    rng = random.Random(20240601)
    messages: list[Sent] = []
    for n in range(TOTAL):
        token = f"tok{n:05d}x{rng.getrandbits(40):010x}"
        size = int(200 * (100 ** rng.random()))  # 200 B … 20 KB, log-uniform
        rcpts = [f"user{(n + k) % 50}@test.example" for k in range(rng.randint(1, 3))]
        messages.append(Sent(token, f"sender{n}@client.example", rcpts,
                             make_body(rng, token, size)))

    acked = 0
    killed_at: float | None = None
    errors: list[str] = []
    started = time.monotonic()

    def kill_now() -> None:
        nonlocal killed_at
        if killed_at is None:
            d.kill()  # SIGKILL to supervisor and workers at once
            killed_at = time.monotonic()

    async def client(worker_no: int) -> None:
        nonlocal acked
        mine = messages[worker_no::CLIENTS]
        i = 0
        while i < len(mine) and killed_at is None:
            try:
                c = await RawClient.connect(d.smtp_port, "crash")
            except OSError as exc:
                errors.append(f"connect: {exc!r}")
                return
            try:
                await c.greet()
                # A few messages per connection, then a new connection.
                for _ in range(rng.randint(1, 8)):
                    if i >= len(mine) or killed_at is not None:
                        break
                    m = mine[i]
                    i += 1
                    code, text = await c.cmd(f"MAIL FROM:<{m.sender}>")
                    assert code == 250, text
                    for r in m.rcpts:
                        code, text = await c.cmd(f"RCPT TO:<{r}>")
                        assert code == 250, text
                    code, text = await c.cmd("DATA")
                    assert code == 354, text
                    c.send(dot_stuff(m.body))
                    code, text = await c.reply()
                    assert code == 250, text
                    m.qid = queued_id(text)
                    acked += 1
                    if acked >= KILL_AFTER:
                        kill_now()
                if killed_at is None:
                    await c.cmd("QUIT")
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                # Only expected once the daemon is dead.
                if killed_at is None:
                    errors.append(f"client {worker_no}: {exc!r}")
                    return
            finally:
                await c.close()

    async def main() -> None:
        await asyncio.gather(*(client(k) for k in range(CLIENTS)))

    asyncio.run(main())
    send_time = time.monotonic() - started
    assert not errors, errors[:5]
    assert killed_at is not None, "the daemon was never killed"
    acknowledged = [m for m in messages if m.qid is not None]
    assert len(acknowledged) >= KILL_AFTER

    # Restart on the same state directory.
    restart(d)
    queued_after, removed_tmp, quarantined = recovery_line(d.log())
    ids = set(assert_spool_consistent(d))
    assert queued_after == len(ids)

    # Every acknowledged message is there, byte-exact apart from our Received:,
    # with the envelope it was sent with.
    missing = [m.qid for m in acknowledged if m.qid not in ids]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    for m in acknowledged:
        assert m.qid is not None
        data = d.message_bytes(m.qid)
        assert strip_received(data) == m.body, f"message {m.qid} ({m.token}) differs"
        env = read_envelope(d.queue_dir, m.qid)
        assert env["sender"] == m.sender
        assert [r["address"] for r in env["recipients"]] == m.rcpts  # type: ignore[union-attr]

    # Unacknowledged messages are either complete (the 250 was lost with the
    # daemon) or absent: never a partial body, never twice.
    by_token = {m.token: m for m in messages}
    acked_ids = {m.qid for m in acknowledged}
    token_re = re.compile(rb"^token (tok\w+)\r$", re.M)
    seen_tokens: dict[str, str] = {}
    extra = 0
    for qid in ids:
        data = d.message_bytes(qid)
        found = token_re.search(data)
        assert found, f"queued message {qid} carries no token: partial or foreign"
        token = found.group(1).decode()
        assert token not in seen_tokens, f"{token} queued twice: {seen_tokens[token]}, {qid}"
        seen_tokens[token] = qid
        m = by_token[token]
        if qid not in acked_ids:
            extra += 1
            assert m.qid is None, f"{token} acked as {m.qid} but also queued as {qid}"
            assert strip_received(data) == m.body, f"unacknowledged {qid} is partial"

    # Whatever recovery quarantined must never be an acknowledged message, and each
    # one was logged.
    qdir = d.state_dir / "spool" / "quarantine"
    q_ids = {p.name.split(".")[0] for p in qdir.iterdir()}
    assert not (q_ids & acked_ids), f"acknowledged messages quarantined: {q_ids & acked_ids}"
    assert quarantined == len(q_ids)
    for qid in q_ids:
        assert re.search(rf"quarantined .*{qid}", d.log()), f"no log line for {qid}"

    print(
        f"\ncrash test: {len(acknowledged)} acknowledged of {TOTAL} in {send_time:.1f}s "
        f"before kill -9; after restart {len(ids)} queued ({extra} unacknowledged but "
        f"complete), {removed_tmp} tmp files removed, {quarantined} quarantined"
    )
    assert d.stop() == 0


# ---- 2. system-call order under strace ------------------------------------------------

_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)(?:\s.*)?$")


@dataclass
class Call:
    pid: int
    name: str
    args: str  # everything after "name(", with the resumed part appended
    start: int  # line index of the entry
    end: int  # line index of the exit
    result: int | None = None


def parse_strace(path: Path) -> list[Call]:
    """Syscalls in the order strace saw them; unfinished/resumed pairs joined.

    Under ptrace a tracee stays stopped at each syscall entry and exit until strace has
    handled (and printed) it, so "A's exit line comes before B's entry line" means A
    returned before B started, whichever threads they ran on.
    """
    calls: list[Call] = []
    open_calls: dict[tuple[int, str], Call] = {}
    for i, raw in enumerate(path.read_text(errors="replace").splitlines()):
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = int(m.group(1)), m.group(3)
        if rest.startswith(("+++", "---")):
            continue
        r = _RESUMED.match(rest)
        if r:
            call = open_calls.pop((pid, r.group(1)), None)
            if call is None:
                continue
            call.args += r.group(2)
            call.end = i
            res = _RESULT.search(r.group(2))
            call.result = int(res.group(1)) if res else None
            continue
        c = _CALL.match(rest)
        if not c:
            continue
        call = Call(pid, c.group(1), c.group(2), i, i)
        if rest.endswith("<unfinished ...>"):
            call.args = call.args[: -len("<unfinished ...>")]
            open_calls[(pid, call.name)] = call
        else:
            res = _RESULT.search(rest)
            call.result = int(res.group(1)) if res else None
        calls.append(call)
    return calls


def test_fsync_rename_dirsync_precede_every_250(make_daemon: MakeDaemon,
                                                 tmp_path: Path) -> None:
    strace = require_tool("strace")
    trace = tmp_path / "strace.out"
    d = make_daemon(start=False, workers=2)
    d.wrapper = [
        strace, "-f", "-yy", "-qq", "-ttt", "-s", "256",
        "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,write,writev,sendto,sendmsg",
        "-o", str(trace),
    ]
    d.start()
    started = time.monotonic()

    async def client(k: int) -> list[str]:
        ids = []
        for n in range(10):
            body = f"Subject: strace {k}/{n}\r\n\r\nbody {k} {n}\r\n".encode()
            code, text = await send_message(d.smtp_port, "s@client.example",
                                            [f"u{k}@test.example"], body, "strace")
            assert code == 250, text
            ids.append(queued_id(text))
        return ids

    async def main() -> list[str]:
        return [i for ids in await asyncio.gather(*(client(k) for k in range(5))) for i in ids]

    ids = asyncio.run(main())
    assert len(ids) == 50
    # strace is the process we started; stop the daemon it runs.
    assert d.proc is not None
    (supervisor,) = children_of(d.proc.pid)
    workers = children_of(supervisor)
    assert len(workers) == 2
    # strace shows thread ids; the spool's fsyncs run in each worker's syncer process.
    threads = threads_by_process(workers)
    os.kill(supervisor, signal.SIGTERM)
    assert d.proc.wait(30) == 0
    elapsed = time.monotonic() - started

    calls = parse_strace(trace)
    assert calls, "empty strace output"
    dir_syncs = check_syscall_order(calls, ids, d.state_dir / "spool", threads)
    print(f"\nstrace test: 50 messages, order verified for each, {dir_syncs} dir "
          f"fsyncs, {elapsed:.1f}s")


def check_syscall_order(calls: list[Call], ids: list[str], spool: Path,
                        threads: dict[int, set[int]]) -> int:
    """Assert fsync(message file) < rename < fsync(queue/) < write(250) for each id.

    Returns the number of successful queue/ fsyncs seen.
    """
    tmp_dir, queue_dir = f"{spool}/tmp", f"{spool}/queue"
    dir_syncs = [c for c in calls
                 if c.name in ("fsync", "fdatasync") and f"<{queue_dir}>" in c.args
                 and c.result == 0]
    assert dir_syncs, "queue/ is never fsync'ed"

    fsyncs = ("fsync", "fdatasync")
    renames = ("rename", "renameat", "renameat2")

    def one(names: tuple[str, ...], needles: list[str], what: str) -> Call:
        found = [c for c in calls if c.name in names and all(n in c.args for n in needles)]
        assert len(found) == 1, f"{what}: expected one call, found {len(found)}"
        assert found[0].result == 0, f"{what} failed: {found[0]}"
        return found[0]

    for qid in ids:
        fsync_msg = one(fsyncs, [f"<{tmp_dir}/{qid}.msg>"], f"fsync of {qid}.msg")
        ren_msg = one(renames, [f'"{tmp_dir}/{qid}.msg"', f'"{queue_dir}/{qid}.msg"'],
                      f"rename of {qid}.msg")
        reply = [c for c in calls
                 if c.name in ("write", "writev", "sendto", "sendmsg")
                 and re.match(r"\d+<TCP(v6)?:\[", c.args) and f"queued as {qid}" in c.args]
        assert len(reply) == 1, f"250 for {qid} written {len(reply)} times"
        write_250 = reply[0]
        assert fsync_msg.end < ren_msg.start, f"{qid}: data renamed before its fsync returned"
        renamed = ren_msg.end
        # A directory fsync of the same process that started after the rename and
        # returned before the 250 was written.
        process = threads.get(write_250.pid, {write_250.pid})
        covering = [s for s in dir_syncs
                    if s.pid in process and s.start > renamed and s.end < write_250.start]
        assert covering, (
            f"{qid}: no fsync of queue/ between its rename (line {renamed + 1}) and its "
            f"250 (line {write_250.start + 1})"
        )
    return len(dir_syncs)


_FAKE_ID = "01M89E1XCMZ0KMM1MN2F2HH593"


def _fake_trace(order: list[str]) -> str:
    """A minimal strace -f -yy -ttt log of one commit, lines in the given order."""
    sp = "/s/spool"
    q = _FAKE_ID
    lines = {
        "write_msg": f"write(11<{sp}/tmp/{q}.msg>, \"Received: ...\", 207) = 207",
        "fsync_start": f"fsync(11<{sp}/tmp/{q}.msg> <unfinished ...>",
        "fsync_end": "<... fsync resumed>) = 0",
        "rename_msg": f'rename("{sp}/tmp/{q}.msg", "{sp}/queue/{q}.msg") = 0',
        "fsync_dir": f"fsync(7<{sp}/queue>) = 0",
        "reply": (f'sendto(8<TCP:[127.0.0.1:2525->127.0.0.1:4000]>, '
                  f'"250 2.0.0 Ok: queued as {q}\\r\\n", 52, 0, NULL, 0) = 52'),
    }
    tid = {"fsync_dir": 101, "reply": 100}
    return "".join(f"{tid.get(k, 102)} 1700000000.{i:06d} {lines[k]}\n"
                   for i, k in enumerate(order))


@pytest.mark.parametrize("order, problem", [
    (["write_msg", "fsync_start", "fsync_end", "rename_msg", "fsync_dir", "reply"], None),
    (["write_msg", "rename_msg", "fsync_start", "fsync_end", "fsync_dir", "reply"],
     "data renamed before its fsync"),
    (["write_msg", "fsync_start", "rename_msg", "fsync_end", "fsync_dir", "reply"],
     "data renamed before its fsync"),
    (["write_msg", "fsync_start", "fsync_end", "fsync_dir", "rename_msg", "reply"],
     "no fsync of queue/"),
    (["write_msg", "fsync_start", "fsync_end", "rename_msg", "reply", "fsync_dir"],
     "no fsync of queue/"),
    (["write_msg", "fsync_start", "fsync_end", "rename_msg", "fsync_dir"], "250 for"),
])
def test_syscall_order_checker_catches_bad_orders(tmp_path: Path, order: list[str],
                                                  problem: str | None) -> None:
    """The strace check above can fail: it flags each wrong order on a synthetic trace."""
    trace = tmp_path / "trace"
    trace.write_text(_fake_trace(order))
    calls = parse_strace(trace)
    threads = {100: {100, 101, 102}, 101: {100, 101, 102}, 102: {100, 101, 102}}
    if problem is None:
        assert check_syscall_order(calls, [_FAKE_ID], Path("/s/spool"), threads) == 1
    else:
        with pytest.raises(AssertionError, match=re.escape(problem)):
            check_syscall_order(calls, [_FAKE_ID], Path("/s/spool"), threads)
    # A queue/ fsync by another process does not count for this worker.
    if problem is None:
        other = {100: {100}, 101: {101, 102}, 102: {101, 102}}
        with pytest.raises(AssertionError, match="no fsync of queue/"):
            check_syscall_order(calls, [_FAKE_ID], Path("/s/spool"), other)


def threads_by_process(pids: list[int]) -> dict[int, set[int]]:
    """{thread id: all thread ids of its worker} for the running workers ``pids``; a
    worker's spool syncer (its child, empath/spool/syncer.py) counts as part of it."""
    out: dict[int, set[int]] = {}
    for pid in pids:
        tids = {int(t) for p in [pid, *children_of(pid)] for t in os.listdir(f"/proc/{p}/task")}
        for tid in tids:
            out[tid] = tids
    return out


# ---- 3. ENOSPC and min_free_space ---------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(mode=0o750)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        msg = f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_enospc_during_data_gives_451_and_leaves_nothing(make_daemon: MakeDaemon) -> None:
    d = make_daemon(start=False, workers=2,
                    limits={"min_free_space": 1, "max_message_size": 10_000_000})
    with tmpfs(d.state_dir, "1m"):
        try:
            d.start()
            big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2100  # ~2 MB
            code, text = asyncio.run(send_message(
                d.smtp_port, "a@client.example", ["b@test.example"], big, "enospc"))
            assert (code, text[:5]) == (451, "4.3.0"), (code, text)
            spool = d.state_dir / "spool"
            assert list((spool / "tmp").iterdir()) == []
            assert list(d.queue_dir.iterdir()) == []
            assert "No space left on device" in d.log()

            small = b"Subject: small\r\n\r\nstill fine\r\n"
            code, text = asyncio.run(send_message(
                d.smtp_port, "a@client.example", ["b@test.example"], small, "enospc"))
            assert code == 250, text
            assert strip_received(d.message_bytes(queued_id(text))) == small
            assert list((spool / "tmp").iterdir()) == []
            assert d.stop() == 0

            # Below min_free_space, MAIL is refused before any data is taken.
            d.config["limits"] = {"min_free_space": 2 * 1024 * 1024}
            restart(d)

            async def mail() -> tuple[int, str]:
                c = await RawClient.connect(d.smtp_port, "min_free_space")
                try:
                    await c.greet()
                    return await c.cmd("MAIL FROM:<a@client.example>")
                finally:
                    await c.close()

            code, text = asyncio.run(mail())
            assert (code, text[:5]) == (452, "4.3.1"), (code, text)
            assert d.stop() == 0
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()


# ---- 4. recovery of a damaged spool -------------------------------------------------


def test_recovery_quarantines_damaged_entries(make_daemon: MakeDaemon) -> None:
    d = make_daemon(workers=2)
    good: dict[str, bytes] = {}
    for n in range(3):
        body = f"Subject: good {n}\r\n\r\nkeep me {n}\r\n".encode()
        code, text = asyncio.run(send_message(d.smtp_port, "a@client.example",
                                              ["b@test.example"], body, "recovery"))
        assert code == 250, text
        good[queued_id(text)] = d.message_bytes(queued_id(text))
    assert d.stop() == 0

    q = d.queue_dir
    spool = d.state_dir / "spool"
    template_id = next(iter(good))
    template_env = read_envelope(q, template_id)
    template_msg = good[template_id]

    def env_bytes(qid: str, **changes: object) -> bytes:
        return json.dumps({**template_env, "id": qid, **changes}).encode() + b"\n"

    bad: dict[str, str] = {}  # id -> expected reason fragment
    qid = new_message_id()
    (q / f"{qid}.msg").write_bytes(template_msg)
    bad[qid] = "data without envelope"
    # An envelope whose message file is gone: a removal interrupted between its two
    # unlinks. Removed, not quarantined.
    leftover = new_message_id()
    (q / f"{leftover}.env").write_bytes(env_bytes(leftover))
    qid = new_message_id()  # a message file whose envelope line is damaged
    line = b'{"version": 2, "id": "' + qid.encode() + b'"}\n'
    (q / f"{qid}.msg").write_bytes(template_msg + line + b"empath-envelope %010d\n" % len(line))
    bad[qid] = "corrupt envelope"
    qid = new_message_id()
    (q / f"{qid}.msg").write_bytes(template_msg)
    (q / f"{qid}.env").write_bytes(b'{"version": 1, "id": "' + qid.encode() + b'", "sen')
    bad[qid] = "corrupt envelope"
    qid = new_message_id()
    (q / f"{qid}.msg").write_bytes(template_msg[:-10])  # truncated data
    (q / f"{qid}.env").write_bytes(env_bytes(qid))
    bad[qid] = "size mismatch"
    (spool / "tmp" / f"{new_message_id()}.msg").write_bytes(b"half a mess")
    (spool / "tmp" / f"{new_message_id()}.env").write_bytes(b"{")

    restart(d)  # must become ready, not crash
    queued, removed_tmp, quarantined = recovery_line(d.log())
    assert (queued, removed_tmp, quarantined) == (3, 2, len(bad))
    assert list((spool / "tmp").iterdir()) == []
    assert set(assert_spool_consistent(d)) == set(good)
    for gid, data in good.items():
        assert d.message_bytes(gid) == data
    in_quarantine = {p.name for p in (spool / "quarantine").iterdir()}
    log = d.log()
    assert not (q / f"{leftover}.env").exists()
    assert not any(name.startswith(leftover) for name in in_quarantine)
    for qid, reason in bad.items():
        assert any(name.startswith(qid) for name in in_quarantine), f"{qid} not quarantined"
        assert re.search(rf"quarantined.*{qid}.*{reason}", log), (
            f"no log line naming {qid} with reason {reason!r}:\n{log}"
        )
    # The daemon serves after recovery.
    code, text = asyncio.run(send_message(d.smtp_port, "a@client.example",
                                          ["b@test.example"], b"Subject: after\r\n\r\nok\r\n",
                                          "recovery"))
    assert code == 250, text
    assert d.stop() == 0
