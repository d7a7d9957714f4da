"""DNS for delivery: MX and A/AAAA lookups with a bounded, TTL-respecting cache.

Built on ``dns.asyncresolver`` using only APIs present since dnspython 2.3 (Debian
bookworm): ``Resolver(configure=False)``, ``nameservers`` as IP strings,
``nameserver_ports``, ``port``, ``timeout``/``lifetime`` and ``resolve()``.

Answers are classified into the few outcomes delivery acts on, so the caller never
sees dnspython exceptions:

- MX: ``mx`` | ``implicit`` (no MX records: the domain itself, RFC 5321 §5.1) |
  ``null`` (RFC 7505) | ``nxdomain`` | ``tempfail``.
- A/AAAA: ``ok`` | ``nodata`` | ``nxdomain`` | ``tempfail``.

Positive and negative answers are cached for their TTL (negative: the SOA's
MINIMUM/TTL, RFC 2308 §5) in an LRU of bounded size; temporary failures are not
cached, so the next attempt asks again.

DNSSEC: queries carry the AD flag (RFC 6840 §5.7), which asks a validating resolver to
say whether it validated the answer, without the cost of DO (signatures in every
reply). Each answer's ``authenticated`` is that AD bit — but only when every
nameserver is on loopback (``trusts_ad``): from a remote resolver the bit crosses a
network on which anyone can set it. Cached answers keep it. See docs/dnssec.md.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from empath import metrics
from empath.config.nexthop import split_host_port

__all__ = [
    "DNS",
    "NEGATIVE_TTL_CAP",
    "POSITIVE_TTL_CAP",
    "AddrAnswer",
    "AddrKind",
    "MXAnswer",
    "MXKind",
    "is_loopback_nameserver",
    "parse_nameserver",
]

MXKind = Literal["mx", "implicit", "null", "nxdomain", "tempfail"]
AddrKind = Literal["ok", "nxdomain", "nodata", "tempfail"]
_RawKind = Literal["ok", "nodata", "nxdomain", "tempfail"]
_RRType = Literal["MX", "A", "AAAA"]

# Cap on how long a negative answer is believed: a domain that is being set up should
# start receiving mail within minutes even if its SOA asks for a day (Postfix relies on
# the resolver; unbound and BIND cap negative TTLs at 1-3 h, we are stricter because a
# wrong NXDOMAIN bounces mail).
NEGATIVE_TTL_CAP = 300
# Cap on positive TTLs, so a changed MX is picked up within a day whatever the zone says.
POSITIVE_TTL_CAP = 86_400
# empath_dns_lookups_total's result label, from an answer's kind
_LOOKUP_RESULT = {"ok": "ok", "nodata": "nodata", "nxdomain": "nxdomain", "tempfail": "error"}

log = logging.getLogger("empath.delivery.dns")


@dataclass(frozen=True, slots=True)
class MXAnswer:
    """``hosts``: (preference, host name) in the order to try; ``ttl``: seconds this
    answer remains valid (0 for tempfail); ``error``: why, for tempfail/nxdomain;
    ``authenticated``: DNSSEC-validated by a trusted resolver (for ``implicit``, the
    proof that there is no MX)."""

    kind: MXKind
    hosts: list[tuple[int, str]] = field(default_factory=list)
    ttl: int = 0
    error: str | None = None
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class AddrAnswer:
    """``ips``: IPv6 addresses first, then IPv4, each in the order DNS gave them.
    ``authenticated``: every answer that contributed an address was validated (an IP
    literal counts as authenticated: no DNS answer to forge)."""

    kind: AddrKind
    ips: list[str] = field(default_factory=list)
    ttl: int = 0
    error: str | None = None
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class _Entry:
    """One (name, type) lookup outcome as cached. ``records``: MX as (pref, host), A and
    AAAA as address strings. ``expires`` is on the DNS object's clock."""

    kind: _RawKind
    records: tuple[Any, ...]
    expires: float
    error: str | None = None
    authenticated: bool = False


def parse_nameserver(text: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[ipv6]:port`` → (normalised ip, port; default 53).

    Only literal IPs: a resolver cannot look up the name of its own nameserver."""
    host, _bracketed, port = split_host_port(text.strip())
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"nameserver {text!r} is not an IP address") from None
    return ip, 53 if port is None else port


def is_loopback_nameserver(ip: str) -> bool:
    """Whether the AD bit from ``ip`` can be believed: only a resolver on this machine
    (127.0.0.0/8, ::1, or ::ffff:127.x) answers without a network path in between."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _nameserver_config(nameservers: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    ips: list[str] = []
    ports: dict[str, int] = {}
    for text in nameservers:
        ip, port = parse_nameserver(text)
        if ip in ports:
            # dnspython 2.3 keys ports by IP (nameserver_ports), so one IP cannot be
            # listed with two ports; the same IP twice with one port is just redundant.
            if ports[ip] != port:
                raise ValueError(
                    f"nameserver {ip} is listed with two ports ({ports[ip]} and {port})"
                )
            continue
        ips.append(ip)
        ports[ip] = port
    return ips, ports


def _dns_name(name: str) -> str:
    """Lower-case, without trailing dot: the form used as cache key and in answers."""
    return name.strip().rstrip(".").lower()


@functools.lru_cache(maxsize=1024)
def _ip_text(text: str) -> str | None:
    """The canonical text of the IP ``text``, or None if it is not one (memoised: a
    route to an address is asked for at every delivery)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM). Without an SOA
    it must not be cached (§5: nothing bounds it), so 0."""
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            minimum = int(rrset[0].minimum)
            return max(0, min(int(rrset.ttl), minimum, NEGATIVE_TTL_CAP))
    return 0


def _ad(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _nxdomain_response(exc: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    try:
        responses = exc.responses()  # type: ignore[no-untyped-call]
    except Exception:  # an NXDOMAIN built without responses: no TTL known
        return None
    for response in responses.values():
        return response  # type: ignore[no-any-return]
    return None


def _order_mx(records: tuple[tuple[int, str], ...]) -> list[tuple[int, str]]:
    """Sorted by preference, shuffled within equal preference (RFC 5321 §5.1: spread
    the load over equal MX hosts) — freshly on every call, cached or not."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for rec in records:
        groups.setdefault(rec[0], []).append(rec)
    ordered: list[tuple[int, str]] = []
    for pref in sorted(groups):
        group = groups[pref]
        random.shuffle(group)
        ordered.extend(group)
    return ordered


def _mx_kind(entry: _Entry) -> MXKind:
    if entry.kind == "ok":
        # RFC 7505: MX 0 "." means "no mail". We treat any answer whose exchanges are
        # all "." as null: there is no host to try either way.
        return "null" if all(host == "." for _pref, host in entry.records) else "mx"
    if entry.kind == "nodata":
        return "implicit"
    return entry.kind


class DNS:
    """Asynchronous MX/A/AAAA lookups with a shared cache.

    ``nameservers``: ``ip[:port]`` / ``[ipv6]:port`` strings (``delivery.nameservers``);
    empty means the system resolver configuration (/etc/resolv.conf). ``timeout`` bounds
    each lookup as a whole; ``cache_size`` is the number of (name, type) answers kept
    (0 disables caching). ``clock`` is for tests.

    ``trusts_ad``: whether answers' AD bits are believed (every nameserver on
    loopback); when not, every answer is unauthenticated, and the log says why once.
    """

    def __init__(
        self,
        nameservers: tuple[str, ...] = (),
        *,
        timeout: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.cache_size = max(0, cache_size)
        self._clock = clock
        self._cache: OrderedDict[tuple[str, _RRType], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, _RRType], asyncio.Task[_Entry]] = {}
        self._setup_error: str | None = None
        self._resolver = self._make_resolver()
        self.trusts_ad = self._check_trust()

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        if self.nameservers:
            ips, ports = _nameserver_config(self.nameservers)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.port = 53
            resolver.nameserver_ports = ports
            resolver.nameservers = ips
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except (OSError, dns.exception.DNSException) as exc:
                # No usable /etc/resolv.conf: every lookup tempfails (mail waits in the
                # queue) instead of the daemon refusing to start.
                self._setup_error = f"no usable system resolver configuration: {exc}"
                resolver = dns.asyncresolver.Resolver(configure=False)
        # The whole lookup is bounded by ``timeout``; a single server gets at most 2 s
        # (dnspython's default) so a dead first server leaves time for the next one.
        resolver.lifetime = self.timeout
        resolver.timeout = min(2.0, self.timeout)
        # AD in the query: "tell me whether you validated this" (RFC 6840 §5.7).
        resolver.flags = dns.flags.RD | dns.flags.AD
        return resolver

    def _check_trust(self) -> bool:
        servers = list(self._resolver.nameservers)
        if self._setup_error is not None or not servers:
            return False
        # dnspython ≥ 2.4 may hold Nameserver objects (DoH, DoT): not plain Do53 on
        # loopback, so not trusted.
        remote = [str(ns) for ns in servers
                  if not (isinstance(ns, str) and is_loopback_nameserver(ns))]
        if remote:
            log.info("DNSSEC: nameserver %s is not on loopback; AD bits are not trusted "
                     "and every DNS answer counts as unauthenticated (docs/dnssec.md)",
                     ", ".join(remote))
            return False
        return True

    # -- public lookups ---------------------------------------------------------------

    async def mx(self, domain: str) -> MXAnswer:
        name = _dns_name(domain)
        entry = await self._lookup(name, "MX")
        ttl = self._remaining(entry)
        kind = _mx_kind(entry)
        ad = entry.authenticated
        if kind == "mx":
            # A "." next to real hosts is a broken null MX: skip it, try the others.
            hosts = _order_mx(tuple(r for r in entry.records if r[1] != "."))
            return MXAnswer("mx", hosts, ttl, authenticated=ad)
        if kind == "implicit":
            return MXAnswer("implicit", [(0, name)], ttl, authenticated=ad)
        if kind == "null":
            return MXAnswer("null", [], ttl, f"{name} publishes a null MX (RFC 7505)",
                            authenticated=ad)
        return MXAnswer(kind, [], ttl, entry.error, authenticated=ad)

    async def addresses(self, host: str) -> AddrAnswer:
        """A and AAAA of ``host`` (queried concurrently); an IP literal is returned as is."""
        name = _dns_name(host)
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        ip = _ip_text(name)
        if ip is not None:
            return AddrAnswer("ok", [ip], POSITIVE_TTL_CAP, authenticated=True)
        v6, v4 = await asyncio.gather(self._lookup(name, "AAAA"), self._lookup(name, "A"))
        ttl = min(self._remaining(v6), self._remaining(v4))
        ips = [*v6.records, *v4.records]
        if ips:
            # One family answering is enough to deliver; a tempfail of the other only
            # means fewer addresses to try this time.
            ttl = min(self._remaining(e) for e in (v6, v4) if e.kind == "ok")
            # Only the answers we take addresses from matter: a forged "no AAAA" can
            # only take addresses away, a forged AAAA would be an "ok" answer itself.
            ad = all(e.authenticated for e in (v6, v4) if e.kind == "ok")
            return AddrAnswer("ok", ips, ttl, authenticated=ad)
        # tempfail first: an NXDOMAIN for one type and a timeout for the other is no
        # proof that the name does not exist.
        for e in (v6, v4):
            if e.kind == "tempfail":
                return AddrAnswer("tempfail", [], 0, e.error)
        ad = v6.authenticated and v4.authenticated
        for e in (v6, v4):
            if e.kind == "nxdomain":
                return AddrAnswer("nxdomain", [], ttl, e.error, authenticated=ad)
        return AddrAnswer("nodata", [], ttl, f"{name} has no A or AAAA record",
                          authenticated=ad)

    # -- cache (control plane: ``empathctl dns cache [--clear]``) ---------------------

    def cache_entries(self) -> list[dict[str, Any]]:
        """Unexpired cached answers, least recently used first."""
        self._purge_expired()
        out: list[dict[str, Any]] = []
        for (name, rrtype), entry in self._cache.items():
            kind: str = _mx_kind(entry) if rrtype == "MX" else entry.kind
            if rrtype == "MX":
                data = [f"{pref} {host}" for pref, host in entry.records]
            else:
                data = [str(r) for r in entry.records]
            out.append(
                {
                    "name": name,
                    "type": rrtype,
                    "kind": kind,
                    "expires_in": self._remaining(entry),
                    "data": data,
                    "authenticated": entry.authenticated,
                }
            )
        return out

    def clear_cache(self) -> int:
        """Forget every cached answer; returns how many there were."""
        n = len(self._cache)
        self._cache.clear()
        return n

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._cache.items() if e.expires <= now]:
            del self._cache[key]

    def _remaining(self, entry: _Entry) -> int:
        return max(0, int(entry.expires - self._clock()))

    def _cache_get(self, key: tuple[str, _RRType]) -> _Entry | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _cache_put(self, key: tuple[str, _RRType], entry: _Entry) -> None:
        if self.cache_size == 0 or entry.kind == "tempfail" or entry.expires <= self._clock():
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- querying -----------------------------------------------------------------------

    async def _lookup(self, name: str, rrtype: _RRType) -> _Entry:
        key = (name, rrtype)
        entry = self._cache_get(key)
        if entry is not None:
            metrics.inc("empath_dns_cache_hits_total", (rrtype,))
            return entry
        # Many deliveries to one domain start together: they share one query.
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._query(name, rrtype))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget_inflight(key, t))
        # shield: one caller being cancelled must not cancel the query for the others.
        return await asyncio.shield(task)

    def _forget_inflight(self, key: tuple[str, _RRType], task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _query(self, name: str, rrtype: _RRType) -> _Entry:
        entry = await self._ask(name, rrtype)
        metrics.inc("empath_dns_lookups_total", (rrtype, _LOOKUP_RESULT.get(entry.kind, "error")))
        if entry.kind != "tempfail":
            result = ("authenticated" if entry.authenticated else
                      "unauthenticated" if self.trusts_ad else "untrusted")
            metrics.inc("empath_dns_authenticated_total", (result,))
        self._cache_put((name, rrtype), entry)
        return entry

    def _tempfail(self, text: str) -> _Entry:
        return _Entry("tempfail", (), self._clock(), text)

    async def _ask(self, name: str, rrtype: _RRType) -> _Entry:
        if self._setup_error is not None:
            return self._tempfail(self._setup_error)
        if not self._resolver.nameservers:
            return self._tempfail("no nameservers configured")
        try:
            qname = dns.name.from_text(name)  # absolute: no search list applies
        except dns.exception.DNSException as exc:
            # Not a valid DNS name (e.g. a label over 63 octets): it cannot exist.
            return _Entry("nxdomain", (), self._clock(), f"invalid name {name!r}: {exc}")
        now = self._clock()
        try:
            answer = await self._resolver.resolve(
                qname, rrtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            response = _nxdomain_response(exc)
            return _Entry("nxdomain", (), now + _negative_ttl(response),
                          f"{name}: no such domain (NXDOMAIN)",
                          self.trusts_ad and _ad(response))
        except dns.exception.Timeout:
            return self._tempfail(
                f"{rrtype} lookup for {name} timed out after {self.timeout:g}s"
            )
        except (dns.exception.DNSException, OSError) as exc:
            # NoNameservers (SERVFAIL/REFUSED from every server, or none reachable),
            # YXDOMAIN, malformed answers, socket errors: all worth a later retry.
            return self._tempfail(f"{rrtype} lookup for {name} failed: {exc}")
        rrset = answer.rrset
        ad = self.trusts_ad and _ad(answer.response)
        if rrset is None or len(rrset) == 0:
            return _Entry(
                "nodata", (), now + _negative_ttl(answer.response),
                f"{name} has no {rrtype} record", ad,
            )
        # chaining_result.minimum_ttl covers CNAMEs on the way, like the answer's expiry.
        ttl = min(int(answer.chaining_result.minimum_ttl), POSITIVE_TTL_CAP)
        records: tuple[Any, ...]
        if rrtype == "MX":
            # The root name (a null MX's exchange) is kept as "."; other exchanges as
            # host names without the trailing dot.
            records = tuple(
                (int(r.preference), "." if r.exchange == dns.name.root
                 else _dns_name(r.exchange.to_text()))
                for r in rrset
            )
        else:
            records = tuple(str(ipaddress.ip_address(r.address)) for r in rrset)
        return _Entry("ok", records, now + ttl, None, ad)
