#!/usr/bin/env python3
"""Molecule instances: booted Debian 12 systemd containers, each in its own netns.

Molecule has no systemd-nspawn driver; the scenarios' create.yml and destroy.yml
(molecule/resources/playbooks/) call this script instead:

    nspawn_instance.py rootfs          build (or find) the cached rootfs, print its path
    nspawn_instance.py up NAME         boot instance NAME, print {"instance", "pid", ...}
    nspawn_instance.py down NAME       power it off and remove everything it left

The rootfs is a debootstrap minbase bookworm with systemd, python3 (Ansible's
modules), python3-apt and python3-debian (the apt and deb822_repository modules),
iproute2 (ss, for testinfra), nftables (the fleet playbook's drain) and empath's
Debian dependencies already installed, cached under
/var/cache/empath-test/molecule-rootfs-<hash of the recipe> and never written to: an
instance boots on an overlay of it. It is not tests/system/nspawn.py's rootfs,
which leaves the dependencies uninstalled on purpose so that its `apt install`
resolves them; an instance here has no network to fetch them with.

Every instance gets a network namespace of its own with only the loopback up, so
its port 25 is not the host's (the system tests use that one) and two instances do
not fight over it. Ansible and testinfra reach it through nsenter, not IP: the
inventory's ansible_nsenter_pid reads WORK_ROOT/NAME/pid1, the container's systemd.

What both drivers do the same way on the host (the Debian mirror, the build lock, the
first changes to a debootstrap tree, finding and stopping nspawn) is in
tests/system/nspawn_host.py, shared with the system tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# This script runs under the system python3 from the checkout: the helpers it shares
# with the system tests are found in the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.system.nspawn_host import (
    container_init,
    debian_mirror,
    locked,
    prepare_rootfs,
    stop_nspawn,
)

SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-apt",
                 "python3-debian", "iproute2", "nftables")
# The .deb's Depends, installed ahead so that an instance can install the .deb
# offline; the Depends of the .debs named by $EMPATH_DEB and $EMPATH_DEB_NEXT are
# added (a new dependency makes a new rootfs). python3-aiosmtpd is not one of them any
# more: it is here for the test sink (tasks/sink.yml).
EMPATH_DEPS = (
    "python3-aiosmtpd", "python3-aiosmtplib", "python3-dnspython", "python3-yaml",
    "python3-prometheus-client", "python3-systemd", "python3-sdnotify",
    "python3-aiohttp", "python3-bcrypt",
)
MASKED_UNITS = ("console-getty.service", "getty@tty1.service", "systemd-firstboot.service",
                "apt-daily.timer", "apt-daily-upgrade.timer")
# Bump when the steps below change, so a stale cache is not reused.
RECIPE_VERSION = "1"

CACHE_ROOT = Path(os.environ.get("EMPATH_TEST_CACHE", "/var/cache/empath-test"))
WORK_ROOT = Path(os.environ.get("EMPATH_MOLECULE_WORK", "/var/tmp/empath-molecule"))
BOOT_TIMEOUT = 120.0
PRUNE_AFTER = 7 * 86400.0


class InstanceError(Exception):
    pass


def say(msg: str) -> None:
    print(f"nspawn_instance: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, timeout: float = 900.0, check: bool = True) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise InstanceError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout


# ---- the cached rootfs ----------------------------------------------------------------


def deb_depends(deb: Path) -> set[str]:
    """Package names a .deb depends on (the first of alternatives, arch qualifiers off)."""
    field = run(["dpkg-deb", "--field", str(deb), "Depends"]).strip()
    names = set()
    for dep in field.split(","):
        first = dep.split("|")[0].split("(")[0].strip()
        if first:
            names.add(first.split(":")[0])
    return names


def packages_to_install() -> list[str]:
    wanted = set(EMPATH_DEPS)
    for var in ("EMPATH_DEB", "EMPATH_DEB_NEXT"):
        deb = Path(os.environ.get(var, ""))
        if deb.is_file():
            wanted |= deb_depends(deb)
    return sorted(wanted - set(BASE_PACKAGES))


def rootfs_path() -> Path:
    recipe = "\n".join([SUITE, RECIPE_VERSION, *BASE_PACKAGES, *packages_to_install(),
                        *MASKED_UNITS])
    return CACHE_ROOT / f"molecule-rootfs-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"


def build_rootfs() -> Path:
    target = rootfs_path()
    done = target / ".empath-rootfs-complete"
    if done.exists():
        with contextlib.suppress(OSError):
            done.touch()  # last use, for _prune_old()
        return target
    if os.geteuid() != 0:
        raise InstanceError("building the rootfs needs root (debootstrap)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "ip"):
        if shutil.which(tool) is None:
            raise InstanceError(f"{tool} not found (apt-get install systemd-container "
                                f"debootstrap iproute2 util-linux)")
    with locked(CACHE_ROOT / ".molecule-build.lock", 900, InstanceError):
        if done.exists():
            return target
        tmp = CACHE_ROOT / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        mirror = debian_mirror()
        say(f"building {target} with debootstrap from {mirror}")
        try:
            run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                 SUITE, str(tmp), mirror])
            _prepare(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        done_tmp = tmp / done.name
        done_tmp.write_text(f"suite={SUITE}\nmirror={mirror}\n"
                            f"packages={' '.join([*BASE_PACKAGES, *packages_to_install()])}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        say(f"rootfs built in {time.monotonic() - started:.0f} s")
        _prune_old(target)
    return target


def _prepare(root: Path) -> None:
    # The host's sources bring bookworm-updates and -security: python3-aiosmtpd must be
    # the fixed one (the .deb asks for >= 1.4.3-1.1+deb12u1).
    prepare_rootfs(root, "empath-molecule", MASKED_UNITS)
    base = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--pipe",
            "-D", str(root), "--setenv=DEBIAN_FRONTEND=noninteractive"]
    run([*base, "apt-get", "-q", "update"])
    run([*base, "apt-get", "-q", "-y", "--no-install-recommends", "install",
         *packages_to_install()])
    run([*base, "apt-get", "clean"])


def _prune_old(keep: Path) -> None:
    """Remove rootfs caches not used for a week that no instance is booted on (the
    recipe changed; a few recent ones stay, e.g. with and without a new dependency)."""
    in_use = Path("/proc/self/mountinfo").read_text()
    for old in CACHE_ROOT.glob("molecule-rootfs-*"):
        try:
            idle = time.time() - (old / ".empath-rootfs-complete").stat().st_mtime
        except OSError:
            idle = float("inf")
        if old != keep and idle > PRUNE_AFTER and f"lowerdir={old}," not in in_use:
            say(f"removing the stale rootfs {old}")
            shutil.rmtree(old, ignore_errors=True)


# ---- instances -------------------------------------------------------------------------


def workdir(name: str) -> Path:
    return WORK_ROOT / name


def netns(name: str) -> str:
    # /run/netns/NAME; a prefix keeps it apart from anyone else's namespaces.
    return f"empath-mol-{name}"[:60]


def _in_container(pid1: int, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid1), "-a", *cmd], capture_output=True,
                          text=True, timeout=timeout, check=False)


def up(name: str, rootfs: Path) -> dict[str, object]:
    down(name)  # a run that died left it behind
    wd = workdir(name)
    for sub in ("upper", "work", "root"):
        (wd / sub).mkdir(parents=True, exist_ok=True)
    root = wd / "root"
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={rootfs},upperdir={wd / 'upper'},workdir={wd / 'work'}", str(root)])
    ns = netns(name)
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    (root / "etc/hostname").write_text(f"{name}\n")
    console = wd / "console.log"
    cmd = ["systemd-nspawn", "--quiet", "-D", str(root), "-b", "--register=no", "--keep-unit",
           f"--machine={name}", f"--network-namespace-path=/run/netns/{ns}",
           "--console=passive"]
    with console.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    (wd / "nspawn.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + BOOT_TIMEOUT
    pid1 = None
    while pid1 is None and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InstanceError(f"systemd-nspawn exited {proc.returncode}:\n"
                                + console.read_text(errors="replace")[-4000:])
        pid1 = container_init(proc.pid)
        time.sleep(0.1)
    if pid1 is None:
        raise InstanceError(f"{name}: no systemd under nspawn {proc.pid}")
    state = ""
    while time.monotonic() < deadline:
        state = _in_container(pid1, "systemctl", "is-system-running").stdout.strip()
        if state in ("running", "degraded"):
            break
        if proc.poll() is not None or state in ("maintenance", "stopping"):
            break
        time.sleep(0.3)
    if state not in ("running", "degraded"):
        failed = _in_container(pid1, "systemctl", "--failed", "--no-pager").stdout
        raise InstanceError(f"{name} did not boot (state {state!r}):\n{failed}\n"
                            + console.read_text(errors="replace")[-4000:])
    (wd / "pid1").write_text(f"{pid1}\n")
    # Molecule's instance config entry: what its inventory takes from it.
    return {"instance": name, "connection": "community.docker.nsenter", "pid": pid1,
            "nspawn_pid": proc.pid, "netns": ns, "root": str(root), "state": state}


def down(name: str) -> bool:
    """Stop and remove instance NAME; False if there was nothing to remove."""
    wd = workdir(name)
    ns = netns(name)
    found = wd.exists() or Path(f"/run/netns/{ns}").exists()
    with contextlib.suppress(OSError, ValueError):
        stop_nspawn(int((wd / "nspawn.pid").read_text()))
    root = wd / "root"
    if os.path.ismount(root) and subprocess.run(["umount", str(root)], capture_output=True,
                                                check=False).returncode:
        subprocess.run(["umount", "-l", str(root)], check=False)
    if Path(f"/run/netns/{ns}").exists():
        run(["ip", "netns", "delete", ns], check=False)
    shutil.rmtree(wd, ignore_errors=True)
    return found


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["rootfs"] and len(argv) == 1:
            print(build_rootfs())
            return 0
        if argv[:1] == ["up"] and len(argv) == 2:
            rootfs = build_rootfs()
            try:
                print(json.dumps(up(argv[1], rootfs)))
            except BaseException:
                down(argv[1])
                raise
            return 0
        if argv[:1] == ["down"] and len(argv) == 2:
            print(json.dumps({"name": argv[1], "removed": down(argv[1])}))
            return 0
    except (InstanceError, subprocess.TimeoutExpired) as exc:
        say(str(exc))
        return 1
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
