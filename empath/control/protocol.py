"""The control protocol: versioned, length-limited JSON lines over a Unix stream socket.

One request is one line of UTF-8 JSON, at most ``MAX_REQUEST`` bytes before its
newline::

    {"v": 1, "cmd": "queue.list", "args": {"status": "deferred"}, "token": "..."}

``args`` and ``token`` may be left out. The daemon answers each request with one
line::

    {"v": 1, "ok": true, "result": ...}
    {"v": 1, "ok": false, "error": "text for a human", "code": "not-found"}

An error may carry ``detail`` (for example the errors of a refused reload). A
streaming command (``queue.stats`` with ``watch``, ``queue.list`` with ``stream``)
answers with a sequence of ``{"v": 1, "ok": true, "result": ..., "more": true}``
lines, then a last ``{"v": 1, "ok": true, "result": null}`` when it is over
(``watch`` without ``count`` runs until the client closes the connection).
Several requests may follow each other on one connection; each is answered
before the next is read.

This module is shared by the daemon and by ``empathctl`` and imports nothing of
the daemon, so the client starts fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Final

__all__ = [
    "CODES",
    "MAX_LIST",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "PROTOCOL_VERSION",
    "LineReader",
    "LineTooLong",
    "ProtocolError",
    "Request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
    "parse_request",
]

PROTOCOL_VERSION: Final = 1
# A request line, without its newline. Requests are small (a command, an id, a next
# hop); a line this long is a mistake or an attack, never a real command.
MAX_REQUEST: Final = 64 * 1024
# What the client accepts as one response line. The daemon never comes near it:
# a long queue listing is streamed in pages (``queue.list`` with ``stream``), and a
# non-streamed one is refused ("too-large") beyond ``MAX_LIST`` messages.
MAX_RESPONSE: Final = 512 * 1024 * 1024
# Messages in one non-streamed ``queue.list`` answer, at most.
MAX_LIST: Final = 10_000

# Error codes a response can carry (``code``), and what they mean.
CODES: Final = {
    "bad-request": "the request is not valid JSON or lacks / mistypes a field",
    "too-large": f"the request line is longer than {MAX_REQUEST} bytes, or the answer "
                 "would be too large for one response (ask for pages or a stream)",
    "unsupported-version": "the request's protocol version is not spoken here",
    "unknown-command": "no such command",
    "forbidden": "the connecting user may not use the control socket",
    "unauthorized": "a token is required, or the token given is wrong",
    "not-found": "no such message, route or entry",
    "conflict": "the message is being delivered right now",
    "refused": "the daemon refused the change (for example an invalid configuration)",
    "unavailable": "the daemon does not offer this (yet)",
    "busy": "too many control connections at once",
    "timeout": "the request was not received in time",
    "internal": "the daemon failed unexpectedly; see its log",
}

_REQUEST_KEYS = frozenset({"v", "cmd", "args", "token"})


class ProtocolError(Exception):
    """A request that cannot be served; ``code`` is one of ``CODES``."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class LineTooLong(ProtocolError):
    """A line over the limit.

    ``pending`` false: the whole line was consumed (its newline seen), the next
    ``readline`` reads the next line. ``pending`` true: the line is still arriving;
    answer now, then ``LineReader.skip_line()`` discards the rest of it and says
    whether the next line can be read (else the connection should be closed).
    """

    def __init__(self, limit: int, *, pending: bool) -> None:
        super().__init__("too-large", f"request longer than {limit} bytes")
        self.pending = pending


@dataclass(frozen=True, slots=True)
class Request:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    token: str | None = None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _loads(data: bytes | str) -> Any:
    return json.loads(data, parse_constant=_refuse_constant)


def parse_request(line: bytes) -> Request:
    """Validate one request line (without its newline); ProtocolError if unusable."""
    if len(line) > MAX_REQUEST:
        raise ProtocolError("too-large", f"request longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad-request", "request is not valid JSON: not UTF-8 text"
                            ) from None
    try:
        obj = _loads(text)
    except (ValueError, RecursionError, TypeError) as exc:
        raise ProtocolError("bad-request", f"request is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad-request", "request must be a JSON object")
    if "v" not in obj:
        raise ProtocolError("bad-request", 'request lacks the protocol version "v"')
    version = obj["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported-version",
            f"protocol version {version!r} is not supported "
            f"(this daemon speaks version {PROTOCOL_VERSION}); upgrade empathctl or the daemon",
        )
    unknown = sorted(str(k) for k in obj.keys() - _REQUEST_KEYS)
    if unknown:
        raise ProtocolError("bad-request", f"unknown request field(s): {', '.join(unknown)}")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("bad-request", 'request lacks a command ("cmd": a string)')
    args = obj.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("bad-request", '"args" must be a JSON object')
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("bad-request", '"token" must be a string')
    return Request(cmd, args, token)


def _default(value: Any) -> Any:
    """JSON for the few non-JSON types results naturally contain."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(obj: Mapping[str, Any]) -> bytes:
    # ASCII: lone surrogates from surrogateescape'd addresses stay representable.
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, default=_default,
                      separators=(",", ":"))
    return text.encode("ascii") + b"\n"


def encode_result(result: Any, *, more: bool = False) -> bytes:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": True, "result": result}
    if more:
        obj["more"] = True
    return _dumps(obj)


def encode_error(code: str, message: str, detail: Any = None) -> bytes:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": False, "error": message, "code": code}
    if detail is not None:
        obj["detail"] = detail
    return _dumps(obj)


def encode_request(cmd: str, args: Mapping[str, Any] | None = None,
                   token: str | None = None) -> bytes:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "cmd": cmd, "args": dict(args or {})}
    if token is not None:
        obj["token"] = token
    return _dumps(obj)


def decode_response(line: bytes) -> dict[str, Any]:
    """Parse a response line; ValueError if it is not a response of our version."""
    try:
        obj = _loads(line)
    except (ValueError, RecursionError, TypeError) as exc:
        raise ValueError(f"garbled response from the daemon: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ValueError("garbled response from the daemon: not a response object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"the daemon speaks protocol version {obj.get('v')!r}, "
                         f"empathctl speaks {PROTOCOL_VERSION}")
    return obj


class LineReader:
    """Bounded line reading over an ``asyncio.StreamReader``.

    ``readline`` returns a line without its newline, or None at end of stream. A
    line longer than ``limit`` is never held in memory whole. As soon as more than
    ``limit`` bytes arrived without a newline, ``LineTooLong`` is raised with
    ``pending`` true, so the client can be told at once; ``skip_line`` then
    discards the rest of that line as it arrives (up to ``discard_limit`` more
    bytes) and returns True when the next line can be read, False when the
    discard limit or the end of stream came first (close the connection).
    """

    def __init__(self, reader: asyncio.StreamReader, limit: int,
                 *, discard_limit: int = 16 * 1024 * 1024) -> None:
        self._reader = reader
        self._limit = limit
        self._discard_limit = discard_limit
        self._buf = bytearray()
        self._eof = False
        self._skipping = 0  # bytes of an over-long line discarded so far

    async def readline(self) -> bytes | None:
        if self._skipping:
            raise RuntimeError("skip_line() the over-long line first")
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if len(line) > self._limit:
                    raise LineTooLong(self._limit, pending=False)
                return line
            if len(self._buf) > self._limit:
                self._skipping = len(self._buf)
                self._buf.clear()
                raise LineTooLong(self._limit, pending=True)
            if self._eof:
                if self._buf:  # a last request without newline: serve it
                    line = bytes(self._buf)
                    self._buf.clear()
                    return line
                return None
            chunk = await self._reader.read(65536)
            if not chunk:
                self._eof = True
            else:
                self._buf += chunk

    async def skip_line(self) -> bool:
        """Discard the rest of an over-long line; True if the next line can be read."""
        discarded, self._skipping = self._skipping, 0
        while discarded <= self._discard_limit and not self._eof:
            chunk = await self._reader.read(65536)
            if not chunk:
                break
            nl = chunk.find(b"\n")
            if nl >= 0:
                self._buf += chunk[nl + 1:]
                return True
            discarded += len(chunk)
        self._eof = True  # gave up, or the client is gone: the connection is finished
        return False
