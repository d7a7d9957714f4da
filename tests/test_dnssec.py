"""DNSSEC-aware delivery against real DNSSEC: zones signed with ldns-signzone, served
by nsd and validated by unbound on loopback (tests/dnssec.py).

- The resolver (empath.delivery.dns) reads the AD bit of MX, A and AAAA answers, for
  positive and negative answers, keeps it in its cache, and trusts it only when every
  nameserver is on loopback.
- Routing (empath.delivery.route) says whether a route rested on authenticated
  answers, and ``dnssec: require`` defers (4.7.5) a destination whose answers were not.
- The real daemon records ``dnssec`` per attempt in the recipient's history, shows it
  in ``empathctl queue show``, counts it in ``empath_dns_authenticated_total``, and
  delivers a deferred recipient once the policy lets it.

Zones: ``signed.test`` validates (AD), ``unsigned.test`` is not signed (no AD), and
``bogus.test`` is signed with a key that its trust anchor does not match, so unbound
answers SERVFAIL — the proof that the AD bits seen here come from real validation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from empath.config import load_config_text
from empath.delivery.dns import DNS, is_loopback_nameserver
from empath.delivery.route import OwnIdentity, Route, resolve_route
from empath.spool.envelope import Attempt, Envelope, Recipient
from empath.spool.ids import new_message_id
from tests.dnssec import DnssecLab, Zone, dnssec_fixture, require_tools
from tests.harness import (
    REPO,
    Daemon,
    free_port,
    queued_id,
    send_message,
    spool_record,
    wait_until,
)
from tests.sinks import SinkLoop, SMTPSink

T = TypeVar("T")
MakeDaemon = Callable[..., Daemon]

MX_PORT = free_port()
IP = {
    "mx.signed.test": "127.0.11.1",
    "mx.unsigned.test": "127.0.11.2",
    "mx.bogus.test": "127.0.11.3",
    "routed": "127.0.11.4",  # delivery.routes: smtp:, not MX routing
}
ZONES = [
    Zone("signed.test", [
        "@ MX 10 mx",
        f"mx A {IP['mx.signed.test']}",
        "implicit A 127.0.11.1",  # no MX: the domain's own address (RFC 5321 §5.1)
        "mixed MX 10 mx.unsigned.test.",  # a signed MX pointing into an unsigned zone
    ]),
    Zone("unsigned.test", [
        "@ MX 10 mx",
        f"mx A {IP['mx.unsigned.test']}",
        "strict MX 10 mx",
    ], kind="insecure"),
    Zone("bogus.test", ["@ MX 10 mx", f"mx A {IP['mx.bogus.test']}"], kind="bogus"),
]

lab = dnssec_fixture(ZONES)

NOBODY = OwnIdentity("mx.empath.test", frozenset())
# TEST-NET-1 (RFC 5737): never a resolver on any network; queries to it go nowhere.
REMOTE = "192.0.2.1"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_dns(lab: DnssecLab) -> DNS:
    return DNS((lab.nameserver,))


def config(**delivery: Any) -> Any:
    return load_config_text(yaml.safe_dump({
        "hostname": "mx.empath.test", "postmaster": "postmaster@empath.test",
        "state_dir": "/var/lib/empath-test-unused", "local_domains": ["empath.test"],
        "delivery": {"mode": "mx", **delivery,
                     "routes": {"empath.test": "maildir:/var/mail/empath-test-unused",
                                **delivery.get("routes", {})}},
    }))


def route(dns: DNS, domain: str, **delivery: Any) -> Route:
    return run(resolve_route(domain, config(**delivery), dns, overrides={}, own=NOBODY))


def require(*domains: str) -> dict[str, Any]:
    return {"destinations": {d: {"dnssec": "require"} for d in domains}}


# ---- the resolver reads the AD bit -------------------------------------------------


def test_signed_zone_mx_and_addresses_are_authenticated(lab: DnssecLab) -> None:
    dns = make_dns(lab)
    assert dns.trusts_ad
    mx = run(dns.mx("signed.test"))
    assert (mx.kind, mx.hosts, mx.authenticated) == ("mx", [(10, "mx.signed.test")], True)
    addrs = run(dns.addresses("mx.signed.test"))
    assert (addrs.kind, addrs.ips, addrs.authenticated) == ("ok", ["127.0.11.1"], True)


def test_unsigned_zone_answers_are_not_authenticated(lab: DnssecLab) -> None:
    dns = make_dns(lab)
    mx = run(dns.mx("unsigned.test"))
    assert (mx.kind, mx.hosts, mx.authenticated) == ("mx", [(10, "mx.unsigned.test")], False)
    addrs = run(dns.addresses("mx.unsigned.test"))
    assert (addrs.kind, addrs.authenticated) == ("ok", False)


def test_bogus_zone_fails_validation_and_is_a_temporary_failure(lab: DnssecLab) -> None:
    """The resolver refuses an answer whose signatures do not chain to the anchor:
    mail to it waits instead of going where a forger says."""
    mx = run(make_dns(lab).mx("bogus.test"))
    assert mx.kind == "tempfail" and not mx.authenticated
    assert "SERVFAIL" in (mx.error or "")


def test_negative_answers_carry_their_authentication(lab: DnssecLab) -> None:
    dns = make_dns(lab)
    nx = run(dns.mx("nosuch.signed.test"))
    assert (nx.kind, nx.authenticated) == ("nxdomain", True)  # NSEC proves it
    implicit = run(dns.mx("implicit.signed.test"))
    assert (implicit.kind, implicit.authenticated) == ("implicit", True)
    assert run(dns.addresses("implicit.signed.test")).authenticated
    nx_unsigned = run(dns.mx("nosuch.unsigned.test"))
    assert (nx_unsigned.kind, nx_unsigned.authenticated) == ("nxdomain", False)


def test_cached_answers_keep_their_authentication(tmp_path: Path) -> None:
    """After the resolver is gone, the answers come from empath's cache, AD and all."""
    require_tools()
    with DnssecLab(ZONES[:2], workdir=tmp_path) as own_lab:
        dns = make_dns(own_lab)
        assert run(dns.mx("signed.test")).authenticated
        assert not run(dns.mx("unsigned.test")).authenticated
    # The lab's daemons are stopped: nothing answers on its port any more.
    assert run(dns.mx("signed.test")).authenticated
    assert not run(dns.mx("unsigned.test")).authenticated
    entries = {(e["name"], e["type"]): e for e in dns.cache_entries()}
    assert entries["signed.test", "MX"]["authenticated"] is True
    assert entries["unsigned.test", "MX"]["authenticated"] is False


# ---- trust: the AD bit only from a resolver on loopback -------------------------------


@pytest.mark.parametrize(("ip", "trusted"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("127.255.1.2", True), ("::1", True),
    ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("192.168.1.1", False), (REMOTE, False), ("0.0.0.0", False),
    ("::", False), ("fe80::1%eth0", False), ("2001:db8::53", False),
    ("::ffff:192.0.2.1", False), ("not-an-ip", False),
])
def test_which_nameservers_are_trusted(ip: str, trusted: bool) -> None:
    assert is_loopback_nameserver(ip) is trusted


def test_one_remote_nameserver_means_no_trust_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="empath.delivery.dns"):
        assert DNS(("127.0.0.1:5353", "[::1]:53")).trusts_ad
        assert not caplog.records
        dns = DNS(("127.0.0.1", f"{REMOTE}:53"))
    assert not dns.trusts_ad
    (record,) = caplog.records
    assert REMOTE in record.getMessage() and "not on loopback" in record.getMessage()
    assert "127.0.0.1" not in record.getMessage()


def test_ad_bit_from_an_untrusted_setup_is_ignored(lab: DnssecLab) -> None:
    """The validating resolver sets AD, but it is listed after a remote one (which
    never answers): the answer then cannot be told apart from one off the network."""
    dns = DNS((REMOTE, lab.nameserver), timeout=6.0)
    mx = run(dns.mx("signed.test"))
    assert (mx.kind, mx.authenticated) == ("mx", False)


# ---- routing and the dnssec: require policy ---------------------------------------------


def test_route_records_whether_its_answers_were_authenticated(lab: DnssecLab) -> None:
    dns = make_dns(lab)
    signed = route(dns, "signed.test")
    assert signed.failure is None and signed.dnssec is True
    assert [t.address for t in signed.targets] == ["127.0.11.1"]
    unsigned = route(dns, "unsigned.test")
    assert unsigned.failure is None and unsigned.dnssec is False
    assert unsigned.unauthenticated == ("the MX answer for unsigned.test",
                                        "the addresses of mx.unsigned.test")
    # The MX answer is signed, the host it names is not: not authenticated as a whole.
    mixed = route(dns, "mixed.signed.test")
    assert mixed.dnssec is False
    assert mixed.unauthenticated == ("the addresses of mx.unsigned.test",)
    assert route(dns, "implicit.signed.test").dnssec is True
    # Not MX routing: nothing to say.
    assert route(dns, "signed.test", routes={"signed.test": "smtp:mx.signed.test"}).dnssec is None


def test_require_delivers_on_authenticated_answers(lab: DnssecLab) -> None:
    r = route(make_dns(lab), "signed.test", **require("signed.test"))
    assert r.failure is None and [t.address for t in r.targets] == ["127.0.11.1"]


def test_require_defers_unauthenticated_answers_with_4_7_5(lab: DnssecLab) -> None:
    dns = make_dns(lab)
    r = route(dns, "unsigned.test", **require("unsigned.test"))
    assert r.targets == [] and r.failure is not None
    assert (r.failure.permanent, r.failure.enhanced) == (False, "4.7.5")
    assert r.failure.text.startswith(
        "DNSSEC required for unsigned.test, but the MX answer for unsigned.test and the "
        "addresses of mx.unsigned.test were not authenticated (the resolver did not "
        "validate them")
    mixed = route(dns, "mixed.signed.test", **require("mixed.signed.test"))
    assert mixed.failure is not None and mixed.failure.enhanced == "4.7.5"
    assert "the addresses of mx.unsigned.test was not authenticated" in mixed.failure.text
    # The policy is per destination: the same answers without it deliver.
    assert route(dns, "unsigned.test", **require("signed.test")).failure is None


def test_require_defers_an_unauthenticated_nxdomain_instead_of_bouncing(
    lab: DnssecLab,
) -> None:
    """A forged NXDOMAIN would bounce mail; under require only a proven one does."""
    dns = make_dns(lab)
    forged = route(dns, "nosuch.unsigned.test", **require("nosuch.unsigned.test"))
    assert forged.failure is not None
    assert (forged.failure.permanent, forged.failure.enhanced) == (False, "4.7.5")
    assert ("the NXDOMAIN answer for nosuch.unsigned.test was not authenticated"
            in forged.failure.text)
    proven = route(dns, "nosuch.signed.test", **require("nosuch.signed.test"))
    assert proven.failure is not None
    assert (proven.failure.permanent, proven.failure.enhanced) == (True, "5.1.2")


def test_require_with_an_untrusted_resolver_says_why(lab: DnssecLab) -> None:
    dns = DNS((REMOTE, lab.nameserver), timeout=6.0)
    r = route(dns, "signed.test", **require("signed.test"))
    assert r.failure is not None and r.failure.enhanced == "4.7.5"
    assert "the resolver is not on loopback, so its AD bit is not trusted" in r.failure.text


def test_require_does_not_apply_to_explicit_routes(lab: DnssecLab) -> None:
    """``smtp:HOST`` is the operator's own choice of server: no MX answer to doubt."""
    r = route(make_dns(lab), "unsigned.test", routes={"unsigned.test": "smtp:mx.unsigned.test"},
              **require("unsigned.test"))
    assert r.failure is None and r.dnssec is None


# ---- the envelope record ----------------------------------------------------------------


def test_attempt_dnssec_round_trips_and_old_entries_still_load() -> None:
    def env(history: list[Attempt]) -> Envelope:
        return Envelope(id=new_message_id(), sender="a@b.example",
                        recipients=[Recipient("c@d.example", state="deferred", attempts=3,
                                              next_attempt=1.0, history=history)],
                        received_at=1.0, client_addr="127.0.0.1", client_port=1, helo="x")

    history = [Attempt.make(1.0, "deferred", "4.7.5", "X-Empath; DNSSEC required", dnssec=False),
               Attempt.make(2.0, "delivered", "2.0.0", "smtp; 250 ok", "mx", dnssec=True),
               Attempt.make(3.0, "delivered", "2.0.0", "smtp; 250 ok", "mx")]
    data = env(history).to_bytes()
    entries = json.loads(data)["recipients"][0]["history"]
    assert [e.get("dnssec", "absent") for e in entries] == [False, True, "absent"]
    assert Envelope.from_bytes(data).recipients[0].history == history
    # A record written before the field existed: entries without it load, as None.
    obj = json.loads(data)
    for e in obj["recipients"][0]["history"]:
        e.pop("dnssec", None)
    old = Envelope.from_bytes(json.dumps(obj).encode())
    assert [a.dnssec for a in old.recipients[0].history] == [None, None, None]
    # Anything but true, false or null is damage.
    obj["recipients"][0]["history"][0]["dnssec"] = "yes"
    with pytest.raises(ValueError, match=r"history\[0\]\.dnssec"):
        Envelope.from_bytes(json.dumps(obj).encode())


# ---- the real daemon ------------------------------------------------------------------


def mx_sink(sinks: SinkLoop, name: str) -> SMTPSink:
    """An SMTP sink at ``name``'s address, on the port every MX is reached at."""
    return sinks.start(SMTPSink(host=IP[name], port=MX_PORT))


def ctl(d: Daemon, *args: str) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("EMPATH_CONTROL_SOCKET", "EMPATH_CONFIG", "EMPATH_CONTROL_TOKEN")}
    environ["PYTHONPATH"] = str(REPO)
    p = subprocess.run(
        [sys.executable, "-m", "empath.ctl", "--socket", str(d.state_dir / "control.sock"),
         *args], capture_output=True, text=True, env=environ, timeout=60, check=False,
        stdin=subprocess.DEVNULL)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def recipients(d: Daemon, qid: str) -> dict[str, dict[str, Any]] | None:
    try:
        env = spool_record(d.queue_dir, qid)
    except (FileNotFoundError, ValueError):
        return None
    return {r["address"]: r for r in env["recipients"]}


def column(table_text: str, header: str, after: str) -> dict[str, str]:
    """address → the cell under ``header`` in empathctl's attempts table."""
    lines = table_text.splitlines()
    head = next(line for line in lines if header in line and "ADDRESS" in line)
    start, end = head.index(header), head.index(after)
    out: dict[str, str] = {}
    for line in lines[lines.index(head) + 1:]:
        if not line.startswith("  "):
            break  # the next section
        out[line.split()[0]] = line[start:end].strip()
    return out


def metric(body: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$", body, re.M)
    assert m, f"{name}{{{want}}} not exported"
    return float(m.group(1))


def test_daemon_records_dnssec_per_attempt_and_require_defers(
    make_daemon: MakeDaemon, lab: DnssecLab, sinks: SinkLoop, tmp_path: Path,
) -> None:
    signed, unsigned = mx_sink(sinks, "mx.signed.test"), mx_sink(sinks, "mx.unsigned.test")
    bogus, routed = mx_sink(sinks, "mx.bogus.test"), mx_sink(sinks, "routed")
    metrics_port = free_port()
    delivery = {
        "mode": "mx",
        "nameservers": [lab.nameserver],
        "mx_port": MX_PORT,
        "retry_schedule": [3600],  # one attempt each: no retry while the test looks
        "routes": {"routed.test": f"smtp:{IP['routed']}:{MX_PORT}",
                   "empath.test": f"maildir:{tmp_path / 'mail'}"},
        "destinations": {"signed.test": {"dnssec": "require"},
                         "strict.unsigned.test": {"dnssec": "require"}},
    }
    d = make_daemon(start=False, hostname="mx.empath.test", local_domains=["empath.test"],
                    delivery=delivery, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    d.start()
    rcpts = ["bob@signed.test", "carol@unsigned.test", "dave@strict.unsigned.test",
             "erin@bogus.test", "frank@routed.test"]
    code, text = run(send_message(d.smtp_port, "alice@empath.test", rcpts,
                                  b"Subject: dnssec\r\n\r\nHello.\r\n", "dnssec"))
    assert code == 250, text
    qid = queued_id(text)

    def settled() -> dict[str, dict[str, Any]] | None:
        rs = recipients(d, qid)
        return rs if rs and all(r["attempts"] == 1 for r in rs.values()) else None

    rs = wait_until(settled, "one attempt for every recipient", d)
    last = {a: r["history"][-1] for a, r in rs.items()}
    assert {a: r["state"] for a, r in rs.items()} == {
        "bob@signed.test": "delivered", "carol@unsigned.test": "delivered",
        "dave@strict.unsigned.test": "deferred", "erin@bogus.test": "deferred",
        "frank@routed.test": "delivered"}
    # In the record: true, false, or absent (null) when no MX answer was used.
    assert {a: h.get("dnssec") for a, h in last.items()} == {
        "bob@signed.test": True, "carol@unsigned.test": False,
        "dave@strict.unsigned.test": False, "erin@bogus.test": None,
        "frank@routed.test": None}
    assert "dnssec" not in last["frank@routed.test"]
    dave = last["dave@strict.unsigned.test"]
    assert dave["enhanced"] == "4.7.5"
    assert dave["diagnostic"].startswith(
        "X-Empath; DNSSEC required for strict.unsigned.test, but the MX answer for "
        "strict.unsigned.test and the addresses of mx.unsigned.test were not authenticated")
    assert last["erin@bogus.test"]["enhanced"] == "4.4.3"  # validation failed: SERVFAIL
    # Only the deliveries the policy allowed reached a server.
    assert [t.rcpts for t in signed.delivered] == [["TO:<bob@signed.test>"]]
    assert [t.rcpts for t in unsigned.delivered] == [["TO:<carol@unsigned.test>"]]
    assert [t.rcpts for t in routed.delivered] == [["TO:<frank@routed.test>"]]
    assert not bogus.connections

    shown = ctl(d, "queue", "show", qid)
    assert column(shown, "DNSSEC", "DIAGNOSTIC") == {
        "bob@signed.test": "yes", "carol@unsigned.test": "no",
        "dave@strict.unsigned.test": "no", "erin@bogus.test": "-", "frank@routed.test": "-"}
    as_json = json.loads(ctl(d, "--json", "queue", "show", qid))
    assert {r["address"]: r["history"][-1]["dnssec"]
            for r in as_json["envelope"]["recipients"]}["bob@signed.test"] is True

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    # MX + A of signed.test at least; unsigned.test's and strict's MX and A at least.
    assert metric(body, "empath_dns_authenticated_total", result="authenticated") >= 2
    assert metric(body, "empath_dns_authenticated_total", result="unauthenticated") >= 3
    assert metric(body, "empath_dns_authenticated_total", result="untrusted") == 0

    # A deferral, not a bounce: once the policy allows it, the mail goes.
    del d.config["delivery"]["destinations"]["strict.unsigned.test"]
    d.write_config()
    ctl(d, "reload", "--wait")
    ctl(d, "queue", "retry", qid)
    wait_until(lambda: any(t.rcpts == ["TO:<dave@strict.unsigned.test>"]
                           for t in unsigned.delivered), "dave's delivery", d)
    rs = wait_until(lambda: (r := recipients(d, qid)) and
                    r["dave@strict.unsigned.test"]["state"] == "delivered" and r, "the record", d)
    assert rs["dave@strict.unsigned.test"]["history"][-1]["dnssec"] is False
