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
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

__all__ = ["DnsmasqServer", "dnsmasq_fixture", "find_dnsmasq"]

# A DS digest no key hashes to: every answer below a name anchored with it is BOGUS.
_IMPOSSIBLE_DS = "1,8,2," + "0" * 64
_SAFE = re.compile(r"^[A-Za-z0-9.:_-]+$")


def find_dnsmasq() -> str | None:
    """dnsmasq lives in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.access("/usr/sbin/dnsmasq", os.X_OK) else None
    )


def _free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


def _check(value: str) -> str:
    # Everything goes into a dnsmasq config line: refuse what could break its syntax.
    if not _SAFE.match(value):
        raise ValueError(f"unsafe value for a dnsmasq config: {value!r}")
    return value


class _Process:
    """One dnsmasq with its config file and log (stderr, queries logged)."""

    def __init__(self, binary: str, workdir: Path, name: str, lines: list[str]) -> None:
        self.binary = binary
        self.conf = workdir / f"{name}.conf"
        self.log_path = workdir / f"{name}.log"
        self.lines = lines
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        self.port = port
        self.conf.write_text(
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
                    *self.lines,
                ]
            )
            + "\n"
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                # --conf-file replaces /etc/dnsmasq.conf (and its conf-dir) so a system
                # dnsmasq's settings never leak in; -k: foreground, no fork.
                [self.binary, "--keep-in-foreground", f"--conf-file={self.conf}",
                 "--log-facility=-"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


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
        self._authority: _Process | None = None
        self._front: _Process | None = None

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
        self._authority = _Process(self.binary, workdir, "authority", self._authority_lines())
        self._start_ready(self._authority, f"ns.{self.zone}")
        self._front = _Process(self.binary, workdir, "front", self._front_lines())
        self._start_ready(self._front, self.zone)
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

    def _start_ready(self, proc: _Process, probe: str) -> None:
        """Start on a free port (retrying if another process grabs it first) and wait
        until it answers a query."""
        last = ""
        for _ in range(5):
            proc.start(_free_udp_tcp_port())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if proc.exited():
                    break
                if _answers(proc.port, probe):
                    return
                time.sleep(0.05)
            last = proc.log()
            proc.stop()
            if "Address already in use" not in last:
                break
        raise RuntimeError(f"dnsmasq did not start:\n{last}")


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
