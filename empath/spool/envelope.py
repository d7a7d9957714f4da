"""The envelope record: everything about a queued message except its bytes.

Stored as JSON in ``queue/<id>.env``. It is read back after crashes, possibly
truncated or garbled, so ``from_bytes`` checks every field's type and value and
reports any problem as ``CorruptEnvelope``, never as some other exception.

``to_bytes`` refuses anything ``from_bytes`` would refuse (it reads its own output
back): an envelope that could be committed but not loaded again would turn into a
quarantined message — lost mail — at the next restart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from empath.spool.ids import is_message_id

__all__ = [
    "BODY_TYPES",
    "ENVELOPE_VERSION",
    "NOTIFY_VALUES",
    "RECIPIENT_STATES",
    "RET_VALUES",
    "CorruptEnvelope",
    "Envelope",
    "Recipient",
]

ENVELOPE_VERSION = 1
RECIPIENT_STATES = frozenset({"pending", "deferred", "delivered", "bounced"})
BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 §4.1
RET_VALUES = frozenset({"FULL", "HDRS"})  # RFC 3461 §4.3


class CorruptEnvelope(ValueError):
    """An envelope record that cannot be trusted; the text says why."""


@dataclass
class Recipient:
    address: str  # local@domain (domain normalised)
    state: str = "pending"  # pending | deferred | delivered | bounced
    orcpt: str | None = None  # RFC 3461 ORCPT
    notify: tuple[str, ...] | None = None  # RFC 3461 NOTIFY values
    attempts: int = 0
    next_attempt: float | None = None
    last_error: str | None = None

    def _to_obj(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "state": self.state,
            "orcpt": self.orcpt,
            "notify": list(self.notify) if self.notify is not None else None,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
        }

    @classmethod
    def _from_obj(cls, obj: object, where: str) -> Recipient:
        r = _Fields(obj, where, _RECIPIENT_KEYS)
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
        return cls(
            address=address,
            state=r.choice("state", RECIPIENT_STATES),
            orcpt=r.opt_string("orcpt"),
            notify=notify,
            attempts=r.count("attempts"),
            next_attempt=r.opt_time("next_attempt"),
            last_error=r.opt_string("last_error"),
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
    size: int = 0  # bytes of the .msg file
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
            data = json.dumps(
                obj, ensure_ascii=True, allow_nan=False, sort_keys=True, separators=(",", ":")
            ).encode("ascii")
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
            obj = json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, RecursionError, TypeError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and the int
            # digit limit; RecursionError is a deeply nested document.
            raise CorruptEnvelope(f"not valid JSON: {exc}") from None
        f = _Fields(obj, "envelope", _ENVELOPE_KEYS)
        version = f.get("version")
        if type(version) is not int or version != ENVELOPE_VERSION:
            raise CorruptEnvelope(f"unsupported version {version!r}")
        id = f.string("id")
        if not is_message_id(id):
            raise CorruptEnvelope(f"id: not a message id: {id!r}")
        recipients_raw = f.array("recipients")
        recipients = [
            Recipient._from_obj(r, f"recipients[{i}]") for i, r in enumerate(recipients_raw)
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


_RECIPIENT_KEYS = frozenset(
    {"address", "state", "orcpt", "notify", "attempts", "next_attempt", "last_error"}
)
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


class _Fields:
    """Typed access to a JSON object's members: exact key set, strict types.

    ``bool`` is a subclass of ``int`` in Python, so integer fields check
    ``type(v) is int`` rather than isinstance, and vice versa.
    """

    def __init__(self, obj: object, where: str, keys: frozenset[str]) -> None:
        if not isinstance(obj, dict):
            raise CorruptEnvelope(f"{where}: not an object")
        missing = keys - obj.keys()
        if missing:
            raise CorruptEnvelope(f"{where}: missing {', '.join(sorted(missing))}")
        unknown = obj.keys() - keys
        if unknown:
            # A newer writer bumps the version; unknown keys in version 1 mean damage.
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

    def boolean(self, key: str) -> bool:
        v = self._obj[key]
        if type(v) is not bool:
            raise self._bad(key, "a boolean")
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
