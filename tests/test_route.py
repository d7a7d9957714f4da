"""empath.delivery.route: next hops, MX routing and loop detection, against real DNS
(dnsmasq, see tests/dnsmasq.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from empath.config.model import Config, DeliveryConfig, Listener
from empath.delivery.dns import DNS
from empath.delivery.route import OwnIdentity, Route, own_identity, resolve_route
from empath.delivery.types import Target
from tests.dnsmasq import DnsmasqServer, dnsmasq_fixture

HOSTNAME = "mx.empath.test"
US = "127.0.0.20"  # our SMTP listener in these tests
OWN = OwnIdentity(HOSTNAME, frozenset({(US, 25)}))
OWN_WILDCARD = OwnIdentity(HOSTNAME, frozenset({(US, 25), ("0.0.0.0", 25), ("::", 25)}))


def _local_non_loopback_ip() -> str | None:
    """An address of this machine other than loopback (the one a route out would use),
    found without sending anything: connecting a UDP socket only picks a source."""
    for probe in ("192.0.2.1", "198.51.100.1", "10.255.255.254"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                ip = str(s.getsockname()[0])
        except OSError:
            continue
        if not ipaddress.ip_address(ip).is_loopback and ip != "0.0.0.0":
            return ip
    return None


LOCAL_IP = _local_non_loopback_ip()
FAR_IP = "198.51.100.7"  # TEST-NET-2: never an address of this machine

_hosts: dict[str, list[str]] = {
    "mx1.two.test": ["127.0.0.11"],
    "mx2.two.test": ["127.0.0.12"],
    "aonly.test": ["127.0.0.13"],
    "primary.backup.test": ["127.0.0.14"],
    "third.backup.test": ["127.0.0.15"],
    "us.backup.test": [US],
    "a.byname.test": ["127.0.0.16"],
    "b.byname.test": ["127.0.0.17"],
    "sink.loopback.test": ["127.0.0.21"],
    "far.notlocal.test": [FAR_IP],
    "relay.test": ["127.0.0.30"],
    "smtphost.test": ["127.0.0.31"],
    "dual.test": ["::1", "127.0.0.32"],
    "self.test": [US],
}
if LOCAL_IP is not None:
    _hosts["local.wild.test"] = [LOCAL_IP]

dns_server = dnsmasq_fixture(
    mx={
        "two.test": [(20, "mx2.two.test"), (10, "mx1.two.test")],
        "null.test": [(0, ".")],
        "backup.test": [(10, "primary.backup.test"), (20, "us.backup.test"),
                        (30, "third.backup.test")],
        "best.test": [(10, "us.backup.test"), (20, "third.backup.test")],
        "peer.test": [(10, "primary.backup.test"), (10, "us.backup.test")],
        "byname.test": [(5, "a.byname.test"), (10, HOSTNAME), (20, "b.byname.test")],
        "loopback.test": [(10, "sink.loopback.test")],
        "wild.test": [(10, "primary.backup.test"), (20, "local.wild.test")],
        "notlocal.test": [(10, "far.notlocal.test")],
        "noaddr.test": [(10, "missing.noaddr.test")],
        "halfsf.test": [(10, "x.broken.test"), (20, "missing.noaddr.test")],
        "mixed.test": [(10, "x.broken.test"), (20, "mx2.two.test")],
        "dupes.test": [(10, "mx1.two.test"), (20, "mx1.two.test"), (30, "dual.test")],
        "prio.test": [(10, "mx1.two.test")],
        "smtphost.test": [(10, "mx2.two.test")],
        "relay.test": [(10, "mx2.two.test")],
        "partner.test": [(10, "mx2.two.test")],
    },
    hosts=_hosts,
    txt={"nodata.test": "exists", HOSTNAME: "exists"},
    servfail=["broken.test"],
)


def make_config(**delivery: Any) -> Config:
    return Config(
        hostname=HOSTNAME,
        postmaster=f"postmaster@{HOSTNAME}",
        state_dir=Path("/var/lib/empath-test"),
        delivery=DeliveryConfig(**{"mode": "mx", **delivery}),
    )


def resolve(
    server: DnsmasqServer,
    domain: str,
    *,
    own: OwnIdentity = OWN,
    overrides: dict[str, str] | None = None,
    config: Config | None = None,
    **delivery: Any,
) -> Route:
    cfg = config if config is not None else make_config(**delivery)
    dns = DNS((server.nameserver,), timeout=3.0)
    return asyncio.run(resolve_route(domain, cfg, dns, overrides=overrides or {}, own=own))


def addrs(route: Route) -> list[tuple[str, str, int, int]]:
    return [(t.name, t.address, t.port, t.preference) for t in route.targets]


def assert_failure(route: Route, permanent: bool, enhanced: str, text: str = "") -> None:
    assert route.failure is not None, route
    assert route.targets == []
    assert (route.failure.permanent, route.failure.enhanced) == (permanent, enhanced), route
    assert text in route.failure.text


# ------------------------------------------------------------------------ MX routing


def test_mx_primary_then_secondary(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "two.test")
    assert r.failure is None
    assert (r.kind, r.source, r.nexthop) == ("smtp", "mx", "mx:two.test")
    assert r.targets == [
        Target("mx1.two.test", "127.0.0.11", 25, 10),
        Target("mx2.two.test", "127.0.0.12", 25, 20),
    ]


def test_mx_targets_ipv6_first_and_duplicates_tried_once(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "dupes.test")
    assert addrs(r) == [
        ("mx1.two.test", "127.0.0.11", 25, 10),
        ("dual.test", "::1", 25, 30),
        ("dual.test", "127.0.0.32", 25, 30),
    ]


def test_implicit_mx_uses_domain_address(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "aonly.test")
    assert r.failure is None
    assert addrs(r) == [("aonly.test", "127.0.0.13", 25, 0)]


def test_null_mx_bounces(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "null.test")
    assert_failure(r, True, "5.1.10", "does not accept mail (null MX)")


def test_nxdomain_bounces(dns_server: DnsmasqServer) -> None:
    assert_failure(resolve(dns_server, "nowhere.test"), True, "5.1.2", "nowhere.test")


def test_servfail_defers(dns_server: DnsmasqServer) -> None:
    assert_failure(resolve(dns_server, "broken.test"), False, "4.4.3")
    assert_failure(resolve(dns_server, "x.broken.test"), False, "4.4.3")


def test_dead_nameserver_defers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))  # receives, never answers
        dns = DNS((f"127.0.0.1:{hole.getsockname()[1]}",), timeout=0.5)
        r = asyncio.run(resolve_route("two.test", make_config(), dns, overrides={}, own=OWN))
    assert_failure(r, False, "4.4.3", "timed out")


def test_domain_without_mx_or_address_bounces_unable_to_route(
    dns_server: DnsmasqServer,
) -> None:
    assert_failure(resolve(dns_server, "nodata.test"), True, "5.4.4")


def test_mx_hosts_without_address_bounce_unable_to_route(dns_server: DnsmasqServer) -> None:
    assert_failure(resolve(dns_server, "noaddr.test"), True, "5.4.4", "missing.noaddr.test")


def test_mx_host_tempfail_with_nothing_else_usable_defers(dns_server: DnsmasqServer) -> None:
    # One host SERVFAILs, the other does not exist: not proof that the domain is dead.
    assert_failure(resolve(dns_server, "halfsf.test"), False, "4.4.3", "x.broken.test")


def test_mx_host_tempfail_skipped_when_another_works(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "mixed.test")
    assert r.failure is None
    assert addrs(r) == [("mx2.two.test", "127.0.0.12", 25, 20)]


# ------------------------------------------------------------------ ourselves in MX


def test_ourselves_as_secondary_mx_keeps_only_better_mx(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "backup.test")
    assert r.failure is None
    assert addrs(r) == [("primary.backup.test", "127.0.0.14", 25, 10)]


def test_without_us_listening_there_all_mx_are_kept(dns_server: DnsmasqServer) -> None:
    other = OwnIdentity(HOSTNAME, frozenset({(US, 2525)}))  # same IP, another port
    r = resolve(dns_server, "backup.test", own=other)
    assert [t.name for t in r.targets] == [
        "primary.backup.test", "us.backup.test", "third.backup.test",
    ]


def test_ourselves_as_best_mx_is_a_loop(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "best.test")
    assert_failure(r, True, "5.4.6", "loops back to myself (we are its best MX)")


def test_ourselves_at_equal_preference_drops_the_peers(dns_server: DnsmasqServer) -> None:
    # RFC 5321 §5.1: discard our record and all records at the same preference or worse.
    assert_failure(resolve(dns_server, "peer.test"), True, "5.4.6")


def test_our_hostname_in_mx_list(dns_server: DnsmasqServer) -> None:
    # mx.empath.test has no address at all: the name alone says it is us.
    r = resolve(dns_server, "byname.test")
    assert addrs(r) == [("a.byname.test", "127.0.0.16", 25, 5)]
    # Matched case-insensitively, as a normalised host name.
    own = own_identity(dataclasses.replace(make_config(), hostname=HOSTNAME.upper() + "."), [])
    assert own.hostname == HOSTNAME
    assert addrs(resolve(dns_server, "byname.test", own=own)) == addrs(r)


def test_other_loopback_address_is_not_us(dns_server: DnsmasqServer) -> None:
    # Test sinks live on 127.0.0.x: with wildcard listeners they are still not us.
    r = resolve(dns_server, "loopback.test", own=OWN_WILDCARD)
    assert addrs(r) == [("sink.loopback.test", "127.0.0.21", 25, 10)]


def test_wildcard_listener_does_not_claim_foreign_addresses(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "notlocal.test", own=OWN_WILDCARD)
    assert addrs(r) == [("far.notlocal.test", FAR_IP, 25, 10)]


@pytest.mark.skipif(LOCAL_IP is None, reason="no non-loopback IPv4 address on this machine")
def test_wildcard_listener_matches_local_address(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "wild.test", own=OWN_WILDCARD)
    assert addrs(r) == [("primary.backup.test", "127.0.0.14", 25, 10)]
    # Exact endpoints only: the same local address is then not us.
    assert len(resolve(dns_server, "wild.test", own=OWN).targets) == 2


def test_implicit_mx_pointing_at_us_is_a_loop(dns_server: DnsmasqServer) -> None:
    assert_failure(resolve(dns_server, "self.test"), True, "5.4.6")
    # Our own host name as the recipient domain (mail to user@mx.empath.test that is
    # not a local domain) loops as well, even though the name has no address here
    # (it exists, with no MX: implicit MX to itself).
    assert_failure(resolve(dns_server, HOSTNAME), True, "5.4.6")


def test_mx_port(dns_server: DnsmasqServer) -> None:
    cfg = make_config(mx_port=2525)
    r = resolve(dns_server, "two.test", config=cfg)
    assert {t.port for t in r.targets} == {2525}
    # Our listener on 127.0.0.20:25 is not the MX's 127.0.0.20:2525.
    assert len(resolve(dns_server, "best.test", config=cfg).targets) == 2
    mine = OwnIdentity(HOSTNAME, frozenset({(US, 2525)}))
    assert_failure(resolve(dns_server, "best.test", config=cfg, own=mine), True, "5.4.6")


# ------------------------------------------------------------------------ next hops


def test_smtp_route_uses_address_not_mx(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "smtphost.test", routes={"smtphost.test": "smtp:smtphost.test:2626"})
    assert r.failure is None
    assert (r.kind, r.source, r.nexthop) == ("smtp", "route", "smtp:smtphost.test:2626")
    assert r.targets == [Target("smtphost.test", "127.0.0.31", 2626)]


def test_smtp_route_ip_literals_and_default_port(dns_server: DnsmasqServer) -> None:
    routes = {"a.example": "smtp:127.0.0.40", "b.example": "smtp:[::1]:25"}
    assert addrs(resolve(dns_server, "a.example", routes=routes)) == [
        ("127.0.0.40", "127.0.0.40", 25, 0)
    ]
    r = resolve(dns_server, "b.example", routes=routes)
    assert (r.nexthop, addrs(r)) == ("smtp:[::1]:25", [("::1", "::1", 25, 0)])


def test_lmtp_routes(dns_server: DnsmasqServer) -> None:
    routes = {"tcp.example": "lmtp:dual.test:24", "unix.example": "lmtp:/run/dovecot/lmtp"}
    r = resolve(dns_server, "tcp.example", routes=routes)
    assert r.kind == "lmtp"
    assert addrs(r) == [("dual.test", "::1", 24, 0), ("dual.test", "127.0.0.32", 24, 0)]
    r = resolve(dns_server, "unix.example", routes=routes)
    assert (r.kind, r.nexthop) == ("lmtp", "lmtp:/run/dovecot/lmtp")
    assert r.targets == [Target("/run/dovecot/lmtp", "/run/dovecot/lmtp", 0)]


def test_maildir_route(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "corp.example", routes={"corp.example": "maildir:/var/mail/corp"})
    assert r.failure is None
    assert (r.kind, r.path, r.targets, r.source) == (
        "maildir", Path("/var/mail/corp"), [], "route"
    )


def test_mx_route_uses_other_domains_mx(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "partner.test", routes={"partner.test": "mx:two.test"})
    assert (r.source, r.nexthop) == ("route", "mx:two.test")
    assert [t.address for t in r.targets] == ["127.0.0.11", "127.0.0.12"]


def test_configured_next_hop_that_does_not_exist_defers(dns_server: DnsmasqServer) -> None:
    # A typo in our own config must not bounce mail: it defers until fixed.
    routes = {
        "a.example": "smtp:nowhere.test",
        "b.example": "mx:nowhere.test",
        "c.example": "mx:null.test",
        "d.example": "smtp:nodata.test:25",
        "e.example": "mx:noaddr.test",
    }
    for domain in routes:
        r = resolve(dns_server, domain, routes=routes)
        assert_failure(r, False, "4.4.4")
        assert r.source == "route"
    assert_failure(resolve(dns_server, "f.example", routes={"f.example": "smtp:x.broken.test"}),
                   False, "4.4.3")


def test_smtp_route_to_our_own_endpoint_is_a_loop(dns_server: DnsmasqServer) -> None:
    for hop in (f"smtp:{US}", f"smtp:{US}:25", "smtp:self.test", f"lmtp:{US}:25"):
        r = resolve(dns_server, "loop.example", routes={"loop.example": hop})
        assert_failure(r, True, "5.4.6", "loops back to myself")
    # Another port on the same address is another service (e.g. a content filter).
    r = resolve(dns_server, "loop.example", routes={"loop.example": f"smtp:{US}:10025"})
    assert addrs(r) == [(US, US, 10025, 0)]
    # Our host name with a port is not a loop by itself: only endpoints count here.
    r = resolve(dns_server, "loop.example", routes={"loop.example": f"smtp:{HOSTNAME}:10025"})
    assert_failure(r, False, "4.4.4")


def test_relayhost(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "two.test", mode="relay", relayhost="relay.test:2527")
    assert (r.kind, r.source, r.nexthop) == ("smtp", "relayhost", "smtp:relay.test:2527")
    assert r.targets == [Target("relay.test", "127.0.0.30", 2527)]  # no MX lookup
    r = resolve(dns_server, "two.test", mode="relay", relayhost="[::1]:2528")
    assert addrs(r) == [("::1", "::1", 2528, 0)]
    # The relayhost applies only in mode "relay".
    assert resolve(dns_server, "two.test", mode="mx", relayhost="relay.test:2527").source == "mx"


def test_address_literal_domain(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "[127.0.0.60]")
    assert addrs(r) == [("[127.0.0.60]", "127.0.0.60", 25, 0)]
    r = resolve(dns_server, "[ipv6:::1]")
    assert [t.address for t in r.targets] == ["::1"]
    assert_failure(resolve(dns_server, f"[{US}]"), True, "5.4.6")


# ------------------------------------------------------------------------- priority


def test_priority_override_route_relayhost_mx(dns_server: DnsmasqServer) -> None:
    routes = {"prio.test": "smtp:127.0.0.41:2525"}
    overrides = {"prio.test": "smtp:127.0.0.43:2527"}
    relay: dict[str, Any] = {"mode": "relay", "relayhost": "127.0.0.42:2526"}

    r = resolve(dns_server, "prio.test", overrides=overrides, routes=routes, **relay)
    assert (r.source, addrs(r)) == ("override", [("127.0.0.43", "127.0.0.43", 2527, 0)])
    r = resolve(dns_server, "prio.test", routes=routes, **relay)
    assert (r.source, addrs(r)) == ("route", [("127.0.0.41", "127.0.0.41", 2525, 0)])
    r = resolve(dns_server, "prio.test", **relay)
    assert (r.source, addrs(r)) == ("relayhost", [("127.0.0.42", "127.0.0.42", 2526, 0)])
    r = resolve(dns_server, "prio.test")
    assert (r.source, addrs(r)) == ("mx", [("mx1.two.test", "127.0.0.11", 25, 10)])


def test_override_is_canonicalised_and_invalid_one_defers(dns_server: DnsmasqServer) -> None:
    r = resolve(dns_server, "prio.test", overrides={"prio.test": "SMTP:[0::1]:25"})
    assert (r.source, r.nexthop) == ("override", "smtp:[::1]:25")
    r = resolve(dns_server, "prio.test", overrides={"prio.test": "carrier-pigeon:coop"})
    assert_failure(r, False, "4.3.5", "runtime override")


def test_routes_match_the_exact_domain_only(dns_server: DnsmasqServer) -> None:
    routes = {"test": "smtp:127.0.0.50", "mx1.two.test": "smtp:127.0.0.51"}
    r = resolve(dns_server, "two.test", routes=routes)
    assert r.source == "mx"
    # ... and the domain is compared in normalised form.
    r = resolve(dns_server, "MX1.two.test.", routes=routes)
    assert (r.source, [t.address for t in r.targets]) == ("route", ["127.0.0.51"])


# ------------------------------------------------------------------------- identity


def test_own_identity_from_listening_sockets_or_config() -> None:
    cfg = dataclasses.replace(
        make_config(),
        hostname="MX.Empath.Test.",
        listen=(Listener("127.0.0.1", 2525, "smtp"), Listener("::1", 2587, "submission")),
    )
    own = own_identity(cfg, [])
    assert own.hostname == HOSTNAME
    assert own.endpoints == {("127.0.0.1", 2525), ("::1", 2587)}
    # The sockets we really listen on (socket activation) win over config.listen.
    own = own_identity(cfg, [("0:0::0", 25), ("[::ffff:127.0.0.9]", 25), ("not-an-ip", 1)])
    assert own.endpoints == {("::", 25), ("127.0.0.9", 25)}
