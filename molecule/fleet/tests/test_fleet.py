"""After ansible/fleet.yml: both nodes upgraded, one at a time, each drained first."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import checks
import testinfra

NODES = ("empath-fleet-1", "empath-fleet-2")  # the inventory order = the rollout order


def version_of(deb: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True,
                          text=True, check=True).stdout.strip()


def node(name: str):
    return testinfra.get_host(f"ansible://{name}",
                              ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


def before(host) -> dict:
    return json.loads(host.file("/var/tmp/fleet/before.json").content_string)


def status(host) -> dict:
    return json.loads(host.check_output("empathctl --json status"))


def queued(host) -> dict:
    got = checks.delivered(host, f"queued-{host.backend.host}@fleet.test", timeout=5)
    assert got is not None, "the message queued before the rollout never reached the sink"
    return got


def test_first_installed_from_the_repository(host):
    assert host.file("/etc/apt/sources.list.d/empath.sources").contains("file:/srv/empath-repo")
    assert before(host)["version"] == version_of(os.environ["EMPATH_DEB"])


def test_upgraded_to_the_new_package_and_restarted(host):
    new = version_of(os.environ["EMPATH_DEB_NEXT"])
    assert new != before(host)["version"]
    assert host.package("empath").version == new
    st = status(host)
    assert st["version"] == new
    assert st["pid"] != before(host)["pid"]


def test_drained_before_its_package_changed(host):
    # Delivered by the drain's flush (its retry was an hour away), before the daemon
    # that runs now was started by the upgrade.
    assert queued(host)["mtime"] < status(host)["started_at"]
    assert json.loads(host.check_output("empathctl --json queue stats"))["messages"] == 0


def test_port_25_open_again_after_the_drain(host):
    assert "empath_drain" not in host.check_output("nft list tables")
    assert checks.banner(host).startswith(f"220 {host.backend.host}.fleet.test")


def test_mail_flows_on_every_node(host):
    msgid = f"{uuid.uuid4().hex}@fleet.test"
    assert checks.send(host, "after@sink.test", msgid)["refused"] == {}
    assert checks.delivered(host, msgid) is not None


def test_one_node_at_a_time():
    # serial: 1: the second node was drained only after the first one was upgraded and
    # running again (both containers share the host's clock).
    first, second = (node(n) for n in NODES)
    assert status(first)["started_at"] < queued(second)["mtime"]
