"""The module API: the types a module author uses (docs/modules.md is the guide).

A module is an object made by a factory — usually its class — called as
``factory(options, env)`` with the ``options`` mapping from the config and a
``ModuleEnv``. It defines any of these coroutine methods; the ones it leaves out
are not called:

- SMTP hooks, in the worker that serves the session, each returning ``None`` or
  ``ACCEPT`` (go on), ``Reject(code, enhanced, text)`` or ``Tempfail(...)``:
  ``on_connect(ctx: ConnectContext)``, ``on_helo(ctx: HeloContext)``,
  ``on_mail(ctx: MailContext)``, ``on_rcpt(ctx: RcptContext)``,
  ``on_data(ctx: DataContext)``.
- Events, in the supervisor's queue manager, with the message's persisted context;
  their return value is ignored: ``on_received``, ``on_delivery_attempt``,
  ``on_delivered``, ``on_deferred``, ``on_bounced``, ``on_expired`` (each takes an
  ``Event``).
- ``close()``, when the instance is replaced (reload) or the process stops.

Only names from this file (``empath.modules.api``, also re-exported by
``empath.modules``) are the API; everything else in empath may change.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

__all__ = [
    "ACCEPT",
    "EVENTS",
    "HOOKS",
    "Accept",
    "ConnectContext",
    "DataContext",
    "DeliveryResult",
    "Event",
    "Headers",
    "HeloContext",
    "MailContext",
    "Module",
    "ModuleEnv",
    "ModuleOptionError",
    "RcptContext",
    "RecipientInfo",
    "Reject",
    "SessionInfo",
    "Tempfail",
    "Verdict",
]

HOOKS = ("connect", "helo", "mail", "rcpt", "data")
EVENTS = ("received", "delivery_attempt", "delivered", "deferred", "bounced", "expired")

# Reply text: one line, printable, short enough that "550 5.7.1 " + text stays well
# inside the 512 octets of a reply line (RFC 5321 §4.5.3.1.5).
MAX_TEXT = 400
# A header field added by a module: name and value on one line of at most 998
# octets (RFC 5322 §2.1.1); all headers a message gets from modules together.
MAX_HEADER_LINE = 998
MAX_ADDED_HEADERS = 32 * 1024
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # printable US-ASCII except ":" (RFC 5322 §3.6.8)
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")


class ModuleOptionError(ValueError):
    """Raised by a factory for bad options: the config error names
    ``modules[i].options`` (``.key`` when ``key`` is given)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _check_reply(kind: str, code: int, enhanced: str, text: str, klass: str) -> None:
    if type(code) is not int or not (int(klass) * 100 <= code <= int(klass) * 100 + 99):
        raise ValueError(f"{kind}: code must be {klass}xx, got {code!r}")
    m = _ENHANCED.fullmatch(enhanced) if isinstance(enhanced, str) else None
    if m is None or m.group(1) != klass:
        raise ValueError(f"{kind}: enhanced status must be {klass}.x.y, got {enhanced!r}")
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT or not text.isprintable():
        raise ValueError(f"{kind}: text must be one printable line of 1 to {MAX_TEXT} "
                         f"characters, got {text!r}")


@dataclass(frozen=True, slots=True)
class Accept:
    """Go on: the next module is asked, and if none objects the command is accepted.
    Returning ``None`` means the same."""


ACCEPT = Accept()


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse with a permanent 5xx reply: ``Reject(550, "5.7.1", "Go away")``."""

    code: int = 550
    enhanced: str = "5.7.1"
    text: str = "Rejected by policy"

    def __post_init__(self) -> None:
        _check_reply("Reject", self.code, self.enhanced, self.text, "5")

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True, slots=True)
class Tempfail:
    """Refuse for now with a 4xx reply: the client keeps the message and retries."""

    code: int = 451
    enhanced: str = "4.7.1"
    text: str = "Try again later"

    def __post_init__(self) -> None:
        _check_reply("Tempfail", self.code, self.enhanced, self.text, "4")

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


Verdict = Accept | Reject | Tempfail | None


@dataclass(frozen=True, slots=True)
class ModuleEnv:
    """What a factory learns about where its module runs."""

    name: str  # the module's ``name`` as the config gives it
    hostname: str  # our ``hostname``
    postmaster: str
    local_domains: frozenset[str]  # lower-case A-labels
    # "check": built only to validate the options (config load, check-config, the
    # reload's validation), then dropped; "worker": SMTP hooks; "supervisor": events.
    role: Literal["check", "worker", "supervisor"]
    log: logging.Logger  # "empath.module.<name>"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """The SMTP session a hook is called for, as it is at that moment."""

    client_addr: str
    client_port: int
    role: str  # listener role: "smtp" | "submission"
    listener: str  # our address:port
    helo: str | None  # the HELO/EHLO name, once given
    tls: bool
    tls_version: str | None
    authenticated: str | None  # the AUTH identity, if any


class Headers:
    """The message's header fields in order, unfolded, as (name, value) pairs.

    Names keep their spelling; ``get`` and ``get_all`` compare them without case.
    Values are decoded as UTF-8 (undecodable bytes as surrogate escapes)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field called ``name``."""
        key = name.lower()
        return next((v for n, v in self._fields if n.lower() == key), default)

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._fields if n.lower() == key]


def _header_line(name: str, value: str) -> bytes:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"add_header: {name!r} is not a header field name")
    if not isinstance(value, str) or not value.isascii() or "\r" in value or "\n" in value:
        raise ValueError(f"add_header: the value of {name} must be ASCII on one line "
                         "(encode other text as RFC 2047 words)")
    line = f"{name}: {value}"
    if len(line) > MAX_HEADER_LINE:
        raise ValueError(f"add_header: {name} is longer than {MAX_HEADER_LINE} octets")
    return line.encode("ascii") + b"\r\n"


@dataclass(eq=False)
class _Stage:
    module: str  # this module's name
    session: SessionInfo
    # This module's metadata for the message: JSON values only, at most
    # METADATA_MAX bytes as JSON. Set at connect or HELO it starts every transaction
    # of the session; set at MAIL, RCPT or DATA it belongs to the one message.
    # Persisted with the message and handed back in every Event.
    metadata: dict[str, Any]
    _headers: list[bytes] = field(default_factory=list, repr=False)

    def add_header(self, name: str, value: str) -> None:
        """Add ``name: value`` to the message (to every message of the session when
        called at connect or HELO). Placed right after our Received: header; kept
        only if this call of the hook succeeds."""
        self._headers.append(_header_line(name, value))


@dataclass(eq=False)
class ConnectContext(_Stage):
    pass


@dataclass(eq=False)
class HeloContext(_Stage):
    helo: str = ""  # the name the client gave
    esmtp: bool = False  # EHLO rather than HELO


@dataclass(eq=False)
class MailContext(_Stage):
    sender: str = ""  # "" for the null sender <>
    body: str = "7BIT"  # 7BIT | 8BITMIME
    size: int | None = None  # the SIZE= the client declared
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 RET
    envid: str | None = None  # RFC 3461 ENVID (xtext)


@dataclass(eq=False)
class RcptContext(_Stage):
    sender: str = ""
    recipient: str = ""  # local@domain, domain normalised
    recipients: tuple[str, ...] = ()  # accepted so far in this transaction
    local_domain: bool = False  # the domain is one of local_domains
    postmaster: bool = False  # <postmaster> or postmaster@ a local domain


@dataclass(eq=False)
class DataContext(_Stage):
    sender: str = ""
    recipients: tuple[str, ...] = ()
    size: int = 0  # bytes of the message as spooled (with our Received: header)
    headers: Headers = field(default_factory=lambda: Headers([]))
    _path: str = field(default="", repr=False)
    _body_offset: int = field(default=0, repr=False)
    _files: list[IO[bytes]] = field(default_factory=list, repr=False)
    _hold: str | None = field(default=None, repr=False)

    def open_message(self) -> IO[bytes]:
        """The whole message as it is spooled, from our Received: header on.

        A regular file: read it with ``asyncio.to_thread`` when it may be big. It is
        closed for you when the hook returns."""
        f = open(self._path, "rb")  # noqa: SIM115 - closed by the runner
        self._files.append(f)
        return f

    def open_body(self) -> IO[bytes]:
        """The message from the first byte after the empty line that ends the header."""
        f = self.open_message()
        f.seek(self._body_offset)
        return f

    def hold(self, reason: str) -> None:
        """Queue the message held: it is kept, not delivered, until ``empathctl
        queue release``. The client gets the normal 250."""
        if not isinstance(reason, str) or not reason.isprintable() or len(reason) > MAX_TEXT:
            raise ValueError("hold: reason must be one printable line")
        self._hold = reason

    @property
    def held(self) -> bool:
        return self._hold is not None


@dataclass(frozen=True, slots=True)
class RecipientInfo:
    address: str
    state: str  # pending | deferred | delivered | bounced (as recorded)
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status: str  # delivered | deferred | bounced
    enhanced: str  # RFC 3463, e.g. "2.0.0"
    diagnostic: str  # "smtp; 250 2.0.0 Ok" or "X-Empath; text"
    remote_mta: str | None
    tls: str | None


@dataclass(frozen=True, slots=True)
class Event:
    """A queue event about one message, with its context as the spool holds it."""

    kind: str  # one of EVENTS
    queue_id: str
    sender: str
    recipients: tuple[RecipientInfo, ...]
    received_at: float  # Unix time
    client_addr: str
    helo: str
    authenticated: str | None
    size: int
    held: bool
    # This module's metadata as persisted when the message was received (a copy).
    metadata: Mapping[str, Any]
    # delivered, deferred, bounced, expired: the recipient and its result.
    recipient: str | None = None
    result: DeliveryResult | None = None
    # delivery_attempt: the recipients about to be tried.
    due: tuple[str, ...] = ()


class Module:
    """An optional base class: subclass it and override the methods you need.
    The defaults are never called (the runner skips them)."""

    def __init__(self, options: Mapping[str, Any], env: ModuleEnv) -> None:
        self.options = options
        self.env = env

    async def on_connect(self, ctx: ConnectContext) -> Verdict:
        return None

    async def on_helo(self, ctx: HeloContext) -> Verdict:
        return None

    async def on_mail(self, ctx: MailContext) -> Verdict:
        return None

    async def on_rcpt(self, ctx: RcptContext) -> Verdict:
        return None

    async def on_data(self, ctx: DataContext) -> Verdict:
        return None

    async def on_received(self, event: Event) -> None:
        return None

    async def on_delivery_attempt(self, event: Event) -> None:
        return None

    async def on_delivered(self, event: Event) -> None:
        return None

    async def on_deferred(self, event: Event) -> None:
        return None

    async def on_bounced(self, event: Event) -> None:
        return None

    async def on_expired(self, event: Event) -> None:
        return None

    async def close(self) -> None:
        return None
