"""Fixtures for the system tests: one booted Debian 12 container per session.

``container`` (session): the cached rootfs (tests/system/nspawn.py builds it once,
≈1 min), an overlay of it with this checkout installed (``install_from_tree``) and
the test configuration, booted with systemd-nspawn on the host's network; torn down
at the end of the session. ``empath`` (per test): the service reset to a known
state — stopped, spool and mailboxes emptied, test drop-ins removed, the base test
configuration back — and then started (or left stopped, for socket activation).

Not root or no systemd-nspawn/debootstrap: skipped on a laptop, a failure under
CI=true (``scripts/system-rootfs`` installs the host tools). Port 25 or 587 taken
on the host: always a failure, naming the process.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI
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
def container() -> Iterator[nspawn.Container]:
    if os.geteuid() != 0:
        _unavailable("the system tests need root (debootstrap, systemd-nspawn)")
    missing = nspawn.missing_host_tools()
    if missing:
        _unavailable(f"missing host tools {', '.join(missing)}; run scripts/system-rootfs "
                     "(apt-get install systemd-container debootstrap)")
    with nspawn.host_lock():
        nspawn.reap_stale()
        for port in (25, 587):
            busy = nspawn.port_in_use(port)
            if busy:
                pytest.fail(
                    f"port {port} is in use on this host ({busy}); the container shares the "
                    f"host's network and needs it. Listening now:\n{nspawn.who_listens(port)}",
                    pytrace=False)
        try:
            base = nspawn.build_rootfs()
        except nspawn.NspawnError as exc:
            _unavailable(f"cannot build the rootfs: {exc}")
        with nspawn.Container(base, "empath-systest") as c:
            c.mount()
            nspawn.install_from_tree(c.root)
            nspawn.configure_for_tests(c.root)
            try:
                c.boot()
            except nspawn.NspawnError as exc:
                _unavailable(f"cannot boot the container: {exc}")
            try:
                yield c
            finally:
                r = c.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
                          check=False, timeout=60)
                JOURNAL_DUMP.write_text(r.stdout)


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
        return {n[:-4] for n in r.stdout.split() if n.endswith(".env")}

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
