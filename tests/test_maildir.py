"""empath.delivery.maildir: real files in real directories (and a real full tmpfs)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.delivery.maildir import CHUNK, deliver_maildir
from empath.delivery.types import RcptResult
from empath.spool import Recipient
from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
HOST = "mx.empath.test"
SENDER = "bob@sender.example"
MESSAGE = (
    b"Received: from client.example by mx.empath.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"first line\r\n"
    b"\xc3\xa9 second line, 8-bit\r\n"
)
NAME = re.compile(
    r"^(\d+)\.M(\d+)P(\d+)Q(\d+)R([0-9a-f]+)\.mx\.empath\.test,S=(\d+),W=(\d+)$"
)


def expected(rcpt: str, data: bytes, sender: str = SENDER) -> bytes:
    head = f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode()
    return head + data.replace(b"\r\n", b"\n")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "msg"
    path.write_bytes(MESSAGE)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.mkdir()
    return path


def deliver(root: Path, addresses: list[str], data: Path, sender: str = SENDER
            ) -> list[RcptResult]:
    return deliver_maildir(root, [Recipient(address=a) for a in addresses], data,
                           hostname=HOST, sender=sender)


def files(d: Path) -> list[Path]:
    return sorted(d.iterdir()) if d.exists() else []


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_delivery_creates_maildir_and_file(root: Path, data_file: Path) -> None:
    [res] = deliver(root, ["alice@corp.example"], data_file)
    assert (res.status, res.enhanced, res.code, res.remote_mta, res.success_action) == (
        "delivered", "2.0.0", None, None, "delivered"
    )
    box = root / "alice"
    for d in (box, box / "tmp", box / "new", box / "cur"):
        assert d.is_dir()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert files(box / "tmp") == [] and files(box / "cur") == []
    [msg] = files(box / "new")
    assert msg.name in res.text
    assert stat.S_IMODE(msg.stat().st_mode) == 0o600
    content = msg.read_bytes()
    assert content == expected("alice@corp.example", MESSAGE)
    m = NAME.match(msg.name)
    assert m is not None, msg.name
    assert int(m.group(3)) == os.getpid()
    assert int(m.group(6)) == len(content)  # S=: size on disk
    assert int(m.group(7)) == len(content) + content.count(b"\n")  # W=: size with CRLF


def test_null_sender_and_existing_maildir(root: Path, data_file: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (root / "bob" / sub).mkdir(parents=True)
    [res] = deliver(root, ["bob@corp.example"], data_file, sender="")
    assert res.status == "delivered"
    [msg] = files(root / "bob" / "new")
    assert msg.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: bob@corp.example\n")


def test_two_recipients_two_files(root: Path, data_file: Path) -> None:
    results = deliver(root, ["alice@corp.example", "Bob.Smith+tag@corp.example"], data_file)
    assert [r.status for r in results] == ["delivered", "delivered"]
    [a] = files(root / "alice" / "new")
    [b] = files(root / "Bob.Smith+tag" / "new")  # verbatim: case kept
    assert a.read_bytes() == expected("alice@corp.example", MESSAGE)
    assert b.read_bytes() == expected("Bob.Smith+tag@corp.example", MESSAGE)


def test_same_mailbox_twice_gives_distinct_files(root: Path, data_file: Path) -> None:
    results = deliver(root, [f"alice@d{i}.example" for i in range(20)], data_file)
    assert {r.status for r in results} == {"delivered"}
    new = files(root / "alice" / "new")
    assert len(new) == 20
    assert {p.read_bytes() for p in new} == {
        expected(f"alice@d{i}.example", MESSAGE) for i in range(20)
    }


def test_concurrent_deliveries_from_threads(root: Path, data_file: Path) -> None:
    results: list[RcptResult] = []
    lock = threading.Lock()

    def work() -> None:
        res = deliver(root, ["alice@corp.example"] * 10, data_file)
        with lock:
            results.extend(res)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and {r.status for r in results} == {"delivered"}
    assert len(files(root / "alice" / "new")) == 40


def test_large_message_streamed_with_crlf_across_chunk_boundary(
    root: Path, tmp_path: Path
) -> None:
    line = b"x" * 98 + b"\r\n"
    # A CR as the last byte of the first chunk, its LF the first byte of the next.
    data = line * (CHUNK // 100) + b"z" * (CHUNK - 1 - (CHUNK // 100) * 100) + b"\r\n"
    assert data[CHUNK - 1 : CHUNK + 1] == b"\r\n"
    data += line * 5000 + b"no final newline"
    path = tmp_path / "big"
    path.write_bytes(data)
    [res] = deliver(root, ["alice@corp.example"], path)
    assert res.status == "delivered"
    [msg] = files(root / "alice" / "new")
    content = msg.read_bytes()
    assert content == expected("alice@corp.example", data)
    assert b"\r" not in content


@pytest.mark.parametrize(
    "local",
    ["../etc", ".hidden", "..", "a/b", "nul\0byte", "tab\there", "new\nline", "", "x" * 256],
)
def test_unsafe_local_part_bounced(root: Path, data_file: Path, local: str) -> None:
    results = deliver(root, [f"{local}@corp.example", "alice@corp.example"], data_file)
    assert (results[0].status, results[0].enhanced) == ("bounced", "5.1.3")
    assert "bad destination mailbox address syntax" in results[0].text
    assert results[1].status == "delivered"
    assert [p.name for p in root.iterdir()] == ["alice"]
    assert not (root.parent / "etc").exists()


def test_root_that_is_a_file_defers(tmp_path: Path, data_file: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    results = deliver(not_dir, ["alice@corp.example", "bob@corp.example"], data_file)
    assert [(r.status, r.enhanced) for r in results] == [("deferred", "4.3.0")] * 2
    assert "is not a directory" in results[0].text
    assert not_dir.read_text() == ""


def test_missing_root_defers_and_is_not_created(tmp_path: Path, data_file: Path) -> None:
    [res] = deliver(tmp_path / "nope", ["alice@corp.example"], data_file)
    assert (res.status, res.enhanced) == ("deferred", "4.3.0")
    assert "not usable" in res.text
    assert not (tmp_path / "nope").exists()


def test_mailbox_that_is_a_file_defers_only_that_recipient(root: Path, data_file: Path) -> None:
    (root / "alice").write_text("in the way")
    results = deliver(root, ["alice@corp.example", "bob@corp.example"], data_file)
    assert [(r.status, r.enhanced) for r in results] == [
        ("deferred", "4.3.0"), ("delivered", "2.0.0")
    ]
    assert "alice" in results[0].text
    assert (root / "alice").read_text() == "in the way"


def test_missing_data_file_defers_and_leaves_nothing(root: Path, tmp_path: Path) -> None:
    [res] = deliver(root, ["alice@corp.example"], tmp_path / "gone")
    assert (res.status, res.enhanced) == ("deferred", "4.3.0")
    assert files(root / "alice" / "tmp") == [] and files(root / "alice" / "new") == []


# ------------------------------------------- real write errors, in a child process

_CHILD = """
import json, os, resource, signal, sys
from pathlib import Path
from empath.delivery.maildir import deliver_maildir
from empath.spool import Recipient
opts = json.loads(sys.argv[1])
if opts.get("fsize"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (opts["fsize"], opts["fsize"]))
if opts.get("uid"):
    os.setgid(opts["uid"]); os.setgroups([]); os.setuid(opts["uid"])
res = deliver_maildir(Path(opts["root"]), [Recipient(address=a) for a in opts["rcpts"]],
                      Path(opts["data"]), hostname="mx.empath.test", sender="bob@x.example")
print(json.dumps([[r.status, r.enhanced, r.text] for r in res]))
"""


def deliver_in_child(**opts: object) -> list[list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(opts)], env=env,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: list[list[str]] = json.loads(proc.stdout)
    return result


def test_write_error_defers_with_nothing_partial(root: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes((b"y" * 998 + b"\r\n") * 200)  # ~200 kB, over the 64 kB file limit
    small = tmp_path / "small"
    small.write_bytes(MESSAGE)
    res = deliver_in_child(root=str(root), rcpts=["alice@corp.example"], data=str(big),
                           fsize=65536)
    assert [(s, e) for s, e, _t in res] == [("deferred", "4.3.0")]
    assert "File too large" in res[0][2]
    box = root / "alice"
    assert files(box / "tmp") == [] and files(box / "new") == []
    # The mailbox works again once the cause is gone.
    res = deliver_in_child(root=str(root), rcpts=["alice@corp.example"], data=str(small))
    assert res[0][0] == "delivered"
    assert len(files(box / "new")) == 1


def test_unwritable_root_defers(data_file: Path) -> None:
    # Under /tmp rather than tmp_path (0700 as root), so "nobody" can reach it.
    base = Path(tempfile.mkdtemp(prefix="empath-maildir-"))
    try:
        base.chmod(0o755)
        root = base / "mail"
        root.mkdir(mode=0o555)
        root.chmod(0o555)
        data = base / "msg"
        data.write_bytes(data_file.read_bytes())
        data.chmod(0o644)
        if os.geteuid() == 0:
            # root ignores permissions: deliver as "nobody" instead.
            res = deliver_in_child(root=str(root), rcpts=["alice@corp.example"],
                                   data=str(data), uid=65534)
        else:
            res = [[r.status, r.enhanced, r.text]
                   for r in deliver(root, ["alice@corp.example"], data)]
        assert [(s, e) for s, e, _t in res] == [("deferred", "4.3.0")]
        assert "Permission denied" in res[0][2] and str(root / "alice") in res[0][2]
        assert list(root.iterdir()) == []
    finally:
        (base / "mail").chmod(0o755)
        shutil.rmtree(base)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_enospc_defers_with_nothing_partial(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes((b"y" * 998 + b"\r\n") * 600)  # ~600 kB on a 256 kB file system
    small = tmp_path / "small"
    small.write_bytes(MESSAGE)
    with tmpfs(tmp_path / "fs", "256k") as fs:
        results = deliver(fs, ["alice@corp.example", "bob@corp.example"], big)
        assert [(r.status, r.enhanced) for r in results] == [("deferred", "4.3.0")] * 2
        assert "No space left on device" in results[0].text
        for box in ("alice", "bob"):
            assert files(fs / box / "tmp") == [] and files(fs / box / "new") == []
        [res] = deliver(fs, ["alice@corp.example"], small)
        assert res.status == "delivered"
