"""The packages as built by `make packages` (scripts/build-packages), without booting
anything: lintian and rpmlint verdicts, both packages' contents against ONE kept file
list (tests/packaging/files.txt), the rpm's requirements and scriptlets against kept
copies, the .deb's relations, the rpm unpacked into a scratch root, and the packaged
default configuration. Installing, upgrading and purging the .deb in a booted Debian
is tests/system/test_package.py.

No packaging tools on this machine: skipped, a failure under CI=true.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.packaging import build, lists

REPO = Path(__file__).resolve().parents[1]
PACKAGED_CONFIG = REPO / "packaging/empath.yaml"
HOST_PATH = build.HOST_PATH
UPDATE_HINT = "if the change is intended: python3 -m tests.packaging.lists --update"


@pytest.fixture(scope="session")
def packages() -> build.Built:
    missing = build.missing_tools()
    if missing:
        reason = f"packaging tools missing: {', '.join(missing)} (scripts/install-test-deps)"
        if IN_CI:
            pytest.fail(f"cannot test the packages under CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        b = build.built()
    except build.BuildFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    assert b.rpm is not None, "scripts/build-packages made no .rpm"
    return b


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": HOST_PATH}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                          **kw)  # type: ignore[call-overload, no-any-return]


def diff(want: list[str], got: list[str], what: str) -> str:
    lines = difflib.unified_diff(want, got, f"kept {what}", f"built {what}", lineterm="")
    return "\n".join(lines) + f"\n({UPDATE_HINT})"


# ---- lint -----------------------------------------------------------------------------


def test_lintian_reports_no_errors_and_no_warnings(packages: build.Built) -> None:
    r = run(["lintian", "--fail-on", "error,warning", str(packages.deb)])
    tags = [line for line in r.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert not tags, "\n".join(tags)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rpmlint_reports_no_errors(packages: build.Built) -> None:
    assert packages.rpm is not None
    r = run(["rpmlint", "-c", str(REPO / "packaging/rpm/rpmlint.toml"), str(packages.rpm)])
    errors = [line for line in r.stdout.splitlines() if ": E: " in line]
    assert not errors, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 errors" in r.stdout, r.stdout


# ---- what is in the packages ---------------------------------------------------------------


def test_version_comes_from_empath_init(packages: build.Built) -> None:
    version = build.upstream_version()
    assert packages.version == version
    assert run(["dpkg-deb", "-f", str(packages.deb), "Version"]).stdout.strip() == version
    assert packages.rpm is not None
    rpm_v = run(["rpm", "-qp", "--qf", "%{VERSION}-%{RELEASE}", str(packages.rpm)]).stdout
    assert rpm_v == f"{version}-1"
    assert packages.rpm.name == f"empath-{version}-1.noarch.rpm"
    assert packages.deb.name == f"empath_{version}_all.deb"


@pytest.mark.parametrize("flavour", ["deb", "rpm"])
def test_contents_match_the_one_kept_file_list(packages: build.Built, flavour: str) -> None:
    """dpkg -c and rpm -qpl, normalised, are exactly tests/packaging/files.txt: the same
    commands, sendmail links, units, sysusers/tmpfiles, catalog, conffile (0640), man
    pages and every module of empath/ in both."""
    if flavour == "deb":
        got = lists.normalise(lists.deb_entries(packages.deb), "deb", packages.version)
    else:
        assert packages.rpm is not None
        got = lists.normalise(lists.rpm_entries(packages.rpm), "rpm", packages.version)
    want = lists.expected(flavour)
    assert got == want, diff(want, got, f"files ({flavour})")


def test_rpm_requirements_match_the_kept_list(packages: build.Built) -> None:
    assert packages.rpm is not None
    want = lists.RPM_REQUIRES.read_text().splitlines()
    got = lists.rpm_requires(packages.rpm)
    assert got == want, diff(want, got, "rpm -qpR")


def test_rpm_scriptlets_match_the_kept_ones(packages: build.Built) -> None:
    assert packages.rpm is not None
    want = lists.RPM_SCRIPTS.read_text().splitlines()
    got = lists.rpm_scripts(packages.rpm).splitlines()
    assert got == want, diff(want, got, "rpm -qp --scripts")


def test_deb_relations_and_conffile(packages: build.Built) -> None:
    """Depends on Debian 12's own python3-* (aiosmtpd at the CVE-fixed revision), takes
    the place of any other MTA, and /etc/empath/empath.yaml is a conffile."""
    want = lists.DEB_CONTROL.read_text().splitlines()
    got = lists.deb_control(packages.deb)
    assert got == want, diff(want, got, "deb control fields")
    assert lists.deb_conffiles(packages.deb) == ["/etc/empath/empath.yaml"]


def test_deb_never_restarts_the_socket(packages: build.Built, tmp_path: Path) -> None:
    """The maintainer scripts restart only empath.service on upgrade: the socket is
    started (a no-op when running), never restarted or stopped except on remove."""
    control = tmp_path / "control"
    r = run(["dpkg-deb", "-e", str(packages.deb), str(control)])
    assert r.returncode == 0, r.stderr
    scripts = {p.name: p.read_text() for p in control.iterdir()
               if p.name in ("preinst", "postinst", "prerm", "postrm")}
    for name, text in scripts.items():
        for line in text.splitlines():
            if "deb-systemd-invoke" in line and "empath.socket" in line:
                assert "restart" not in line, f"{name}: {line}"
                if "stop" in line:
                    assert name == "prerm", f"{name}: {line}"
    assert re.search(r"_dh_action=restart", scripts["postinst"])
    assert "restart 'empath.socket'" not in scripts["postinst"]


# ---- the rpm unpacked ----------------------------------------------------------------


def test_rpm_installs_into_a_scratch_root(packages: build.Built, tmp_path: Path) -> None:
    """`rpm --root SCRATCH --nodeps --noscripts -i` puts the files in place, the config
    0640 root:empath once the package's sysusers file has made the group (what its
    %pre does on a real system), and `rpm -V` finds nothing changed."""
    assert packages.rpm is not None
    if shutil.which("systemd-sysusers", path=HOST_PATH) is None:
        if IN_CI:
            pytest.fail("systemd-sysusers missing (package systemd)")
        pytest.skip("systemd-sysusers missing (package systemd)")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = run(["systemd-sysusers", f"--root={root}", str(REPO / "systemd/empath.sysusers")])
    assert r.returncode == 0, r.stderr
    assert run(["rpm", "--root", str(root), "--initdb"]).returncode == 0
    r = run(["rpm", "--root", str(root), "--nodeps", "--noscripts", "-i", str(packages.rpm)])
    assert r.returncode == 0, r.stdout + r.stderr
    q = run(["rpm", "--root", str(root), "-q", "empath"])
    assert q.stdout.strip() == f"empath-{packages.version}-1.noarch", q.stdout + q.stderr

    for line in lists.expected("rpm"):
        path = line.split()[1]
        if "{modules}" in path:
            continue
        path = path.replace("{sitelib}", lists.SITELIB["rpm"]).replace(
            "{version}", packages.version)
        assert (root / path.lstrip("/")).is_symlink() or (root / path.lstrip("/")).is_file(), \
            f"{path} did not land in {root}"
    site = root / lists.SITELIB["rpm"].lstrip("/") / "empath"
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*.py")) == lists.module_files()

    groups = {f[0]: int(f[2]) for f in (line.split(":") for line in
                                        (root / "etc/group").read_text().splitlines())}
    users = {f[0]: int(f[2]) for f in (line.split(":") for line in
                                       (root / "etc/passwd").read_text().splitlines())}
    cfg = (root / "etc/empath/empath.yaml").stat()
    assert (cfg.st_mode & 0o7777, cfg.st_uid, cfg.st_gid) == (0o640, 0, groups["empath"])
    state = (root / "var/lib/empath").stat()
    assert (state.st_mode & 0o7777, state.st_uid) == (0o750, users["empath"])
    assert os.readlink(root / "usr/sbin/sendmail") == "../bin/empath"
    shebang = (root / "usr/bin/empath").read_text().splitlines()[0]
    assert shebang == "#!/usr/bin/python3 -sP"
    v = run(["rpm", "--root", str(root), "-V", "--nodeps", "empath"])
    assert v.returncode == 0, v.stdout + v.stderr


# ---- the packaged configuration -------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "empath", "check-config", "--config",
                           str(path)], capture_output=True, text=True, check=False)


def test_packaged_config_is_valid_and_safe() -> None:
    """packaging/empath.yaml passes `empath check-config` and is what issue 7 asks:
    no listen (socket activation), no local domains, relaying for localhost only,
    delivery by MX, state in /var/lib/empath."""
    r = check_config(PACKAGED_CONFIG)
    assert r.returncode == 0, r.stderr
    effective = r.stdout
    assert "\nlisten: []\n" in effective
    assert "\nlocal_domains: []\n" in effective
    assert "\nrelay_networks:\n- 127.0.0.0/8\n- ::1/128\n" in effective
    assert "\n  mode: mx\n" in effective
    assert "\nstate_dir: /var/lib/empath\n" in effective


def uncommented_examples(text: str) -> str:
    """The config with every commented-out example setting ("#key: ..." and the
    indented "#  ..." lines under it) made live; prose comments ("# ...") stay."""
    out: list[str] = []
    block_indent: int | None = None
    for line in text.splitlines():
        m = re.match(r"^( *)#([a-z_]+:.*)$", line)
        if m:
            block_indent = len(m.group(1))
            out.append(m.group(1) + m.group(2))
            continue
        m = re.match(r"^( *)#( +\S.*)$", line)
        if block_indent is not None and m and len(m.group(1)) == block_indent:
            out.append(m.group(1) + m.group(2))
            continue
        block_indent = None
        out.append(line)
    return "\n".join(out) + "\n"


def test_packaged_config_examples_are_valid(tmp_path: Path) -> None:
    """Every commented example in the packaged config, uncommented all at once, is a
    valid configuration: an admin who uncomments one gets no surprise."""
    text = uncommented_examples(PACKAGED_CONFIG.read_text())
    assert text != PACKAGED_CONFIG.read_text()
    for key in ("hostname:", "  routes:", "tls:", "limits:", "  destinations:"):
        assert f"\n{key}" in text, f"no commented example of {key.strip()}"
    cfg = tmp_path / "examples.yaml"
    cfg.write_text(text)
    r = check_config(cfg)
    assert r.returncode == 0, r.stderr + "\n" + text
