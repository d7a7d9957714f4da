"""sd_notify(3) in the standard library: one datagram per state change to $NOTIFY_SOCKET.

We do not need libsystemd for this, and the ``sdnotify`` package swallows every error
and encodes as Latin-1 (a STATUS= naming a UTF-8 domain would vanish), so this is
ours: a few lines, UTF-8, abstract ``@`` sockets, errors logged once.

Only the main process may notify: ``from_environ`` removes ``NOTIFY_SOCKET`` and the
``WATCHDOG_*`` variables from the environment (as ``sd_notify(unset_environment=1)``
does), so worker processes started later never see them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import MutableMapping

__all__ = ["NOTIFY_ENV", "Notifier", "monotonic_usec", "watchdog_interval"]

log = logging.getLogger("empath.systemd")

# What systemd hands the main process for sd_notify and the watchdog.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# A full notification socket must not stall the event loop for long; systemd reads
# its socket continuously, so this is only reached when something is badly wrong.
SEND_TIMEOUT = 1.0


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, the clock ``MONOTONIC_USEC=`` is read against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | None:
    """A socket address from $NOTIFY_SOCKET: a path, or ``@name`` for an abstract one."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not for us


def watchdog_interval(env: MutableMapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of WATCHDOG_USEC), or None.

    ``WATCHDOG_PID`` names the process systemd watches; when it is set and is not us
    the variables were inherited by accident and the watchdog is somebody else's.
    """
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class Notifier:
    """Sends sd_notify datagrams; does nothing when not started by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        """Take ``$NOTIFY_SOCKET`` and remove the notify variables from ``env``."""
        env = os.environ if env is None else env
        value = env.get("NOTIFY_SOCKET", "")
        for key in NOTIFY_ENV:
            env.pop(key, None)
        return cls(_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True if it was sent.

        Assignments in one datagram are applied together by systemd — ``RELOADING=1``
        must travel with its ``MONOTONIC_USEC=``.
        """
        if self.address is None or not assignments:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise flood the log
                self._warned = True
                log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
