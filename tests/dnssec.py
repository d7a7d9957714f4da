"""Real DNSSEC for tests: zones signed with ``ldns-signzone``, served by ``nsd``, and
validated by ``unbound`` on loopback, all as unprivileged processes on high ports.

dnsmasq (tests/dnsmasq.py) cannot sign a zone, so it cannot show that empath reads
the AD bit of a *validated* answer. Here every piece is the real one:

- each zone gets a key made by ``ldns-keygen`` (ECDSA P-256, one key as KSK and ZSK)
  and is signed by ``ldns-signzone`` (NSEC, so negative answers are provable too);
- ``nsd`` serves the zones authoritatively on ``127.0.0.1:<port>``;
- ``unbound`` resolves them through ``stub-zone`` entries pointing at nsd, with a
  static trust anchor (the DS from ldns-keygen) for each zone meant to validate.

Zone kinds (``Zone.kind``):

- ``secure``: signed, its DS is a trust anchor → answers carry AD;
- ``insecure``: not signed, no anchor covers it → answers without AD;
- ``bogus``: signed, but the anchor is the DS of *another* key → unbound cannot
  validate it and answers SERVFAIL (what a forged or broken signed zone looks like).

Usage::

    with DnssecLab([Zone("signed.test", ["@ MX 10 mx", "mx A 127.0.0.1"])]) as lab:
        DNS(nameservers=(lab.nameserver,))

or as a pytest fixture: ``lab = dnssec_fixture(zones)`` (skipped without the tools,
failed under CI=true through ``require_tool``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.loopback import ForegroundServer, start_answering

__all__ = ["TOOLS", "DnssecLab", "Zone", "dnssec_fixture", "require_tools"]

ZoneKind = Literal["secure", "insecure", "bogus"]
# The programs the lab runs (Debian packages nsd, unbound, ldnsutils).
TOOLS = ("nsd", "unbound", "ldns-keygen", "ldns-signzone")
_TTL = 60


@dataclass(frozen=True)
class Zone:
    """``records``: zone-file lines relative to the origin (``"@ MX 10 mx"``,
    ``"mx A 127.0.0.1"``); SOA, NS and the name server's address are added."""

    name: str
    records: Sequence[str] = ()
    kind: ZoneKind = "secure"

    @property
    def origin(self) -> str:
        return self.name.rstrip(".").lower() + "."


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian: nsd, unbound, ldnsutils)")
    return path


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip()


@dataclass
class DnssecLab:
    """nsd (authority) + unbound (validating resolver) for ``zones``.

    ``nameserver`` is the resolver, ``127.0.0.1:PORT``, as ``delivery.nameservers``
    takes it; ``authority`` is nsd's, for queries that must bypass validation.
    """

    zones: Sequence[Zone]
    workdir: Path | None = None
    nsd_port: int = 0
    unbound_port: int = 0
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)
    _nsd: ForegroundServer | None = field(default=None, repr=False)
    _unbound: ForegroundServer | None = field(default=None, repr=False)

    @property
    def nameserver(self) -> str:
        assert self.unbound_port, "lab not started"
        return f"127.0.0.1:{self.unbound_port}"

    @property
    def authority(self) -> str:
        assert self.nsd_port, "lab not started"
        return f"127.0.0.1:{self.nsd_port}"

    def log(self) -> str:
        return "".join(
            f"--- {name} ---\n{s.log()}\n"
            for name, s in (("nsd", self._nsd), ("unbound", self._unbound)) if s is not None
        )

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> DnssecLab:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="empath-dnssec-")
            self.workdir = Path(self._tmp.name)
        anchors = self._sign_zones(self.workdir)
        self._start_nsd(self.workdir)
        self._start_unbound(self.workdir, anchors)
        return self

    def stop(self) -> None:
        for s in (self._unbound, self._nsd):
            if s is not None:
                s.stop()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.workdir = None

    def __enter__(self) -> DnssecLab:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- zones and keys -------------------------------------------------------------

    def _zone_text(self, zone: Zone) -> str:
        lines = [
            f"$ORIGIN {zone.origin}",
            f"$TTL {_TTL}",
            # MINIMUM = TTL: negative answers are cached as long as positive ones.
            f"@ IN SOA ns hostmaster 1 3600 600 86400 {_TTL}",
            "@ IN NS ns",
            "ns IN A 127.0.0.1",
            *zone.records,
        ]
        return "\n".join(lines) + "\n"

    def _keygen(self, d: Path, zone: Zone) -> str:
        # -k: flags 257 (a KSK, which gets a .ds file); used as the only key it signs
        # everything. /dev/urandom: never block on entropy.
        return _run([_tool("ldns-keygen"), "-a", "ECDSAP256SHA256", "-k", "-r",
                     "/dev/urandom", zone.origin], d)

    def _sign_zones(self, d: Path) -> list[str]:
        """Write (and sign) every zone file; returns the trust anchors (DS lines)."""
        anchors: list[str] = []
        for zone in self.zones:
            path = d / f"{zone.origin}zone"
            path.write_text(self._zone_text(zone))
            if zone.kind == "insecure":
                continue
            key = self._keygen(d, zone)
            _run([_tool("ldns-signzone"), "-f", f"{path}.signed", "-o", zone.origin,
                  str(path), key], d)
            path.with_name(path.name + ".served").symlink_to(f"{path.name}.signed")
            anchor_key = key if zone.kind == "secure" else self._keygen(d, zone)
            anchors.append((d / f"{anchor_key}.ds").read_text().strip())
        for zone in self.zones:
            if zone.kind == "insecure":
                path = d / f"{zone.origin}zone"
                path.with_name(path.name + ".served").symlink_to(path.name)
        return anchors

    # -- nsd ------------------------------------------------------------------------

    def _start_nsd(self, d: Path) -> None:
        def configure(port: int) -> list[str]:
            zones = [
                f"zone:\n  name: \"{z.origin}\"\n  zonefile: \"{d}/{z.origin}zone.served\"\n"
                for z in self.zones
            ]
            (d / "nsd.conf").write_text(
                "server:\n"
                f"  ip-address: 127.0.0.1@{port}\n"
                "  do-ip6: no\n"
                "  reuseport: no\n"
                "  server-count: 1\n"
                "  verbosity: 1\n"
                # Unprivileged, no chroot, every file in the lab's directory.
                "  username: \"\"\n"
                "  chroot: \"\"\n"
                f"  zonesdir: \"{d}\"\n"
                "  database: \"\"\n"
                f"  zonelistfile: \"{d}/nsd.zonelist\"\n"
                f"  xfrdfile: \"{d}/nsd.xfrd\"\n"
                f"  xfrdir: \"{d}\"\n"
                f"  pidfile: \"{d}/nsd.pid\"\n"
                "remote-control:\n"
                "  control-enable: no\n"
                + "".join(zones)
            )
            return [_tool("nsd"), "-d", "-c", str(d / "nsd.conf")]

        probe = self.zones[0].origin if self.zones else "."
        self._nsd, self.nsd_port = _start_ready(d / "nsd.log", configure, probe, ad=False)

    # -- unbound --------------------------------------------------------------------

    def _start_unbound(self, d: Path, anchors: list[str]) -> None:
        (d / "anchors.ds").write_text("".join(a + "\n" for a in anchors))

        def configure(port: int) -> list[str]:
            stubs = "".join(
                f"stub-zone:\n  name: \"{z.origin}\"\n  stub-addr: 127.0.0.1@{self.nsd_port}\n"
                for z in self.zones
            )
            (d / "unbound.conf").write_text(
                "server:\n"
                f"  interface: 127.0.0.1@{port}\n"
                f"  port: {port}\n"
                "  do-ip6: no\n"
                "  num-threads: 1\n"
                "  so-reuseport: no\n"
                "  username: \"\"\n"
                "  chroot: \"\"\n"
                f"  directory: \"{d}\"\n"
                f"  pidfile: \"{d}/unbound.pid\"\n"
                "  use-syslog: no\n"
                "  logfile: \"\"\n"
                "  verbosity: 1\n"
                "  val-log-level: 2\n"
                # nsd is on 127.0.0.1, which unbound does not ask by default.
                "  do-not-query-localhost: no\n"
                # "test." is one of unbound's built-in local zones (RFC 6761): lift it
                # so the stub zones below are asked.
                "  local-zone: \"test.\" nodefault\n"
                "  module-config: \"validator iterator\"\n"
                f"  trust-anchor-file: \"{d}/anchors.ds\"\n"
                # No RFC 8145 key-tag queries: they only clutter the log.
                "  trust-anchor-signaling: no\n"
                "remote-control:\n"
                "  control-enable: no\n"
                + stubs
            )
            return [_tool("unbound"), "-d", "-c", str(d / "unbound.conf")]

        secure = next((z for z in self.zones if z.kind == "secure"), None)
        probe = secure.origin if secure is not None else "."
        self._unbound, self.unbound_port = _start_ready(
            d / "unbound.log", configure, probe, ad=secure is not None)


def _answers(port: int, name: str, ad: bool) -> bool:
    query = dns.message.make_query(name, "SOA", want_dnssec=False)
    query.flags |= dns.flags.AD
    try:
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
    except (OSError, dns.exception.DNSException):
        return False
    if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return False
    return not ad or bool(response.flags & dns.flags.AD)


def _start_ready(log_path: Path, configure: Callable[[int], list[str]], probe: str,
                 *, ad: bool) -> tuple[ForegroundServer, int]:
    """Start on a free port and wait until the server answers ``probe`` (with AD, if
    ``ad``)."""
    server = start_answering(lambda port: ForegroundServer(configure(port), log_path),
                             lambda port: _answers(port, probe, ad))
    return server, server.port


def require_tools() -> None:
    """Skip the test without nsd, unbound or ldnsutils; under CI=true, fail it."""
    from tests.conftest import require_tool

    for tool in TOOLS:
        require_tool(tool)


def dnssec_fixture(zones: Sequence[Zone], *, scope: Any = "module") -> Callable[..., Any]:
    """A pytest fixture running ``DnssecLab(zones)`` for ``scope``; skipped without
    the tools, a failure under CI=true (``require_tool``)."""

    @pytest.fixture(scope=scope)
    def _lab() -> Iterator[DnssecLab]:
        require_tools()
        with DnssecLab(zones) as lab:
            yield lab

    return _lab
