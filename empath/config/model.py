"""Typed configuration objects. Built only by ``empath.config.load``; immutable.

Each field mirrors a key of ``/etc/empath/empath.yaml`` (see PRODUCT.md). Values are
already validated and normalised: domains are lower-case A-labels, networks are
``ipaddress`` objects, paths are absolute ``Path`` objects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["smtp", "submission"]
DeliveryMode = Literal["mx", "relay", "hold"]
TLSPolicy = Literal["none", "may", "encrypt", "verify"]
DNSSECPolicy = Literal["may", "require"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Listener:
    host: str  # literal IP address (IPv6 without brackets)
    port: int
    role: Role

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_connections: int = 1000
    per_client_connections: int = 20
    per_client_rate: int = 60  # new connections per minute per client address
    max_errors: int = 20
    min_free_space: int = 104_857_600
    # Seconds for each command line to arrive whole, counted from our previous reply
    # (RFC 5321 §4.5.3.2.7: 5 min); bytes trickling in do not extend it.
    command_timeout: float = 300.0
    # Seconds inside DATA for each further 64 KiB (or the final dot) to arrive
    # (RFC 5321 §4.5.3.2.6: 3 min); bytes trickling in do not extend it.
    data_timeout: float = 180.0
    # Seconds a session may last in all, however busy (slow-loris bound).
    max_session_time: float = 3600.0
    # Octets of the message's header section (before the first empty line).
    max_header_size: int = 1_048_576
    # Failed AUTH per client address within auth_failure_window seconds before the
    # session is dropped and the address refused (empath/smtp/auth.py).
    auth_failures: int = 5
    auth_failure_window: float = 600.0
    # Seconds each failed AUTH's reply waits, times the address's failures (capped at 5).
    auth_failure_delay: float = 1.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    certificate: Path
    key: Path


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    users_file: Path | None = None
    # A user may use only MAIL FROM addresses the users file gives them (or their login).
    sender_login_match: bool = False


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    tls: TLSPolicy = "may"
    max_connections: int | None = None
    rate: float | None = None  # messages per second
    # require: MX routing only on DNSSEC-authenticated answers, else defer (docs/dnssec.md)
    dnssec: DNSSECPolicy = "may"


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    mode: DeliveryMode = "hold"
    relayhost: str | None = None
    nameservers: tuple[str, ...] = ()
    routes: dict[str, str] = field(default_factory=dict)  # normalised domain → next hop
    destinations: dict[str, DestinationPolicy] = field(default_factory=dict)
    retry_schedule: tuple[int, ...] = (60, 300, 900, 1800, 3600)
    max_queue_lifetime: int = 432_000
    # Deliveries in flight at once, over all destinations.
    max_deliveries: int = 20
    # Send a delay warning (RFC 3464 "delayed") once a message is this old; None = never.
    delay_warning: int | None = None
    # Circuit breaker per next-hop host: open after this many consecutive connection
    # failures, probe again after the cooldown (seconds).
    breaker_failures: int = 5
    breaker_cooldown: int = 300
    # TCP port for delivery to MX hosts found by MX lookup (smtp:HOST means 25).
    # 25 in production; tests point it at their sinks' port.
    mx_port: int = 25


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: Path | None = None
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str | None = None
    bearer_token_file: Path | None = None
    web_config: Path | None = None


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    name: str  # entry point (group empath.modules), built-in, or package.module:Factory
    options: dict[str, Any] = field(default_factory=dict)
    # A failing module (raised, timed out) is skipped rather than tempfailing the client.
    fail_open: bool = False
    # Seconds each call may take (asyncio.timeout); then it counts as failing.
    timeout: float = 5.0


# ``dkim.<domain>.headers`` when unset: each is signed and oversigned (docs/dkim.md).
DKIM_DEFAULT_HEADERS = (
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding", "In-Reply-To", "References",
    # RFC 8058 §4: one-click unsubscribe needs both covered by the signature.
    "List-Unsubscribe", "List-Unsubscribe-Post",
)  # fmt: skip
# RFC 6376 §5.4.1: changed in transit, or not to be seen; never in a headers list.
DKIM_NEVER_SIGNED = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)


@dataclass(frozen=True, slots=True)
class Config:
    hostname: str
    postmaster: str
    state_dir: Path
    listen: tuple[Listener, ...] = ()
    local_domains: frozenset[str] = frozenset()
    relay_networks: tuple[IPNetwork, ...] = ()
    limits: Limits = field(default_factory=Limits)
    tls: TLSConfig | None = None
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    dkim: dict[str, Any] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    modules: tuple[ModuleSpec, ...] = ()
    # Number of SMTP worker processes sharing the listening sockets.
    workers: int = 2
    # Seconds SIGTERM waits for sessions in DATA before answering 421 to the rest.
    shutdown_timeout: float = 30.0
    # The file this was loaded from (None for the embedded default).
    source: Path | None = None

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"
