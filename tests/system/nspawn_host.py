"""Host-side pieces shared by the two drivers of booted Debian 12 containers: the
system tests' ``tests/system/nspawn.py`` and Molecule's
``molecule/resources/nspawn_instance.py`` (which runs under the system python3 as a
plain script, so this module uses the standard library only).

The Debian mirror, an exclusive lock file, the one-time changes to a fresh debootstrap
tree, and the /proc lookups for finding and stopping a systemd-nspawn process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


def debian_mirror() -> str:
    """The Debian mirror this host uses (``$EMPATH_TEST_MIRROR``, else the first
    non-security ``URIs:`` of debian.sources, else sources.list)."""
    if os.environ.get("EMPATH_TEST_MIRROR"):
        return os.environ["EMPATH_TEST_MIRROR"]
    if HOST_SOURCES.exists():
        for line in HOST_SOURCES.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def locked(path: Path, timeout: float, error: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if need be); after ``timeout``
    seconds of waiting raise ``error(message)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise error(f"{path} is still locked after {timeout:.0f} s") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


def prepare_rootfs(root: Path, hostname: str, masked_units: Sequence[str]) -> None:
    """One-time changes to a fresh debootstrap tree: its hostname, the units that must
    not run in a container masked, and the host's apt sources (the release, -updates
    and -security, as on an installed Debian 12; debootstrap wrote the release only)
    unless a mirror was forced."""
    (root / "etc/hostname").write_text(f"{hostname}\n")
    for unit in masked_units:
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    if HOST_SOURCES.exists() and not os.environ.get("EMPATH_TEST_MIRROR"):
        (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
        shutil.copy2(HOST_SOURCES, root / "etc/apt/sources.list.d/debian.sources")
        with contextlib.suppress(FileNotFoundError):
            (root / "etc/apt/sources.list").unlink()


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, no procps needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def is_nspawn(pid: int) -> bool:
    return _comm(pid) == "systemd-nspawn"


def container_init(nspawn_pid: int) -> int | None:
    """The container's systemd (PID 1 inside) under ``nspawn_pid``, once it is there."""
    for child in children(nspawn_pid):
        if _comm(child) == "systemd":
            return child
    return None


def stop_nspawn(pid: int, timeout: float = 60.0) -> None:
    """Power a container off — SIGTERM to its systemd-nspawn is a clean poweroff —
    and SIGKILL nspawn's process group if it has not gone after ``timeout`` s. Does
    nothing unless ``pid`` is a live systemd-nspawn (a pid file may be stale)."""
    if not (alive(pid) and is_nspawn(pid)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
