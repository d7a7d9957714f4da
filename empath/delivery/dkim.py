"""DKIM signing of outbound mail (RFC 6376, rsa-sha256, relaxed/relaxed).

What is signed: a message delivered over SMTP (MX, ``smtp:`` routes, the relayhost)
that is ours to vouch for — submitted by a client allowed to relay (an authenticated
user, or an address in ``relay_networks``; local ``sendmail`` comes from loopback) or
generated here (a DSN) — and whose single ``From:`` mailbox is in a configured domain
or below one (``dkim: {example.com: …}`` signs ``From: root@mx.example.com`` with
``d=example.com``, which DMARC's default relaxed alignment accepts). Mail that came in
from outside and is passed on (a local domain routed ``smtp:`` to a mailbox server) is
never signed, even with a ``From:`` in our domain: signing it would turn us into a
signing oracle for whoever can reach port 25. LMTP and Maildir are final delivery
here and are not signed either.

When: at delivery, in the supervisor, not at receipt in the SMTP workers. The private
keys then live only in the process that does not parse client input; the spool keeps
the message as received (``queue show``, DSNs and a re-route see the original); and a
reload with a new key (rotation) applies to mail already queued. The header is
prepended on the wire; it is computed once per message and key set and kept in a
small cache, so the domains of one attempt and retries soon after send the same bytes.

Cost: each key file is read and parsed once per load (start, reload), never per
message. dkimpy wants the whole message in memory (and copies it several times while
canonicalising), so only the header block goes to dkimpy; the body hash is computed
here by streaming the spool file through the relaxed body canonicalisation in
``CHUNK_SIZE`` pieces. dkimpy then hashes the headers and makes the RSA signature
with our body hash (``DKIM.gen_header``, unchanged from dkimpy 1.0 to 1.1).

Headers: every header in the domain's list (``DEFAULT_HEADERS``) is signed once per
instance present and once more ("oversigned"), so none of them can be added to the
signed message afterwards — the DKIM replay trick of adding a second ``From:``,
``Subject:`` or ``Content-Type:`` that the reader sees instead of the signed one.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import email.parser
import email.policy
import hashlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from empath import metrics
from empath.addr import AddressError, normalize_domain
from empath.config.model import DKIM_DEFAULT_HEADERS, Config
from empath.delivery.dsn import DSN_METADATA_KEY
from empath.secretfile import SecretFileError, read_secret
from empath.smtp.policy import in_networks
from empath.spool import Envelope, open_message

__all__ = [
    "DEFAULT_HEADERS",
    "DkimError",
    "DkimKeys",
    "DkimSigner",
    "DomainKey",
    "body_hash",
    "is_ours",
    "load_keys",
    "sign_file",
]

log = logging.getLogger("empath.delivery.dkim")

DEFAULT_HEADERS = DKIM_DEFAULT_HEADERS
# RFC 8301 §3.2: verifiers ignore signatures made with shorter RSA keys.
MIN_KEY_BITS = 1024
CHUNK_SIZE = 128 * 1024
# A header block bigger than this is not signed (no legitimate one comes close).
MAX_HEADER_BYTES = 1 << 20
# Signatures kept for retries and for the other domains of one attempt.
CACHE_SIZE = 1024
CANONICALIZATION = b"relaxed/relaxed"
ALGORITHM = b"rsa-sha256"

_TRAILING_WSP = re.compile(rb"[ \t]+\r\n")
_WSP = re.compile(rb"[ \t]+")


class DkimError(ValueError):
    """Key files that cannot be used; one line per problem, each naming its config key
    (``dkim[example.com].key /etc/empath/dkim/example.com.key: ...``)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class DomainKey:
    domain: str  # d=
    selector: str  # s=
    path: Path
    headers: tuple[str, ...]  # lower-case names to sign (and oversign)
    private: Mapping[str, int]  # dkimpy's parsed RSA key
    bits: int

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True, slots=True)
class DkimKeys:
    by_domain: Mapping[str, DomainKey]

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def for_domain(self, domain: str) -> DomainKey | None:
        """The key of ``domain`` or of its nearest configured parent."""
        labels = domain.split(".")
        for i in range(len(labels) - 1):
            key = self.by_domain.get(".".join(labels[i:]))
            if key is not None:
                return key
        return None


NO_KEYS = DkimKeys({})


def _load_one(domain: str, settings: Mapping[str, Any]) -> DomainKey:
    where = f"dkim[{domain}].key"
    path = Path(settings["key"])
    data = read_secret(path, where)
    if b"ENCRYPTED" in data:
        raise SecretFileError(f"{where} {path}: an encrypted key cannot be used unattended; "
                              "store it unencrypted, readable only by root and group empath")
    try:
        pk = parse_pem_private_key(data)
    except UnparsableKeyError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unparsable"
        raise SecretFileError(f"{where} {path}: not a PEM RSA private key "
                              f"(PKCS#1 or PKCS#8): {first}") from None
    except Exception as exc:  # dkimpy's ASN.1 parser has more ways to fail than it says
        raise SecretFileError(f"{where} {path}: not a PEM RSA private key: {exc}") from None
    bits = int(pk["modulus"]).bit_length()
    if bits < MIN_KEY_BITS:
        raise SecretFileError(f"{where} {path}: RSA key of {bits} bits; verifiers ignore "
                              f"keys under {MIN_KEY_BITS} bits (RFC 8301), use 2048")
    headers = tuple(h.lower() for h in settings.get("headers") or DEFAULT_HEADERS)
    return DomainKey(domain=domain, selector=str(settings["selector"]), path=path,
                     headers=headers, private=dict(pk), bits=bits)


def load_keys(cfg: Config) -> DkimKeys:
    """Read and check every configured key (at start and at each reload).

    Raises DkimError listing every unusable key file.
    """
    out: dict[str, DomainKey] = {}
    problems: list[str] = []
    for domain, settings in sorted(cfg.dkim.items()):
        try:
            out[domain] = _load_one(domain, settings)
        except SecretFileError as exc:
            problems.append(str(exc))
    if problems:
        raise DkimError(problems)
    return DkimKeys(out)


# ---- which messages ------------------------------------------------------------------


def is_ours(env: Envelope, cfg: Config) -> bool:
    """Mail we vouch for: from a client allowed to relay, or generated here (a DSN)."""
    if env.sender == "" and DSN_METADATA_KEY in env.metadata:
        return True
    if env.authenticated is not None:
        return True
    return in_networks(env.client_addr, cfg.relay_networks)


def from_domain(header_block: bytes) -> str | None:
    """The domain of the message's one ``From:`` mailbox; None when there is no
    ``From:``, more than one, or it holds other than one mailbox (RFC 5322 allows a
    list; DMARC cannot align it, so it is not signed)."""
    text = header_block.decode("utf-8", "surrogateescape")
    try:
        msg = email.parser.HeaderParser(policy=email.policy.default).parsestr(text)
        values = msg.get_all("From") or []
        if len(values) != 1:
            return None
        addresses = values[0].addresses
        if len(addresses) != 1 or not addresses[0].domain:
            return None
        return normalize_domain(addresses[0].domain)
    except (AddressError, ValueError, TypeError, AttributeError, IndexError):
        return None


# ---- signing ---------------------------------------------------------------------------


def _trailing_crlfs(data: bytes) -> int:
    """How many CRLF pairs ``data`` ends with."""
    n, end = 0, len(data)
    while end >= 2 and data[end - 2:end] == b"\r\n":
        n += 1
        end -= 2
    return n


class _RelaxedBody:
    """RFC 6376 §3.4.4 relaxed body canonicalisation into SHA-256, fed in pieces.

    Pieces are cut at line ends, so the whole-body substitutions (dkimpy's own) give
    the same result per piece; empty lines are held back until a non-empty line
    follows, because those at the end of the body are not hashed.
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.held_empty = 0
        self.rest = b""

    def feed(self, data: bytes) -> None:
        data = self.rest + data
        cut = data.rfind(b"\r\n") + 2
        if cut < 2:
            self.rest = data
            return
        self.rest = data[cut:]
        self._lines(data[:cut])

    def _lines(self, lines: bytes) -> None:
        c = _WSP.sub(b" ", _TRAILING_WSP.sub(b"\r\n", lines))
        n = _trailing_crlfs(c)
        if len(c) == 2 * n:  # only empty lines
            self.held_empty += n
            return
        if self.held_empty:
            self.hash.update(b"\r\n" * self.held_empty)
        self.hash.update(c[: len(c) - 2 * (n - 1)])
        self.held_empty = n - 1

    def digest(self) -> bytes:
        if self.rest:
            # A last line without CRLF gets one (RFC 6376 §3.4.4); the spool's do not
            # occur (DATA ends with CRLF), but a hand-made file may.
            rest, self.rest = self.rest, b""
            self._lines(rest + b"\r\n")
        return self.hash.digest()


def body_hash(f: Any, first: bytes = b"", chunk_size: int = CHUNK_SIZE) -> bytes:
    """The relaxed body hash of ``first`` followed by the rest of file ``f``."""
    body = _RelaxedBody()
    if first:
        body.feed(first)
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        body.feed(chunk)
    return body.digest()


def _read_header_block(f: Any, chunk_size: int) -> tuple[bytes, bytes] | None:
    """(header block up to and including the CRLF before the empty line, first part of
    the body already read); None if the headers exceed MAX_HEADER_BYTES."""
    data = b""
    while True:
        if data.startswith(b"\r\n"):
            return b"", data[2:]  # no header at all
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 2], data[end + 4:]
        if len(data) > MAX_HEADER_BYTES:
            return None
        chunk = f.read(chunk_size)
        if not chunk:
            return data, b""  # headers only, no body
        data += chunk


def _include_headers(headers: list[list[bytes]], names: tuple[str, ...]) -> list[bytes]:
    """h=: each listed name once per instance present, plus once (oversigned)."""
    present = collections.Counter(name.lower().rstrip() for name, _ in headers)
    out: list[bytes] = []
    for name in names:
        raw = name.encode("ascii")
        out += [raw] * (present[raw] + 1)
    return out


def sign_headers(header_block: bytes, bh: bytes, key: DomainKey,
                 now: float | None = None) -> bytes:
    """The ``DKIM-Signature:`` header field (folded, CRLF-terminated) for a message
    with this header block and relaxed body hash ``bh`` (raw digest)."""
    d = dkim.DKIM(header_block + b"\r\n", logger=log, linesep=b"\r\n")
    include = _include_headers(d.headers, key.headers)
    d.signature_algorithm = ALGORITHM
    d.hasher = dkim.HASH_ALGORITHMS[ALGORITHM]
    fields = [
        (b"v", b"1"),
        (b"a", ALGORITHM),
        (b"c", CANONICALIZATION),
        (b"d", key.domain.encode("ascii")),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(int(time.time() if now is None else now)).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(bh)),
        # dkimpy folds b= onto lines of its own; the placeholder makes room for it.
        (b"b", b"0" * 60),
    ]
    canon = CanonicalizationPolicy.from_c_value(CANONICALIZATION)
    value: bytes = d.gen_header(fields, include, canon, b"DKIM-Signature", key.private)
    return b"DKIM-Signature: " + value


@dataclass(frozen=True, slots=True)
class Signed:
    header: bytes  # b"" when not signed
    domain: str | None = None  # d=, when signed
    reason: str = ""  # why not signed
    problem: bool = False  # not signed although it might have been ours to sign


def sign_file(path: Path, keys: DkimKeys, chunk_size: int = CHUNK_SIZE,
              size: int | None = None) -> Signed:
    """Sign the message in ``path`` (its first ``size`` octets when given: a queue
    file) if its From: domain has a key. Raises OSError, and dkim.DKIMException for a
    header block dkimpy cannot parse."""
    with open_message(path, size) as f:
        split = _read_header_block(f, chunk_size)
        if split is None:
            return Signed(b"", reason=f"header block over {MAX_HEADER_BYTES} bytes",
                          problem=True)
        header_block, first = split
        domain = from_domain(header_block)
        if domain is None:
            return Signed(b"", reason="no single From: mailbox")
        key = keys.for_domain(domain)
        if key is None:
            return Signed(b"", reason=f"no key for {domain}")
        bh = body_hash(f, first, chunk_size)
    return Signed(sign_headers(header_block, bh, key), domain=key.domain)


class DkimSigner:
    """The keys in force, and signatures made with them (per message, cached)."""

    def __init__(self, keys: DkimKeys = NO_KEYS) -> None:
        self.keys = keys
        self._cache: collections.OrderedDict[str, asyncio.Task[bytes]] = (
            collections.OrderedDict())

    def use(self, keys: DkimKeys) -> None:
        """At start and after a reload: sign with these from the next message on."""
        self.keys = keys
        self._cache.clear()
        for key in keys.by_domain.values():
            log.info("dkim: signing mail from %s with selector %s (RSA %d bits, %s); "
                     "public key at %s TXT", key.domain, key.selector, key.bits, key.path,
                     key.dns_name)

    async def header(self, env: Envelope, data_path: Path, cfg: Config) -> bytes:
        """The DKIM-Signature header to send before ``env``'s data, or b""."""
        if not self.keys or not is_ours(env, cfg):
            return b""
        task = self._cache.get(env.id)
        if task is None:
            task = asyncio.ensure_future(self._sign(env.id, data_path, env.size, self.keys))
            self._cache[env.id] = task
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(env.id)
        # shield: one domain's delivery being cancelled must not cancel the others'.
        return await asyncio.shield(task)

    async def _sign(self, id: str, data_path: Path, size: int, keys: DkimKeys) -> bytes:
        try:
            signed = await asyncio.to_thread(sign_file, data_path, keys, CHUNK_SIZE, size)
        except Exception as exc:
            # Unsigned beats stuck: a message whose header dkimpy cannot handle would
            # fail the same way at every retry until it bounced for lateness.
            if self._cache.get(id) is asyncio.current_task():
                del self._cache[id]  # try again at the next attempt
            metrics.inc("empath_dkim_signatures_total", ("error",))
            log.warning("dkim: cannot sign id=%s, sending it unsigned: %s: %s", id,
                        type(exc).__name__, exc, extra={"QUEUE_ID": id})
            return b""
        if signed.header:
            metrics.inc("empath_dkim_signatures_total", ("signed",))
            log.debug("dkim: signed id=%s d=%s", id, signed.domain, extra={"QUEUE_ID": id})
        elif signed.problem:
            metrics.inc("empath_dkim_signatures_total", ("error",))
            log.warning("dkim: not signing id=%s: %s", id, signed.reason,
                        extra={"QUEUE_ID": id})
        else:
            log.debug("dkim: not signing id=%s: %s", id, signed.reason, extra={"QUEUE_ID": id})
        return signed.header
