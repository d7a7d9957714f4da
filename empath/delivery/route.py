"""Where a domain's mail goes: the next hop and the servers to try, in order.

``resolve_route`` decides, for one recipient domain, in this order:

1. a runtime override (``empathctl route set DOMAIN NEXTHOP``),
2. the domain's ``delivery.routes`` entry,
3. ``delivery.relayhost`` when ``delivery.mode`` is ``relay``,
4. the domain's MX records (RFC 5321 §5.1).

Overrides and routes match the recipient domain **exactly**: an entry for
``example.com`` does not apply to ``sub.example.com`` (as Postfix's transport maps
with ``parent_domain_matches_subdomains`` unset). The domain is compared in its
normalised form (lower-case A-label, no trailing dot).

Next hops: ``smtp:HOST[:PORT]`` connects to HOST's A/AAAA addresses (no MX lookup,
port 25 by default), ``lmtp:HOST:PORT`` / ``lmtp:/socket`` speaks LMTP,
``maildir:PATH`` delivers locally, ``mx:DOMAIN`` uses DOMAIN's MX records exactly as
default routing uses the recipient domain's.

Failures never raise: they are returned as ``Route.failure``, permanent (bounce) or
temporary (defer). When there is any doubt the failure is temporary:

- a DNS temporary failure (SERVFAIL, timeout) anywhere, with no usable server left,
  defers (4.4.3);
- a next hop that does not exist because of *our* configuration (an ``smtp:`` host,
  the relayhost or an ``mx:`` domain other than the recipient domain that is NXDOMAIN,
  has no address or publishes a null MX) defers (4.4.4), so the operator can fix the
  config without mail bouncing meanwhile; only facts about the recipient domain itself
  (NXDOMAIN 5.1.2, null MX 5.1.10, MX hosts without addresses 5.4.4) bounce;
- a next hop that is ourselves bounces with 5.4.6 (a loop cannot fix itself).

DNSSEC: an MX route says whether the answers it rests on were authenticated
(``Route.dnssec``: the MX answer, or the proof that there is none, and the address
answers of the hosts it will try; None when no MX answer was used). A destination
with ``dnssec: require`` (``delivery.destinations``) is deferred with 4.7.5 when they
were not — a forged answer could point mail anywhere, and also fake an NXDOMAIN or a
null MX, so even those defer rather than bounce; validation may recover, hence
temporary, as DANE (RFC 7672) defers when its secure lookups fail. See docs/dnssec.md.

Ourselves in the MX list (what makes empath work as a backup MX): an MX host is us
when its name is our ``hostname``, or when one of its addresses with the MX port is
one of our listening endpoints. We then drop ourselves and every MX whose preference
is not better than ours; with nothing left, the mail loops (5.4.6: we are its best
MX, so the domain should be in ``local_domains`` or routed explicitly).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from empath.addr import AddressError, normalize_domain
from empath.config.model import Config
from empath.config.nexthop import NextHop, parse_host, parse_next_hop, split_host_port
from empath.delivery.dns import DNS, AddrAnswer
from empath.delivery.types import Target

__all__ = [
    "OwnIdentity",
    "Route",
    "RouteFailure",
    "RouteKind",
    "RouteSource",
    "own_identity",
    "resolve_route",
]

log = logging.getLogger("empath.delivery.route")

RouteKind = Literal["smtp", "lmtp", "maildir"]
RouteSource = Literal["override", "route", "relayhost", "mx", ""]

DEFAULT_SMTP_PORT = 25
_WILDCARDS = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """Why no route could be found. ``permanent``: bounce; otherwise defer."""

    permanent: bool
    enhanced: str  # RFC 3463, e.g. "5.1.2"
    text: str


@dataclass(frozen=True, slots=True)
class Route:
    """The outcome of routing one domain.

    ``targets``: servers in the order to try (LMTP over a Unix socket: ``address`` is
    the socket path, ``port`` 0). ``path``: the Maildir root for ``maildir``.
    ``source`` says which rule decided and ``nexthop`` is the canonical next-hop text
    (``mx:example.com`` for MX routing), for logs and ``empathctl``.
    ``dnssec``: for MX routing, whether every DNS answer it used was authenticated
    (None: not MX routing, or no MX answer); ``unauthenticated`` names those that were
    not, for the diagnostic.
    """

    kind: RouteKind
    targets: list[Target] = field(default_factory=list)
    path: Path | None = None
    failure: RouteFailure | None = None
    source: RouteSource = ""
    nexthop: str = ""
    dnssec: bool | None = None
    unauthenticated: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OwnIdentity:
    """Who "we" are, to detect routing loops.

    ``hostname``: ``config.hostname`` normalised. ``endpoints``: our listening
    (ip, port) pairs, IPs normalised; a wildcard (``0.0.0.0`` or ``::``) stands for
    every address of this machine on that port (except 127.0.0.0/8, see
    ``_is_ourselves``).
    """

    hostname: str
    endpoints: frozenset[tuple[str, int]]


# --------------------------------------------------------------------------- identity


@functools.lru_cache(maxsize=4096)  # parsed for every target of every delivery
def _norm_ip(text: str) -> str | None:
    """Canonical text of an IP (brackets and IPv6 zone dropped, IPv4-mapped IPv6 as
    IPv4), or None if ``text`` is not an IP."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    if t.lower().startswith("ipv6:"):
        t = t[5:]
    t = t.partition("%")[0]
    try:
        ip = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _norm_hostname(name: str) -> str:
    try:
        return normalize_domain(name)
    except AddressError:
        return name.strip().rstrip(".").lower()


def own_identity(config: Config, listening: list[tuple[str, int]]) -> OwnIdentity:
    """Our identity for loop detection.

    ``listening``: the (ip, port) pairs of the sockets actually open (socket
    activation hands us those); when empty, ``config.listen`` is used instead.
    Entries that are not IP literals are ignored.
    """
    pairs: Iterable[tuple[str, int]] = listening or [(li.host, li.port) for li in config.listen]
    endpoints: set[tuple[str, int]] = set()
    for host, port in pairs:
        ip = _norm_ip(host)
        if ip is not None:
            endpoints.add((ip, int(port)))
    return OwnIdentity(_norm_hostname(config.hostname), frozenset(endpoints))


@functools.lru_cache(maxsize=1024)
def _is_local_address(ip: str) -> bool:
    """True if ``ip`` belongs to this machine: it can be bound. Cached: the addresses
    of a mail server change rarely, and a restart (or reload) is expected then."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def _is_ourselves(ip: str, port: int, own: OwnIdentity) -> bool:
    """Whether connecting to ``ip:port`` would reach one of our listeners.

    An exact endpoint always counts. A wildcard endpoint on ``port`` counts for any
    address of this machine, except 127.0.0.0/8: every one of those is bindable on
    Linux, yet test sinks and local filters live on 127.0.0.x, so a loopback address
    is ours only when we listen on exactly it. The wildcards match both families
    (``[::]`` is dual-stack by default on Linux).
    """
    norm = _norm_ip(ip)
    if norm is None:
        return False
    if (norm, port) in own.endpoints:
        return True
    if not any((w, port) in own.endpoints for w in _WILDCARDS):
        return False
    addr = ipaddress.ip_address(norm)
    if isinstance(addr, ipaddress.IPv4Address) and addr.is_loopback:
        return False
    if addr.is_unspecified:
        return True  # connecting to 0.0.0.0 / :: reaches this machine
    if addr.is_link_local:
        return False  # not bindable without a scope; never a sensible MX address
    return _is_local_address(norm)


# ------------------------------------------------------------------------------ routing


def _fail(
    kind: RouteKind, permanent: bool, enhanced: str, text: str, source: RouteSource, nexthop: str
) -> Route:
    return Route(kind, failure=RouteFailure(permanent, enhanced, text), source=source,
                 nexthop=nexthop)


def _mx_port(config: Config) -> int:
    return config.delivery.mx_port  # validated 1..65535 by the loader


async def resolve_route(
    domain: str,
    config: Config,
    dns: DNS,
    *,
    overrides: Mapping[str, str],
    own: OwnIdentity,
) -> Route:
    """Where mail for ``domain`` goes now. Never raises: errors are ``Route.failure``."""
    key = domain.strip().rstrip(".").lower()
    try:
        return _dnssec_policy(key, config, dns, await _resolve(key, config, dns, overrides, own))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug must defer the mail, not lose it
        log.exception("route: resolving %s failed unexpectedly", key)
        return _fail("smtp", False, "4.3.0", f"internal error while routing {key}: {exc}",
                     "", "")


def _dnssec_policy(domain: str, config: Config, dns: DNS, route: Route) -> Route:
    """``dnssec: require``: an MX route on unauthenticated answers becomes a deferral."""
    policy = config.delivery.destinations.get(domain)
    if policy is None or policy.dnssec != "require" or route.dnssec is not False:
        return route
    if not dns.trusts_ad:
        why = ("the resolver is not on loopback, so its AD bit is not trusted; run a "
               "validating resolver on this host")
    else:
        why = "the resolver did not validate them: is the zone signed, does the resolver validate?"
    parts = route.unauthenticated
    verb = "was" if len(parts) == 1 else "were"
    text = (f"DNSSEC required for {domain}, but {' and '.join(parts)} {verb} "
            f"not authenticated ({why})")
    return replace(route, targets=[], failure=RouteFailure(False, "4.7.5", text))


async def _resolve(
    domain: str, config: Config, dns: DNS, overrides: Mapping[str, str], own: OwnIdentity
) -> Route:
    source: RouteSource
    if domain in overrides:
        text, source = overrides[domain], "override"
    elif domain in config.delivery.routes:
        text, source = config.delivery.routes[domain], "route"
    elif config.delivery.mode == "relay" and config.delivery.relayhost:
        return await _relayhost(domain, config.delivery.relayhost, dns, own)
    else:
        return await _mx_route(domain, domain, config, dns, own, "mx")
    try:
        hop = _parse_hop(text.strip())
    except ValueError as exc:
        where = "runtime override" if source == "override" else "delivery.routes entry"
        return _fail("smtp", False, "4.3.5", f"invalid {where} for {domain}: {exc}",
                     source, text)
    return await _next_hop(domain, hop, config, dns, own, source)


# The same few route texts for every message (lru_cache keeps no exceptions: a bad
# override is reported each time).
_parse_hop = functools.lru_cache(maxsize=256)(parse_next_hop)


async def _next_hop(
    domain: str, hop: NextHop, config: Config, dns: DNS, own: OwnIdentity, source: RouteSource
) -> Route:
    nexthop = str(hop)
    if hop.kind == "maildir":
        return Route("maildir", path=hop.path, source=source, nexthop=nexthop)
    if hop.kind == "mx":
        assert hop.host is not None
        return await _mx_route(domain, hop.host, config, dns, own, source, nexthop)
    if hop.kind == "lmtp" and hop.path is not None:
        target = Target(name=str(hop.path), address=str(hop.path), port=0)
        return Route("lmtp", [target], source=source, nexthop=nexthop)
    assert hop.host is not None
    port = hop.port if hop.port is not None else DEFAULT_SMTP_PORT
    kind: RouteKind = "lmtp" if hop.kind == "lmtp" else "smtp"
    return await _host_route(domain, kind, hop.host, port, dns, own, source, nexthop)


async def _relayhost(domain: str, relayhost: str, dns: DNS, own: OwnIdentity) -> Route:
    nexthop = f"smtp:{relayhost}"
    try:
        host, bracketed, port = split_host_port(relayhost.strip())
        host = parse_host(host, bracketed, literal_ip=False)
    except ValueError as exc:
        return _fail("smtp", False, "4.3.5", f"invalid delivery.relayhost: {exc}",
                     "relayhost", nexthop)
    return await _host_route(domain, "smtp", host, port or DEFAULT_SMTP_PORT, dns, own,
                             "relayhost", nexthop)


async def _host_route(
    domain: str,
    kind: RouteKind,
    host: str,
    port: int,
    dns: DNS,
    own: OwnIdentity,
    source: RouteSource,
    nexthop: str,
) -> Route:
    """``smtp:HOST[:PORT]``, ``lmtp:HOST:PORT`` and the relayhost: A/AAAA of HOST."""
    answer = await dns.addresses(host)
    if answer.kind == "tempfail":
        return _fail(kind, False, "4.4.3",
                     f"cannot resolve next hop {host} for {domain}: {answer.error}",
                     source, nexthop)
    if answer.kind != "ok":
        # Our own configuration names a host that does not exist: defer, don't bounce.
        why = "does not exist" if answer.kind == "nxdomain" else "has no A or AAAA record"
        return _fail(kind, False, "4.4.4",
                     f"unable to route {domain}: next hop {host} {why} ({source} {nexthop})",
                     source, nexthop)
    targets = [Target(name=host, address=ip, port=port) for ip in answer.ips]
    remaining = [t for t in targets if not _is_ourselves(t.address, t.port, own)]
    if not remaining:
        return _fail(kind, True, "5.4.6",
                     f"mail for {domain} loops back to myself (next hop {nexthop} is one of "
                     "our own listeners)", source, nexthop)
    return Route(kind, remaining, source=source, nexthop=nexthop)


def _literal_route(domain: str, ip: str, port: int, own: OwnIdentity) -> Route:
    """``user@[192.0.2.1]``: the address literal is the host (RFC 5321 §5.1)."""
    nexthop = f"smtp:[{ip}]:{port}" if ":" in ip else f"smtp:{ip}:{port}"
    if _is_ourselves(ip, port, own):
        return _fail("smtp", True, "5.4.6", f"mail for {domain} loops back to myself",
                     "mx", nexthop)
    return Route("smtp", [Target(name=domain, address=ip, port=port)], source="mx",
                 nexthop=nexthop)


async def _mx_route(
    domain: str,
    mx_domain: str,
    config: Config,
    dns: DNS,
    own: OwnIdentity,
    source: RouteSource,
    nexthop: str | None = None,
) -> Route:
    """MX routing of ``mx_domain`` (the recipient domain itself, or an ``mx:`` route)."""
    port = _mx_port(config)
    if mx_domain.startswith("[") and mx_domain.endswith("]"):
        ip = _norm_ip(mx_domain)
        if ip is not None:
            return _literal_route(domain, ip, port, own)
    nexthop = nexthop or f"mx:{mx_domain}"
    # Facts about the recipient's own domain may bounce; about a domain we chose to
    # route through (mx:OTHER), they are a configuration problem and defer.
    ours = mx_domain == domain

    def fail(permanent: bool, enhanced: str, text: str) -> Route:
        if not ours and permanent and enhanced != "5.4.6":
            return _fail("smtp", False, "4.4.4", f"{text} (next hop {nexthop} for {domain})",
                         source, nexthop)
        return _fail("smtp", permanent, enhanced, text, source, nexthop)

    mx = await dns.mx(mx_domain)
    if mx.kind == "tempfail":
        return fail(False, "4.4.3", f"MX lookup for {mx_domain} failed temporarily: {mx.error}")
    insecure: list[str] = []
    if not mx.authenticated:
        insecure.append({"mx": f"the MX answer for {mx_domain}",
                         "implicit": f"the answer that {mx_domain} has no MX",
                         "nxdomain": f"the NXDOMAIN answer for {mx_domain}",
                         "null": f"the null MX of {mx_domain}"}[mx.kind])

    def dnssec(route: Route) -> Route:
        return replace(route, dnssec=not insecure, unauthenticated=tuple(insecure))

    if mx.kind == "nxdomain":
        return dnssec(fail(True, "5.1.2", f"domain {mx_domain} does not exist (NXDOMAIN)"))
    if mx.kind == "null":
        return dnssec(fail(True, "5.1.10", f"{mx_domain} does not accept mail (null MX)"))
    implicit = mx.kind == "implicit"

    hosts = mx.hosts
    answers = await asyncio.gather(*(dns.addresses(name) for _pref, name in hosts))

    # Where are we in the list? Our lowest preference value cuts the list there.
    our_pref: int | None = None
    for (pref, name), answer in zip(hosts, answers, strict=True):
        me = name == own.hostname or any(_is_ourselves(ip, port, own) for ip in answer.ips)
        if me and (our_pref is None or pref < our_pref):
            our_pref = pref
    if our_pref is not None:
        kept = [(h, a) for h, a in zip(hosts, answers, strict=True) if h[0] < our_pref]
        if not kept:
            return dnssec(fail(True, "5.4.6",
                               f"mail for {mx_domain} loops back to myself (we are its best MX)"))
    else:
        kept = list(zip(hosts, answers, strict=True))

    targets: list[Target] = []
    seen: set[tuple[str, int]] = set()
    failures: list[tuple[str, AddrAnswer]] = []
    for (pref, name), answer in kept:
        if answer.kind != "ok":
            failures.append((name, answer))
            continue
        if not answer.authenticated:
            insecure.append(f"the addresses of {name}")
        for ip in answer.ips:
            if (ip, port) in seen:
                continue
            seen.add((ip, port))
            targets.append(Target(name=name, address=ip, port=port, preference=pref))
    if targets:
        return dnssec(Route("smtp", targets, source=source, nexthop=nexthop))
    # Without targets, the failed address answers are what the result rests on.
    insecure.extend(f"the addresses of {n}" for n, a in failures
                    if a.kind != "tempfail" and not a.authenticated)

    temp = [(n, a) for n, a in failures if a.kind == "tempfail"]
    if temp:
        detail = "; ".join(f"{n}: {a.error}" for n, a in temp)
        return dnssec(fail(False, "4.4.3",
                           f"cannot resolve the mail hosts of {mx_domain}: {detail}"))
    if implicit:
        # No MX and the domain exists (MX NODATA) but has no address either.
        if failures and failures[0][1].kind == "nxdomain":
            return dnssec(fail(True, "5.1.2", f"domain {mx_domain} does not exist (NXDOMAIN)"))
        return dnssec(fail(True, "5.4.4",
                           f"unable to route: {mx_domain} has no MX and no A or AAAA record"))
    names = ", ".join(n for n, _a in failures)
    return dnssec(fail(True, "5.4.4",
                       f"unable to route: no MX host of {mx_domain} has an address ({names})"))
