"""Real DNS for tests: dnsmasq on a loopback port serving MX/A/AAAA/TXT records,
null MX, NXDOMAIN and SERVFAIL for test domains.

Usage::

    with DnsmasqServer(mx={"example.test": [(10, "mx.example.test")]},
                       hosts={"mx.example.test": ["127.0.0.5"]}) as dns_server:
        DNS(nameservers=(dns_server.nameserver,))

or, as a pytest fixture in a test module (skipped without dnsmasq, failed under CI=true)::

    dns_server = dnsmasq_fixture(mx={...}, hosts={...})            # module scope

Two dnsmasq processes run, because one cannot do both things we need:

- the *authority* answers for ``zone`` (default ``test``) in dnsmasq's authoritative
  mode (``--auth-zone``), so negative answers carry an SOA record whose MINIMUM is the
  negative-caching TTL (RFC 2308), exactly like a real authoritative server. A plain
  ``--local=/test/`` answers NXDOMAIN/NODATA without SOA, which no real server does.
- the *front*, on the port the tests query, forwards the zone to the authority. For each
  ``servfail`` name it also has a DNSSEC trust anchor whose key can never match; the
  authority's unsigned answer then fails validation and the front answers SERVFAIL
  (rcode 2). dnsmasq has no option that answers SERVFAIL directly: ``--server=/x/#``
  without upstreams gives REFUSED, and forwarding to a dead port just times out.

Null MX (RFC 7505) needs no trick: ``--mx-host=domain,.,0`` serves ``MX 0 .``.
Record TTLs and the SOA MINIMUM are both ``ttl`` (``--auth-ttl``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.loopback import ForegroundServer, start_answering

__all__ = ["DnsmasqServer", "dnsmasq_fixture", "find_dnsmasq"]

# A DS digest no key hashes to: every answer below a name anchored with it is BOGUS.
_IMPOSSIBLE_DS = "1,8,2," + "0" * 64
_SAFE = re.compile(r"^[A-Za-z0-9.:_-]+$")


def find_dnsmasq() -> str | None:
    """dnsmasq lives in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.access("/usr/sbin/dnsmasq", os.X_OK) else None
    )


def _check(value: str) -> str:
    # Everything goes into a dnsmasq config line: refuse what could break its syntax.
    if not _SAFE.match(value):
        raise ValueError(f"unsafe value for a dnsmasq config: {value!r}")
    return value


def _dnsmasq(binary: str, workdir: Path, name: str,
             lines: list[str]) -> Callable[[int], ForegroundServer]:
    """One dnsmasq for a port: its config file written, its log (stderr, queries logged)."""

    def make(port: int) -> ForegroundServer:
        conf = workdir / f"{name}.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port={port}",
                    "listen-address=127.0.0.1",
                    # Bind only our address: a wildcard socket would clash with other
                    # servers on the same port, and with other dnsmasq instances.
                    "bind-interfaces",
                    "no-resolv",
                    "no-hosts",
                    "pid-file=",
                    "log-queries",
                    *lines,
                ]
            )
            + "\n"
        )
        # --conf-file replaces /etc/dnsmasq.conf (and its conf-dir) so a system
        # dnsmasq's settings never leak in; -k: foreground, no fork.
        return ForegroundServer([binary, "--keep-in-foreground", f"--conf-file={conf}",
                                 "--log-facility=-"], workdir / f"{name}.log")

    return make


class DnsmasqServer:
    """Authoritative test zone behind a forwarding front on ``127.0.0.1:port``.

    - ``mx``: domain → [(preference, exchange)]; exchange ``"."`` makes a null MX.
    - ``hosts``: name → IP addresses (IPv4 and/or IPv6; tests use 127.0.0.x and ::1).
    - ``txt``: name → text; a TXT record makes a name exist without A/AAAA/MX (NODATA).
    - ``servfail``: names for which the name and every name below answers SERVFAIL.
    - Any other name under ``zone`` is NXDOMAIN. All names must lie under ``zone``.
    """

    def __init__(
        self,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
        txt: Mapping[str, str] | None = None,
        servfail: Sequence[str] = (),
        *,
        zone: str = "test",
        ttl: int = 60,
        binary: str | None = None,
    ) -> None:
        self.zone = _check(zone.rstrip(".").lower())
        self.mx = {k: list(v) for k, v in (mx or {}).items()}
        self.hosts = {k: list(v) for k, v in (hosts or {}).items()}
        self.txt = dict(txt or {})
        self.servfail = list(servfail)
        self.ttl = ttl
        self.binary = binary or find_dnsmasq()
        for name in [*self.mx, *self.hosts, *self.txt, *self.servfail]:
            n = _check(name.rstrip(".").lower())
            if n != self.zone and not n.endswith("." + self.zone):
                raise ValueError(f"{name!r} is not under the zone {self.zone!r}")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._authority: ForegroundServer | None = None
        self._front: ForegroundServer | None = None

    # -- what tests use -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port of the front: the one to query."""
        assert self._front is not None, "server not started"
        return self._front.port

    @property
    def nameserver(self) -> str:
        """``127.0.0.1:PORT``, as ``delivery.nameservers`` and ``DNS()`` take it."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        """Both dnsmasq logs (front first): every query is logged."""
        return "".join(p.log() for p in (self._front, self._authority) if p is not None)

    def queries(self, name: str, rdtype: str) -> int:
        """How many ``rdtype`` queries for ``name`` reached the front, e.g. to show that
        an answer came from a client-side cache."""
        if self._front is None:
            return 0
        pattern = re.compile(
            rf"query\[{re.escape(rdtype.upper())}\] {re.escape(name.rstrip('.'))} from "
        )
        return len(pattern.findall(self._front.log()))

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> DnsmasqServer:
        if self.binary is None:
            raise RuntimeError("dnsmasq is not installed")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="empath-dnsmasq-")
        workdir = Path(self._tmp.name)
        self._authority = start_answering(
            _dnsmasq(self.binary, workdir, "authority", self._authority_lines()),
            lambda port: _answers(port, f"ns.{self.zone}"), wait=10)
        self._front = start_answering(
            _dnsmasq(self.binary, workdir, "front", self._front_lines()),
            lambda port: _answers(port, self.zone), wait=10)
        return self

    def stop(self) -> None:
        for p in (self._front, self._authority):
            if p is not None:
                p.stop()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DnsmasqServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- configuration ------------------------------------------------------------------

    def _authority_lines(self) -> list[str]:
        lines = [
            # Authoritative for queries arriving at 127.0.0.1: answers carry AA and
            # negative answers carry the zone's SOA.
            f"auth-server=ns.{self.zone},127.0.0.1",
            f"auth-zone={self.zone}",
            f"auth-ttl={self.ttl}",
            f"local-ttl={self.ttl}",
        ]
        for domain, entries in self.mx.items():
            for pref, host in entries:
                lines.append(f"mx-host={_check(domain)},{_check(host)},{int(pref)}")
        for name, ips in self.hosts.items():
            # One host-record line per address: dnsmasq merges them into one RRset.
            lines.extend(f"host-record={_check(name)},{_check(ip)}" for ip in ips)
        for name, text in self.txt.items():
            lines.append(f'txt-record={_check(name)},"{_check(text)}"')
        return lines

    def _front_lines(self) -> list[str]:
        assert self._authority is not None
        upstream = f"127.0.0.1#{self._authority.port}"
        lines = [f"server=/{self.zone}/{upstream}"]
        if self.servfail:
            lines += [
                "dnssec",
                # dnsmasq refuses to validate without a root anchor; it is never used
                # because only the servfail names are forwarded with validation.
                f"trust-anchor=.,{_IMPOSSIBLE_DS}",
            ]
            for name in self.servfail:
                n = _check(name.rstrip("."))
                # A server line of its own makes dnsmasq validate this subtree (the
                # zone's line is marked "no DNSSEC" because no anchor covers it).
                lines += [f"server=/{n}/{upstream}", f"trust-anchor={n},{_IMPOSSIBLE_DS}"]
        return lines


def _answers(port: int, name: str) -> bool:
    query = dns.message.make_query(name, "SOA")
    try:
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
    except (OSError, dns.exception.DNSException):
        return False
    return response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)


def dnsmasq_fixture(*, scope: Any = "module", **records: Any) -> Callable[..., Any]:
    """A pytest fixture running ``DnsmasqServer(**records)`` for ``scope``; skipped
    without dnsmasq, a failure under CI=true (``require_tool``)."""

    @pytest.fixture(scope=scope)
    def _dnsmasq() -> Iterator[DnsmasqServer]:
        from tests.conftest import require_tool

        binary = require_tool("dnsmasq")
        with DnsmasqServer(binary=binary, **records) as server:
            yield server

    return _dnsmasq
