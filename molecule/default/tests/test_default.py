"""The role converged on a booted Debian 12: what a mail admin would check."""

from __future__ import annotations

import os
import subprocess
import uuid

import checks
import pytest

TOKEN = "molecule-metrics-token-3f9c2a"  # empath_metrics_token in molecule.yml


def deb_version() -> str:
    deb = os.environ["EMPATH_DEB"]
    return subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_package_from_this_checkout_is_installed(host):
    pkg = host.package("empath")
    assert pkg.is_installed
    assert pkg.version == deb_version()
    assert host.check_output("empath version").strip().endswith(deb_version())


def test_user_and_groups(host):
    user = host.user("empath")
    assert user.exists
    assert user.group == "empath"
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
    assert host.group("empath-admin").exists


@pytest.mark.parametrize("path, mode, owner, group", [
    ("/etc/empath/empath.yaml", 0o640, "root", "empath"),
    ("/etc/empath/tls", 0o750, "root", "empath"),
    ("/etc/empath/tls/key.pem", 0o640, "root", "empath"),
    ("/etc/empath/tls/cert.pem", 0o644, "root", "root"),
    ("/etc/empath/metrics.token", 0o640, "root", "empath"),
])
def test_config_and_secrets_have_safe_modes(host, path, mode, owner, group):
    f = host.file(path)
    assert f.exists
    assert (f.mode, f.user, f.group) == (mode, owner, group)


def test_config_is_the_roles_and_valid(host):
    text = host.file("/etc/empath/empath.yaml").content_string
    assert "Ansible" in text  # ansible_managed
    assert 'hostname: "mx.molecule.test"' in text
    # check-config as the admin runs it, against the file in place
    out = host.check_output("empath check-config --config /etc/empath/empath.yaml")
    assert "sink.test" in out


def test_socket_listens_on_25_and_service_is_enabled(host):
    assert host.service("empath.socket").is_enabled
    assert host.service("empath.socket").is_running
    assert host.service("empath.service").is_enabled
    listening = host.check_output("ss -Hltn 'sport = :25'")
    assert ":25" in listening, listening
    assert host.service("empath-submission.socket").is_enabled is False


def test_service_is_started_by_the_first_connection(host):
    # Stopped, with the socket still held by systemd: a client's connection starts it.
    host.check_output("systemctl stop empath.service")
    assert host.service("empath.socket").is_running
    assert not host.service("empath.service").is_running
    assert checks.banner(host).startswith("220 mx.molecule.test")
    assert host.service("empath.service").is_running


def test_mail_to_a_routed_domain_reaches_the_sink(host):
    msgid = f"{uuid.uuid4().hex}@molecule.test"
    sent = checks.send(host, "alice@sink.test", msgid)
    assert sent["banner"].startswith("mx.molecule.test")
    assert sent["refused"] == {}
    got = checks.delivered(host, msgid)
    assert got is not None, host.check_output(
        "empathctl queue list; journalctl -u empath -n 40 --no-pager")
    assert "Received: from client.molecule.test" in got["text"]


def test_starttls_with_the_deployed_certificate(host):
    msgid = f"{uuid.uuid4().hex}@molecule.test"
    sent = checks.send(host, "bob@sink.test", msgid, tls_name="mx.molecule.test",
                       tls_ca="/etc/empath/tls/cert.pem")
    assert "STARTTLS" in sent["ehlo"]
    assert sent["starttls"] == 220
    assert sent["cipher"] in ("TLSv1.2", "TLSv1.3")
    assert checks.delivered(host, msgid) is not None


def test_metrics_need_the_token_and_healthz_does_not(host):
    assert checks.http_get(host, "http://127.0.0.1:9125/metrics")["status"] == 401
    assert checks.http_get(host, "http://127.0.0.1:9125/metrics", "wrong")["status"] == 401
    ok = checks.http_get(host, "http://127.0.0.1:9125/metrics", TOKEN)
    assert ok["status"] == 200
    assert "empath_smtp_connections_total" in ok["body"]
    assert checks.http_get(host, "http://127.0.0.1:9125/healthz")["status"] == 200


def test_empathctl_status_as_root(host):
    out = host.check_output("empathctl status")
    assert "mx.molecule.test" in out
    assert deb_version() in out
    assert "socket_activated             True" in out
