"""Logging setup: journald with structured fields under systemd, readable lines otherwise.

Log calls put their facts in the message for people and in upper-case ``extra=`` keys
for machines (``QUEUE_ID``, ``EMPATH_EVENT``, ``CLIENT_ADDR``, ``RCPT_DOMAIN``,
``DSN_STATUS``; see empath/systemd/events.py). Where they go:

- journald's native protocol, with those keys as journal fields, when stderr is the
  journal stream systemd gave us (``JOURNAL_STREAM``) or ``EMPATH_LOG=journal``;
- otherwise stderr, one line per event, the fields appended as ``KEY=value``.

``EMPATH_LOG=stderr`` forces the second. ``EMPATH_JOURNAL_SOCKET=PATH`` (test-only)
sends the journal entries to PATH instead of journald's socket. Workers inherit
stderr and the environment, so every process of the daemon decides the same way.
"""

from __future__ import annotations

import logging
import os
import sys

from empath.systemd.journal import JournalHandler, extra_fields, stderr_is_journal

__all__ = ["FieldsFormatter", "setup_logging", "use_journal"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Fields first in a stderr line, in this order; any others follow sorted.
_FIELD_ORDER = ("EMPATH_EVENT", "QUEUE_ID", "CLIENT_ADDR", "RCPT_DOMAIN", "DSN_STATUS")


class FieldsFormatter(logging.Formatter):
    """The stderr line: ``time LEVEL logger[pid]: message  KEY=value …``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        fields.pop("MESSAGE_ID", None)  # an opaque id helps nobody reading a terminal
        if not fields:
            return line
        keys = [k for k in _FIELD_ORDER if k in fields]
        keys += sorted(k for k in fields if k not in _FIELD_ORDER)
        text = " ".join(f"{k}={_quote(fields[k])}" for k in keys)
        head, nl, rest = line.partition("\n")  # a traceback stays below the line
        return f"{head}  {text}{nl}{rest}"


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "\n\t='):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def use_journal() -> bool:
    mode = os.environ.get("EMPATH_LOG", "").strip().lower()
    if mode == "journal":
        return True
    if mode == "stderr":
        return False
    return stderr_is_journal()


def setup_logging(level: str) -> None:
    """Install the handler (once per process) and set the level (every call)."""
    root = logging.getLogger()
    if not getattr(setup_logging, "_done", False):
        handler: logging.Handler
        if use_journal():
            handler = JournalHandler()
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(FieldsFormatter())
        root.handlers[:] = [handler]
        setup_logging._done = True  # type: ignore[attr-defined]
    root.setLevel(_LEVELS.get(level, logging.INFO))
