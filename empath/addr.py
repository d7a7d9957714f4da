"""Mail addresses and domains: parsing and normalisation shared by config and SMTP.

Domains compare case-insensitively, without a trailing dot, with IDNA A-labels and
U-labels equal: everything is normalised to the lower-case A-label form.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "AddressError",
    "Mailbox",
    "is_postmaster",
    "normalize_domain",
    "parse_mailbox",
]

# RFC 5321 §4.5.3.1: local part ≤ 64 octets, domain ≤ 255, path ≤ 256.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5321 atext (ASCII) for a Dot-string local part.
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")


class AddressError(ValueError):
    """An address or domain that is not acceptable; the text says why."""


def normalize_domain(domain: str) -> str:
    """Return ``domain`` as a lower-case A-label string without trailing dot.

    Raises AddressError for anything that is not a syntactically valid host name.
    """
    d = domain.strip()
    if d.endswith("."):
        d = d[:-1]
    if not d:
        raise AddressError("empty domain")
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise AddressError(f"invalid internationalised domain {domain!r}: {exc}") from None
    d = d.lower()
    if len(d) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} characters")
    labels = d.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise AddressError(f"invalid domain {domain!r}")
    if label_is_numeric(labels[-1]):
        raise AddressError(f"invalid domain {domain!r}: top-level label is numeric")
    if any(label.startswith("xn--") for label in labels):
        # Reject A-labels that do not decode: they would never match a U-label.
        try:
            d.encode("ascii").decode("idna")
        except UnicodeError:
            raise AddressError(f"invalid IDNA A-label in {domain!r}") from None
    return d


def label_is_numeric(label: str) -> bool:
    return label.isdigit()


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed envelope address. ``domain`` is normalised; ``local`` is kept as sent."""

    local: str
    domain: str  # normalised A-label, or an address literal such as "[192.0.2.1]"

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def utf8(self) -> bool:
        return not self.local.isascii()


def _parse_domain_part(domain: str) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal.lower().startswith("ipv6:"):
                ipaddress.IPv6Address(literal[5:])
                return "[IPv6:" + literal[5:].lower() + "]"
            ipaddress.IPv4Address(literal)
        except ValueError:
            raise AddressError(f"invalid address literal {domain!r}") from None
        return domain
    return normalize_domain(domain)


def _valid_local_part(local: str) -> bool:
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            return False
        inner = local[1:-1]
        i = 0
        while i < len(inner):
            c = inner[i]
            if c == "\\":
                if i + 1 >= len(inner) or not (32 <= ord(inner[i + 1]) <= 126):
                    return False
                i += 2
                continue
            if c == '"' or (c.isascii() and not (32 <= ord(c) <= 126)):
                return False
            i += 1
        return True
    if local.isascii():
        return all(_ATEXT.match(atom) for atom in local.split("."))
    # RFC 6531: UTF-8 local parts; still no controls, spaces or specials.
    return all(
        atom and all((not ch.isascii() and ch.isprintable()) or _ATEXT.match(ch) for ch in atom)
        for atom in local.split(".")
    )


def parse_mailbox(text: str, *, allow_utf8: bool = True) -> Mailbox:
    """Parse an RFC 5321 ``Mailbox`` (``local@domain``, no angle brackets).

    ``allow_utf8`` permits a UTF-8 local part and U-label domain (SMTPUTF8).
    """
    try:
        # Arguments arrive decoded with surrogateescape: invalid UTF-8 shows up here.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise AddressError("address is not valid UTF-8") from None
    if len(text) > MAX_PATH:
        raise AddressError("address longer than 256 characters")
    if not allow_utf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"address {text!r} is not local@domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    if not _valid_local_part(local):
        raise AddressError(f"invalid local part in {text!r}")
    return Mailbox(local=local, domain=_parse_domain_part(domain))


def is_postmaster(mailbox: Mailbox | None, raw: str) -> bool:
    """True for ``<Postmaster>`` (no domain, RFC 5321 §4.5.1) or postmaster@ any domain."""
    if mailbox is None:
        return raw.lower() == "postmaster"
    return mailbox.local.lower() == "postmaster"
