"""The envelope record: everything about a queued message except its bytes.

Stored as one JSON line after the data in ``queue/<id>.msg``, and in
``queue/<id>.env`` once delivery has changed it. It is read back after crashes, possibly
truncated or garbled, so ``from_bytes`` checks every field's type and value and
reports any problem as ``CorruptEnvelope``, never as some other exception.

``to_bytes`` refuses anything ``from_bytes`` would refuse (it reads its own output
back): an envelope that could be committed but not loaded again would turn into a
quarantined message — lost mail — at the next restart.

Versions: 2 adds each recipient's ``history``, its last ``HISTORY_LIMIT`` delivery
attempts (oldest first), so an admin can see why a message is stuck. Version 1
records (written before the upgrade) still load, with an empty history, and are
written back as version 2 on their next update; every record written is version 2.
The record is rewritten after every attempt, so each entry is bounded: its text
fields are cut to ``HISTORY_TEXT_MAX`` / ``HISTORY_FIELD_MAX`` characters.

An attempt's ``dnssec`` (whether the MX routing rested on DNSSEC-authenticated
answers, docs/dnssec.md) is an optional member of a version-2 entry: written only
when it is true or false, so entries recorded before it existed, and every entry of
a queue that never routes by MX, are exactly as before (and stay readable by the
previous release); absent, it loads as None.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from empath.spool.ids import is_message_id

__all__ = [
    "ATTEMPT_STATUSES",
    "BODY_TYPES",
    "ENVELOPE_VERSION",
    "HISTORY_FIELD_MAX",
    "HISTORY_LIMIT",
    "HISTORY_TEXT_MAX",
    "NOTIFY_VALUES",
    "RECIPIENT_STATES",
    "RET_VALUES",
    "Attempt",
    "CorruptEnvelope",
    "Envelope",
    "Recipient",
]

ENVELOPE_VERSION = 2
# Versions from_bytes reads; older ones are upgraded in memory (written as the current).
READABLE_VERSIONS = frozenset({1, 2})
RECIPIENT_STATES = frozenset({"pending", "deferred", "delivered", "bounced"})
BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 §4.1
RET_VALUES = frozenset({"FULL", "HDRS"})  # RFC 3461 §4.3
ATTEMPT_STATUSES = frozenset({"delivered", "deferred", "bounced"})
# Attempts kept per recipient (oldest dropped first).
HISTORY_LIMIT = 10
# Characters kept of an attempt's diagnostic, and of its relay and tls strings.
HISTORY_TEXT_MAX = 500
HISTORY_FIELD_MAX = 255
_TRUNCATED = "..."
# RFC 3463 status code; [0-9], not \d, which also matches non-ASCII digits.
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


class CorruptEnvelope(ValueError):
    """An envelope record that cannot be trusted; the text says why."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt for one recipient, as kept in its ``history``.

    Build entries with ``Attempt.make`` (which bounds and cleans every field); the
    constructor takes values as they are and ``to_bytes`` refuses invalid ones.
    """

    at: float  # unix time the result was known
    status: str  # delivered | deferred | bounced
    enhanced: str  # RFC 3463, e.g. "4.4.1"
    diagnostic: str  # "smtp; 451 4.7.1 text" or "X-Empath; text" (RFC 3464 style)
    relay: str | None = None  # the remote MTA that answered, if any
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", None for plain text
    # MX answers (and addresses) DNSSEC-authenticated; None: not MX routing, or unknown
    dnssec: bool | None = None

    @classmethod
    def make(
        cls, at: float, status: str, enhanced: str, diagnostic: str,
        relay: str | None = None, tls: str | None = None, dnssec: bool | None = None,
    ) -> Attempt:
        """An entry that is sure to serialise: cut to size, rounded to the millisecond,
        and with a malformed status code replaced by the one its class implies."""
        if status not in ATTEMPT_STATUSES:
            raise ValueError(f"attempt status {status!r} not one of {sorted(ATTEMPT_STATUSES)}")
        if not _ENHANCED.fullmatch(enhanced):
            enhanced = {"delivered": "2.0.0", "deferred": "4.0.0", "bounced": "5.0.0"}[status]
        return cls(
            at=round(float(at), 3),
            status=status,
            enhanced=enhanced,
            diagnostic=_cut(diagnostic, HISTORY_TEXT_MAX),
            relay=_cut(relay, HISTORY_FIELD_MAX) if relay is not None else None,
            tls=_cut(tls, HISTORY_FIELD_MAX) if tls is not None else None,
            dnssec=None if dnssec is None else bool(dnssec),
        )

    def _to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "at": self.at,
            "status": self.status,
            "enhanced": self.enhanced,
            "diagnostic": self.diagnostic,
            "relay": self.relay,
            "tls": self.tls,
        }
        if self.dnssec is not None:
            obj["dnssec"] = self.dnssec
        return obj

    @classmethod
    def _from_obj(cls, obj: object, where: str, memo: dict[str, str]) -> Attempt:
        # Recovery and ``queue list`` parse every entry of every record: the common
        # case (a well-formed entry) is checked inline, exactly as strictly as the
        # general path below, which is taken for anything unusual and says what is
        # wrong. ``memo`` shares equal strings between the entries of one record
        # (the same error, relay and TLS every time), so a loaded envelope holds one
        # copy of each.
        if type(obj) is dict and (obj.keys() == _ATTEMPT_KEYS
                                  or obj.keys() == _ATTEMPT_KEYS_DNSSEC):
            at, status, enhanced = obj["at"], obj["status"], obj["enhanced"]
            diagnostic, relay, tls = obj["diagnostic"], obj["relay"], obj["tls"]
            dnssec = obj.get("dnssec")
            if (
                type(at) is float and math.isfinite(at)
                and type(status) is str and status in ATTEMPT_STATUSES
                and type(enhanced) is str and _ENHANCED.fullmatch(enhanced)
                and type(diagnostic) is str and len(diagnostic) <= HISTORY_TEXT_MAX
                and (relay is None or (type(relay) is str and len(relay) <= HISTORY_FIELD_MAX))
                and (tls is None or (type(tls) is str and len(tls) <= HISTORY_FIELD_MAX))
                and (dnssec is None or type(dnssec) is bool)
            ):
                m = memo.setdefault
                return cls(
                    at=at, status=m(status, status), enhanced=m(enhanced, enhanced),
                    diagnostic=m(diagnostic, diagnostic),
                    relay=None if relay is None else m(relay, relay),
                    tls=None if tls is None else m(tls, tls),
                    dnssec=dnssec,
                )
        optional = isinstance(obj, dict) and "dnssec" in obj
        a = _Fields(obj, where, _ATTEMPT_KEYS_DNSSEC if optional else _ATTEMPT_KEYS)
        at_ = a.opt_time("at")
        if at_ is None:
            raise CorruptEnvelope(f"{where}.at: null")
        enhanced_ = a.string("enhanced")
        if not _ENHANCED.fullmatch(enhanced_):
            raise CorruptEnvelope(f"{where}.enhanced: not an RFC 3463 status code")
        status_ = a.choice("status", ATTEMPT_STATUSES)
        diagnostic_ = a.bounded_string("diagnostic", HISTORY_TEXT_MAX)
        relay_ = a.opt_bounded_string("relay", HISTORY_FIELD_MAX)
        tls_ = a.opt_bounded_string("tls", HISTORY_FIELD_MAX)
        dnssec_ = a.opt_boolean("dnssec") if optional else None
        m = memo.setdefault
        return cls(
            at=at_, status=m(status_, status_), enhanced=m(enhanced_, enhanced_),
            diagnostic=m(diagnostic_, diagnostic_),
            relay=None if relay_ is None else m(relay_, relay_),
            tls=None if tls_ is None else m(tls_, tls_),
            dnssec=dnssec_,
        )


@dataclass
class Recipient:
    address: str  # local@domain (domain normalised)
    state: str = "pending"  # pending | deferred | delivered | bounced
    orcpt: str | None = None  # RFC 3461 ORCPT
    notify: tuple[str, ...] | None = None  # RFC 3461 NOTIFY values
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str | None = None
    # The last HISTORY_LIMIT attempts, oldest first (empty for version-1 records).
    history: list[Attempt] = field(default_factory=list)

    def record(self, attempt: Attempt) -> None:
        """Append ``attempt`` to the history, dropping the oldest beyond the limit."""
        self.history.append(attempt)
        del self.history[:-HISTORY_LIMIT]

    def _to_obj(self) -> dict[str, Any]:
        if not isinstance(self.history, list):
            raise ValueError(f"{self.address}: history: not a list")
        return {
            "address": self.address,
            "state": self.state,
            "orcpt": self.orcpt,
            "notify": list(self.notify) if self.notify is not None else None,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "history": [a._to_obj() if isinstance(a, Attempt) else a for a in self.history],
        }

    @classmethod
    def _from_obj(cls, obj: object, where: str, version: int,
                  memo: dict[str, str]) -> Recipient:
        r = _Fields(obj, where, _RECIPIENT_KEYS_V1 if version == 1 else _RECIPIENT_KEYS)
        address = r.string("address")
        if not address:
            raise CorruptEnvelope(f"{where}.address: empty")
        notify_list = r.opt_array("notify")
        notify: tuple[str, ...] | None = None
        if notify_list is not None:
            values: list[str] = []
            for i, v in enumerate(notify_list):
                if not isinstance(v, str) or v not in NOTIFY_VALUES:
                    allowed = sorted(NOTIFY_VALUES)
                    raise CorruptEnvelope(f"{where}.notify[{i}]: not one of {allowed}")
                values.append(v)
            notify = tuple(values)
        history: list[Attempt] = []
        if version >= 2:
            history_raw = r.array("history")
            if len(history_raw) > HISTORY_LIMIT:
                raise CorruptEnvelope(
                    f"{where}.history: {len(history_raw)} entries, more than {HISTORY_LIMIT}")
            history = [Attempt._from_obj(a, f"{where}.history[{i}]", memo)
                       for i, a in enumerate(history_raw)]
        return cls(
            address=address,
            state=r.choice("state", RECIPIENT_STATES),
            orcpt=r.opt_string("orcpt"),
            notify=notify,
            attempts=r.count("attempts"),
            next_attempt=r.opt_time("next_attempt"),
            last_error=r.opt_string("last_error"),
            history=history,
        )


@dataclass
class Envelope:
    id: str
    sender: str  # "" for the null sender <>
    recipients: list[Recipient]
    received_at: float  # unix time
    client_addr: str
    client_port: int
    helo: str
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    authenticated: str | None = None
    size: int = 0  # octets of message data (the start of the .msg file)
    body: str = "7BIT"  # 7BIT | 8BITMIME
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 RET
    envid: str | None = None  # RFC 3461 ENVID
    held: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form, for modules

    def to_bytes(self) -> bytes:
        """Serialise as JSON. Raises ValueError if the envelope would not load back."""
        if not isinstance(self.recipients, list):
            raise ValueError("recipients: not a list")
        obj = {
            "version": ENVELOPE_VERSION,
            "id": self.id,
            "sender": self.sender,
            "recipients": [r._to_obj() if isinstance(r, Recipient) else r for r in self.recipients],
            "received_at": self.received_at,
            "client_addr": self.client_addr,
            "client_port": self.client_port,
            "helo": self.helo,
            "tls": self.tls,
            "authenticated": self.authenticated,
            "size": self.size,
            "body": self.body,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
            "held": self.held,
            "metadata": self.metadata,
        }
        try:
            # ASCII output: lone surrogates (from surrogateescape'd input) stay
            # representable, and the file is plain text for an admin's `cat`.
            data = _ENCODE(obj).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"envelope not serialisable: {exc}") from None
        try:
            Envelope.from_bytes(data)
        except CorruptEnvelope as exc:
            raise ValueError(f"invalid envelope: {exc}") from None
        return data + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse a record written by ``to_bytes``; CorruptEnvelope on anything else."""
        try:
            # Records are ASCII (to_bytes); anything else fails here as not UTF-8.
            obj = _DECODE(data.decode("utf-8"))
        except (ValueError, RecursionError, TypeError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and the int
            # digit limit; RecursionError is a deeply nested document.
            raise CorruptEnvelope(f"not valid JSON: {exc}") from None
        f = _Fields(obj, "envelope", _ENVELOPE_KEYS)
        version = f.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise CorruptEnvelope(f"unsupported version {version!r}")
        id = f.string("id")
        if not is_message_id(id):
            raise CorruptEnvelope(f"id: not a message id: {id!r}")
        recipients_raw = f.array("recipients")
        memo: dict[str, str] = {}
        recipients = [
            Recipient._from_obj(r, f"recipients[{i}]", version, memo)
            for i, r in enumerate(recipients_raw)
        ]
        client_port = f.count("client_port")
        if client_port > 65535:
            raise CorruptEnvelope(f"client_port: out of range: {client_port}")
        ret = f.get("ret")
        if ret is not None and (not isinstance(ret, str) or ret not in RET_VALUES):
            raise CorruptEnvelope(f"ret: not one of {sorted(RET_VALUES)} or null")
        metadata = f.get("metadata")
        if not isinstance(metadata, dict):
            raise CorruptEnvelope("metadata: not an object")
        received_at = f.opt_time("received_at")
        if received_at is None:
            raise CorruptEnvelope("received_at: null")
        return cls(
            id=id,
            sender=f.string("sender"),
            recipients=recipients,
            received_at=received_at,
            client_addr=f.string("client_addr"),
            client_port=client_port,
            helo=f.string("helo"),
            tls=f.opt_string("tls"),
            authenticated=f.opt_string("authenticated"),
            size=f.count("size"),
            body=f.choice("body", BODY_TYPES),
            smtputf8=f.boolean("smtputf8"),
            ret=ret,
            envid=f.opt_string("envid"),
            held=f.boolean("held"),
            metadata=metadata,
        )


_RECIPIENT_KEYS_V1 = frozenset(
    {"address", "state", "orcpt", "notify", "attempts", "next_attempt", "last_error"}
)
_RECIPIENT_KEYS = _RECIPIENT_KEYS_V1 | {"history"}
_ATTEMPT_KEYS = frozenset({"at", "status", "enhanced", "diagnostic", "relay", "tls"})
_ATTEMPT_KEYS_DNSSEC = _ATTEMPT_KEYS | {"dnssec"}
_ENVELOPE_KEYS = frozenset(
    {
        "version",
        "id",
        "sender",
        "recipients",
        "received_at",
        "client_addr",
        "client_port",
        "helo",
        "tls",
        "authenticated",
        "size",
        "body",
        "smtputf8",
        "ret",
        "envid",
        "held",
        "metadata",
    }
)


def _refuse_constant(name: str) -> Any:
    # json accepts NaN/Infinity by default; no field may hold them.
    raise ValueError(f"non-finite number {name}")


# One decoder and one encoder for every record: json.loads and json.dumps with options
# build a new one per call, and recovery reads every envelope in the spool.
_DECODE = json.JSONDecoder(parse_constant=_refuse_constant).decode
_ENCODE = json.JSONEncoder(ensure_ascii=True, allow_nan=False, sort_keys=True,
                           separators=(",", ":")).encode


class _Fields:
    """Typed access to a JSON object's members: exact key set, strict types.

    ``bool`` is a subclass of ``int`` in Python, so integer fields check
    ``type(v) is int`` rather than isinstance, and vice versa.
    """

    def __init__(self, obj: object, where: str, keys: frozenset[str]) -> None:
        if not isinstance(obj, dict):
            raise CorruptEnvelope(f"{where}: not an object")
        if obj.keys() != keys:  # one comparison in C; the sets only to say what is wrong
            missing = keys - obj.keys()
            if missing:
                raise CorruptEnvelope(f"{where}: missing {', '.join(sorted(missing))}")
            # A newer writer bumps the version; unknown keys in a known version mean damage.
            unknown = obj.keys() - keys
            raise CorruptEnvelope(f"{where}: unknown {', '.join(sorted(map(str, unknown)))}")
        self._obj: dict[str, object] = obj
        self._where = where

    def _bad(self, key: str, what: str) -> CorruptEnvelope:
        return CorruptEnvelope(f"{self._where}.{key}: not {what}")

    def get(self, key: str) -> object:
        return self._obj[key]

    def string(self, key: str) -> str:
        v = self._obj[key]
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def opt_string(self, key: str) -> str | None:
        v = self._obj[key]
        if v is not None and not isinstance(v, str):
            raise self._bad(key, "a string or null")
        return v

    def bounded_string(self, key: str, limit: int) -> str:
        v = self.string(key)
        if len(v) > limit:
            raise CorruptEnvelope(f"{self._where}.{key}: longer than {limit} characters")
        return v

    def opt_bounded_string(self, key: str, limit: int) -> str | None:
        v = self.opt_string(key)
        if v is not None and len(v) > limit:
            raise CorruptEnvelope(f"{self._where}.{key}: longer than {limit} characters")
        return v

    def boolean(self, key: str) -> bool:
        v = self._obj[key]
        if type(v) is not bool:
            raise self._bad(key, "a boolean")
        return v

    def opt_boolean(self, key: str) -> bool | None:
        v = self._obj[key]
        if v is not None and type(v) is not bool:
            raise self._bad(key, "a boolean or null")
        return v

    def count(self, key: str) -> int:
        v = self._obj[key]
        if type(v) is not int or v < 0:
            raise self._bad(key, "a non-negative integer")
        return v

    def opt_time(self, key: str) -> float | None:
        v = self._obj[key]
        if v is None:
            return None
        if type(v) not in (int, float):
            raise self._bad(key, "a number or null")
        try:
            t = float(v)  # type: ignore[arg-type]
        except OverflowError:  # an int too large for a float
            raise self._bad(key, "a finite number") from None
        if not math.isfinite(t):
            raise self._bad(key, "a finite number")
        return t

    def array(self, key: str) -> list[object]:
        v = self._obj[key]
        if not isinstance(v, list):
            raise self._bad(key, "a list")
        return v

    def opt_array(self, key: str) -> list[object] | None:
        v = self._obj[key]
        if v is not None and not isinstance(v, list):
            raise self._bad(key, "a list or null")
        return v

    def choice(self, key: str, allowed: frozenset[str]) -> str:
        v = self._obj[key]
        if not isinstance(v, str) or v not in allowed:
            raise self._bad(key, f"one of {sorted(allowed)}")
        return v
