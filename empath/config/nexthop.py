"""Parsing of the small string grammars used in the config: ``HOST:PORT`` and next hops.

They live apart from the loader because the running daemon needs them too:
``empathctl route set DOMAIN NEXTHOP`` must accept exactly what ``delivery.routes``
accepts, and the canonical form written by ``str(NextHop)`` is what both store.

All functions raise ``ValueError`` with a message meant for the operator; the
caller adds the file and key path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from empath.addr import AddressError, normalize_domain

__all__ = [
    "NextHop",
    "format_host_port",
    "parse_absolute_path",
    "parse_host",
    "parse_next_hop",
    "parse_port",
    "split_host_port",
]

NextHopKind = Literal["smtp", "lmtp", "maildir", "mx"]


def parse_port(text: str) -> int:
    """A decimal TCP port 1..65535 (ASCII digits only: ``int()`` would accept ' 25'
    or Unicode digits, which are surely typos in a config file)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"invalid port {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1..65535")
    return port


def split_host_port(text: str) -> tuple[str, bool, int | None]:
    """Split ``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port``.

    Returns ``(host, bracketed, port)`` with the brackets removed. A bare IPv6
    address is refused: with a port appended it would be ambiguous, so the config
    always brackets IPv6 (as URLs and Postfix do).
    """
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
        return host, True, parse_port(rest[1:]) if rest else None
    if text.count(":") > 1:
        raise ValueError(
            f"IPv6 addresses must be written in brackets, e.g. '[::1]:25', got {text!r}"
        )
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    return host, False, parse_port(port) if sep else None


def parse_host(host: str, bracketed: bool, *, literal_ip: bool) -> str:
    """Validate and normalise the host part returned by ``split_host_port``.

    Brackets must hold an IPv6 address. Without brackets the host is an IPv4
    address or, unless ``literal_ip``, a domain (normalised to its A-label).
    """
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if literal_ip:
        raise ValueError(f"{host!r} is not an IP address (a literal IP is required here)")
    try:
        return normalize_domain(host)
    except AddressError as exc:
        raise ValueError(
            f"{host!r} is neither an IPv4 address nor a valid domain ({exc})"
        ) from None


def format_host_port(host: str, port: int | None) -> str:
    """Inverse of split_host_port + parse_host: brackets IPv6 hosts."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def parse_absolute_path(text: str) -> Path:
    """An absolute path. Relative paths are refused because the daemon's working
    directory is not something an operator thinks about when editing the config."""
    if not text:
        raise ValueError("empty path")
    if "\0" in text:
        raise ValueError("path contains a NUL byte")
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return Path(text)


@dataclass(frozen=True, slots=True)
class NextHop:
    """A parsed next hop. ``str()`` gives the canonical form stored in the config.

    - ``smtp``: ``host`` (domain, IPv4 or IPv6), ``port`` or None for 25; the host's
      A/AAAA records are used, no MX lookup.
    - ``lmtp``: either ``host`` + ``port`` (required: LMTP has no well-known TCP
      port) or ``path`` to a Unix socket.
    - ``maildir``: ``path``; mail goes to ``path/<local-part>/``.
    - ``mx``: ``host`` is the domain whose MX records are used.
    """

    kind: NextHopKind
    host: str | None = None
    port: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.kind}:{self.path}"
        assert self.host is not None
        return f"{self.kind}:{format_host_port(self.host, self.port)}"


def parse_next_hop(text: str) -> NextHop:
    """Parse ``smtp:HOST[:PORT]``, ``smtp:[IPv6][:PORT]``, ``lmtp:HOST:PORT``,
    ``lmtp:/abs/socket``, ``maildir:/abs/path`` or ``mx:DOMAIN``."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(
            f"next hop {text!r} lacks a transport; expected smtp:, lmtp:, maildir: or mx:"
        )
    kind = kind.lower()
    if kind == "smtp":
        host, bracketed, port = split_host_port(rest)
        return NextHop("smtp", host=parse_host(host, bracketed, literal_ip=False), port=port)
    if kind == "lmtp":
        if "/" in rest:
            return NextHop("lmtp", path=parse_absolute_path(rest))
        host, bracketed, port = split_host_port(rest)
        if port is None:
            raise ValueError(
                f"next hop {text!r}: LMTP over TCP needs a port (lmtp:HOST:PORT), "
                "or give an absolute socket path (lmtp:/run/dovecot/lmtp)"
            )
        return NextHop("lmtp", host=parse_host(host, bracketed, literal_ip=False), port=port)
    if kind == "maildir":
        return NextHop("maildir", path=parse_absolute_path(rest))
    if kind == "mx":
        try:
            return NextHop("mx", host=normalize_domain(rest))
        except AddressError as exc:
            raise ValueError(f"next hop {text!r}: {exc}") from None
    raise ValueError(
        f"next hop {text!r} has unknown transport {kind!r}; expected smtp:, lmtp:, maildir: or mx:"
    )
