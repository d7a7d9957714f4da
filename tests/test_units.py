"""The unit files in systemd/, checked on the host without booting anything.

``systemd-analyze security --offline=true`` must score empath.service at most 2.0,
and ``systemd-analyze verify`` must accept the units. verify insists that ExecStart=
and ExecReload= name existing executables, so it runs on a temporary copy whose
/usr/bin/empath and /usr/bin/empathctl point at stub scripts; everything else is
verified as shipped. Without systemd-analyze these tests skip, except under CI=true.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNITS / "empath.service"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    return require_tool("systemd-analyze")


def _systemd_version(analyze: str) -> int:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True,
                         check=False).stdout
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else 0


def values(path: Path, section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``[section]``, in order (unit keys may repeat; an
    empty assignment is kept as "")."""
    current = None
    found = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        name, sep, value = line.partition("=")
        if sep and current == section and name.strip() == key:
            found.append(value.strip())
    return found


def test_service_security_exposure_at_most_2() -> None:
    analyze = _analyze()
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True, text=True, check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, f"no exposure line in systemd-analyze output:\n{proc.stdout}\n{proc.stderr}"
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, (
        f"empath.service exposure {exposure} > {MAX_EXPOSURE}:\n"
        + "\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("✗"))
    )


def test_units_verify(tmp_path: Path) -> None:
    analyze = _analyze()
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    for name in ("empath", "empathctl"):
        stub = stub_bin / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    names = ("empath.service", "empath.socket", "empath-submission.socket")
    for name in names:
        text = (UNITS / name).read_text()
        text = text.replace("=/usr/bin/empathctl ", f"={stub_bin}/empathctl ")
        text = text.replace("=/usr/bin/empath ", f"={stub_bin}/empath ")
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )
    # Warnings about the host's own units (pulled in as dependencies) are not ours.
    ours = [ln for ln in proc.stderr.splitlines() if "empath" in ln]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_notify_reload_dropin(tmp_path: Path) -> None:
    """On systemd ≥ 253 the drop-in verifies with the service; on 252 (which does not
    know Type=notify-reload) its content is checked as text."""
    dropin = UNITS / "notify-reload.conf"
    assert values(dropin, "Service", "Type") == ["notify-reload"]
    # ExecReload= must be cleared: notify-reload would signal AND run it (reload twice).
    assert values(dropin, "Service", "ExecReload") == [""]
    analyze = _analyze()
    if _systemd_version(analyze) < 253:
        return
    stub = tmp_path / "empath"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = SERVICE.read_text().replace("=/usr/bin/empath ", f"={stub} ")
    text = text.replace("=/usr/bin/empathctl ", f"={stub} ")
    (tmp_path / "empath.service").write_text(text)
    (tmp_path / "empath.service.d").mkdir()
    (tmp_path / "empath.service.d" / "notify-reload.conf").write_text(dropin.read_text())
    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "empath.service")],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_service_contract() -> None:
    """The settings PRODUCT.md and the other parts of the project rely on."""
    s = "Service"
    assert values(SERVICE, s, "Type") == ["notify"]
    assert values(SERVICE, s, "ExecStart") == [
        "/usr/bin/empath run --config /etc/empath/empath.yaml"]
    assert values(SERVICE, s, "ExecReload") == ["/usr/bin/empathctl reload --wait"]
    assert values(SERVICE, s, "User") == ["empath"]
    assert values(SERVICE, s, "Group") == ["empath"]
    assert values(SERVICE, s, "StateDirectory") == ["empath"]
    assert values(SERVICE, s, "RuntimeDirectory") == ["empath"]
    assert values(SERVICE, s, "RestartPreventExitStatus") == ["2"]
    assert values(SERVICE, s, "KillMode") == ["mixed"]
    assert int(values(SERVICE, s, "LimitNOFILE")[0]) > 2 * 1000
    assert values(SERVICE, s, "CapabilityBoundingSet") == [""]
    assert values(SERVICE, s, "AmbientCapabilities") == [""]
    assert values(SERVICE, "Install", "WantedBy") == ["multi-user.target"]
    assert "empath-submission.socket" not in " ".join(values(SERVICE, "Install", "Also"))
    assert "empath.socket" in values(SERVICE, "Unit", "Requires")
    smtp = UNITS / "empath.socket"
    sub = UNITS / "empath-submission.socket"
    assert values(smtp, "Socket", "ListenStream") == ["25"]
    assert values(smtp, "Socket", "FileDescriptorName") == ["smtp"]
    assert values(sub, "Socket", "ListenStream") == ["587"]
    assert values(sub, "Socket", "FileDescriptorName") == ["submission"]
    for sock in (smtp, sub):
        assert values(sock, "Socket", "Service") == ["empath.service"]
        assert values(sock, "Socket", "Accept") == ["no"]


def test_tmpfiles_and_sysusers_match_the_service() -> None:
    """tmpfiles creates /var/lib/empath as StateDirectory= would; sysusers creates the
    user and the group the service names."""
    mode = values(SERVICE, "Service", "StateDirectoryMode")[0]
    lines = [ln.split() for ln in (UNITS / "empath.tmpfiles").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    state = [ln for ln in lines if ln[1] == "/var/lib/empath"]
    assert state == [["d", "/var/lib/empath", mode, "empath", "empath", "-"]]
    sysusers = [ln.split()[:2] for ln in (UNITS / "empath.sysusers").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert ["u", "empath"] in sysusers
    assert ["g", "empath-admin"] in sysusers
    assert values(SERVICE, "Service", "SupplementaryGroups") == ["empath-admin"]


@pytest.mark.parametrize("name", ["empath.sysusers", "empath.tmpfiles"])
def test_sysusers_tmpfiles_parse(name: str, tmp_path: Path) -> None:
    """The host's systemd-sysusers / systemd-tmpfiles accept the files (dry run in a
    scratch root)."""
    tool = require_tool("systemd-sysusers" if name.endswith("sysusers") else "systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for f in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / f).write_text("root:x:0:0:root:/root:/bin/sh\n" if f == "passwd"
                                      else "root:x:0:\n" if f == "group" else "")
    conf = tmp_path / (name.split(".")[0] + ".conf")
    conf.write_text((UNITS / name).read_text())
    if name.endswith("sysusers"):
        cmd = [tool, f"--root={root}", str(conf)]
    else:
        cmd = [tool, f"--root={root}", "--create", str(conf)]
        # tmpfiles resolves empath:empath in the root: create them first.
        subprocess.run([require_tool("systemd-sysusers"), f"--root={root}",
                        str(UNITS / "empath.sysusers")], check=True, capture_output=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    if name.endswith("sysusers"):
        passwd = (root / "etc/passwd").read_text()
        assert re.search(r"^empath:x:\d+:\d+:empath mail transfer agent:/var/lib/empath:"
                         r"/usr/sbin/nologin$", passwd, re.M), passwd
        assert re.search(r"^empath-admin:x:\d+:", (root / "etc/group").read_text(), re.M)
    else:
        st = (root / "var/lib/empath").stat()
        assert oct(st.st_mode & 0o7777) == "0o750"
