"""Build the packages once per test session, with the same script as ``make packages``.

``built()`` runs ``scripts/build-packages --no-lint`` (the tests run lintian and
rpmlint themselves) into a scratch directory and returns where the .deb and .rpm
are; ``built("+1")`` makes a newer .deb of the same tree for the upgrade scenario.
Each is built at most once per process, so tests/test_packaging.py and the system
tests share the builds.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/build-packages"
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# What scripts/build-packages needs on the host (scripts/install-test-deps has them).
TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "rpmbuild", "lintian", "rpmlint", "rpm",
         "dpkg-deb")
PY_MODULES = ("build", "installer", "setuptools")


class BuildFailed(Exception):
    pass


@dataclass(frozen=True)
class Built:
    version: str
    deb: Path
    rpm: Path | None


def upstream_version() -> str:
    text = (REPO / "empath/__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert m, "no __version__ in empath/__init__.py"
    return m.group(1)


def missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t, path=HOST_PATH) is None]
    if Path("/usr/bin/python3").exists():
        for mod in PY_MODULES:
            r = subprocess.run(["/usr/bin/python3", "-c", f"import {mod}"],
                               capture_output=True, check=False)
            if r.returncode != 0:
                missing.append(f"python3-{mod}")
    else:
        missing.append("/usr/bin/python3")
    return missing


_scratch: Path | None = None
_lock = threading.Lock()


def _scratch_dir() -> Path:
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix="empath-packages-"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


@functools.cache
def _build(suffix: str) -> Built:
    out = _scratch_dir() / f"dist{suffix or '-release'}"
    env = {**os.environ, "EMPATH_VERSION_SUFFIX": suffix}
    cmd = [str(SCRIPT), "--no-lint", "--out", str(out),
           "--work", str(_scratch_dir() / f"work{suffix or '-release'}")]
    if suffix:
        cmd.append("--deb")  # only the upgrade scenario wants a newer build
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise BuildFailed(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                          f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    version = upstream_version() + suffix
    deb = out / f"empath_{version}_all.deb"
    rpm = out / f"empath-{version}-1.noarch.rpm"
    if not deb.exists():
        raise BuildFailed(f"no {deb} after a successful build:\n{proc.stderr}")
    return Built(version, deb, rpm if rpm.exists() else None)


def built(suffix: str = "") -> Built:
    with _lock:
        return _build(suffix)
