"""The durable spool: real files under tmp_path, syscall order, recovery, envelopes."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath.spool import (
    CorruptEnvelope,
    Envelope,
    Recipient,
    RecoveryReport,
    Spool,
    SpoolError,
    SpoolWriter,
    is_message_id,
    new_message_id,
    open_message,
    store,
)
from empath.spool.envelope import (
    ENVELOPE_VERSION,
    HISTORY_FIELD_MAX,
    HISTORY_LIMIT,
    HISTORY_TEXT_MAX,
    Attempt,
)
from empath.spool.ids import message_id_time
from tests.harness import spool_data, spool_record


def make_env(id: str, **kw: Any) -> Envelope:
    fields: dict[str, Any] = {
        "sender": "alice@example.org",
        "recipients": [Recipient("bob@example.com"), Recipient("carol@example.com")],
        "received_at": 1_700_000_000.25,
        "client_addr": "192.0.2.7",
        "client_port": 40000,
        "helo": "client.example.org",
    }
    fields.update(kw)
    return Envelope(id=id, **fields)


async def commit_one(spool: Spool, data: bytes, chunk: int = 1000, **kw: Any) -> str:
    w = spool.create()
    for i in range(0, len(data), chunk):
        w.write(data[i : i + chunk])
    await spool.commit(w, make_env(w.id, **kw))
    return w.id


def commit_sync(spool: Spool, data: bytes, **kw: Any) -> str:
    return asyncio.run(commit_one(spool, data, **kw))


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    s.prepare()
    yield s
    s.close()


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


MESSAGE = (
    b"Received: from client.example.org ([192.0.2.7])\r\n\tby mx.example.com; "
    b"Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n.\r\n\x00\xff"
)


# -- commit and read back ----------------------------------------------------


def test_commit_then_reload_in_new_spool_is_byte_exact(spool: Spool) -> None:
    big = MESSAGE + os.urandom(300_000)  # crosses the 64 KiB write buffer many times
    id = commit_sync(spool, big, body="8BITMIME", tls="TLSv1.3 TLS_AES_256_GCM_SHA384")
    spool.close()

    again = Spool(spool.root)
    try:
        assert again.recover() == RecoveryReport(ids=[id], removed_tmp=0, quarantined=[])
        assert again.ids() == [id]
        env = again.load(id)
        assert env == make_env(
            id, body="8BITMIME", tls="TLSv1.3 TLS_AES_256_GCM_SHA384", size=len(big)
        )
        with again.open_data(id) as f:
            assert f.read() == big
    finally:
        again.close()
    assert listing(spool.tmp_dir) == []
    assert listing(spool.queue_dir) == [f"{id}.msg"]  # one file per message


def test_tmp_file_is_made_only_when_the_data_outgrows_the_buffer(spool: Spool) -> None:
    small = spool.create()
    small.write(MESSAGE)
    assert listing(spool.tmp_dir) == []  # nothing on disk before the commit job
    big = spool.create()
    big.write(b"y" * (store.WRITE_BUFFER + 1))
    assert listing(spool.tmp_dir) == [f"{big.id}.msg"]  # streamed: memory stays bounded
    asyncio.run(spool.commit(small, make_env(small.id)))
    big.abort()
    assert listing(spool.tmp_dir) == []
    assert spool.ids() == [small.id]
    with spool.open_data(small.id) as f:
        assert f.read() == MESSAGE


def test_commit_sets_size_and_envelope_file_is_versioned_json(spool: Spool) -> None:
    w = spool.create()
    w.write(MESSAGE)
    env = make_env(w.id, size=999)
    asyncio.run(spool.commit(w, env))
    assert env.size == len(MESSAGE) == w.size
    # The file: the data, then the envelope as one JSON line, then its length.
    entry = (spool.queue_dir / f"{w.id}.msg").read_bytes()
    assert entry.startswith(MESSAGE)
    line = entry[len(MESSAGE):-27]
    assert entry[-27:] == b"empath-envelope %010d\n" % len(line)
    assert line.endswith(b"}\n") and b"\n" not in line[:-1]
    raw = json.loads(line)
    assert raw == spool_record(spool.queue_dir, w.id)
    assert raw["version"] == ENVELOPE_VERSION == 2
    assert raw["id"] == w.id and raw["size"] == len(MESSAGE)
    assert [r["history"] for r in raw["recipients"]] == [[], []]


def test_empty_message(spool: Spool) -> None:
    id = commit_sync(spool, b"")
    assert spool.load(id).size == 0
    with spool.open_data(id) as f:
        assert f.read() == b""


def test_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        s = Spool(tmp_path / "state" / "spool")
        (tmp_path / "state").mkdir()
        s.prepare()
        id = commit_sync(s, MESSAGE)
        w = s.create()
        w.write(b"x" * store.WRITE_BUFFER)  # outgrows the buffer: the tmp file exists
    finally:
        os.umask(old)
    try:
        for d in (s.root, s.tmp_dir, s.queue_dir, s.quarantine_dir):
            assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700, d
        s.update(s.load(id))  # writes the changed envelope beside the message
        for p in (s.queue_dir / f"{id}.msg", s.queue_dir / f"{id}.env", w.path):
            assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p
        w.abort()
        # an existing, too-open directory is tightened
        os.chmod(s.queue_dir, 0o755)
        s.prepare()
        assert stat.S_IMODE(os.lstat(s.queue_dir).st_mode) == 0o700
    finally:
        s.close()


def test_prepare_refuses_symlinked_dir(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "queue").symlink_to(tmp_path / "elsewhere")
    s = Spool(root)
    with pytest.raises(SpoolError) as ei:
        s.prepare()
    assert ei.value.errno == errno.ENOTDIR
    s.close()


@pytest.mark.parametrize("dangling", [False, True])
def test_create_does_not_follow_planted_symlink(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dangling: bool
) -> None:
    fixed = new_message_id()
    monkeypatch.setattr(store, "new_message_id", lambda: fixed)
    target = tmp_path / "victim"
    if not dangling:
        target.write_bytes(b"precious")
    planted = spool.tmp_dir / f"{fixed}.msg"
    planted.symlink_to(target)
    w = spool.create()  # the file is made at commit (the message fits the buffer)
    w.write(MESSAGE)
    with pytest.raises(SpoolError) as ei:
        asyncio.run(spool.commit(w, make_env(w.id)))
    assert ei.value.errno == errno.EEXIST
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"precious"
    assert planted.is_symlink()  # not ours: left for the admin to see
    assert listing(spool.queue_dir) == []


def test_concurrent_commits_all_land_unique_and_sorted(spool: Spool) -> None:
    async def main() -> list[str]:
        return await asyncio.gather(
            *(commit_one(spool, MESSAGE + str(i).encode()) for i in range(200))
        )

    ids = asyncio.run(main())
    assert len(set(ids)) == 200
    assert spool.ids() == sorted(ids)
    for i, id in enumerate(ids):
        with spool.open_data(id) as f:
            assert f.read() == MESSAGE + str(i).encode()
    assert listing(spool.tmp_dir) == []


def test_group_commit_shares_directory_fsyncs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_ino = os.stat(spool.queue_dir).st_ino
    dir_syncs = 0
    real = store._fsync

    def slow_dir_fsync(fd: int) -> None:
        nonlocal dir_syncs
        if os.fstat(fd).st_ino == queue_ino:
            dir_syncs += 1
            time.sleep(0.05)  # a slow disk: renames pile up behind the running sync
        real(fd)

    monkeypatch.setattr(store, "_fsync", slow_dir_fsync)

    async def main() -> list[str]:
        return await asyncio.gather(*(commit_one(spool, MESSAGE) for _ in range(64)))

    assert len(asyncio.run(main())) == 64
    assert 1 <= dir_syncs <= 32


# -- durability order ------------------------------------------------------


def test_syscall_order_fsync_rename_dirsync_return(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[Any, ...]] = []
    lock = threading.Lock()
    real_fsync, real_rename = store._fsync, store._rename

    def rec(*e: Any) -> None:
        with lock:
            events.append(e)

    def fsync(fd: int) -> None:
        ino = os.fstat(fd).st_ino
        rec("fsync-start", ino)
        real_fsync(fd)
        rec("fsync-done", ino)

    def rename(src: Path, dst: Path) -> None:
        rec("rename-start", Path(src).name, Path(dst).parent.name)
        real_rename(src, dst)
        rec("rename-done", Path(src).name, Path(dst).parent.name)

    monkeypatch.setattr(store, "_fsync", fsync)
    monkeypatch.setattr(store, "_rename", rename)

    async def one(i: int) -> str:
        id = await commit_one(spool, MESSAGE * (i + 1))
        rec("returned", id)
        return id

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    ids = asyncio.run(main())
    queue_ino = os.stat(spool.queue_dir).st_ino

    def index(e: tuple[Any, ...]) -> int:
        assert events.count(e) == 1, e
        return events.index(e)

    for id in ids:
        msg_ino = os.stat(spool.queue_dir / f"{id}.msg").st_ino  # rename keeps the inode
        synced = index(("fsync-done", msg_ino))
        ren_msg = index(("rename-start", f"{id}.msg", "queue"))
        # the name becomes durable only after the bytes it names
        assert synced < ren_msg
        assert not any(e[1] == f"{id}.env" for e in events if e[0].startswith("rename"))
        renamed = index(("rename-done", f"{id}.msg", "queue"))
        returned = index(("returned", id))
        # some fsync of queue/ started after our renames and completed before return
        dir_starts = [i for i, e in enumerate(events) if e == ("fsync-start", queue_ino)]
        dir_dones = [i for i, e in enumerate(events) if e == ("fsync-done", queue_ino)]
        assert any(
            renamed < s < d < returned for s, d in zip(dir_starts, dir_dones, strict=True)
        ), id


def test_update_order_and_roundtrip(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    id = commit_sync(spool, MESSAGE)
    env = spool.load(id)
    env.recipients[0].state = "delivered"
    env.recipients[1] = Recipient(
        "carol@example.com",
        "deferred",
        attempts=2,
        next_attempt=1_700_000_900.0,
        last_error="451 4.7.1 try later",
    )
    env.metadata["route"] = {"via": "mx1.example.com", "n": [1, 2]}

    events: list[tuple[str, Any]] = []
    real_fsync, real_rename = store._fsync, store._rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(src: Path, dst: Path) -> None:
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(store, "_fsync", fsync)
    monkeypatch.setattr(store, "_rename", rename)
    spool.update(env)
    env_ino = os.stat(spool.queue_dir / f"{id}.env").st_ino
    queue_ino = os.stat(spool.queue_dir).st_ino
    assert events == [("fsync", env_ino), ("rename", f"{id}.env"), ("fsync", queue_ino)]

    fresh = Spool(spool.root)
    assert fresh.load(id) == env
    fresh.close()
    assert listing(spool.tmp_dir) == []

    env.held = True
    asyncio.run(spool.update_async(env))
    assert spool.load(id).held is True


def test_update_refusals(spool: Spool) -> None:
    id = commit_sync(spool, MESSAGE)
    env = spool.load(id)
    env.size += 1
    with pytest.raises(ValueError, match="size"):
        spool.update(env)
    env.size -= 1
    env.recipients[0].state = "lost"
    with pytest.raises(ValueError):
        spool.update(env)
    with pytest.raises(FileNotFoundError):
        spool.update(make_env(new_message_id()))
    with pytest.raises(ValueError):
        spool.update(make_env("../../../etc/passwd"))
    assert spool.load(id).recipients[0].state == "pending"
    assert listing(spool.tmp_dir) == []
    spool.remove(id)
    env.recipients[0].state = "delivered"
    with pytest.raises(FileNotFoundError):  # must not resurrect a removed message
        spool.update(env)
    assert listing(spool.queue_dir) == []


def test_remove(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    a = commit_sync(spool, MESSAGE)
    b = commit_sync(spool, MESSAGE)
    unlinked: list[str] = []
    real_unlink = os.unlink

    def unlink(path: Any) -> None:
        unlinked.append(Path(path).name)
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    spool.remove(a)
    monkeypatch.undo()
    # The message file goes first: removing a changed envelope first could bring
    # the message back, with its original envelope, after a crash in between.
    assert unlinked == [f"{a}.msg", f"{a}.env"]
    assert spool.ids() == [b]
    with pytest.raises(FileNotFoundError):
        spool.remove(a)
    with pytest.raises(FileNotFoundError):
        spool.load(a)
    asyncio.run(spool.remove_async(b))
    assert listing(spool.queue_dir) == []


def test_changed_envelope_beside_the_message_wins_and_goes_with_it(spool: Spool) -> None:
    """After an update the envelope lives in <id>.env (the .msg is never rewritten);
    load and recovery read that one, the data stays the first ``size`` octets of the
    .msg, and remove takes both files."""
    id = commit_sync(spool, MESSAGE)
    entry = (spool.queue_dir / f"{id}.msg").read_bytes()
    env = spool.load(id)
    env.recipients[0].state = "delivered"
    spool.update(env)
    assert (spool.queue_dir / f"{id}.msg").read_bytes() == entry
    assert listing(spool.queue_dir) == [f"{id}.env", f"{id}.msg"]
    assert spool.load(id).recipients[0].state == "delivered"
    report = spool.recover()
    assert report.ids == [id] and report.envelopes[id].recipients[0].state == "delivered"
    with spool.open_data(id) as f:
        assert f.read() == MESSAGE
    spool.remove(id)
    assert listing(spool.queue_dir) == []


def test_spool_of_the_older_layout_is_read_as_it_is(spool: Spool) -> None:
    """Spools written before one-file entries (data-only .msg beside its .env) are
    recovered, loaded, read and changed without conversion."""
    id = new_message_id()
    (spool.queue_dir / f"{id}.msg").write_bytes(MESSAGE)
    (spool.queue_dir / f"{id}.env").write_bytes(make_env(id, size=len(MESSAGE)).to_bytes())
    assert spool.recover().ids == [id]
    assert spool.ids() == [id]
    with spool.open_data(id) as f:
        assert f.read() == MESSAGE
    env = spool.load(id)
    env.held = True
    spool.update(env)
    assert spool.load(id).held is True
    spool.remove(id)
    assert listing(spool.queue_dir) == []


def test_message_data_reader_stops_at_the_data(spool: Spool) -> None:
    """What delivery reads (open_data, open_message): exactly the message, whatever
    the chunk sizes, with seek back to the start for a second next hop."""
    body = b"".join(b"line %05d\r\n" % i for i in range(20000))
    id = commit_sync(spool, body)
    with spool.open_data(id) as f:
        assert f.read(7) == body[:7]
        assert f.read() == body[7:]
        assert f.read() == b""
        f.seek(0)
        assert b"".join(iter(lambda: f.read(4096), b"")) == body
        f.seek(0)
        assert list(f)[:2] == [b"line 00000\r\n", b"line 00001\r\n"]
    with open_message(spool.queue_dir / f"{id}.msg", len(body)) as f:
        assert f.read() == body


@pytest.mark.parametrize(
    "bad", ["../queue/x", "/etc/passwd", "", "01ARZ3NDEKTSV4RRFFQ69G5FA", "a" * 26, "..", None]
)
def test_path_tricks_refused(spool: Spool, bad: Any) -> None:
    for op in (spool.load, spool.open_data, spool.remove):
        with pytest.raises(ValueError):
            op(bad)
    with pytest.raises(ValueError):
        spool.update(make_env(bad))


def test_free_space(spool: Spool) -> None:
    st_ = os.statvfs(spool.root)
    assert abs(spool.free_space() - st_.f_bavail * st_.f_frsize) < 64 * 1024 * 1024
    assert spool.free_space() > 0


# -- failures leave nothing ------------------------------------------------------


def test_rename_failure_leaves_nothing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = commit_sync(spool, MESSAGE)

    def rename(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_rename", rename)
    w = spool.create()
    w.write(MESSAGE)
    with pytest.raises(SpoolError) as ei:
        asyncio.run(spool.commit(w, make_env(w.id)))
    assert ei.value.errno == errno.ENOSPC
    assert listing(spool.tmp_dir) == []
    assert listing(spool.queue_dir) == [f"{keep}.msg"]
    w.abort()  # harmless afterwards
    assert spool.ids() == [keep]


@pytest.mark.parametrize("which", ["file", "dir"])
def test_fsync_failure_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    real = store._fsync

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_dir == (which == "dir"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(store, "_fsync", fsync)
    w = spool.create()
    w.write(MESSAGE)
    with pytest.raises(SpoolError) as ei:
        asyncio.run(spool.commit(w, make_env(w.id)))
    assert ei.value.errno == errno.EIO
    assert listing(spool.tmp_dir) == []
    assert listing(spool.queue_dir) == []

    # the spool keeps working once the disk does
    monkeypatch.setattr(store, "_fsync", real)
    id = commit_sync(spool, MESSAGE)
    assert spool.ids() == [id]


def test_failed_directory_sync_fails_exactly_the_commits_it_covered(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits pile up behind a directory sync that fails: each one either got its
    sync and is queued, or was told it failed and left nothing behind."""
    queue_ino = os.stat(spool.queue_dir).st_ino
    real = store._fsync
    dir_syncs = 0

    def fsync(fd: int) -> None:
        nonlocal dir_syncs
        if os.fstat(fd).st_ino == queue_ino:
            dir_syncs += 1
            if dir_syncs == 1:
                time.sleep(0.05)
                raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(store, "_fsync", fsync)

    async def one() -> tuple[str, bool]:
        w = spool.create()
        w.write(MESSAGE)
        try:
            await spool.commit(w, make_env(w.id))
        except SpoolError as exc:
            assert exc.errno == errno.EIO
            return w.id, False
        return w.id, True

    async def main() -> list[tuple[str, bool]]:
        return await asyncio.gather(*(one() for _ in range(32)))

    outcome = asyncio.run(main())
    queued = sorted(id for id, ok in outcome if ok)
    assert 1 <= len(queued) < 32  # the failed sync covered some; later ones succeeded
    assert spool.ids() == queued
    assert listing(spool.queue_dir) == sorted(f"{id}.msg" for id in queued)
    assert listing(spool.tmp_dir) == []


def test_write_error_reaches_caller_and_commit_refuses(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_all", full)
    w = spool.create()
    w.write(b"x" * 100)  # buffered, no syscall yet
    with pytest.raises(OSError) as ei:
        w.write(b"x" * store.WRITE_BUFFER)
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(SpoolError):
        asyncio.run(spool.commit(w, make_env(w.id)))
    assert listing(spool.tmp_dir) == []


def test_unserialisable_envelope_fails_commit_cleanly(spool: Spool) -> None:
    w = spool.create()
    w.write(MESSAGE)
    with pytest.raises(SpoolError) as ei:
        asyncio.run(spool.commit(w, make_env(w.id, metadata={"x": object()})))
    assert ei.value.errno == errno.EINVAL
    w2 = spool.create()
    with pytest.raises(ValueError, match="writer"):
        asyncio.run(spool.commit(w2, make_env(new_message_id())))
    assert listing(spool.tmp_dir) == [] and listing(spool.queue_dir) == []


def test_commit_after_close_fails_cleanly(spool: Spool) -> None:
    w = spool.create()
    w.write(MESSAGE)
    spool.close()
    with pytest.raises(SpoolError):
        asyncio.run(spool.commit(w, make_env(w.id)))
    assert listing(spool.tmp_dir) == [] and listing(spool.queue_dir) == []


def test_writer_lifecycle(spool: Spool) -> None:
    w = spool.create()
    w.write(b"abc")
    w.abort()
    w.abort()  # idempotent
    with pytest.raises(ValueError):
        w.write(b"more")
    with spool.create() as w2:
        w2.write(b"abc")
    assert listing(spool.tmp_dir) == []  # the context manager aborted it

    with spool.create() as w3:
        w3.write(MESSAGE)
        asyncio.run(spool.commit(w3, make_env(w3.id)))
    w3.abort()  # after commit: must not touch the committed message
    assert spool.ids() == [w3.id]
    with pytest.raises(ValueError):
        w3.write(b"late")
    with pytest.raises(SpoolError):
        asyncio.run(spool.commit(w3, make_env(w3.id)))
    assert spool.ids() == [w3.id]


def test_cancelled_commit_still_completes_or_unwinds(spool: Spool) -> None:
    async def main() -> SpoolWriter:
        w = spool.create()
        w.write(MESSAGE)
        task = asyncio.create_task(spool.commit(w, make_env(w.id)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        w.abort()  # what a session's cleanup does; must not undercut the commit
        await asyncio.gather(*spool._tasks)
        return w

    w = asyncio.run(main())
    assert listing(spool.tmp_dir) == []
    assert spool.ids() == [w.id]
    assert spool.load(w.id).size == len(MESSAGE)


# -- recovery ---------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 3])
def test_recover_quarantines_every_bad_case(spool: Spool, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch,
                                            processes: int) -> None:
    """The same report whether one process checks the entries or three forked ones do
    (chunks of 2 here, so good and bad entries land in every chunk)."""
    monkeypatch.setattr(store, "RECOVERY_CHUNK", 2)
    q, tmp, quar = spool.queue_dir, spool.tmp_dir, spool.quarantine_dir
    good = sorted(commit_sync(spool, MESSAGE + bytes([i])) for i in range(3))

    # tmp/ leftovers, including a symlink
    (tmp / f"{new_message_id()}.msg").write_bytes(b"half")
    (tmp / f"{new_message_id()}.env").write_bytes(b"{")
    (tmp / "junk").symlink_to("/etc/passwd")
    (tmp / "adir").mkdir()  # we never make directories there: set aside, not rmtree'd

    def pair(msg: bytes | None, env: bytes | None) -> str:
        id = new_message_id()
        if msg is not None:
            (q / f"{id}.msg").write_bytes(msg)
        if env is not None:
            (q / f"{id}.env").write_bytes(env)
        return id

    def env_bytes(id: str, **kw: Any) -> bytes:
        return make_env(id, **kw).to_bytes()

    msg_only = pair(MESSAGE, None)
    garbage = pair(MESSAGE, b"\x00\x01not json")
    truncated = pair(MESSAGE, env_bytes(new_message_id())[:40])
    size_bad = pair(MESSAGE, b"")
    (q / f"{size_bad}.env").write_bytes(env_bytes(size_bad, size=len(MESSAGE) - 1))
    wrong_id = pair(MESSAGE, env_bytes(good[0], size=len(MESSAGE)))
    wrong_version = pair(MESSAGE, b"")
    obj = json.loads(env_bytes(wrong_version, size=len(MESSAGE)))
    obj["version"] = ENVELOPE_VERSION + 1
    (q / f"{wrong_version}.env").write_bytes(json.dumps(obj).encode())

    # one-file entries (data, envelope line, trailer) gone wrong
    def entry(id: str, line: bytes, data: bytes = MESSAGE) -> str:
        (q / f"{id}.msg").write_bytes(data + line + b"empath-envelope %010d\n" % len(line))
        return id

    one_garbage = new_message_id()
    entry(one_garbage, b"{not json}\n")
    one_size_bad = new_message_id()
    entry(one_size_bad, env_bytes(one_size_bad, size=len(MESSAGE) + 1))
    one_wrong_id = entry(new_message_id(), env_bytes(good[1], size=len(MESSAGE)))
    one_cut = new_message_id()  # the trailer claims more than the file holds
    (q / f"{one_cut}.msg").write_bytes(MESSAGE + b"empath-envelope %010d\n" % 10**6)
    # an envelope whose message file is gone: a removal interrupted between its unlinks
    removed = pair(None, env_bytes(new_message_id(), size=len(MESSAGE)))
    (q / "README").write_text("hello")
    (q / f"{good[0].lower()}.msg").write_bytes(MESSAGE)  # not a valid id
    (q / "subdir").mkdir()
    (quar / "README").write_text("from an earlier recovery")  # forces a suffix

    with caplog.at_level(logging.WARNING, logger="empath.spool"):
        report = spool.recover(processes=processes)

    assert report.ids == good
    assert sorted(report.envelopes) == good
    assert all(report.envelopes[id].id == id for id in good)
    assert report.removed_tmp == 3
    reasons = dict(report.quarantined)
    assert reasons[msg_only] == "data without envelope"
    assert removed not in reasons
    assert reasons[one_garbage].startswith("corrupt envelope")
    assert reasons[one_size_bad].startswith("size mismatch")
    assert "holds id" in reasons[one_wrong_id]
    assert reasons[one_cut] == "data without envelope"
    assert reasons[garbage].startswith("corrupt envelope")
    assert reasons[truncated].startswith("corrupt envelope")
    assert reasons[size_bad].startswith("size mismatch")
    assert "holds id" in reasons[wrong_id]
    assert "version" in reasons[wrong_version]
    assert reasons["README"] == "unexpected file name"
    assert reasons[f"{good[0].lower()}.msg"] == "unexpected file name"
    assert reasons["subdir"] == "not a regular file"
    assert reasons["adir"] == "unexpected directory in tmp/"
    assert len(report.quarantined) == 14

    assert listing(tmp) == []
    assert listing(q) == sorted(f"{id}.msg" for id in good)
    moved = set(listing(quar))
    assert {"README", "README.1", "subdir", "adir"} <= moved
    assert f"{msg_only}.msg" in moved and f"{removed}.env" not in moved
    for id in (one_garbage, one_size_bad, one_wrong_id, one_cut):
        assert f"{id}.msg" in moved
    for id in (garbage, truncated, size_bad, wrong_id, wrong_version):
        assert {f"{id}.msg", f"{id}.env"} <= moved
    assert (quar / "README.1").read_text() == "hello"

    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for id, reason in report.quarantined:
        assert any(id in m and reason in m for m in warned), (id, reason)

    # the survivors are intact and a second recovery finds nothing to do
    for id in good:
        with spool.open_data(id) as f:
            assert f.read() == spool_data(q, id)
        assert spool.load(id).size == len(MESSAGE) + 1
    assert spool.recover() == RecoveryReport(ids=good, removed_tmp=0, quarantined=[])


def test_recover_redoes_the_part_of_a_process_that_fails(
        spool: Spool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recovery process that dies takes no message with it: its chunk is checked
    again in the daemon, every message is reported once, and the failure is logged."""
    monkeypatch.setattr(store, "RECOVERY_CHUNK", 5)
    ids = sorted(commit_sync(spool, MESSAGE + b"%d" % i) for i in range(20))
    parent = os.getpid()

    def digest(env: Envelope) -> tuple[str, int]:
        if os.getpid() != parent and env.id == ids[-1]:
            os.kill(os.getpid(), 9)  # the last chunk's process, killed mid-way
        return env.id, env.size

    with caplog.at_level(logging.WARNING, logger="empath.spool"):
        report = spool.recover(processes=4, digest=digest)
    assert report.ids == ids
    assert report.envelopes == {id: (id, len(MESSAGE) + len(b"%d" % i))
                                for i, id in enumerate(ids)}
    assert report.quarantined == []
    assert any("exited with status -9" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(spool.queue_dir)) == sorted(f"{id}.msg" for id in ids)


def test_recover_raises_only_for_unusable_dirs(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool")
    s.prepare()
    os.rmdir(s.queue_dir)
    with pytest.raises(SpoolError):
        s.recover()
    s.close()


# -- ids -------------------------------------------------------------------------


def test_message_id_format() -> None:
    id = new_message_id()
    assert len(id) == 26 and is_message_id(id)
    assert set(id) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    assert abs(message_id_time(id) - time.time()) < 5
    for bad in [
        id.lower(),
        id + "\n",
        id[:-1],
        "8" + id[1:],
        id[:-1] + "U",
        id[:-1] + "/",
        "../" + id[3:],
        None,
        123,
        b"0" * 26,
    ]:
        assert not is_message_id(bad), bad


def test_message_ids_sort_by_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_700_000_000_000_000_000]

    def fake_ns() -> int:
        now[0] += 1_000_000  # +1 ms per id
        return now[0]

    with monkeypatch.context() as m:
        m.setattr(time, "time_ns", fake_ns)
        made = [new_message_id() for _ in range(2000)]
    assert sorted(made) == made
    assert message_id_time(made[0]) == 1_700_000_000.001


def _mint(n: int) -> list[str]:
    return [new_message_id() for _ in range(n)]


def test_message_ids_unique_across_threads_and_processes() -> None:
    with ThreadPoolExecutor(8) as pool:
        in_threads = [i for chunk in pool.map(_mint, [5000] * 8) for i in chunk]
    with multiprocessing.get_context("fork").Pool(4) as procs:
        in_procs = [i for chunk in procs.map(_mint, [5000] * 4) for i in chunk]
    all_ids = in_threads + in_procs
    assert len(set(all_ids)) == len(all_ids) == 60000


# -- envelope serialisation -------------------------------------------------------

_text = st.text(max_size=40)
_opt_text = st.none() | _text
_time = st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_attempts = st.builds(
    Attempt,
    at=_time,
    status=st.sampled_from(["delivered", "deferred", "bounced"]),
    enhanced=st.from_regex(r"\A[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z"),
    diagnostic=st.text(max_size=HISTORY_TEXT_MAX),
    relay=st.none() | st.text(max_size=HISTORY_FIELD_MAX),
    tls=_opt_text,
)
_recipients = st.builds(
    Recipient,
    address=st.text(min_size=1, max_size=40),
    state=st.sampled_from(["pending", "deferred", "delivered", "bounced"]),
    orcpt=_opt_text,
    notify=st.none()
    | st.lists(st.sampled_from(["NEVER", "SUCCESS", "FAILURE", "DELAY"]), max_size=3).map(tuple),
    attempts=st.integers(min_value=0, max_value=10**6),
    next_attempt=st.none() | _time,
    last_error=_opt_text,
    history=st.lists(_attempts, max_size=HISTORY_LIMIT),
)
_envelopes = st.builds(
    Envelope,
    id=st.builds(new_message_id),
    sender=_text,
    recipients=st.lists(_recipients, max_size=5),
    received_at=_time,
    client_addr=_text,
    client_port=st.integers(min_value=0, max_value=65535),
    helo=_text,
    tls=_opt_text,
    authenticated=_opt_text,
    size=st.integers(min_value=0, max_value=2**40),
    body=st.sampled_from(["7BIT", "8BITMIME"]),
    smtputf8=st.booleans(),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    envid=_opt_text,
    held=st.booleans(),
    metadata=st.dictionaries(_text, _json, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(_envelopes)
def test_envelope_round_trip(env: Envelope) -> None:
    data = env.to_bytes()
    assert json.loads(data)["version"] == ENVELOPE_VERSION
    assert Envelope.from_bytes(data) == env
    assert Envelope.from_bytes(data).to_bytes() == data


def _parse_or_corrupt(data: bytes) -> None:
    try:
        env = Envelope.from_bytes(data)
    except CorruptEnvelope:
        return
    assert isinstance(env, Envelope)
    env.to_bytes()  # whatever loads must also serialise


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_from_bytes_arbitrary_bytes(data: bytes) -> None:
    _parse_or_corrupt(data)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_from_bytes_arbitrary_json(value: Any) -> None:
    _parse_or_corrupt(json.dumps(value).encode())


@settings(max_examples=500, deadline=None)
@given(_envelopes, st.data())
def test_from_bytes_mutated_fields(env: Envelope, data: st.DataObject) -> None:
    obj = json.loads(env.to_bytes())
    target = obj
    if obj["recipients"] and data.draw(st.booleans()):
        target = obj["recipients"][data.draw(st.integers(0, len(obj["recipients"]) - 1))]
        if target["history"] and data.draw(st.booleans()):
            target = target["history"][data.draw(st.integers(0, len(target["history"]) - 1))]
    key = data.draw(st.sampled_from(sorted(target)))
    action = data.draw(st.sampled_from(["replace", "delete", "extra"]))
    if action == "replace":
        target[key] = data.draw(_json)
    elif action == "delete":
        del target[key]
    else:
        target[key + "_x"] = 1
    _parse_or_corrupt(json.dumps(obj).encode())
    if action != "replace":
        with pytest.raises(CorruptEnvelope):
            Envelope.from_bytes(json.dumps(obj).encode())


def test_from_bytes_specific_corruptions() -> None:
    compact = make_env(new_message_id()).to_bytes()
    good = json.loads(compact)

    def variant(**changes: Any) -> bytes:
        obj = dict(good)
        obj.update(changes)
        return json.dumps(obj).encode()

    cases = [
        b"",
        b"[" * 100_000 + b"]" * 100_000,  # recursion depth
        b'{"version": 1, "id": 1' + b"1" * 5000 + b"}",  # int digit limit
        "{}".encode("utf-16")[:3],
        variant(version=True),
        variant(version="1"),
        variant(size=True),
        variant(size=-1),
        variant(size=1.0),
        variant(held=1),
        variant(client_port=70000),
        variant(received_at=None),
        variant(body="BINARYMIME"),
        variant(ret="full"),
        variant(metadata=[]),
        variant(recipients={}),
        variant(recipients=[{"address": "x@y"}]),
        variant(id="../../etc/passwd"),
        variant(sender=None),
        compact.replace(b'"received_at":1700000000.25', b'"received_at":NaN'),
        compact.replace(b'"received_at":1700000000.25', b'"received_at":1e400'),
        # a version-1 record has no history; a version-2 one must have it
        variant(version=1),
        variant(recipients=[{k: v for k, v in good["recipients"][0].items() if k != "history"}]),
    ]
    assert cases[-1] != compact
    for data in cases:
        with pytest.raises(CorruptEnvelope):
            Envelope.from_bytes(data)


def test_to_bytes_refuses_what_would_not_load() -> None:
    id = new_message_id()
    for env in (
        make_env(id, recipients=[Recipient("x@example.com", state="sent")]),
        make_env(id, recipients=[Recipient("x@example.com", notify=("success",))]),
        make_env(id, received_at=float("nan")),
        make_env("not-an-id"),
        make_env(id, client_port=-1),
        make_env(id, smtputf8=1),
        make_env(id, metadata={"k": {1, 2}}),
        make_env(id, recipients=[Recipient("x@example.com", history=(
            Attempt(1.0, "deferred", "4.4.1", "X-Empath; refused"),))]),  # type: ignore[arg-type]
        make_env(id, recipients=[Recipient("x@example.com", history=[
            Attempt(1.0, "deferred", "4.4.1", "X-Empath; refused")] * (HISTORY_LIMIT + 1))]),
        make_env(id, recipients=[Recipient("x@example.com", history=[
            Attempt(1.0, "sent", "2.0.0", "ok")])]),
        make_env(id, recipients=[Recipient("x@example.com", history=[
            Attempt(1.0, "deferred", "4.4", "X-Empath; refused")])]),
        make_env(id, recipients=[Recipient("x@example.com", history=[
            Attempt(float("inf"), "deferred", "4.4.1", "X-Empath; refused")])]),
        make_env(id, recipients=[Recipient("x@example.com", history=[
            Attempt(1.0, "deferred", "4.4.1", "x" * (HISTORY_TEXT_MAX + 1))])]),
        make_env(id, recipients=[Recipient("x@example.com", history=[
            {"at": 1.0}])]),  # type: ignore[list-item]
    ):
        with pytest.raises(ValueError):
            env.to_bytes()


# -- the syncer: how the SMTP workers commit (empath/spool/syncer.py) --------


@pytest.fixture
def synced(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", syncer=True)
    s.prepare()
    yield s
    s.close()


def syncer_pid(spool: Spool) -> int:
    proc = spool._syncer._proc if spool._syncer is not None else None
    assert proc is not None, "no syncer running"
    return proc.pid


def test_syncer_commits_concurrent_messages_into_queue(synced: Spool) -> None:
    big = MESSAGE * 2000  # past the writer's buffer: written as it arrives
    async def main() -> list[str]:
        return await asyncio.gather(*(commit_one(synced, MESSAGE + str(i).encode())
                                      for i in range(50)), commit_one(synced, big))

    ids = asyncio.run(main())
    assert synced.ids() == sorted(ids)
    for i, id in enumerate(ids[:50]):
        with synced.open_data(id) as f:
            assert f.read() == MESSAGE + str(i).encode()
        assert synced.load(id).sender == "alice@example.org"
    with synced.open_data(ids[50]) as f:
        assert f.read() == big
    assert listing(synced.tmp_dir) == []
    # The syncer is a process of its own, not a thread of ours.
    assert syncer_pid(synced) != os.getpid()
    assert os.path.exists(f"/proc/{syncer_pid(synced)}")


def test_syncer_rename_failure_fails_the_commit_and_leaves_nothing(synced: Spool) -> None:
    async def main() -> str:
        w = synced.create()
        w.write(MESSAGE)
        (synced.queue_dir / f"{w.id}.msg").mkdir()  # rename(2) onto a directory fails
        with pytest.raises(SpoolError) as err:
            await synced.commit(w, make_env(w.id))
        assert err.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
        (synced.queue_dir / f"{w.id}.msg").rmdir()
        return await commit_one(synced, MESSAGE)  # the next one is fine

    good = asyncio.run(main())
    assert synced.ids() == [good]
    assert listing(synced.tmp_dir) == []


def test_syncer_killed_mid_commit_fails_it_and_a_new_one_takes_over(synced: Spool) -> None:
    import signal

    async def main() -> tuple[str, int, int]:
        first = await commit_one(synced, MESSAGE)
        old = syncer_pid(synced)
        os.kill(old, signal.SIGSTOP)  # holds the next id unanswered...
        w = synced.create()
        w.write(MESSAGE)
        pending = asyncio.ensure_future(synced.commit(w, make_env(w.id)))
        await asyncio.sleep(0.2)
        assert not pending.done()
        os.kill(old, signal.SIGKILL)  # ...and dies with it outstanding
        with pytest.raises(SpoolError):
            await pending
        second = await commit_one(synced, MESSAGE)
        return first + " " + second, old, syncer_pid(synced)

    ids, old, new = asyncio.run(main())
    assert new != old
    # The failed message is gone from tmp/ and queue/ (its client got a 4xx and sends
    # it again); the two others are committed.
    assert synced.ids() == sorted(ids.split())
    assert listing(synced.tmp_dir) == []


def test_syncer_exits_when_the_spool_closes(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", syncer=True)
    s.prepare()
    asyncio.run(commit_one(s, MESSAGE))
    proc = s._syncer._proc if s._syncer is not None else None
    assert proc is not None and proc.poll() is None
    s.close()
    assert proc.poll() is not None  # reaped: no zombie, no orphan


def test_syncer_started_ahead_serves_the_first_message(synced: Spool) -> None:
    # A worker starts its syncer before it takes connections: the first messages must
    # not wait for an interpreter to start.
    async def main() -> tuple[int, str, int]:
        synced.start_syncer()
        before = syncer_pid(synced)
        return before, await commit_one(synced, MESSAGE), syncer_pid(synced)

    before, id, after = asyncio.run(main())
    assert before == after
    assert synced.ids() == [id]


def test_syncer_batch_refuses_a_bad_id_and_commits_the_rest(synced: Spool) -> None:
    from empath.spool import syncer
    from empath.spool.ids import new_message_id

    ids = [new_message_id() for _ in range(3)]
    for id in ids:  # as a worker leaves them: written and closed in tmp/
        (synced.tmp_dir / f"{id}.msg").write_bytes(MESSAGE)
    with ThreadPoolExecutor(4) as pool:
        answer = syncer._batch(str(synced.tmp_dir), str(synced.queue_dir),
                               [ids[0], "../../etc/passwd", ids[1], ids[2]], pool)
    lines = answer.decode().splitlines()
    assert lines[0] == f"{ids[0]} 0" and lines[2] == f"{ids[1]} 0"
    assert lines[1].startswith(f"../../etc/passwd {errno.EINVAL} ")
    assert lines[3] == f"{ids[2]} 0"
    assert sorted(p.name for p in synced.queue_dir.iterdir()) == sorted(
        f"{i}.msg" for i in ids)



def test_syncer_queue_sync_failure_refuses_its_batch_and_leaves_no_copy(
        synced: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """If fsync of queue/ fails, the renames of that batch may or may not be durable:
    every message of the batch is refused (its client gets a 4xx and sends again) and
    taken back out of queue/, so a restart cannot deliver a copy the client re-sent.
    The syncer goes on serving: the next id is committed."""
    import socket

    from empath.spool import store, syncer
    from empath.spool.ids import new_message_id

    batch, later = [new_message_id(), new_message_id()], new_message_id()
    for id in batch:
        (synced.tmp_dir / f"{id}.msg").write_bytes(MESSAGE)
    real_sync_dir = store.Spool._sync_dir
    failures = [OSError(errno.EIO, "Input/output error")]

    def sync_dir(path: str | Path) -> None:
        if failures:
            raise failures.pop()
        real_sync_dir(path)

    monkeypatch.setattr(store.Spool, "_sync_dir", staticmethod(sync_dir))
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=syncer.serve, args=(theirs, str(synced.root)))
    server.start()
    ours.settimeout(10)

    def answers(n: int) -> list[str]:
        got = b""
        while got.count(b"\n") < n:
            chunk = ours.recv(4096)
            assert chunk, "the syncer closed before answering"
            got += chunk
        return got.decode().splitlines()

    try:
        ours.sendall("".join(f"{id}\n" for id in batch).encode())  # one read, one batch
        refused = answers(2)
        assert listing(synced.queue_dir) == [] and listing(synced.tmp_dir) == []
        (synced.tmp_dir / f"{later}.msg").write_bytes(MESSAGE)
        ours.sendall(f"{later}\n".encode())
        committed = answers(1)
    finally:
        ours.close()
        server.join(10)
        theirs.close()
    assert not server.is_alive()  # the worker's end closed: the syncer returns
    assert [line.split(" ", 2)[:2] for line in refused] == [[id, str(errno.EIO)]
                                                            for id in batch]
    assert all("cannot sync" in line for line in refused)
    assert committed == [f"{later} 0"]
    assert listing(synced.queue_dir) == [f"{later}.msg"]
