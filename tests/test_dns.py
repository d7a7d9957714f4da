"""empath.delivery.dns against a real DNS server (dnsmasq, see tests/dnsmasq.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from empath.delivery.dns import DNS, NEGATIVE_TTL_CAP, parse_nameserver
from tests.dnsmasq import DnsmasqServer, dnsmasq_fixture

TTL = 60
T = TypeVar("T")

dns_server = dnsmasq_fixture(
    mx={
        "eq.test": [(10, "a.eq.test"), (10, "b.eq.test"), (20, "c.eq.test")],
        "null.test": [(0, ".")],
        "one.test": [(5, "a.eq.test")],
        "two.test": [(5, "b.eq.test")],
        "three.test": [(5, "c.eq.test")],
    },
    hosts={
        "a.eq.test": ["127.0.0.2"],
        "b.eq.test": ["127.0.0.3"],
        "c.eq.test": ["127.0.0.4"],
        "implicit.test": ["127.0.0.5"],
        "dual.test": ["::1", "127.0.0.6"],
        "v6only.test": ["::1"],
    },
    txt={"nodata.test": "exists"},
    servfail=["broken.test"],
    ttl=TTL,
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_dns(server: DnsmasqServer, **kwargs: object) -> DNS:
    return DNS((server.nameserver,), **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ MX


def test_mx_sorted_by_preference_and_shuffled_within_equal_preference(
    dns_server: DnsmasqServer,
) -> None:
    dns = make_dns(dns_server)

    async def many() -> list[list[tuple[int, str]]]:
        return [(await dns.mx("eq.test")).hosts for _ in range(200)]

    answers = run(many())
    firsts = set()
    for hosts in answers:
        assert [p for p, _ in hosts] == [10, 10, 20]
        assert hosts[2] == (20, "c.eq.test")
        firsts.add(tuple(h for _, h in hosts[:2]))
    # Both orders of the two preference-10 hosts appear (chance of not: 2**-199).
    assert firsts == {("a.eq.test", "b.eq.test"), ("b.eq.test", "a.eq.test")}


def test_mx_answer_kind_and_ttl(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    answer = run(dns.mx("EQ.test."))  # case and trailing dot do not matter
    assert answer.kind == "mx"
    assert 0 < answer.ttl <= TTL
    assert answer.error is None


def test_implicit_mx_when_domain_has_no_mx(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    answer = run(dns.mx("implicit.test"))
    assert answer.kind == "implicit"
    assert answer.hosts == [(0, "implicit.test")]
    assert 0 < answer.ttl <= TTL  # NODATA cached for the SOA's negative TTL
    assert run(dns.addresses("implicit.test")).ips == ["127.0.0.5"]


def test_name_without_mx_or_address_is_implicit_then_nodata(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    assert run(dns.mx("nodata.test")).kind == "implicit"
    answer = run(dns.addresses("nodata.test"))
    assert answer.kind == "nodata"
    assert answer.ips == []


def test_null_mx(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    answer = run(dns.mx("null.test"))
    assert answer.kind == "null"
    assert answer.hosts == []
    assert answer.error is not None and "null MX" in answer.error


def test_nxdomain_is_cached_for_the_negative_ttl(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    before = dns_server.queries("nowhere.test", "MX")
    answer = run(dns.mx("nowhere.test"))
    assert answer.kind == "nxdomain"
    assert 0 < answer.ttl <= min(TTL, NEGATIVE_TTL_CAP)
    assert "NXDOMAIN" in (answer.error or "")
    again = run(dns.mx("nowhere.test"))
    assert again.kind == "nxdomain"
    assert dns_server.queries("nowhere.test", "MX") == before + 1
    assert run(dns.addresses("nowhere.test")).kind == "nxdomain"


def test_servfail_is_tempfail_and_not_cached(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    answer = run(dns.mx("broken.test"))
    assert answer.kind == "tempfail"
    assert answer.ttl == 0
    assert answer.error
    before = dns_server.queries("broken.test", "MX")
    assert run(dns.mx("broken.test")).kind == "tempfail"
    assert dns_server.queries("broken.test", "MX") > before  # asked again
    assert run(dns.addresses("www.broken.test")).kind == "tempfail"
    assert dns.cache_entries() == []


# ---------------------------------------------------------------- dead nameservers


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A UDP port on 127.0.0.2 where datagrams arrive and nobody ever answers (not
    127.0.0.1: one nameserver IP cannot be listed with two ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        yield int(s.getsockname()[1])


def test_timeout_on_silent_nameserver_is_tempfail(black_hole: int) -> None:
    dns = DNS((f"127.0.0.2:{black_hole}",), timeout=0.5)
    answer = run(dns.mx("eq.test"))
    assert answer.kind == "tempfail"
    assert "timed out" in (answer.error or "")
    assert run(dns.addresses("a.eq.test")).kind == "tempfail"
    assert dns.cache_entries() == []


def test_closed_nameserver_port_is_tempfail() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    # The socket is closed: nothing listens on the port any more.
    dns = DNS((f"127.0.0.1:{port}",), timeout=0.5)
    assert run(dns.mx("eq.test")).kind == "tempfail"
    assert run(dns.addresses("a.eq.test")).kind == "tempfail"


def test_second_nameserver_used_when_first_is_silent(
    dns_server: DnsmasqServer, black_hole: int
) -> None:
    dns = DNS((f"127.0.0.2:{black_hole}", dns_server.nameserver), timeout=5.0)
    assert run(dns.addresses("a.eq.test")).ips == ["127.0.0.2"]


# ------------------------------------------------------------------------ addresses


def test_aaaa_before_a(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    answer = run(dns.addresses("dual.test"))
    assert answer.kind == "ok"
    assert answer.ips == ["::1", "127.0.0.6"]
    assert 0 < answer.ttl <= TTL
    assert run(dns.addresses("v6only.test")).ips == ["::1"]


def test_ip_literals_need_no_lookup(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    assert run(dns.addresses("127.0.0.9")).ips == ["127.0.0.9"]
    assert run(dns.addresses("[::1]")).ips == ["::1"]
    assert run(dns.addresses("[0:0::1]")).ips == ["::1"]
    assert dns.cache_entries() == []


# ---------------------------------------------------------------------------- cache


def test_answers_served_from_cache_after_server_stops() -> None:
    from tests.conftest import require_tool

    binary = require_tool("dnsmasq")
    with DnsmasqServer(
        mx={"cached.test": [(10, "mx.cached.test")]},
        hosts={"mx.cached.test": ["127.0.0.7", "::1"]},
        binary=binary,
    ) as server:
        dns = make_dns(server, timeout=1.0)
        mx = run(dns.mx("cached.test"))
        addrs = run(dns.addresses("mx.cached.test"))
        nx = run(dns.mx("gone.cached.test"))
        assert (mx.kind, addrs.kind, nx.kind) == ("mx", "ok", "nxdomain")
        server.stop()
        # The server is gone: an uncached name cannot be resolved any more ...
        assert run(dns.mx("other.test")).kind == "tempfail"
        # ... but cached answers, positive and negative, still are.
        assert run(dns.mx("cached.test")).hosts == [(10, "mx.cached.test")]
        assert run(dns.addresses("mx.cached.test")).ips == ["::1", "127.0.0.7"]
        assert run(dns.mx("gone.cached.test")).kind == "nxdomain"
        kinds = {(e["name"], e["type"]): e["kind"] for e in dns.cache_entries()}
        assert kinds == {
            ("cached.test", "MX"): "mx",
            ("mx.cached.test", "A"): "ok",
            ("mx.cached.test", "AAAA"): "ok",
            ("gone.cached.test", "MX"): "nxdomain",
        }


def test_cached_answer_expires_after_its_ttl(dns_server: DnsmasqServer) -> None:
    now = [1000.0]
    dns = make_dns(dns_server, clock=lambda: now[0])
    before = dns_server.queries("one.test", "MX")
    assert run(dns.mx("one.test")).ttl == TTL
    now[0] += TTL - 1
    assert run(dns.mx("one.test")).ttl == 1
    assert dns_server.queries("one.test", "MX") == before + 1
    now[0] += 2
    assert dns.cache_entries() == []
    assert run(dns.mx("one.test")).kind == "mx"
    assert dns_server.queries("one.test", "MX") == before + 2


def test_cache_is_bounded_lru(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server, cache_size=2)
    names = ["one.test", "two.test", "three.test"]
    before = {n: dns_server.queries(n, "MX") for n in names}
    for n in names:
        assert run(dns.mx(n)).kind == "mx"
    entries = dns.cache_entries()
    assert [e["name"] for e in entries] == ["two.test", "three.test"]
    run(dns.mx("three.test"))  # still cached
    assert dns_server.queries("three.test", "MX") == before["three.test"] + 1
    run(dns.mx("one.test"))  # evicted: asked again
    assert dns_server.queries("one.test", "MX") == before["one.test"] + 2
    assert len(dns.cache_entries()) == 2


def test_cache_size_zero_disables_caching(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server, cache_size=0)
    before = dns_server.queries("two.test", "MX")
    run(dns.mx("two.test"))
    run(dns.mx("two.test"))
    assert dns_server.queries("two.test", "MX") == before + 2
    assert dns.cache_entries() == []


def test_clear_cache(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    before = dns_server.queries("three.test", "MX")
    run(dns.mx("three.test"))
    run(dns.addresses("c.eq.test"))
    assert dns.clear_cache() == 3  # MX + A + AAAA
    assert dns.cache_entries() == []
    run(dns.mx("three.test"))
    assert dns_server.queries("three.test", "MX") == before + 2


def test_concurrent_lookups_share_one_query(dns_server: DnsmasqServer) -> None:
    dns = make_dns(dns_server)
    before = dns_server.queries("shared.nowhere.test", "MX")

    async def together() -> set[str]:
        answers = await asyncio.gather(*(dns.mx("shared.nowhere.test") for _ in range(20)))
        return {a.kind for a in answers}

    assert run(together()) == {"nxdomain"}
    assert dns_server.queries("shared.nowhere.test", "MX") == before + 1


# ------------------------------------------------------------------------ nameservers


def test_parse_nameserver() -> None:
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    with pytest.raises(ValueError, match="not an IP"):
        parse_nameserver("ns.example.com")


def test_one_ip_with_two_ports_is_refused() -> None:
    with pytest.raises(ValueError, match="two ports"):
        DNS(("127.0.0.1:53", "127.0.0.1:5353"))
