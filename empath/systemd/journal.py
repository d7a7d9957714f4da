"""Logging to journald with structured fields (the native protocol).

A log call carries its facts as upper-case ``extra=`` keys (``QUEUE_ID``,
``EMPATH_EVENT``, ``CLIENT_ADDR``, ``RCPT_DOMAIN``, ``DSN_STATUS``, …); here they become
journal fields, so ``journalctl -u empath QUEUE_ID=…`` shows one message's life.

With systemd-python installed we send through ``systemd.journal.sendv`` (libsystemd);
without it a small stdlib writer speaks the same protocol to journald's socket:
``FIELD=value\\n`` per field, or for a value containing a newline
``FIELD\\n<64-bit little-endian length><value>\\n``; a datagram too large for the
socket goes as a sealed memfd, as libsystemd does.

``EMPATH_JOURNAL_SOCKET`` (test-only) points the stdlib writer at another socket so
tests can read what the daemon would have sent to journald.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping

from empath.systemd.events import message_id

__all__ = [
    "JOURNAL_SOCKET",
    "JournalHandler",
    "JournalWriter",
    "encode_fields",
    "extra_fields",
    "stderr_is_journal",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "empath"

# journald field names: upper-case letters, digits, underscore; no leading underscore
# (those are the trusted fields journald adds itself); at most 64 characters.
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Fields the handler owns; an ``extra=`` key cannot overwrite them.
_RESERVED = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"})

_PRIORITY = {  # syslog(3) levels
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def extra_fields(record: logging.LogRecord) -> dict[str, str]:
    """The record's structured fields: every upper-case attribute set via ``extra=``.

    LogRecord's own attributes are all lower-case, so upper case marks ours.
    """
    return {
        key: str(value)
        for key, value in vars(record).items()
        if value is not None and key not in _RESERVED and _FIELD.fullmatch(key)
    }


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when fd 2 is the stream systemd connected to journald.

    systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` for it; compared with fd 2 itself so
    that a redirected stderr (``empath run 2>file`` inside a unit) is not mistaken.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


def encode_fields(fields: Mapping[str, str]) -> bytes:
    """One native-protocol datagram."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalWriter:
    """The stdlib sender: datagrams to journald's native socket."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def send(self, fields: Mapping[str, str]) -> None:
        """Raises OSError when journald cannot be reached."""
        data = encode_fields(fields)
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        # journald accepts a sealed memfd passed with an empty datagram.
        assert self._sock is not None
        fd = os.memfd_create("empath-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _default_sender() -> Callable[[Mapping[str, str]], None]:
    override = os.environ.get("EMPATH_JOURNAL_SOCKET")
    if override:
        return JournalWriter(override).send
    try:
        journal = importlib.import_module("systemd.journal")  # systemd-python, optional
    except ImportError:
        return JournalWriter().send

    def send(fields: Mapping[str, str]) -> None:
        journal.sendv(*(f"{k}={v}" for k, v in fields.items()))

    return send


class JournalHandler(logging.Handler):
    """A logging handler that writes each record as one journal entry with fields.

    If journald cannot be reached the line goes to stderr instead (which, under
    systemd, is the journal's stream): a log line is never dropped silently.
    """

    def __init__(self, send: Callable[[Mapping[str, str]], None] | None = None,
                 identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self._send = send if send is not None else _default_sender()
        self.identifier = identifier
        self.setFormatter(logging.Formatter("%(message)s"))
        self.fallback: logging.Handler = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(
            logging.Formatter("%(levelname)s %(name)s[%(process)d]: %(message)s"))

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        fields.update(extra_fields(record))
        mid = message_id(fields.get("EMPATH_EVENT"))
        if mid is not None and "MESSAGE_ID" not in fields:
            fields["MESSAGE_ID"] = mid
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(fields)
        except OSError:
            self.fallback.handle(record)
