"""Fixtures for the system tests: one booted Debian 12 container per session.

``packages`` (session): this checkout's .deb, built once by scripts/build-packages
(tests/packaging/build.py). ``container`` (session): the cached rootfs
(tests/system/nspawn.py builds it once, ≈2 min), an overlay of it booted with
systemd-nspawn on the host's network, the .deb installed in it with
``apt install ./empath_*.deb`` (``installed`` records what that looked like right
after apt returned), then the test configuration; torn down at the end of the
session. ``empath`` (per test): the service reset to a known state — stopped, spool
and mailboxes emptied, test drop-ins removed, the base test configuration back —
and then started (or left stopped, for socket activation). ``other_container()``
boots a second, empty container for the scenarios that install, upgrade and purge
from scratch, with every other container's empath units stopped meanwhile (they
share port 25).

Not root, no systemd-nspawn/debootstrap or no packaging tools: skipped on a laptop,
a failure under CI=true (``scripts/system-rootfs`` and ``scripts/install-test-deps``
install the host tools). Port 25 or 587 taken on the host: always a failure, naming
the process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.packaging import build
from tests.system import nspawn

MAIL_ROOT = nspawn.MAIL_ROOT
DROPIN_DIR = "/etc/systemd/system/empath.service.d"
JOURNAL_DUMP = nspawn.WORK_ROOT / "last-system-test-journal.txt"
config_text = nspawn.config_text


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "system: boots Debian 12 with systemd in a container (needs root)")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"system tests cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def packages() -> build.Built:
    missing = build.missing_tools()
    if missing:
        _unavailable(f"cannot build the .deb: missing {', '.join(missing)} "
                     "(scripts/install-test-deps)")
    try:
        return build.built()
    except build.BuildFailed as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class Installed:
    """The session container right after ``apt install ./empath_*.deb`` returned."""

    install: nspawn.Install
    deb: Path
    greeting: str  # the first SMTP connection's first line, or why it failed
    units: dict[str, tuple[str, str]]  # unit: (is-enabled, is-active)
    config: str  # /etc/empath/empath.yaml as the package installed it
    config_stat: str  # "%a %U %G"
    packages: dict[str, str]  # dpkg-query: package -> version, for the dependencies


UNITS = ("empath.socket", "empath.service", "empath-submission.socket")
# Containers booted now: other_container() stops the empath units of all of them.
_LIVE: list[nspawn.Container] = []
_INSTALLED: dict[int, Installed] = {}


def first_greeting(port: int = 25, timeout: float = 10.0) -> str:
    """Connect once (no retry) and read one line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return s.makefile("rb").readline().decode(errors="replace").strip()
    except OSError as exc:
        return f"connection failed: {exc}"


def install_and_look(c: nspawn.Container, deb: Path) -> Installed:
    """apt install the .deb, then at once look at what a user would see."""
    try:
        install = nspawn.install_package(c, deb)
    except nspawn.NspawnError as exc:
        pytest.fail(f"apt install of {deb.name} failed:\n{exc}", pytrace=False)
    greeting = first_greeting()
    units = {u: (c.systemctl("is-enabled", u, check=False).stdout.strip(),
                 c.systemctl("is-active", u, check=False).stdout.strip()) for u in UNITS}
    config = c.path("/etc/empath/empath.yaml").read_text()
    stat = c.run(["stat", "-c", "%a %U %G", "/etc/empath/empath.yaml"]).stdout.strip()
    q = c.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\n"],
              check=False).stdout
    versions = {f[0]: f[1] for f in (line.split() for line in q.splitlines())
                if len(f) >= 3 and f[2].startswith("ii")}
    return Installed(install, deb, greeting, units, config, stat, versions)


def _boot(c: nspawn.Container) -> None:
    c.mount()
    try:
        c.boot()
    except nspawn.NspawnError as exc:
        _unavailable(f"cannot boot the container: {exc}")
    _LIVE.append(c)


def _check_ports() -> None:
    for port in (25, 587):
        busy = nspawn.port_in_use(port)
        if busy:
            pytest.fail(
                f"port {port} is in use on this host ({busy}); the container shares the "
                f"host's network and needs it. Listening now:\n{nspawn.who_listens(port)}",
                pytrace=False)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    if os.geteuid() != 0:
        _unavailable("the system tests need root (debootstrap, systemd-nspawn)")
    missing = nspawn.missing_host_tools()
    if missing:
        _unavailable(f"missing host tools {', '.join(missing)}; run scripts/system-rootfs "
                     "(apt-get install systemd-container debootstrap)")
    try:
        return nspawn.build_rootfs()
    except nspawn.NspawnError as exc:
        _unavailable(f"cannot build the rootfs: {exc}")
        raise


@pytest.fixture(scope="session")
def host(rootfs: Path) -> Iterator[Path]:
    """The host lock (one booted container per host) for the whole session."""
    with nspawn.host_lock():
        nspawn.reap_stale()
        _check_ports()
        yield rootfs


@pytest.fixture(scope="session")
def container(host: Path, packages: build.Built) -> Iterator[nspawn.Container]:
    with nspawn.Container(host, "empath-systest") as c:
        _boot(c)
        try:
            _INSTALLED[id(c)] = install_and_look(c, packages.deb)
            nspawn.configure_for_tests(c.root)
            yield c
        finally:
            _LIVE.remove(c)
            r = c.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
                      check=False, timeout=60)
            JOURNAL_DUMP.write_text(r.stdout)


@pytest.fixture(scope="session")
def installed(container: nspawn.Container) -> Installed:
    return _INSTALLED[id(container)]


@contextlib.contextmanager
def other_container(host: Path, name: str) -> Iterator[nspawn.Container]:
    """A second booted container, nothing of empath in it; while it runs, the empath
    units of every other booted container are stopped (port 25 is shared)."""
    paused = list(_LIVE)
    for c in paused:
        c.systemctl("stop", "empath.socket", "empath.service", "empath-submission.socket",
                    check=False, timeout=120)
    try:
        _check_ports()
        with nspawn.Container(host, name) as c:
            _boot(c)
            try:
                yield c
            finally:
                _LIVE.remove(c)
                r = c.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
                          check=False, timeout=60)
                (nspawn.WORK_ROOT / f"last-{name}-journal.txt").write_text(r.stdout)
    finally:
        for c in paused:
            c.systemctl("start", "empath.socket", check=False)


class Empath:
    """The empath units inside the container, and what a test needs to see of them."""

    def __init__(self, c: nspawn.Container) -> None:
        self.c = c
        self.cursor: str | None = None  # journal() shows only entries after it

    def mark(self) -> None:
        """From now on, journal() shows only what is logged after this point."""
        r = self.c.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], check=False)
        for line in r.stdout.splitlines():
            if line.startswith("-- cursor: "):
                self.cursor = line.removeprefix("-- cursor: ").strip()

    # -- state

    def reset(self, *, start: bool = True, config: str | None = None) -> None:
        c = self.c
        self.mark()
        c.systemctl("stop", "empath.service", timeout=120)
        c.systemctl("disable", "--now", "empath-submission.socket", check=False)
        dropins = c.path(DROPIN_DIR)
        if dropins.exists():
            shutil.rmtree(dropins)
        c.systemctl("daemon-reload")
        c.systemctl("reset-failed", "empath.service", check=False)
        self.write_config(config or config_text())
        c.sh(f"rm -rf /var/lib/empath/spool {MAIL_ROOT}/* && "
             "systemd-tmpfiles --create empath.conf empath-test.conf")
        c.systemctl("start", "empath.socket")
        if start:
            c.systemctl("start", "empath.service", timeout=120)
            self.wait_state("active")

    def write_config(self, text: str) -> None:
        self.c.path("/etc/empath/empath.yaml").write_text(text)

    def drop_in(self, name: str, text: str) -> None:
        d = self.c.path(DROPIN_DIR)
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
        self.c.systemctl("daemon-reload")

    # -- looking

    def state(self, unit: str = "empath.service") -> str:
        return self.c.systemctl("is-active", unit, check=False).stdout.strip()

    def wait_state(self, want: str, unit: str = "empath.service", timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(unit)
            if state == want:
                return state
            time.sleep(0.2)
        raise AssertionError(f"{unit} is {state!r}, not {want!r}, after {timeout:.0f} s\n"
                             + self.journal(lines=60))

    def main_pid(self) -> int:
        return int(self.c.show("empath.service", "MainPID"))

    def prop(self, name: str) -> str:
        return self.c.show("empath.service", name)

    def proc_status(self, pid: int) -> dict[str, str]:
        text = self.c.run(["cat", f"/proc/{pid}/status"]).stdout
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def children(self, pid: int) -> list[int]:
        r = self.c.sh(f"cat /proc/{pid}/task/*/children", check=False)
        return [int(x) for x in r.stdout.split()]

    def journal(self, *matches: str, lines: int | None = None, output: str = "short",
                everything: bool = False) -> str:
        """``journalctl -u empath.service`` since the last mark() (all of it with
        ``everything``), the last ``lines`` lines of it if given."""
        cmd = ["journalctl", "-u", "empath.service", "--no-pager", "-o", output, *matches]
        if self.cursor and not everything:
            # Not combined with -n: journalctl 252 then shows only the first entries.
            cmd.append(f"--after-cursor={self.cursor}")
        text = self.c.run(cmd, check=False).stdout
        if lines is not None:
            text = "\n".join(text.splitlines()[-lines:]) + "\n"
        return text

    def queue_ids(self) -> set[str]:
        r = self.c.sh("ls /var/lib/empath/spool/queue/ 2>/dev/null", check=False)
        return {n[:-4] for n in r.stdout.split() if n.endswith(".msg")}

    def queue_files(self) -> set[str]:
        r = self.c.sh("ls /var/lib/empath/spool/queue/ 2>/dev/null", check=False)
        return set(r.stdout.split())

    def mailbox(self, local: str) -> list[str]:
        r = self.c.sh(f"ls {MAIL_ROOT}/{local}/new 2>/dev/null", check=False)
        return r.stdout.split()


@pytest.fixture
def empath(container: nspawn.Container) -> Empath:
    e = Empath(container)
    e.reset()
    return e
