"""A booted Debian 12 systemd in a container, for the system tests.

Three steps, each one function:

``build_rootfs()``
    A minbase Debian 12 made with debootstrap (systemd and dbus only), cached under
    ``/var/cache/empath-test/rootfs-<hash of the recipe>`` and reused by every later
    run; a change of the package lists or of the recipe makes a new one. empath's
    dependencies are NOT installed in it: they are only downloaded into its apt
    cache (``apt-get install --download-only``, with the package indexes kept), so
    that ``apt install ./empath_*.deb`` really resolves and installs them from
    Debian's archive, without fetching them again in every run.
``install_package()``
    ``apt install ./empath_VERSION_all.deb`` inside the booted container, as a user
    does it: the maintainer scripts create the users and enable and start the units.
    ``configure_for_tests()`` then writes the test ``empath.yaml``.
``Container``
    An overlay of the cached rootfs (so a session never changes the cache), booted
    with ``systemd-nspawn -b --register=no --keep-unit`` in its own session,
    commands run inside with ``nsenter -t PID1 -a``, torn down by terminating nspawn
    (a clean poweroff of the container), then SIGKILL if it hangs, then unmounting.

The container shares the host's network: its port 25 is the host's 127.0.0.1:25.

``python3 -m tests.system.nspawn rootfs`` builds (or finds) the cached rootfs and
prints its path; ``... shell`` builds the .deb, boots a container, installs the
package and opens a shell in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.system.nspawn_host import (
    alive,
    container_init,
    debian_mirror,
    is_nspawn,
    locked,
    prepare_rootfs,
    stop_nspawn,
)

REPO = Path(__file__).resolve().parents[2]

SUITE = "bookworm"
# Installed by debootstrap: a bare booted Debian, without empath's dependencies.
PACKAGES = ("systemd", "systemd-sysv", "dbus")
# Downloaded into the rootfs's apt cache only (not installed): what `apt install
# ./empath_*.deb` will resolve (the .deb's Depends and their Recommends), and exim4
# for the scenario that replaces it. A name missing here is fetched from the
# archive at test time, which is slower but still works.
PREFETCH = (
    "python3", "python3-aiosmtplib", "python3-aiohttp",
    "python3-bcrypt", "python3-dnspython", "python3-yaml", "python3-prometheus-client",
    "python3-systemd", "python3-sdnotify", "python3-dkim", "python3-cryptography",
    "exim4-daemon-light",
)  # fmt: skip
# Bump when the build steps below change, so a stale cache is not reused.
RECIPE_VERSION = "3"

CACHE_ROOT = Path(os.environ.get("EMPATH_TEST_CACHE", "/var/cache/empath-test"))
WORK_ROOT = Path(os.environ.get("EMPATH_TEST_WORK", "/var/tmp/empath-test"))
# One booted container at a time on this host: they all want port 25.
HOST_LOCK = Path("/run/lock/empath-system-test.lock")

# Units that would only wait for a terminal that is not there.
MASKED_UNITS = ("console-getty.service", "getty@tty1.service", "systemd-firstboot.service")


class NspawnError(Exception):
    """The container could not be built, booted or reached; the message says why."""


# ---- the cached rootfs ----------------------------------------------------------------


def rootfs_key() -> str:
    recipe = "\n".join([SUITE, RECIPE_VERSION, *sorted(PACKAGES), "prefetch:",
                        *sorted(PREFETCH), *MASKED_UNITS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def rootfs_path() -> Path:
    return CACHE_ROOT / f"rootfs-{rootfs_key()}"


def missing_host_tools() -> list[str]:
    tools = ("debootstrap", "systemd-nspawn", "nsenter", "systemd-sysusers", "systemctl")
    return [t for t in tools if shutil.which(t) is None
            and not Path("/usr/sbin", t).exists()]


def _locked(path: Path, *, timeout: float, what: str) -> contextlib.AbstractContextManager[None]:
    return locked(path, timeout,
                  lambda msg: NspawnError(f"{what}: {msg} (another system-test run?)"))


def build_rootfs(log: object = print) -> Path:
    """The cached rootfs, built with debootstrap if it is not there yet (≈1–2 min)."""
    say = log if callable(log) else print
    target = rootfs_path()
    if (target / ".empath-rootfs-complete").exists():
        return target
    if os.geteuid() != 0:
        raise NspawnError("building the system-test rootfs needs root (debootstrap)")
    missing = missing_host_tools()
    if missing:
        raise NspawnError(f"missing host tools: {', '.join(missing)} "
                          f"(apt-get install systemd-container debootstrap)")
    with _locked(CACHE_ROOT / ".build.lock", timeout=900, what="rootfs build"):
        if (target / ".empath-rootfs-complete").exists():
            return target
        tmp = CACHE_ROOT / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        mirror = debian_mirror()
        say(f"system tests: building {target} with debootstrap from {mirror}")
        started = time.monotonic()
        cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
               SUITE, str(tmp), mirror]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise NspawnError(f"debootstrap failed ({proc.returncode}):\n"
                              + proc.stdout[-4000:])
        _prepare_rootfs(tmp)
        try:
            _prefetch(tmp)
        except NspawnError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / ".empath-rootfs-complete").write_text(
            f"suite={SUITE}\nmirror={mirror}\npackages={' '.join(PACKAGES)}\n"
            f"prefetched={' '.join(PREFETCH)}\n"
            f"built={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        say(f"system tests: rootfs built in {time.monotonic() - started:.0f} s")
    return target


def _prepare_rootfs(root: Path) -> None:
    """One-time changes to a fresh debootstrap tree."""
    prepare_rootfs(root, "empath-test", MASKED_UNITS)
    # A persistent journal, as on a normal Debian host (journalctl -u … after restarts).
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)


def _prefetch(root: Path) -> None:
    """Package indexes and the .debs of PREFETCH into the rootfs's apt cache, by the
    rootfs's own apt (in a non-booted nspawn on the host's network)."""
    base = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--pipe",
            "-D", str(root), "--setenv=DEBIAN_FRONTEND=noninteractive"]
    # Only what PREFETCH needs stays in the cache, not debootstrap's own downloads.
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for cmd in (["apt-get", "-q", "update"],
                ["apt-get", "-q", "-y", "--download-only", "install", *PREFETCH]):
        proc = subprocess.run([*base, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, check=False, timeout=900)
        if proc.returncode != 0:
            raise NspawnError(f"{' '.join(cmd)} in the new rootfs failed "
                              f"({proc.returncode}):\n{proc.stdout[-4000:]}")


# ---- installing the package into a booted container ---------------------------------


@dataclass
class Install:
    """One ``apt install`` in the container: its output and how long it took."""

    cmd: list[str]
    returncode: int
    output: str
    seconds: float

    def check(self) -> Install:
        if self.returncode != 0:
            raise NspawnError(f"{' '.join(self.cmd)} exited {self.returncode}:\n"
                              + self.output[-6000:])
        return self


def apt(c: Container, *args: str, timeout: float = 900.0) -> Install:
    """``apt ARGS`` in the booted container, non-interactive, output captured."""
    cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt", "-y", *args]
    started = time.monotonic()
    r = c.run(cmd, check=False, timeout=timeout)
    return Install(cmd[2:], r.returncode, r.stdout + r.stderr, time.monotonic() - started)


def install_package(c: Container, deb: Path) -> Install:
    """``apt install ./empath_VERSION_all.deb`` in the booted container ``c``.

    The .deb is copied to /root first (apt wants a path with a slash for a file).
    Dependencies come from Debian's archive: the indexes and .debs cached in the
    rootfs, or the network for anything not prefetched.
    """
    dest = c.path(f"/root/{deb.name}")
    shutil.copy2(deb, dest)
    return apt(c, "install", f"/root/{deb.name}").check()


# ---- the test configuration --------------------------------------------------------

MAIL_ROOT = "/var/lib/empath/mail"

# relay_networks holds IPv4 loopback only, so a client on [::1] is an outsider: it
# may send to local_domains and nowhere else (the reload scenario relies on it).
BASE_CONFIG = """\
# empath system-test configuration (tests/system/nspawn.py)
hostname: mx.system.test
postmaster: postmaster@system.test
state_dir: /var/lib/empath
local_domains: [{domains}]
relay_networks: [127.0.0.0/8]
delivery:
  mode: {mode}
  routes:
{routes}{extra}log: {{level: info}}
workers: 2
shutdown_timeout: 10
"""

# The maildir route's root must exist (the daemon does not create it).
TEST_TMPFILES = f"d {MAIL_ROOT} 0750 empath empath -\n"


def config_text(mode: str = "mx", domains: Sequence[str] = ("system.test",),
                extra: str = "", routes: Mapping[str, str] | None = None) -> str:
    """The test configuration: every local domain delivered to the maildir root,
    ``routes`` added to delivery.routes, ``extra`` top-level YAML appended."""
    table = {d: f"maildir:{MAIL_ROOT}" for d in domains} | dict(routes or {})
    routes_yaml = "".join(f'    {d}: "{hop}"\n' for d, hop in table.items())
    return BASE_CONFIG.format(domains=", ".join(domains), mode=mode, routes=routes_yaml,
                              extra=extra)


def configure_for_tests(root: Path, text: str | None = None) -> None:
    """Test-only setup on top of the installed package: empath.yaml and the mail root."""
    cfg = root / "etc/empath/empath.yaml"
    cfg.write_text(config_text() if text is None else text)
    os.chown(cfg, 0, _group_id(root, "empath"))
    cfg.chmod(0o640)
    (root / "etc/tmpfiles.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/tmpfiles.d/empath-test.conf").write_text(TEST_TMPFILES)


def _group_id(root: Path, name: str) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise NspawnError(f"group {name} not created in {root}/etc/group")


# ---- the host's ports ------------------------------------------------------------------


def port_in_use(port: int) -> str | None:
    """Why ``port`` cannot be bound on the host's wildcard address, or None if free."""
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((addr, port))
        except OSError as exc:
            return f"{addr} port {port}: {exc.strerror}"
        finally:
            s.close()
    return None


def who_listens(port: int) -> str:
    proc = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                          text=True, check=False)
    return proc.stdout.strip() or "(ss shows nothing)"


# ---- a booted container ----------------------------------------------------------------


class Container:
    """A booted container on an overlay of ``base``; use as a context manager."""

    def __init__(self, base: Path, name: str = "empath-test") -> None:
        self.base = base
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_work_root()))
        # For reap_stale(): the process that owns (and must tear down) this container.
        (self.workdir / "owner.pid").write_text(f"{os.getpid()}\n")
        self.root = self.workdir / "root"
        self.console_log = self.workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self._mounted = False

    # -- lifecycle

    def mount(self) -> None:
        for sub in ("upper", "work", "root"):
            (self.workdir / sub).mkdir(exist_ok=True)
        opts = (f"lowerdir={self.base},upperdir={self.workdir / 'upper'},"
                f"workdir={self.workdir / 'work'}")
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts,
                               str(self.root)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            self._mounted = True
            return
        # No overlayfs here (nested container, odd file system): a plain copy.
        shutil.copytree(self.base, self.root, symlinks=True, dirs_exist_ok=True)

    def boot(self, timeout: float = 90.0) -> None:
        cmd = ["systemd-nspawn", "--quiet", "-D", str(self.root), "-b", "--register=no",
               "--keep-unit", f"--machine={self.name}", "--console=passive"]
        with self.console_log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        # For reap_stale(): the nspawn that runs this container.
        (self.workdir / "nspawn.pid").write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout
        self.pid1 = self._find_pid1(deadline)
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            # "offline"/"unknown": systemd is not answering yet (just exec'ed); retry.
            if state in ("maintenance", "stopping"):
                break
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise NspawnError(f"container did not finish booting (state {state!r}):\n"
                          + self.diagnostics())

    def _find_pid1(self, deadline: float) -> int:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NspawnError(f"systemd-nspawn exited with {self.proc.returncode}:\n"
                                  + self.console())
            pid1 = container_init(self.proc.pid)
            if pid1 is not None:
                return pid1
            time.sleep(0.1)
        raise NspawnError("no container init found under systemd-nspawn:\n" + self.console())

    def shutdown(self, timeout: float = 60.0) -> None:
        """Power the container off (SIGTERM to nspawn), SIGKILL if it hangs; unmount."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        self.pid1 = None

    def remove(self) -> None:
        if self._mounted:
            for _ in range(10):
                r = subprocess.run(["umount", str(self.root)], capture_output=True,
                                   check=False)
                if r.returncode == 0:
                    break
                time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", str(self.root)], check=False)
            self._mounted = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.shutdown()
        finally:
            self.remove()

    # -- inside

    def run(self, cmd: Sequence[str], *, check: bool = True, input: str | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces, as root)."""
        if self.pid1 is None:
            raise NspawnError("container is not booted")
        full = ["nsenter", "-t", str(self.pid1), "-a", *cmd]
        proc = subprocess.run(full, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise NspawnError(f"in container: {' '.join(cmd)} exited {proc.returncode}\n"
                              f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", script], **kw)  # type: ignore[arg-type]

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def path(self, inside: str) -> Path:
        """Host path of a file inside the container (its root is our overlay mount)."""
        return self.root / inside.lstrip("/")

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        parts = ["--- console ---", self.console()]
        if self.pid1 is not None:
            for cmd in (["systemctl", "--failed", "--no-pager"],
                        ["systemctl", "list-jobs", "--no-pager"],
                        ["journalctl", "-b", "--no-pager", "-n", "80"]):
                with contextlib.suppress(Exception):
                    r = self.run(cmd, check=False, timeout=20)
                    parts += [f"--- {' '.join(cmd)} ---", r.stdout + r.stderr]
        return "\n".join(parts)


def reap_stale(log: object = print) -> None:
    """Tear down containers left by a test run that died without its teardown (killed,
    SIGPIPE, …): their owner process is gone. Call with the host lock held."""
    say = log if callable(log) else print
    if not WORK_ROOT.exists():
        return
    for workdir in WORK_ROOT.iterdir():
        if not workdir.is_dir():
            continue
        owner = _read_pid(workdir / "owner.pid")
        if owner is not None and alive(owner):
            continue
        nspawn_pid = _read_pid(workdir / "nspawn.pid")
        if nspawn_pid is not None and alive(nspawn_pid) and is_nspawn(nspawn_pid):
            say(f"system tests: stopping a stale container (nspawn pid {nspawn_pid})")
            stop_nspawn(nspawn_pid, timeout=30)
        root = workdir / "root"
        if os.path.ismount(root):
            subprocess.run(["umount", "-l", str(root)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _work_root() -> str:
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    return str(WORK_ROOT)


@contextlib.contextmanager
def host_lock(timeout: float = 600.0) -> Iterator[None]:
    """Serialise booted containers on this host (they share port 25)."""
    with _locked(HOST_LOCK, timeout=timeout, what="system tests"):
        yield


def main(argv: list[str]) -> int:
    if argv[:1] == ["rootfs"]:
        print(build_rootfs(log=lambda m: print(m, file=sys.stderr)))
        return 0
    if argv[:1] == ["shell"]:
        base = build_rootfs()
        with host_lock():
            reap_stale()
            from tests.packaging.build import built

            deb = built().deb
            with Container(base, "empath-shell") as c:
                c.mount()
                c.boot()
                install_package(c, deb)
                configure_for_tests(c.root)
                print(f"container PID 1 = {c.pid1}; exit the shell to tear it down",
                      file=sys.stderr)
                subprocess.run(["nsenter", "-t", str(c.pid1), "-a", "/bin/bash", "-l"],
                               check=False)
        return 0
    print("usage: python3 -m tests.system.nspawn rootfs|shell", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
