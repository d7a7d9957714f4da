"""Small value types shared by the delivery modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RcptResult", "RcptStatus", "Target"]

RcptStatus = Literal["delivered", "deferred", "bounced"]


@dataclass(frozen=True, slots=True)
class Target:
    """One server to try: ``name`` is the host name (for TLS verification and logs),
    ``address`` the IP to connect to (or an absolute socket path for LMTP)."""

    name: str
    address: str
    port: int
    preference: int = 0


@dataclass(frozen=True, slots=True)
class RcptResult:
    """The outcome of one attempt for one recipient.

    ``code`` is the SMTP reply code when a server answered (None for local, DNS and
    connection errors); ``enhanced`` always holds an RFC 3463 code, e.g. "4.4.1".
    """

    address: str
    status: RcptStatus
    enhanced: str
    text: str
    code: int | None = None
    remote_mta: str | None = None
    tls: str | None = None
    # For a delivered recipient, the RFC 3464 action a success DSN would report:
    # "delivered" (final: maildir, LMTP), "relayed" (handed to an SMTP server that
    # did not offer DSN), or None (the next hop took DSN over: NOTIFY was passed on,
    # so it, not we, reports success).
    success_action: Literal["delivered", "relayed"] | None = None

    @property
    def diagnostic(self) -> str:
        """``smtp; 550 5.1.1 text`` style, as RFC 3464's Diagnostic-Code wants."""
        if self.code is not None:
            return f"smtp; {self.code} {self.enhanced} {self.text}"
        return f"X-Empath; {self.text}"
