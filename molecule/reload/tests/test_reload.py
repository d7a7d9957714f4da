"""The second converge (side_effect.yml) changed the configuration: applied by a
reload, not a restart."""

from __future__ import annotations

import json
import uuid

import checks


def before(host) -> dict:
    return json.loads(host.file("/var/tmp/reload/before.json").content_string)


def test_a_refused_configuration_never_reaches_the_host(host):
    refused = json.loads(host.file("/var/tmp/reload/refused.json").content_string)
    # The template task's validate (empath check-config) failed, naming the problem...
    assert "unrouted.test" in refused["stderr"] + refused["stdout"], refused
    assert "delivery.routes" in refused["stderr"] + refused["stdout"], refused
    # ...so the file in place (and so the daemon) never saw it.
    assert "unrouted.test" not in host.file("/etc/empath/empath.yaml").content_string


def test_same_main_pid_so_no_restart(host):
    pid = int(host.check_output("systemctl show -P MainPID empath.service"))
    assert pid == before(host)["pid"] != 0
    assert host.check_output("systemctl show -P NRestarts empath.service") == "0"


def test_the_daemon_reloaded_the_new_configuration(host):
    status = json.loads(host.check_output("empathctl --json status"))
    old = before(host)["status"]
    assert status["pid"] == old["pid"]
    assert status["generation"] > old["generation"]
    assert status["hostname"] == "mx2.reload.test"
    journal = host.check_output("journalctl -b -u empath.service --no-pager -o cat")
    assert "Reloaded empath.service" in journal or "Reloaded empath" in journal, journal[-2000:]


def test_new_sessions_see_the_new_values(host):
    msgid = f"{uuid.uuid4().hex}@reload.test"
    sent = checks.send(host, "dave@sink.test", msgid)
    assert sent["banner"].startswith("mx2.reload.test")
    assert "SIZE 10485760" in sent["ehlo"]
    assert checks.delivered(host, msgid) is not None


def test_the_session_opened_before_the_reload_could_still_send(host):
    ready = json.loads(host.file("/var/tmp/reload/ready.json").content_string)
    result = json.loads(host.file("/var/tmp/reload/result.json").content_string)
    assert ready["banner"].startswith("mx1.reload.test")
    # It keeps the configuration it started with, and its message is accepted...
    assert "SIZE 26214400" in ready["ehlo"]
    assert result["data"] == 250, result
    # ...and delivered.
    assert checks.delivered(host, "held-session@reload.test") is not None
