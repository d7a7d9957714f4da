"""Logging setup. Foreground: one line per event on stderr, ``key=value`` fields.

journald output with structured fields comes with the systemd integration; callers
already log ``event key=value`` lines so both can carry the same facts.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not getattr(setup_logging, "_done", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
        root.handlers[:] = [handler]
        setup_logging._done = True  # type: ignore[attr-defined]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiosmtpd logs every peer at INFO; our own session log says what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
