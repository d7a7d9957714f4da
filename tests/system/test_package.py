"""The .deb in a booted Debian 12: install, sendmail, replacing exim4, upgrade, remove,
purge — what `apt install empath` users go through (issue 7, "How it is shown").

The session container (``container``) had ``apt install ./empath_*.deb`` run in it
before any test; ``installed`` is what it looked like right after apt returned. The
exim4, upgrade and remove/purge scenarios start from an empty container of their own
(``other_container``), because they change which package is installed.

SMTP sinks listen on the host's loopback (127.0.0.7x): the container shares the
host's network, so a route ``smtp:127.0.0.71:PORT`` in the container reaches them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.packaging import build
from tests.system import nspawn, smtp
from tests.system.conftest import (
    UNITS,
    Empath,
    Installed,
    config_text,
    first_greeting,
    install_and_look,
    other_container,
)
from tests.system.sink import sink

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
PACKAGED_CONFIG = (REPO / "packaging/empath.yaml").read_text()
# What apt must bring in from Debian's archive (none of it is in the rootfs).
DEPENDENCIES = ("python3-aiosmtplib", "python3-aiohttp", "python3-bcrypt",
                "python3-dnspython", "python3-yaml", "python3-prometheus-client",
                "python3-systemd", "python3-sdnotify", "python3-dkim", "python3-cryptography")


def apt_list(output: str, heading: str) -> set[str]:
    """The package names apt lists under ``heading`` ("NEW packages will be installed")."""
    names: set[str] = set()
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if heading in line:
            for more in lines[i + 1:]:
                if not more.startswith("  "):
                    break
                names.update(n.rstrip("*") for n in more.split())
    return names


def with_route(config: str, domain: str, hop: str) -> str:
    """The packaged config with one delivery route added, as an admin edits it."""
    assert "\n  mode: mx\n" in config
    return config.replace("\n  mode: mx\n",
                          f'\n  mode: mx\n  routes:\n    {domain}: "{hop}"\n', 1)


def journal_events(c: nspawn.Container, qid: str) -> set[str]:
    r = c.run(["journalctl", "-u", "empath.service", "-o", "json", "--no-pager",
               f"QUEUE_ID={qid}"], check=False)
    return {json.loads(line).get("EMPATH_EVENT", "") for line in r.stdout.splitlines()
            if line.strip()}


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def dpkg_status(c: nspawn.Container, package: str) -> str:
    r = c.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Version}", package],
              check=False)
    return r.stdout.strip() if r.returncode == 0 else "not-known"


def unit_journal(c: nspawn.Container, lines: int = 40) -> str:
    r = c.run(["journalctl", "-u", "empath.service", "-n", str(lines), "--no-pager"],
              check=False)
    return r.stdout


# ---- P1. apt install --------------------------------------------------------------------


def test_p1_apt_install_resolves_from_debian_and_answers_at_once(
        installed: Installed, container: nspawn.Container) -> None:
    """`apt install ./empath_*.deb` on a bare Debian 12 installs empath's dependencies
    from Debian's archive (and not aiosmtpd, which only the tests use); right after it
    returns, port 25
    answers the first connection, the socket and the service are enabled and running,
    port 587 is not, and /etc/empath/empath.yaml is the packaged one, 0640 root:empath."""
    new = apt_list(installed.install.output, "NEW packages will be installed")
    assert {"empath", *DEPENDENCIES} <= new, \
        f"apt did not install these from the archive: {set(DEPENDENCIES) - new}\n" \
        + installed.install.output[-3000:]
    assert "python3-aiosmtpd" not in new, "the daemon does not need aiosmtpd"

    assert installed.greeting.startswith("220 "), installed.greeting
    assert installed.greeting.endswith("ESMTP empath"), installed.greeting
    assert installed.units == {
        "empath.socket": ("enabled", "active"),
        "empath.service": ("enabled", "active"),
        "empath-submission.socket": ("disabled", "inactive"),
    }, installed.units

    assert installed.config == PACKAGED_CONFIG
    assert installed.config_stat == "640 root empath"
    conffiles = container.run(["dpkg-query", "-W", "-f", "${Conffiles}", "empath"]).stdout
    assert "/etc/empath/empath.yaml" in conffiles
    assert container.run(["id", "-u", "empath"], check=False).returncode == 0
    assert container.run(["getent", "group", "empath-admin"], check=False).returncode == 0
    assert container.run(["readlink", "-f", "/usr/sbin/sendmail"]).stdout.strip() \
        == "/usr/bin/empath"
    # systemd's dpkg trigger compiled the journal catalog: journalctl -x explains events.
    cat = container.run(["journalctl", "--list-catalog", "f4130fb9583a43be97560b14859dee1e"],
                        check=False).stdout
    assert "empath is ready to accept mail" in cat, cat


def test_p2_packaged_config_edited_reload_and_delivery(
        empath: Empath, installed: Installed) -> None:
    """The packaged configuration plus one route, applied with `systemctl reload empath`:
    a message from this host to the routed domain reaches the sink, and
    `journalctl -u empath` shows its delivery."""
    c = empath.c
    with sink("127.0.0.71") as s:
        empath.write_config(with_route(installed.config, "sink.test", f"smtp:{s.address}"))
        check = c.run(["empath", "check-config"], check=False)
        assert check.returncode == 0, check.stderr
        r = c.systemctl("reload", "empath.service", check=False)
        assert r.returncode == 0, f"reload failed: {r.stderr}\n{empath.journal(lines=20)}"
        out = smtp.run(smtp.session("someone@sink.test", "packaged config"))
        assert out.accepted, out
        got = s.wait(lambda ts: len(ts) >= 1, 30, "the message", empath.journal)
        assert got[0].rcpts[0].startswith("TO:<someone@sink.test>")
        assert got[0].data is not None and b"Subject: packaged config" in got[0].data
    assert out.queue_id
    wait_for(lambda: "delivered" in journal_events(c, out.queue_id or ""), 15,
             "the delivered event in journalctl -u empath")
    text = c.run(["journalctl", "-u", "empath", "--no-pager"]).stdout
    assert out.queue_id in text


# ---- P2. sendmail ----------------------------------------------------------------------


def test_p3_sendmail_t_as_an_unprivileged_user(empath: Empath) -> None:
    """`sendmail -t` run by an ordinary user (nobody, as cron would) submits the message
    through /usr/sbin/sendmail to the daemon, which delivers it to the sink."""
    c = empath.c
    with sink("127.0.0.72") as s:
        empath.reset(config=config_text(routes={"sink.test": f"smtp:{s.address}"}))
        msg = "To: someone@sink.test\nSubject: from cron\n\nnightly report\n"
        r = c.run(["runuser", "-u", "nobody", "--", "/usr/sbin/sendmail", "-t"],
                  input=msg, check=False)
        assert r.returncode == 0, f"sendmail -t exited {r.returncode}: {r.stderr}"
        got = s.wait(lambda ts: len(ts) >= 1, 30, "the sendmail message", empath.journal)
        assert got[0].rcpts[0].startswith("TO:<someone@sink.test>"), got[0].rcpts
        assert got[0].data is not None
        assert b"Subject: from cron" in got[0].data
        assert b"nightly report" in got[0].data


# ---- P4. replacing exim4 ------------------------------------------------------------------


def test_p4_installing_over_exim4_replaces_it(host: Path, packages: build.Built) -> None:
    """On a Debian 12 running exim4 (exim4-daemon-light, answering port 25), installing
    the .deb removes exim4 (Conflicts/Replaces/Provides: mail-transport-agent) and
    empath answers port 25 instead; /usr/sbin/sendmail is empath's."""
    with other_container(host, "empath-exim") as c:
        exim = nspawn.apt(c, "install", "exim4-daemon-light").check()
        assert dpkg_status(c, "exim4-daemon-light").startswith("ii"), exim.output[-2000:]
        before = wait_for(lambda: (g := first_greeting()).startswith("220") and g, 30,
                          "exim4's greeting")
        assert "Exim" in before, before

        after = install_and_look(c, packages.deb)
        removed = apt_list(after.install.output, "packages will be REMOVED")
        assert "exim4-daemon-light" in removed, after.install.output[-3000:]
        assert not dpkg_status(c, "exim4-daemon-light").startswith("ii")
        still = c.sh("grep -lx exim4 /proc/[0-9]*/comm", check=False).stdout.strip()
        assert not still, f"an exim4 process is still running: {still}"
        assert after.greeting.startswith("220 ") and after.greeting.endswith("ESMTP empath"), \
            after.greeting
        assert after.units["empath.service"] == ("enabled", "active"), after.units
        assert c.run(["readlink", "-f", "/usr/sbin/sendmail"]).stdout.strip() \
            == "/usr/bin/empath"


# ---- P5/P6. upgrade, remove, purge -----------------------------------------------------------


@pytest.fixture(scope="module")
def lifecycle(host: Path) -> Iterator[nspawn.Container]:
    """An empty container for the upgrade → remove → purge scenarios (in that order,
    each one installs what it needs if an earlier one did not run)."""
    with other_container(host, "empath-lifecycle") as c:
        yield c


def ensure_installed(c: nspawn.Container, deb: Path) -> None:
    if not dpkg_status(c, "empath").startswith("ii"):
        install_and_look(c, deb)


def test_p5_upgrade_keeps_edited_config_and_queued_mail(
        lifecycle: nspawn.Container, packages: build.Built) -> None:
    """Upgrade to a newer build (0.1.0 → 0.1.0+1) with an edited empath.yaml and a
    message held in the queue: dpkg keeps the edit, only the service is restarted
    (new MainPID, empath.socket untouched), and the held message is delivered after
    the upgrade once released."""
    c = lifecycle
    newer = build.built("+1")
    if dpkg_status(c, "empath").startswith("ii"):
        nspawn.apt(c, "purge", "empath").check()
    first = install_and_look(c, packages.deb)
    assert dpkg_status(c, "empath") == f"ii {packages.version}"

    with sink("127.0.0.73") as s:
        port = s.port
    # The sink is down now: the message is deferred, then held.
    edited = with_route(first.config, "sink.test", f"smtp:127.0.0.73:{port}").replace(
        "#hostname: mx.example.com", "hostname: upgraded.system.test")
    c.path("/etc/empath/empath.yaml").write_text(edited)
    assert c.systemctl("reload", "empath.service", check=False).returncode == 0, \
        unit_journal(c)
    out = smtp.run(smtp.session("someone@sink.test", "held across the upgrade"))
    assert out.accepted, out
    qid = out.queue_id
    assert qid
    wait_for(lambda: "deferred" in journal_events(c, qid), 30, "the first attempt to fail")
    c.run(["empathctl", "queue", "hold", qid])

    pid = int(c.show("empath.service", "MainPID"))
    socket_since = c.show("empath.socket", "ActiveEnterTimestampMonotonic")
    up = nspawn.install_package(c, newer.deb)
    assert dpkg_status(c, "empath") == f"ii {newer.version}", up.output[-2000:]
    assert c.run(["empath", "version"]).stdout.strip() == f"empath {newer.version}"

    assert c.path("/etc/empath/empath.yaml").read_text() == edited
    leftovers = sorted(p.name for p in c.path("/etc/empath").iterdir()
                       if p.name.startswith("empath.yaml."))
    assert not leftovers, leftovers
    assert c.show("empath.service", "ActiveState") == "active"
    new_pid = int(c.show("empath.service", "MainPID"))
    assert new_pid not in (0, pid), "the service was not restarted by the upgrade"
    assert c.show("empath.socket", "ActiveEnterTimestampMonotonic") == socket_since, \
        "empath.socket was restarted by the upgrade"
    assert first_greeting() == "220 upgraded.system.test ESMTP empath"
    assert c.path(f"/var/lib/empath/spool/queue/{qid}.msg").exists(), \
        "the held message is gone from the spool after the upgrade"

    with sink("127.0.0.73", port) as s:
        c.run(["empathctl", "queue", "release", qid])
        c.run(["empathctl", "queue", "retry", qid], check=False)
        got = s.wait(lambda ts: len(ts) >= 1, 30, "the held message after the upgrade",
                     lambda: unit_journal(c))
        assert got[0].data is not None and b"Subject: held across the upgrade" in got[0].data
    wait_for(lambda: "delivered" in journal_events(c, qid), 15, "the delivered event")


def test_p6_remove_keeps_config_and_spool_purge_removes_them(
        lifecycle: nspawn.Container, packages: build.Built) -> None:
    """`apt remove empath` stops the units and keeps /etc/empath/empath.yaml (edited)
    and the spool with its queued message; `apt purge empath` then removes both, and
    the user empath and group empath-admin stay, as documented (debian/postrm)."""
    c = lifecycle
    ensure_installed(c, packages.deb)
    config = c.path("/etc/empath/empath.yaml").read_text()
    held = config.replace("\n  mode: mx\n", "\n  mode: hold\n", 1) + "# edited before remove\n"
    assert held != config
    c.path("/etc/empath/empath.yaml").write_text(held)
    assert c.systemctl("reload", "empath.service", check=False).returncode == 0, \
        unit_journal(c)
    out = smtp.run(smtp.session("someone@elsewhere.test", "queued at remove"))
    assert out.accepted, out
    spooled = f"/var/lib/empath/spool/queue/{out.queue_id}.msg"
    assert c.path(spooled).exists()

    nspawn.apt(c, "remove", "empath").check()
    assert dpkg_status(c, "empath").startswith("rc"), dpkg_status(c, "empath")
    assert c.path("/etc/empath/empath.yaml").read_text() == held
    assert c.path(spooled).exists(), "remove deleted queued mail"
    for unit in UNITS:
        assert c.systemctl("is-active", unit, check=False).stdout.strip() != "active", unit
    assert first_greeting(timeout=5).startswith("connection failed"), \
        "port 25 still answers after remove"
    assert not c.path("/usr/sbin/sendmail").exists()

    nspawn.apt(c, "purge", "empath").check()
    assert dpkg_status(c, "empath") in ("not-known", "un"), dpkg_status(c, "empath")
    assert not c.path("/etc/empath").exists(), "purge left /etc/empath"
    assert not c.path("/var/lib/empath").exists(), "purge left /var/lib/empath"
    wants = c.sh("ls /etc/systemd/system/*.wants/ 2>/dev/null", check=False).stdout
    assert not re.search(r"\bempath", wants), wants
    # Kept on purge (documented in debian/postrm and DEPLOYMENT.md).
    assert c.run(["id", "empath"], check=False).returncode == 0
    assert c.run(["getent", "group", "empath-admin"], check=False).returncode == 0


# ---- P7. metrics on Debian's own libraries -----------------------------------------------


def test_p7_metrics_endpoint_with_debians_aiohttp_prometheus_client_and_bcrypt(
        empath: Empath) -> None:
    """The metrics endpoint of the installed package runs on bookworm's python3-aiohttp,
    python3-prometheus-client and python3-bcrypt: 401 without the bearer token, 200
    with it, /healthz open, a message counted; then an exporter-toolkit web_config with
    a bcrypt ($2y$) user, applied by `systemctl restart`, answers basic auth."""
    import base64
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    c = empath.c
    port = free_port()  # the container shares the host's network
    token = "system-test-token"
    c.path("/etc/empath/metrics.token").write_text(token + "\n")
    c.sh("chown root:empath /etc/empath/metrics.token && chmod 0640 /etc/empath/metrics.token")
    extra = (f'metrics: {{listen: "127.0.0.1:{port}", '
             'bearer_token_file: /etc/empath/metrics.token}\n')
    empath.reset(config=config_text(extra=extra))

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    bearer = {"Authorization": f"Bearer {token}"}
    wait_for(lambda: get("/healthz")[0] == 200, 30, "/healthz")
    assert get("/metrics")[0] == 401
    assert get("/readyz")[0] == 401
    out = smtp.run(smtp.session("someone@system.test", "counted"))
    assert out.accepted, out

    def received() -> float:
        status, body = get("/metrics", bearer)
        assert status == 200, body
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if s.name == "empath_messages_received_total" and \
                        s.labels.get("listener") == "smtp":
                    return s.value
        return 0.0

    assert wait_for(lambda: received() == 1.0, 30, "the message in /metrics")
    status, body = get("/readyz", bearer)
    assert (status, json.loads(body)["ready"]) == (200, True), body

    # basic auth with a bcrypt hash, checked by bookworm's python3-bcrypt
    hashed = c.run(["python3", "-c", "import bcrypt; print(bcrypt.hashpw(b'pw', "
                    "bcrypt.gensalt(4)).decode().replace('$2b$', '$2y$'))"]).stdout.strip()
    c.path("/etc/empath/web.yml").write_text(f"basic_auth_users:\n  prom: '{hashed}'\n")
    c.sh("chown root:empath /etc/empath/web.yml && chmod 0640 /etc/empath/web.yml")
    empath.write_config(config_text(extra=f'metrics: {{listen: "127.0.0.1:{port}", '
                                          'web_config: /etc/empath/web.yml}\n'))
    c.systemctl("restart", "empath.service", timeout=120)
    wait_for(lambda: get("/healthz")[0] == 200, 30, "/healthz after the restart")
    basic = {"Authorization": "Basic " + base64.b64encode(b"prom:pw").decode()}
    assert get("/metrics")[0] == 401
    assert get("/metrics", {"Authorization": "Basic " + base64.b64encode(
        b"prom:wrong").decode()})[0] == 401
    assert get("/metrics", basic)[0] == 200
